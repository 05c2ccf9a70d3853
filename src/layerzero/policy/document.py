"""Policy documents: YAML or JSON files (or dicts) with locks, allows, denies and boosts.

``lz.configure("policy.yaml")`` loads one through :func:`load_policy`::

    version: "1.0"
    locks:                                  # always run these operations on one kernel / backend
      - operation: "attention.*"
        kernel: torch_sdpa_flash
        condition: "sm >= 80 and dtype in ('float16', 'bfloat16')"
    denies:                                 # never run these
      - operation: "*"
        backends: ["xformers"]
        kernels: ["*_experimental"]
    allows:                                 # when present, only these may run (per operation)
      - operation: "rms_norm"
        backends: ["torch", "liger"]
    boosts:                                 # multiply a kernel's score (divide its measured time)
      - operation: "attention.*"
        backend: torch
        boost_factor: 2.0
        condition: "seq_len > 1024"

Every rule becomes a :class:`layerzero.policy.model.Rule` whose ``origin`` names
its place (``policy.yaml: locks[0]``), so traces say which rule fired. Validation
collects every problem with its path and raises them together as one
:class:`PolicyError`; nothing of an invalid document is applied. The reading
and field validators here are shared with the dispatch config schema
(:mod:`layerzero.policy.config_schema`).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from layerzero.errors import ConditionError, ConfigError, PolicyError
from layerzero.policy.conditions import Condition, compile_condition
from layerzero.policy.model import Policy, Rule
from layerzero.registry import KernelRegistry, operation_matches

__all__ = ["load_policy", "validate_policy", "read_document", "read_file_bounded", "parse_text", "Problems",
           "ConfigWarning", "MAX_DOCUMENT_BYTES", "SUPPORTED_VERSIONS", "POLICY_SECTIONS"]

MAX_DOCUMENT_BYTES = 1 << 20   # 1 MiB
MAX_NODES = 100_000            # containers and values in one document
MAX_DEPTH = 32                 # nesting of lists / mappings
MAX_RULES = 1000               # entries in one section
MAX_NAME = 200                 # characters in an operation / kernel / backend glob
SUPPORTED_VERSIONS = ("1.0",)
POLICY_SECTIONS = ("locks", "allows", "denies", "boosts")
_GLOB_CHARS = frozenset("*?[")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-*?[]!")


class ConfigWarning(UserWarning):
    """A policy or config document names something questionable that is not an error (by request)."""


class Problems:
    """Errors and warnings found while validating a document, each with its path."""

    def __init__(self, unknown_kernels: str = "error") -> None:
        if unknown_kernels not in ("error", "warn"):
            raise ConfigError(f"unknown_kernels must be 'error' or 'warn', got {unknown_kernels!r}")
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.unknown_kernels = unknown_kernels

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}" if path else message)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}" if path else message)

    def missing_kernel(self, path: str, message: str) -> None:
        (self.error if self.unknown_kernels == "error" else self.warn)(path, message)

    def __bool__(self) -> bool:
        return bool(self.errors)


# -- reading ------------------------------------------------------------------------------------------------

def read_document(source: str | os.PathLike[str] | Mapping[str, Any], *, error: type[ConfigError] = ConfigError
                  ) -> tuple[Any, str]:
    """Parse ``source`` into plain data and a label for origins and messages.

    A ``Mapping`` is used as is (label ``"dict"``). A path (``Path``, or a string naming an existing
    file or ending in ``.yaml``/``.yml``/``.json``) is read (at most ``MAX_DOCUMENT_BYTES``) and parsed
    as JSON (``.json``) or YAML (``yaml.safe_load``). Any other string is parsed as YAML/JSON text.
    YAML aliases are refused (a small file could otherwise expand into a huge one).
    """
    if isinstance(source, str) and "\n" not in source and ":" not in source and not _is_path(source):
        raise error(f"{source!r}: no such file (and not YAML/JSON document text)", source=source)
    if isinstance(source, Mapping):
        data: Any = source
        label = "dict"
        _check_shape(data, label, error)
        return data, label
    if isinstance(source, (str, os.PathLike)) and _is_path(source):
        path = Path(source)
        label = str(source)
        raw = read_file_bounded(path, label, error)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{label}: not UTF-8 text (byte {exc.start})", source=label) from None
        as_json = path.suffix.lower() == ".json"
    elif isinstance(source, str):
        label = "<text>"
        text = source
        as_json = text.lstrip().startswith("{")
    else:
        raise error(f"expected a path, YAML/JSON text or a mapping, got {type(source).__name__}", source=None)
    return parse_text(text, label, error=error, as_json=as_json), label


def read_file_bounded(path: Path, label: str, error: type[ConfigError] = ConfigError,
                      limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    The file is opened without blocking and checked on the open descriptor, so a FIFO, a device or a
    directory named as a document fails at once (a FIFO would otherwise block the reader forever).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{label}: file not found", source=label) from None
    except IsADirectoryError:
        raise error(f"{label}: is a directory, not a file", source=label) from None
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror or exc}", source=label) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{label}: is a directory, not a file", source=label)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{label}: not a regular file (a FIFO, socket or device cannot be a document)",
                        source=label)
        if st.st_size > limit:
            raise error(f"{label}: file is {st.st_size} bytes, more than the {limit} allowed", source=label)
        with os.fdopen(fd, "rb") as fh:
            fd = -1  # closed with fh
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror or exc}", source=label) from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(raw) > limit:
        raise error(f"{label}: file is larger than the {limit} bytes allowed", source=label)
    return raw


def parse_text(text: str, label: str, *, error: type[ConfigError] = ConfigError, as_json: bool = False) -> Any:
    """Parse document text (never treated as a path) with the same limits as :func:`read_document`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise error(f"{label}: document is larger than the {MAX_DOCUMENT_BYTES} bytes allowed", source=label)
    data = _parse(text, label, as_json, error)
    _check_shape(data, label, error)
    return data


