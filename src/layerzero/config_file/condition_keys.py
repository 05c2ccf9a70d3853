"""The ``conditions:`` of a dispatch rule: an expression, or a mapping of suffixed field keys.

``{batch_size_gte: 8, dtype: [float16, bfloat16], operation_match: "^attention"}``
compiles, key by key, through the condition grammar
(:func:`~layerzero.policy.conditions.compile_comparison`; values are
type-checked, never parsed as text) and :mod:`~layerzero.config_file.regex_check`
for ``_match``, into one :class:`~layerzero.policy.conditions.Condition`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from layerzero.config_file.problems import Problems
from layerzero.config_file.regex_check import REGEX_LIMITS, compile_safe_regex
from layerzero.config_file.validate import show, type_name
from layerzero.errors import ConditionError
from layerzero.policy.conditions import (
    FIELDS,
    PER_KERNEL_FIELDS,
    Condition,
    all_of,
    compile_comparison,
    compile_condition,
)

__all__ = ["compile_conditions", "split_condition_key", "CONDITION_SUFFIXES", "MAX_CONDITIONS"]

# Longest suffixes first, so `_not_in` is not read as `_in` and `_gte` not as `_gt`... of field `x_g`.
CONDITION_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_not_in", "not in"), ("_match", "match"), ("_gte", ">="), ("_lte", "<="), ("_eq", "=="), ("_ne", "!="),
    ("_gt", ">"), ("_lt", "<"), ("_in", "in"),
)
MAX_CONDITIONS = 64


def _regex_condition(fieldname: str, pattern: Any, source: str, per_kernel: bool) -> Condition:
    f = FIELDS.get(fieldname)
    if f is None or f.kind != "str":
        raise ConditionError(f"_match needs a string field, and {fieldname} is "
                             f"{'unknown' if f is None else 'a ' + f.kind}", expression=source)
    if fieldname in PER_KERNEL_FIELDS and not per_kernel:
        raise ConditionError(f"{fieldname!r} is only known to rules judged per kernel", expression=source)
    try:
        rx = compile_safe_regex(pattern)
    except ValueError as exc:
        raise ConditionError(str(exc), expression=source) from None
    limit = REGEX_LIMITS["subject_length"]
    search = rx.search

    def matches(env: Mapping[str, Any]) -> bool:
        value = env.get(fieldname)
        return isinstance(value, str) and len(value) <= limit and search(value) is not None

    return Condition(source, frozenset({fieldname}), matches)


def split_condition_key(key: str) -> tuple[str, str | None] | None:
    """``"batch_size_gte"`` -> ``("batch_size", ">=")``; a bare field -> ``(field, None)``; unknown -> None."""
    if key in FIELDS:
        return key, None
    for suffix, op in CONDITION_SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in FIELDS:
            return key[: -len(suffix)], op
    return None


def compile_conditions(value: Any, path: str, problems: Problems, *, per_kernel: bool = True) -> Condition | None:
    """A ``conditions`` value: an expression string, or a mapping of suffixed field keys to values."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return compile_condition(value, per_kernel=per_kernel)
        except ConditionError as err:
            problems.error(path, str(err))
            return None
    if not isinstance(value, Mapping):
        problems.error(path, f"must be a mapping of field conditions or an expression string, got {type_name(value)}")
        return None
    if len(value) > MAX_CONDITIONS:
        problems.error(path, f"has {len(value)} conditions, at most {MAX_CONDITIONS} allowed")
        return None
    parts: list[Condition] = []
    ok = True
    for key, v in value.items():
        kpath = f"{path}.{key}"
        parsed = split_condition_key(key) if isinstance(key, str) else None
        if parsed is None:
            close = difflib.get_close_matches(str(key), list(FIELDS), n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            problems.error(kpath, "unknown condition: expected a field name, optionally with one of the suffixes "
                                  f"{', '.join(s for s, _ in CONDITION_SUFFIXES)}{hint}")
            ok = False
            continue
        fname, op = parsed
        if op is None:
            op = "in" if isinstance(v, list) else "=="
        try:
            if op == "match":
                parts.append(_regex_condition(fname, v, f"{fname} matches {show(v)}", per_kernel))
            else:
                parts.append(compile_comparison(fname, op, v, per_kernel=per_kernel))
        except ConditionError as err:
            problems.error(kpath, str(err))
            ok = False
    if not ok:
        return None
    source = " and ".join(c.source for c in parts) or "True"
    return parts[0] if len(parts) == 1 else all_of(parts, source)
