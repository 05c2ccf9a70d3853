"""The condition parser: tokens into a syntax tree, by recursive descent.

Grammar::

    condition  := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") operand)*
    operand    := FIELD | literal | "(" or_expr ")" | "(" literals, ")" | "[" literals "]"
    literal    := int | float | 'string' | "string" | True | False | None   (true/false/null too)

A chain ``a < b < c`` becomes ``a < b and b < c``. Calls, attribute access and
subscripts fail here with their own message; nesting is bounded. Names are
not looked up yet: the checker does that. :func:`value_tree` builds the same
tree from structured data (a config file's ``batch_size_gte: 8``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from layerzero.policy.grammar.lexer import CONSTANTS, KEYWORDS, Token
from layerzero.policy.grammar.limits import INT_LIMIT, LIMITS, GrammarFailure

__all__ = ["Node", "Parser", "parse", "value_tree"]


@dataclass(frozen=True, slots=True)
class Node:
    """A syntax-tree node: ``kind`` is name, lit, seq, not, and, or or cmp."""

    kind: str            # name lit seq not and or cmp
    pos: int
    value: Any = None    # field name, literal value, compare op
    items: tuple[Node, ...] = ()


class Parser:
    """Recursive descent over a token list; :meth:`parse` returns the root node."""

    def __init__(self, toks: list[Token]) -> None:
        self.toks = toks
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> Token:
        t = self.toks[self.i]
        self.i += 1
        return t

    def is_word(self, word: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t.kind == "NAME" and t.value == word

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > LIMITS["depth"]:
            raise GrammarFailure(f"expression is nested too deeply (at most {LIMITS['depth']} levels)", pos)

    def parse(self) -> Node:
        node = self.or_expr()
        t = self.peek()
        if t.kind != "EOF":
            raise GrammarFailure(f"unexpected {_show(t)} (expected 'and', 'or', a comparison or the end)", t.pos)
        return node

    def or_expr(self) -> Node:
        first = self.and_expr()
        items = [first]
        while self.is_word("or"):
            self.take()
            items.append(self.and_expr())
        return first if len(items) == 1 else Node("or", first.pos, None, tuple(items))

    def and_expr(self) -> Node:
        first = self.not_expr()
        items = [first]
        while self.is_word("and"):
            self.take()
            items.append(self.not_expr())
        return first if len(items) == 1 else Node("and", first.pos, None, tuple(items))

    def not_expr(self) -> Node:
        if self.is_word("not"):
            t = self.take()
            self.enter(t.pos)
            inner = self.not_expr()
            self.depth -= 1
            return Node("not", t.pos, None, (inner,))
        return self.comparison()

    def comparison(self) -> Node:
        left = self.operand()
        parts: list[Node] = []
        while True:
            t = self.peek()
            if t.kind == "OP":
                op = self.take().value
            elif self.is_word("in"):
                op = "in"
                self.take()
            elif self.is_word("not") and self.is_word("in", 1):
                op = "not in"
                self.take()
                self.take()
            else:
                break
            right = self.operand()
            parts.append(Node("cmp", t.pos, op, (left, right)))
            left = right
        if not parts:
            return left
        return parts[0] if len(parts) == 1 else Node("and", parts[0].pos, None, tuple(parts))

    def operand(self) -> Node:
        t = self.take()
        if t.kind == "NAME":
            if t.value in CONSTANTS:
                return Node("lit", t.pos, CONSTANTS[t.value])
            if t.value in KEYWORDS:
                raise GrammarFailure(f"expected a field or a value, got {t.value!r}", t.pos)
            self.no_postfix()
            return Node("name", t.pos, t.value)
        if t.kind in ("NUM", "STR"):
            self.no_postfix()
            return Node("lit", t.pos, t.value)
        if t.kind == "-":
            num = self.peek()
            if num.kind != "NUM":
                raise GrammarFailure("'-' may only precede a number (arithmetic is not allowed)", t.pos)
            self.take()
            return Node("lit", t.pos, -num.value)
        if t.kind == "(":
            self.enter(t.pos)
            if self.peek().kind == ")":
                self.take()
                self.depth -= 1
                self.no_postfix()
                return Node("seq", t.pos, None, ())
            inner = self.or_expr()
            if self.peek().kind == ",":
                node = self.sequence(t, inner, ")")
            else:
                self.expect(")", t)
                node = inner
            self.depth -= 1
            self.no_postfix()
            return node
        if t.kind == "[":
            self.enter(t.pos)
            if self.peek().kind == "]":
                self.take()
                node = Node("seq", t.pos, None, ())
            else:
                node = self.sequence(t, self.or_expr(), "]")
            self.depth -= 1
            self.no_postfix()
            return node
        if t.kind == "EOF":
            raise GrammarFailure("condition ends where a field or a value was expected", t.pos)
        raise GrammarFailure(f"unexpected {_show(t)} (expected a field or a value)", t.pos)

    def sequence(self, opener: Token, first: Node, close: str) -> Node:
        items = [first]
        while self.peek().kind == ",":
            self.take()
            if self.peek().kind == close:
                break
            items.append(self.or_expr())
            if len(items) > LIMITS["sequence_size"]:
                raise GrammarFailure(f"too many elements (at most {LIMITS['sequence_size']})", opener.pos)
        self.expect(close, opener)
        for item in items:
            if item.kind not in ("lit", "seq"):
                raise GrammarFailure("tuple and list elements must be literal values", item.pos)
        return Node("seq", opener.pos, None, tuple(items))

    def expect(self, kind: str, opener: Token) -> None:
        t = self.peek()
        if t.kind != kind:
            raise GrammarFailure(f"expected {kind!r} to close {opener.value!r} at position {opener.pos}, "
                                 f"got {_show(t)}", t.pos)
        self.take()

    def no_postfix(self) -> None:
        t = self.peek()
        if t.kind == "(":
            raise GrammarFailure("function calls are not allowed", t.pos)
        if t.kind == ".":
            raise GrammarFailure("attribute access is not allowed", t.pos)
        if t.kind == "[":
            raise GrammarFailure("subscripts are not allowed", t.pos)


def _show(t: Token) -> str:
    return t.text if t.kind == "EOF" else repr(t.text)


def parse(tokens: list[Token]) -> Node:
    """The syntax tree of ``tokens`` (from :func:`~layerzero.policy.grammar.lexer.tokenize`).

    Raises:
        GrammarFailure: a syntax error, a forbidden construct or nesting beyond the limit.
    """
    return Parser(tokens).parse()


def value_tree(value: Any) -> Node:
    """The literal node (or tuple node) of a structured value, bounded like a literal in a condition."""
    if isinstance(value, (list, tuple)):
        if len(value) > LIMITS["sequence_size"]:
            raise GrammarFailure(f"too many values ({len(value)}, at most {LIMITS['sequence_size']})", 0)
        return Node("seq", 0, None, tuple(value_tree(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, str) and len(value) > LIMITS["string_length"]:
            raise GrammarFailure(f"string is too long (at most {LIMITS['string_length']} characters)", 0)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
            raise GrammarFailure(f"integer {value} is out of range (|n| < 2**63)", 0)
        if isinstance(value, float) and not math.isfinite(value):
            raise GrammarFailure(f"number {value} is not finite", 0)
        return Node("lit", 0, value)
    raise GrammarFailure("values must be numbers, strings, booleans, null or lists of them, "
                         f"got {type(value).__name__}", 0)