def _is_path(source: str | os.PathLike[str]) -> bool:
    if not isinstance(source, str):
        return True
    if "\n" in source or len(source) > 4096:
        return False
    if source.lower().endswith((".yaml", ".yml", ".json")):
        return True
    try:
        return Path(source).is_file()
    except (OSError, ValueError):
        return False


def _parse(text: str, label: str, as_json: bool, error: type[ConfigError]) -> Any:
    try:
        if as_json:
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise error(f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=label) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{label}: invalid YAML{where}: {problem}", source=label) from None
    except RecursionError:
        raise error(f"{label}: document is nested too deeply", source=label) from None


def _check_shape(data: Any, label: str, error: type[ConfigError]) -> None:
    """Refuse shared sub-objects (YAML aliases), deep nesting and huge documents, without recursion."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise error(f"{label}: document has more than {MAX_NODES} values", source=label)
        if isinstance(value, (Mapping, list, tuple)):
            if depth >= MAX_DEPTH:
                raise error(f"{label}: document is nested more than {MAX_DEPTH} levels deep", source=label)
            if id(value) in seen:
                raise error(f"{label}: YAML anchors and aliases are not supported; write each value out",
                            source=label)
            seen.add(id(value))
            children = list(value.values()) + list(value.keys()) if isinstance(value, Mapping) else list(value)
            stack.extend((c, depth + 1) for c in children)


# -- field validators (shared with config_schema) --------------------------------------------------------------

def show(value: Any) -> str:
    """A short, safe rendering of a user value for messages."""
    if isinstance(value, (Mapping, list, tuple)):
        return f"a {'mapping' if isinstance(value, Mapping) else 'list'} of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return {int: "an int", float: "a float", str: "a string"}.get(type(value), type(value).__name__)


def check_keys(entry: Mapping[str, Any], allowed: tuple[str, ...], path: str, problems: Problems) -> None:
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.error(f"{path}.{key}" if path else str(key),
                           f"unknown key (expected one of: {', '.join(allowed)}){hint}")


def check_name(value: Any, path: str, problems: Problems, what: str = "name") -> str | None:
    """A non-empty operation / kernel / backend name or glob."""
    if not isinstance(value, str):
        problems.error(path, f"must be a string, got {show(value)}")
        return None
    if not value or len(value) > MAX_NAME:
        problems.error(path, f"must be a non-empty {what} of at most {MAX_NAME} characters")
        return None
    bad = sorted(set(value) - _NAME_CHARS)
    if bad:
        problems.error(path, f"{show(value)} contains characters not allowed in a {what}: {''.join(bad)!r}")
        return None
    return value


def check_name_list(value: Any, path: str, problems: Problems, what: str) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        problems.error(path, f"must be a list of {what} globs, got {show(value)} ({type_name(value)})")
        return None
    if not value:
        problems.error(path, f"must list at least one {what}")
        return None
    if len(value) > MAX_RULES:
        problems.error(path, f"has {len(value)} entries, at most {MAX_RULES} allowed")
        return None
    out = [check_name(v, f"{path}[{i}]", problems, what) for i, v in enumerate(value)]
    return None if any(v is None for v in out) else tuple(v for v in out if v is not None)


def is_glob(name: str) -> bool:
    return any(c in _GLOB_CHARS for c in name)


def could_serve(spec_operation: str, glob: str) -> bool:
    """Whether a kernel declared for ``spec_operation`` can serve some operation matched by ``glob``."""
    if not is_glob(glob):
        return operation_matches(spec_operation, glob) or glob == "*" or spec_operation.startswith(glob + ".")
    if fnmatch.fnmatchcase(spec_operation, glob) or fnmatch.fnmatchcase(spec_operation + ".x", glob):
        return True
    prefix = glob[: min(i for i, c in enumerate(glob) if c in _GLOB_CHARS)]
    return spec_operation.startswith(prefix) or prefix.startswith(spec_operation)


def check_kernel(kernel_id: str, path: str, problems: Problems, registry: KernelRegistry | None,
                 operation: str | None = None) -> None:
    """An exact kernel id must exist (error or warning by the flag) and serve ``operation``."""
    if registry is None or is_glob(kernel_id):
        return
    spec = registry.find(kernel_id)
    if spec is None:
        close = difflib.get_close_matches(kernel_id, [s.kernel_id for s in registry], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (layerzero list shows every kernel)"
        problems.missing_kernel(path, f"unknown kernel {kernel_id!r}{hint}")
    elif operation is not None and not could_serve(spec.operation, operation):
        problems.error(path, f"kernel {kernel_id!r} implements {spec.operation!r}, not {operation!r}")


def check_condition(value: Any, path: str, problems: Problems, *, per_kernel: bool) -> Condition | None:
    if value is None:
        return None
    try:
        return compile_condition(value, per_kernel=per_kernel)
    except ConditionError as err:
        problems.error(path, str(err))
        return None


def check_number(value: Any, path: str, problems: Problems, *, low: float, high: float, integer: bool = False,
                 low_inclusive: bool = True) -> float | None:
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        problems.error(path, f"must be {kind}, got {show(value)} ({type_name(value)})")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        problems.error(path, f"must be a finite number, got {value}")
        return None
    below = value < low if low_inclusive else value <= low
    if below or value > high:
        if low_inclusive:
            problems.error(path, f"must be between {low:g} and {high:g}, got {value}")
        else:
            problems.error(path, f"must be greater than {low:g} and at most {high:g}, got {value}")
        return None
    return value


def check_version(data: Mapping[str, Any], problems: Problems) -> None:
    if "version" not in data:
        problems.error("version", f"is required (version: \"{SUPPORTED_VERSIONS[-1]}\")")
        return
    v = data["version"]
    if isinstance(v, float) and not isinstance(v, bool) and f"{v:.1f}" in SUPPORTED_VERSIONS:
        return  # YAML reads `version: 1.0` as a float
    if v not in SUPPORTED_VERSIONS:
        problems.error("version", f"unsupported version {show(v)} (supported: {', '.join(SUPPORTED_VERSIONS)})")


def section_list(data: Mapping[str, Any], key: str, problems: Problems) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        problems.error(key, f"must be a list of rules, got {type_name(value)}")
        return []
    if len(value) > MAX_RULES:
        problems.error(key, f"has {len(value)} rules, at most {MAX_RULES} allowed")
        return []
    return value


# -- policy rules -------------------------------------------------------------------------------------------------

def lock_rule(entry: Any, path: str, origin: str, problems: Problems, registry: KernelRegistry | None) -> Rule | None:
    """``{operation, kernel | backend, condition}`` -> a lock rule."""
    if not _is_entry(entry, path, problems):
        return None
    check_keys(entry, ("operation", "kernel", "backend", "condition", "description"), path, problems)
    if "operation" not in entry:
        problems.error(f"{path}.operation", "is required (the operation glob to lock)")
    op = check_name(entry.get("operation"), f"{path}.operation", problems, "operation") if "operation" in entry else None
    kernel, backend = entry.get("kernel"), entry.get("backend")
    if (kernel is None) == (backend is None):
        problems.error(path, "needs exactly one of kernel or backend")
        return None
    if kernel is not None:
        kernel = check_name(kernel, f"{path}.kernel", problems, "kernel id")
        if kernel is not None:
            if is_glob(kernel):
                problems.error(f"{path}.kernel", f"must be one kernel id, not a glob ({kernel!r})")
                return None
            check_kernel(kernel, f"{path}.kernel", problems, registry, op)
    else:
        backend = check_name(backend, f"{path}.backend", problems, "backend")
    cond = check_condition(entry.get("condition"), f"{path}.condition", problems, per_kernel=False)
    if op is None or (kernel is None and backend is None):
        return None
    return Rule("lock", op, (kernel,) if kernel else (), (backend,) if backend else (), condition=cond,
                condition_source=entry.get("condition"), origin=origin)


def filter_rule(kind: str, entry: Any, path: str, origin: str, problems: Problems,
                registry: KernelRegistry | None) -> Rule | None:
    """``{operation, backends, kernels, condition}`` -> an allow or deny rule."""
    if not _is_entry(entry, path, problems):
        return None
    check_keys(entry, ("operation", "backends", "kernels", "condition", "description"), path, problems)
    op = check_name(entry.get("operation", "*"), f"{path}.operation", problems, "operation")
    if "backends" not in entry and "kernels" not in entry:
        problems.error(path, "needs backends and/or kernels (lists of globs)")
        return None
    backends = check_name_list(entry["backends"], f"{path}.backends", problems, "backend") \
        if "backends" in entry else ()
    kernels = check_name_list(entry["kernels"], f"{path}.kernels", problems, "kernel") if "kernels" in entry else ()
    for i, k in enumerate(kernels or ()):
        check_kernel(k, f"{path}.kernels[{i}]", problems, registry, op)
    cond = check_condition(entry.get("condition"), f"{path}.condition", problems, per_kernel=kind == "deny")
    if op is None or backends is None or kernels is None:
        return None
    return Rule(kind, op, kernels, backends, condition=cond, condition_source=entry.get("condition"), origin=origin)


def boost_rule(entry: Any, path: str, origin: str, problems: Problems, registry: KernelRegistry | None) -> Rule | None:
    """``{operation, backend | kernel, boost_factor, condition}`` -> a boost rule."""
    if not _is_entry(entry, path, problems):
        return None
    check_keys(entry, ("operation", "kernel", "backend", "boost_factor", "condition", "description"), path, problems)
    op = check_name(entry.get("operation", "*"), f"{path}.operation", problems, "operation")
    kernel, backend = entry.get("kernel"), entry.get("backend")
    if (kernel is None) == (backend is None):
        problems.error(path, "needs exactly one of kernel or backend")
    if kernel is not None:
        kernel = check_name(kernel, f"{path}.kernel", problems, "kernel id")
        if kernel is not None:
            check_kernel(kernel, f"{path}.kernel", problems, registry, op)
    if backend is not None:
        backend = check_name(backend, f"{path}.backend", problems, "backend")
    factor = None
    if "boost_factor" not in entry:
        problems.error(f"{path}.boost_factor", "is required (a number > 0; 2.0 doubles the score)")
    else:
        factor = check_number(entry["boost_factor"], f"{path}.boost_factor", problems, low=0.0, high=1e6,
                              low_inclusive=False)
    cond = check_condition(entry.get("condition"), f"{path}.condition", problems, per_kernel=True)
    if op is None or factor is None or (kernel is None) == (backend is None):
        return None
    return Rule("boost", op, (kernel,) if kernel else (), (backend,) if backend else (), factor=float(factor),
                condition=cond, condition_source=entry.get("condition"), origin=origin)


def _is_entry(entry: Any, path: str, problems: Problems) -> bool:
    if not isinstance(entry, Mapping):
        problems.error(path, f"must be a mapping, got {show(entry)} ({type_name(entry)})")
        return False
    return True


def validate_policy(data: Any, label: str = "dict", *, kernel_registry: KernelRegistry | None = None,
                    unknown_kernels: str = "error") -> tuple[Policy, Problems]:
    """Validate parsed policy data; returns the policy (meaningful only without errors) and the problems."""
    problems = Problems(unknown_kernels)
    if not isinstance(data, Mapping):
        problems.error("", f"a policy document must be a mapping with version: \"1.0\", got {type_name(data)}")
        return Policy(()), problems
    check_keys(data, ("version", "description", *POLICY_SECTIONS), "", problems)
    check_version(data, problems)
    if "description" in data and not isinstance(data["description"], str):
        problems.error("description", f"must be a string, got {type_name(data['description'])}")
    rules: list[Rule] = []
    for key in POLICY_SECTIONS:
        for i, entry in enumerate(section_list(data, key, problems)):
            path = f"{key}[{i}]"
            origin = f"{label}: {path}"
            if key == "locks":
                rule = lock_rule(entry, path, origin, problems, kernel_registry)
            elif key == "boosts":
                rule = boost_rule(entry, path, origin, problems, kernel_registry)
            else:
                rule = filter_rule("deny" if key == "denies" else "allow", entry, path, origin, problems,
                                   kernel_registry)
            if rule is not None:
                rules.append(rule)
    return Policy(tuple(rules)), problems


def load_policy(source: str | os.PathLike[str] | Mapping[str, Any], *, kernel_registry: KernelRegistry | None = None,
                unknown_kernels: str = "error") -> Policy:
    """Load and validate a policy document; used by ``lz.configure``.

    Args:
        source: a path (YAML or ``.json``), YAML/JSON text, or a mapping.
        kernel_registry: where named kernels are looked up (the global runtime's registry by default).
        unknown_kernels: ``"error"`` (default) or ``"warn"`` (a :class:`ConfigWarning` per unknown kernel id).

    A dispatch config (SPEC section 4: ``dispatch_rules``, ``kernel_locks``, ``fallback_chains``, ...) is
    accepted too and compiled into the same rules (see :mod:`layerzero.policy.config_schema`).

    Raises:
        PolicyError: with ``.errors`` listing every problem, each prefixed by its path.

    Example:
        >>> load_policy({"version": "1.0", "denies": [{"operation": "*", "kernels": ["torch_sdpa_math"]}]})
    """
    if kernel_registry is None:
        from layerzero.runtime import get_runtime

        kernel_registry = get_runtime().kernels
    data, label = read_document(source, error=PolicyError)
    from layerzero.policy.config_schema import CONFIG_SECTIONS, validate_config

    if isinstance(data, Mapping) and any(k in data for k in CONFIG_SECTIONS) and \
            not any(k in data for k in POLICY_SECTIONS):
        compiled, problems = validate_config(data, label, kernel_registry=kernel_registry,
                                             unknown_kernels=unknown_kernels)
        policy = compiled.policy if compiled is not None else Policy(())
    else:
        policy, problems = validate_policy(data, label, kernel_registry=kernel_registry,
                                           unknown_kernels=unknown_kernels)
    raise_problems(problems, label, "policy", PolicyError)
    return policy


def raise_problems(problems: Problems, label: str, what: str, error: type[ConfigError]) -> None:
    """Raise every error together (warnings are issued as :class:`ConfigWarning`)."""
    for w in problems.warnings:
        warnings.warn(f"{label}: {w}", ConfigWarning, stacklevel=3)
    if problems.errors:
        n = len(problems.errors)
        lines = [f"{label}: invalid {what} ({n} error{'s' if n != 1 else ''}):"]
        lines.extend(f"  {e}" for e in problems.errors)
        raise error("\n".join(lines), errors=list(problems.errors), source=label)
