"""The policy condition grammar: a small, safe expression language over context fields.

Conditions steer policy rules: ``"sm >= 80 and batch_size >= 8"``,
``"dtype in ('float16', 'bfloat16')"``, ``"not is_causal"``. They are parsed
by our own tokenizer and recursive-descent parser (never ``eval``, never
``ast``), type-checked against the field list, and compiled once into a
predicate ``pred(env) -> bool`` over :func:`layerzero.policy.model.condition_env`.

This module is the public face of the grammar; the stages live in
:mod:`layerzero.policy.grammar`: ``lexer`` (text to tokens), ``parser``
(tokens to a tree), ``checker`` (types, then a predicate), ``fields`` (the
names a condition may use) and ``limits`` (size bounds).

Grammar::

    condition  := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") operand)*
    operand    := FIELD | literal | "(" or_expr ")" | "(" literals, ")" | "[" literals "]"
    literal    := int | float | 'string' | "string" | True | False | None   (true/false/null too)

There are no calls, no attribute access, no subscripts, no arithmetic and no
operators beyond the comparisons; anything else is a :class:`ConditionError`
naming the position, with a caret line. Sizes are bounded (see ``LIMITS``).

At run time a field that is unknown for a call (``None``) never satisfies an
ordering comparison: ``batch_size >= 8`` is false when the batch size is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerzero.errors import ConditionError
from layerzero.policy.grammar.checker import COMPARISONS, Checker, Env, Predicate
from layerzero.policy.grammar.fields import FIELDS, PER_KERNEL_FIELDS, Field, describe_fields
from layerzero.policy.grammar.lexer import tokenize
from layerzero.policy.grammar.limits import LIMITS, GrammarFailure
from layerzero.policy.grammar.parser import Node, parse, value_tree

__all__ = ["compile_condition", "compile_comparison", "all_of", "Condition", "Field", "FIELDS", "PER_KERNEL_FIELDS",
           "LIMITS", "describe_fields"]


class Condition:
    """A compiled condition: call it with an env (``condition_env(ctx, operation, spec)``) to get a bool.

    ``source`` is the text; ``fields`` the field names it reads.
    """

    __slots__ = ("source", "fields", "_fn")

    def __init__(self, source: str, fields: frozenset[str], fn: Predicate) -> None:
        self.source = source
        self.fields = fields
        self._fn = fn

    def __call__(self, env: Env) -> bool:
        return bool(self._fn(env))

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"


def compile_condition(text: str, *, per_kernel: bool = True, fields: Mapping[str, Field] | None = None,
                      where: str = "") -> Condition:
    """Parse, type-check and compile a condition once.

    Args:
        text: the expression, for example ``"sm >= 80 and batch_size >= 8"``.
        per_kernel: whether the rule is judged per candidate kernel (``backend`` / ``kernel`` usable).
        fields: the names the condition may use (default :data:`FIELDS`).
        where: what the condition belongs to, prefixed to error messages (``"policy.yaml: locks[0].condition"``).

    Raises:
        ConditionError: syntax errors, unknown fields, type mismatches, forbidden constructs, oversize input;
            the message names the position and shows a caret line.

    Example:
        >>> pred = compile_condition("sm >= 80 and dtype in ('float16', 'bfloat16')")
        >>> pred({"sm": 90, "dtype": "bfloat16"})
        True
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(text, str):
        raise ConditionError(f"{prefix}condition must be a string, got {type(text).__name__}", expression=repr(text))
    if len(text) > LIMITS["expression_length"]:
        raise ConditionError(f"{prefix}condition is too long ({len(text)} characters, at most "
                             f"{LIMITS['expression_length']})", expression=text[:80] + "...", position=0)
    if not text.strip():
        raise ConditionError(f"{prefix}condition is empty", expression=text, position=0)
    compiler = Checker(FIELDS if fields is None else fields, per_kernel)
    try:
        tree = parse(tokenize(text))
        fn = compiler.boolean(tree)
    except GrammarFailure as fail:
        raise ConditionError(f"{prefix}{_caret(text, fail.message, fail.pos)}", expression=text,
                             position=fail.pos) from None
    except RecursionError:  # defensive: the depth limit should make this unreachable
        raise ConditionError(f"{prefix}condition is nested too deeply", expression=text, position=0) from None
    return Condition(text, frozenset(compiler.used), fn)


def compile_comparison(field: str, op: str, value: Any, *, per_kernel: bool = True,
                       fields: Mapping[str, Field] | None = None) -> Condition:
    """Compile ``field <op> value`` from structured data (config files' ``batch_size_gte: 8``).

    ``op`` is one of ``== != < <= > >= in not in``; the value is type-checked like a literal in a
    condition. Nothing is parsed from text, so a value can never inject syntax.

    Raises:
        ConditionError: unknown field, unknown operator or a value of the wrong type.
    """
    shown = f"{field} {op} {value!r}"
    compiler = Checker(FIELDS if fields is None else fields, per_kernel)
    try:
        if op not in COMPARISONS and op not in ("in", "not in"):
            raise GrammarFailure(f"unknown operator {op!r}", 0)
        if op in ("in", "not in") and not isinstance(value, (list, tuple)):
            raise GrammarFailure(f"{op!r} needs a list of values, got {type(value).__name__}", 0)
        node = Node("cmp", 0, op, (Node("name", 0, field), value_tree(value)))
        fn = compiler.boolean(node)
    except GrammarFailure as fail:
        raise ConditionError(fail.message, expression=shown, position=0) from None
    return Condition(shown, frozenset(compiler.used), fn)


def all_of(conditions: list[Condition], source: str) -> Condition:
    """One condition that holds when every one of ``conditions`` holds."""
    parts = tuple(conditions)
    used = frozenset().union(*(c.fields for c in parts)) if parts else frozenset()
    return Condition(source, used, lambda env: all(c(env) for c in parts))


def _caret(text: str, message: str, pos: int) -> str:
    """``message at position N`` plus the expression (a window of it when long) and a caret under ``pos``."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    start = max(0, pos - 60)
    end = min(len(flat), max(pos + 20, start + 80))
    shown = ("..." if start else "") + flat[start:end] + ("..." if end < len(flat) else "")
    offset = pos - start + (3 if start else 0)
    return f"{message} at position {pos}\n    {shown}\n    {' ' * offset}^"

