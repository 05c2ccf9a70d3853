"""The condition type checker: a syntax tree checked against the fields and compiled into a predicate.

Each name must be a known field (with a "did you mean" hint otherwise), and
``backend`` / ``kernel`` only where the rule is judged per kernel. Operands
must have comparable types (``sm >= 'x'`` fails), ordering comparisons take
numbers or tuples only, and literals compared with an enumerated field must be
among its choices (dtype aliases map to their names: ``fp16`` -> ``float16``).
What passes becomes a closure ``pred(env) -> bool``; at run time a field that
is unknown (``None``) never satisfies an ordering comparison.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Mapping
from typing import Any

from layerzero.policy.grammar.fields import DTYPE_ALIASES, PER_KERNEL_FIELDS, Field
from layerzero.policy.grammar.limits import GrammarFailure
from layerzero.policy.grammar.parser import Node

__all__ = ["Checker", "COMPARISONS", "Env", "Predicate"]

COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}

Env = Mapping[str, Any]
Predicate = Callable[[Env], Any]

_NUMERIC = ("int", "float")


def _lit_kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "tuple"


def _compatible(a: str, b: str) -> bool:
    return a == b or (a in _NUMERIC and b in _NUMERIC)


class Checker:
    """Checks and compiles trees against ``fields``; ``used`` collects the field names they read."""

    def __init__(self, fields: Mapping[str, Field], per_kernel: bool) -> None:
        self.fields = fields
        self.per_kernel = per_kernel
        self.used: set[str] = set()

    def field(self, node: Node) -> Field:
        name = node.value
        if name.startswith("__"):
            raise GrammarFailure(f"names starting with '__' are not allowed ({name!r})", node.pos)
        f = self.fields.get(name)
        if f is None:
            close = difflib.get_close_matches(name, list(self.fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close \
                else f"; known fields: {', '.join(sorted(self.fields))}"
            raise GrammarFailure(f"unknown field {name!r}{hint}", node.pos)
        if name in PER_KERNEL_FIELDS and not self.per_kernel:
            raise GrammarFailure(f"{name!r} is only known to rules judged per kernel (denies, boosts, prefer); "
                        "locks and allows are judged once per call", node.pos)
        self.used.add(name)
        return f

    def kind_of(self, node: Node) -> tuple[str, bool]:
        """(kind, may be None) of an operand."""
        if node.kind == "name":
            f = self.field(node)
            return f.kind, f.optional
        if node.kind == "lit":
            return _lit_kind(node.value), node.value is None
        if node.kind == "seq":
            return "seq", False
        return "bool", False

    def boolean(self, node: Node) -> Predicate:
        """Compile a node used as a truth value."""
        if node.kind == "or":
            parts = tuple(self.boolean(n) for n in node.items)
            return lambda env: any(p(env) for p in parts)
        if node.kind == "and":
            parts = tuple(self.boolean(n) for n in node.items)
            return lambda env: all(p(env) for p in parts)
        if node.kind == "not":
            inner = self.boolean(node.items[0])
            return lambda env: not inner(env)
        if node.kind == "cmp":
            return self.compare(node)
        if node.kind == "name":
            f = self.field(node)
            if f.kind != "bool":
                raise GrammarFailure(f"{node.value} is {_article(f.kind)}, not a condition; compare it "
                            f"(for example {node.value} {_example(f)})", node.pos)
            name = node.value
            return lambda env: env.get(name) is True
        if node.kind == "lit":
            if not isinstance(node.value, bool):
                raise GrammarFailure(f"{node.value!r} is not a condition (expected a comparison or True/False)",
                                     node.pos)
            value = node.value
            return lambda env: value
        raise GrammarFailure("a tuple or list is not a condition", node.pos)

    def compare(self, node: Node) -> Predicate:
        op = node.value
        left, right = node.items
        lkind, lnone = self.kind_of(left)
        if op in ("in", "not in"):
            if right.kind != "seq":
                raise GrammarFailure(f"the right side of {op!r} must be a tuple or list of values, "
                            "for example dtype in ('float16', 'bfloat16')", right.pos)
            if lkind == "seq":
                raise GrammarFailure(f"the left side of {op!r} must be a field or a value", left.pos)
            values = frozenset(self.member(left, lkind, lnone, item) for item in right.items)
            get = self.getter(left)
            if op == "in":
                return lambda env: _member(get(env), values)
            return lambda env: not _member(get(env), values)
        rkind, rnone = self.kind_of(right)
        if lkind == "seq" and rkind == "seq":
            raise GrammarFailure("compare a field with a value, not two tuples", node.pos)
        if op in ("==", "!="):
            ok = _compatible(lkind, rkind) or (lkind == "none" and rnone) or (rkind == "none" and lnone) \
                or (lkind == "tuple" and rkind == "seq") or (lkind == "seq" and rkind == "tuple") \
                or (lkind == "none" and rkind == "none")
        else:
            if "none" in (lkind, rkind):
                raise GrammarFailure(f"{op!r} cannot compare with None (use == None or != None)", node.pos)
            ok = (lkind in _NUMERIC and rkind in _NUMERIC) or {lkind, rkind} <= {"tuple", "seq"}
            if not ok and lkind == rkind == "str":
                raise GrammarFailure(f"{op!r} does not order strings; use ==, != or in", node.pos)
        if not ok:
            raise GrammarFailure(f"cannot compare {_describe(left, lkind)} with {_describe(right, rkind)} using {op!r}",
                        node.pos)
        lget = self.getter(left, right)
        rget = self.getter(right, left)
        fn = COMPARISONS[op]
        if op in ("==", "!="):
            return lambda env: fn(lget(env), rget(env))

        def ordered(env: Env) -> bool:
            a, b = lget(env), rget(env)
            if a is None or b is None:
                return False
            try:
                return bool(fn(a, b))
            except TypeError:  # a value of an unexpected type in the env: the rule does not apply
                return False

        return ordered

    def member(self, left: Node, lkind: str, lnone: bool, item: Node) -> Any:
        if item.kind == "seq":
            if lkind != "tuple":
                raise GrammarFailure(f"a tuple cannot be compared with {_describe(left, lkind)}", item.pos)
            return self.tuple_value(item)
        ikind = _lit_kind(item.value)
        if not (_compatible(lkind, ikind) or (ikind == "none" and lnone)):
            raise GrammarFailure(f"{item.value!r} ({ikind}) cannot be compared with {_describe(left, lkind)}", item.pos)
        return self.normalise(left, item)

    def tuple_value(self, node: Node) -> tuple[Any, ...]:
        out = []
        for item in node.items:
            if item.kind != "lit" or _lit_kind(item.value) not in _NUMERIC:
                raise GrammarFailure("compute-capability tuples hold numbers, for example (8, 0)", item.pos)
            out.append(item.value)
        return tuple(out)

    def normalise(self, field_node: Node, lit: Node) -> Any:
        """A literal compared with an enumerated field: check it, and map dtype aliases to names."""
        value = lit.value
        if field_node.kind != "name" or not isinstance(value, str):
            return value
        f = self.fields[field_node.value]
        if field_node.value == "dtype":
            if value.removeprefix("torch.") in DTYPE_ALIASES:
                return DTYPE_ALIASES[value.removeprefix("torch.")]
        elif f.choices is None or value in f.choices:
            return value
        choices = sorted(set(DTYPE_ALIASES.values())) if field_node.value == "dtype" else list(f.choices or ())
        raise GrammarFailure(f"{value!r} is not a known {field_node.value} (known: {', '.join(choices)})", lit.pos)

    def getter(self, node: Node, other: Node | None = None) -> Callable[[Env], Any]:
        if node.kind in ("cmp", "and", "or", "not"):
            return self.boolean(node)
        if node.kind == "name":
            name = node.value
            if self.fields[name].kind == "tuple":
                return lambda env: _as_tuple(env.get(name))
            return lambda env: env.get(name)
        if node.kind == "seq":
            value: Any = self.tuple_value(node)
        elif other is not None and other.kind == "name":
            value = self.normalise(other, node)
        else:
            value = node.value
        return lambda env: value


def _member(value: Any, values: frozenset[Any]) -> bool:
    if isinstance(value, list):
        value = tuple(value)
    try:
        return value in values
    except TypeError:
        return False


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _article(kind: str) -> str:
    return {"int": "an int", "float": "a float", "str": "a string", "tuple": "a tuple"}.get(kind, kind)


def _example(f: Field) -> str:
    if f.kind in _NUMERIC:
        return "> 0"
    if f.choices:
        return f"== {f.choices[0]!r}"
    return "!= None" if f.optional else "== '...'"


def _describe(node: Node, kind: str) -> str:
    if node.kind == "name":
        return f"{node.value} ({kind})"
    if node.kind == "lit":
        return f"{node.value!r} ({kind})"
    if node.kind == "seq":
        return "a tuple"
    return "a condition (bool)"
