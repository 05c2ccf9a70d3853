"""Reading config and policy files: a path, YAML/JSON text or a mapping into plain data, within bounds.

YAML is parsed with ``yaml.safe_load`` only, JSON with ``json.loads``. Files
are read without blocking and at most :data:`MAX_DOCUMENT_BYTES` of them;
YAML aliases, a key given twice in one mapping or object, deep nesting and
huge documents are refused. Nothing here knows
a schema: :mod:`layerzero.config_file.schema` and
:mod:`layerzero.config_file.policy_document` validate what this returns.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from layerzero.errors import ConfigError

__all__ = ["read_document", "read_file_bounded", "parse_text", "MAX_DOCUMENT_BYTES", "MAX_NODES", "MAX_DEPTH"]

MAX_DOCUMENT_BYTES = 1 << 20   # 1 MiB
MAX_NODES = 100_000            # containers and values in one document
MAX_DEPTH = 32                 # nesting of lists / mappings


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
        return Path(source).exists()  # a directory or a FIFO too: reading it says what it is
    except (OSError, ValueError):
        return False


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key given twice in one object is an error (the last would win silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice in one object")
        out[key] = value
    return out


def _yaml_structure_problem(text: str) -> str | None:
    """Why the YAML ``text`` is refused though it parses: a key given twice in one mapping (``yaml.safe_load``
    keeps the last: ``locks: [...]`` then ``locks: []`` would drop every lock without a word), or an alias (a
    node used twice: ``*name``, which also stops a billion laughs). Reads the composed nodes only (the loader
    ``yaml.safe_load`` uses, constructing only the scalar keys)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        return _node_problem(root, loader) if root is not None else None
    finally:
        loader.dispose()


def _node_problem(root: Any, loader: yaml.SafeLoader) -> str | None:
    """:func:`_yaml_structure_problem` over the composed nodes; a scalar key is compared by the value
    ``safe_load`` makes of it (``null`` and ``~``, ``true`` and ``yes``, ``1`` and ``0x1`` are one key there: the
    dict keeps the last), its text naming it."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            mark = node.start_mark
            return (f"YAML anchors and aliases are not supported; write each value out (the value anchored on line "
                    f"{mark.line + 1} is used again)")
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[Any, tuple[str, int]] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    made = loader.construct_object(key)
                    if made in keys:
                        text, line = keys[made]
                        same = repr(key.value) if text == key.value else f"{text!r} (as {key.value!r})"
                        return (f"the key {same} is given twice in one mapping (lines {line} and "
                                f"{key.start_mark.line + 1}); write it once")
                    keys[made] = (key.value, key.start_mark.line + 1)
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def _parse(text: str, label: str, as_json: bool, error: type[ConfigError]) -> Any:
    try:
        if as_json:
            return json.loads(text, object_pairs_hook=_no_duplicate_keys)
        data = yaml.safe_load(text)
        problem = _yaml_structure_problem(text)
        if problem is not None:
            raise error(f"{label}: {problem}", source=label)
        return data
    except json.JSONDecodeError as exc:
        raise error(f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=label) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{label}: invalid YAML{where}: {problem}", source=label) from None
    except RecursionError:
        raise error(f"{label}: document is nested too deeply", source=label) from None
    except ValueError as exc:  # a key twice in one JSON object (_no_duplicate_keys), or the YAML check's error
        if isinstance(exc, ConfigError):
            raise
        raise error(f"{label}: invalid JSON: {exc}", source=label) from None


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
            if id(value) in seen:  # one object in two places of a mapping given directly: read it once
                continue
            seen.add(id(value))
            children = list(value.values()) + list(value.keys()) if isinstance(value, Mapping) else list(value)
            stack.extend((c, depth + 1) for c in children)
