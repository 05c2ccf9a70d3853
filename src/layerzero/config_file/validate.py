"""Field validators shared by the policy-document and dispatch-config schemas.

Each checks one value (a name or glob, a number in a range, a kernel id
against the registry, a condition, the ``version``, a section's list), adds
what is wrong to :class:`~layerzero.config_file.problems.Problems` under the
value's path (``dispatch_rules[0].priority``) and returns the value, or
``None`` when it is unusable.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

from layerzero.config_file.problems import Problems
from layerzero.errors import ConditionError
from layerzero.policy.conditions import Condition, compile_condition
from layerzero.registry import KernelRegistry, operation_matches

__all__ = ["show", "type_name", "check_keys", "check_name", "check_name_list", "is_glob", "could_serve",
           "check_kernel", "check_condition", "check_number", "check_version", "section_list",
           "MAX_RULES", "MAX_NAME", "SUPPORTED_VERSIONS"]

MAX_RULES = 1000               # entries in one section
MAX_NAME = 200                 # characters in an operation / kernel / backend glob
SUPPORTED_VERSIONS = ("1.0",)
_GLOB_CHARS = frozenset("*?[")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-*?[]!")


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


def backend_problem(backend: str, registry: KernelRegistry | None) -> str | None:
    """Why ``backend`` (a name or glob) names no backend of ``registry``'s kernels, or None (also without a
    registry): a rule on a misspelled backend matches nothing (a lock on it breaks every call it covers)."""
    if registry is None:
        return None
    names = sorted({s.backend for s in registry})
    if any(fnmatch.fnmatchcase(name, backend) for name in names):
        return None
    close = difflib.get_close_matches(backend, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f" (the backends: {', '.join(names)})"
    return f"no backend {backend!r} has kernels{hint}"


def check_backend(backend: str, path: str, problems: Problems, registry: KernelRegistry | None) -> None:
    """A backend name or glob must name a backend of some registered kernel (error or warning by the flag, as
    an unknown kernel id)."""
    problem = backend_problem(backend, registry)
    if problem is not None:
        problems.missing_kernel(path, problem)


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
