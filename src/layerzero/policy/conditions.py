"""The policy condition grammar: a small, safe expression language over context fields.

Conditions steer policy rules: ``"sm >= 80 and batch_size >= 8"``,
``"dtype in ('float16', 'bfloat16')"``, ``"not is_causal"``. They are parsed
by our own tokenizer and recursive-descent parser (never ``eval``, never
``ast``), type-checked against the field list below, and compiled once into
a predicate ``pred(env) -> bool`` over :func:`layerzero.policy.model.condition_env`.

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

import difflib
import keyword
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from layerzero.errors import ConditionError

__all__ = ["compile_condition", "compile_comparison", "all_of", "Condition", "Field", "FIELDS", "PER_KERNEL_FIELDS", "LIMITS", "describe_fields"]


@dataclass(frozen=True, slots=True)
class Field:
    """A name a condition may use. ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``tuple``."""

    kind: str
    optional: bool
    doc: str
    choices: tuple[str, ...] | None = None


_DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                  "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32",
                  "float64": "float64", "fp64": "float64", "double": "float64", "int64": "int64",
                  "int32": "int32", "bool": "bool"}
_PLATFORMS = ("cpu", "cuda", "mps", "xpu", "hip", "hpu", "mtia", "meta", "xla", "privateuseone")

FIELDS: dict[str, Field] = {
    "platform": Field("str", False, "device type: 'cuda', 'cpu', 'mps', ...", _PLATFORMS),
    "device": Field("str", False, "device string: 'cuda:0', 'cpu'"),
    "device_index": Field("int", True, "device index (None when not given)"),
    "sm": Field("int", False, "compute capability as an integer: 80, 90; 0 on a CPU"),
    "compute_capability": Field("tuple", True, "compute capability as a pair: compute_capability >= (8, 0)"),
    "dtype": Field("str", True, "dtype by name: 'float16', 'bfloat16', 'float32' (fp16/bf16 accepted)",
                   tuple(sorted(set(_DTYPE_ALIASES)))),
    "batch_size": Field("int", True, "batch size"),
    "seq_len": Field("int", True, "query sequence length (same as seq_len_q)"),
    "seq_len_q": Field("int", True, "query sequence length"),
    "seq_len_k": Field("int", True, "key/value sequence length"),
    "num_heads": Field("int", True, "query heads"),
    "num_kv_heads": Field("int", True, "key/value heads (fewer than num_heads: GQA/MQA)"),
    "head_dim": Field("int", True, "query/key head dimension"),
    "head_dim_v": Field("int", True, "value head dimension"),
    "hidden_size": Field("int", True, "last dimension of norms, activations and sampling"),
    "num_tokens": Field("int", True, "rows of norms, activations and sampling"),
    "layout": Field("str", True, "attention layout: 'BHSD' or 'BSHD'", ("BHSD", "BSHD")),
    "is_causal": Field("bool", False, "causal attention"),
    "mask_kind": Field("str", False, "attention mask: 'none', 'bool', 'additive'", ("none", "bool", "additive")),
    "dropout_p": Field("float", False, "attention dropout probability"),
    "scale": Field("float", True, "softmax scale (None: 1/sqrt(head_dim))"),
    "window": Field("int", True, "sliding-window size (None: no window)"),
    "requires_grad": Field("bool", False, "inputs require grad"),
    "deterministic": Field("bool", False, "torch.use_deterministic_algorithms(True) is on"),
    "is_contiguous": Field("bool", False, "inputs are contiguous in the last dimension"),
    "cuda_graph_capturing": Field("bool", False, "a CUDA graph is being captured"),
    "compiling": Field("bool", False, "torch.compile is tracing"),
    "interleaved": Field("bool", False, "rope: interleaved pairs"),
    "approximate": Field("str", False, "gelu approximation: 'none' or 'tanh'", ("none", "tanh")),
    "tp_size": Field("int", False, "tensor-parallel world size"),
    "tp_rank": Field("int", False, "tensor-parallel rank"),
    "operation": Field("str", False, "the operation being selected: 'attention.causal', 'rms_norm', ..."),
    "backend": Field("str", True, "the candidate kernel's backend (denies, boosts and prefer only)"),
    "kernel": Field("str", True, "the candidate kernel's id (denies, boosts and prefer only)"),
}

PER_KERNEL_FIELDS = frozenset({"backend", "kernel"})

LIMITS: dict[str, int] = {
    "expression_length": 2000,   # characters
    "tokens": 400,
    "depth": 24,                 # nested parentheses / brackets / not
    "string_length": 256,        # characters in one string literal
    "number_length": 24,         # characters in one number literal
    "sequence_size": 64,         # elements of one tuple/list literal
}

_INT_LIMIT = 2**63
_DIGITS = "0123456789"  # str.isdigit() would accept '²' and other non-ASCII digits
_KEYWORDS = {"and", "or", "not", "in"}
_CONSTANTS: dict[str, Any] = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_HINTS = {"&": "use 'and'", "|": "use 'or'", "!": "use 'not' (or '!=')", "=": "use '==' to compare",
          "*": "arithmetic is not allowed", "+": "arithmetic is not allowed", "/": "arithmetic is not allowed",
          "%": "arithmetic is not allowed", ":": "lambdas and slices are not allowed",
          "{": "dicts and sets are not allowed", "}": "dicts and sets are not allowed",
          "@": "decorators and matrix products are not allowed", "`": "backticks are not allowed",
          ";": "only one expression is allowed", "~": "bitwise operators are not allowed",
          "^": "bitwise operators are not allowed"}

Env = Mapping[str, Any]
Predicate = Callable[[Env], Any]


# -- tokens ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str   # NUM STR NAME OP ( ) [ ] , - . EOF
    value: Any
    pos: int
    text: str = ""


class _Fail(Exception):
    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if len(toks) >= LIMITS["tokens"]:
            raise _Fail(f"too many tokens (at most {LIMITS['tokens']})", i)
        if c.isascii() and (c.isalpha() or c == "_"):
            j = i + 1
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            if word not in _KEYWORDS and word not in _CONSTANTS and (keyword.iskeyword(word)
                                                                     or keyword.issoftkeyword(word)):
                hint = " (use == or !=)" if word == "is" else ""
                raise _Fail(f"{word!r} is not allowed in conditions{hint}", i)
            toks.append(_Tok("NAME", word, i, word))
            i = j
        elif (c in _DIGITS) or (c == "." and i + 1 < n and (text[i + 1] in _DIGITS)):
            i = _number(text, i, toks)
        elif c in "'\"":
            i = _string(text, i, toks)
        elif text.startswith(("==", "!=", "<=", ">="), i):
            toks.append(_Tok("OP", text[i:i + 2], i, text[i:i + 2]))
            i += 2
        elif c in "<>":
            toks.append(_Tok("OP", c, i, c))
            i += 1
        elif c in "()[],-.":
            toks.append(_Tok(c, c, i, c))
            i += 1
        else:
            hint = _HINTS.get(c)
            shown = repr(c) if c.isprintable() else f"U+{ord(c):04X}"
            raise _Fail(f"unexpected character {shown}" + (f" ({hint})" if hint else ""), i)
    toks.append(_Tok("EOF", None, n, "end of condition"))
    return toks


def _number(text: str, i: int, toks: list[_Tok]) -> int:
    j, n = i, len(text)
    while j < n and ((text[j] in _DIGITS) or text[j] == "_"):
        j += 1
    is_float = False
    if j < n and text[j] == "." and (j + 1 >= n or (text[j + 1] in _DIGITS)):
        is_float = True
        j += 1
        while j < n and (text[j] in _DIGITS):
            j += 1
    if j < n and text[j] in "eE":
        k = j + 1
        if k < n and text[k] in "+-":
            k += 1
        if k < n and (text[k] in _DIGITS):
            is_float = True
            j = k
            while j < n and (text[j] in _DIGITS):
                j += 1
    if j < n and (text[j].isalpha() or text[j] == "_"):
        raise _Fail(f"malformed number {text[i:j + 1]!r}", i)
    raw = text[i:j]
    if len(raw) > LIMITS["number_length"]:
        raise _Fail(f"number literal is too long ({len(raw)} characters, at most {LIMITS['number_length']})", i)
    if "__" in raw or raw.endswith("_") or raw.startswith("_"):
        raise _Fail(f"malformed number {raw!r}", i)
    if is_float:
        value: Any = float(raw.replace("_", ""))
        if not math.isfinite(value):
            raise _Fail(f"number {raw} is out of range", i)
    else:
        digits = raw.replace("_", "")
        if len(digits) > 1 and digits[0] == "0":
            raise _Fail(f"malformed number {raw!r} (no leading zeros)", i)
        value = int(digits)
        if value >= _INT_LIMIT:
            raise _Fail(f"integer {raw} is out of range (|n| < 2**63)", i)
    toks.append(_Tok("NUM", value, i, raw))
    return j


def _string(text: str, i: int, toks: list[_Tok]) -> int:
    quote, j, n = text[i], i + 1, len(text)
    out: list[str] = []
    while True:
        if j >= n or text[j] in "\r\n":
            raise _Fail("unterminated string literal", i)
        c = text[j]
        if c == quote:
            break
        if c == "\\":
            if j + 1 < n and text[j + 1] in "\\'\"":
                out.append(text[j + 1])
                j += 2
                continue
            raise _Fail("only \\\\, \\' and \\\" escapes are allowed in strings", j)
        out.append(c)
        j += 1
        if len(out) > LIMITS["string_length"]:
            raise _Fail(f"string literal is too long (at most {LIMITS['string_length']} characters)", i)
    toks.append(_Tok("STR", "".join(out), i, text[i:j + 1]))
    return j + 1


# -- syntax tree -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Node:
    kind: str            # name lit seq not and or cmp
    pos: int
    value: Any = None    # field name, literal value, compare op
    items: tuple[_Node, ...] = ()


class _Parser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def is_word(self, word: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t.kind == "NAME" and t.value == word

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > LIMITS["depth"]:
            raise _Fail(f"expression is nested too deeply (at most {LIMITS['depth']} levels)", pos)

    def parse(self) -> _Node:
        node = self.or_expr()
        t = self.peek()
        if t.kind != "EOF":
            raise _Fail(f"unexpected {_show(t)} (expected 'and', 'or', a comparison or the end)", t.pos)
        return node

    def or_expr(self) -> _Node:
        first = self.and_expr()
        items = [first]
        while self.is_word("or"):
            self.take()
            items.append(self.and_expr())
        return first if len(items) == 1 else _Node("or", first.pos, None, tuple(items))

    def and_expr(self) -> _Node:
        first = self.not_expr()
        items = [first]
        while self.is_word("and"):
            self.take()
            items.append(self.not_expr())
        return first if len(items) == 1 else _Node("and", first.pos, None, tuple(items))

    def not_expr(self) -> _Node:
        if self.is_word("not"):
            t = self.take()
            self.enter(t.pos)
            inner = self.not_expr()
            self.depth -= 1
            return _Node("not", t.pos, None, (inner,))
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.operand()
        parts: list[_Node] = []
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
            parts.append(_Node("cmp", t.pos, op, (left, right)))
            left = right
        if not parts:
            return left
        return parts[0] if len(parts) == 1 else _Node("and", parts[0].pos, None, tuple(parts))

    def operand(self) -> _Node:
        t = self.take()
        if t.kind == "NAME":
            if t.value in _CONSTANTS:
                return _Node("lit", t.pos, _CONSTANTS[t.value])
            if t.value in _KEYWORDS:
                raise _Fail(f"expected a field or a value, got {t.value!r}", t.pos)
            self.no_postfix()
            return _Node("name", t.pos, t.value)
        if t.kind in ("NUM", "STR"):
            self.no_postfix()
            return _Node("lit", t.pos, t.value)
        if t.kind == "-":
            num = self.peek()
            if num.kind != "NUM":
                raise _Fail("'-' may only precede a number (arithmetic is not allowed)", t.pos)
            self.take()
            return _Node("lit", t.pos, -num.value)
        if t.kind == "(":
            self.enter(t.pos)
            if self.peek().kind == ")":
                self.take()
                self.depth -= 1
                self.no_postfix()
                return _Node("seq", t.pos, None, ())
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
                node = _Node("seq", t.pos, None, ())
            else:
                node = self.sequence(t, self.or_expr(), "]")
            self.depth -= 1
            self.no_postfix()
            return node
        if t.kind == "EOF":
            raise _Fail("condition ends where a field or a value was expected", t.pos)
        raise _Fail(f"unexpected {_show(t)} (expected a field or a value)", t.pos)

    def sequence(self, opener: _Tok, first: _Node, close: str) -> _Node:
        items = [first]
        while self.peek().kind == ",":
            self.take()
            if self.peek().kind == close:
                break
            items.append(self.or_expr())
            if len(items) > LIMITS["sequence_size"]:
                raise _Fail(f"too many elements (at most {LIMITS['sequence_size']})", opener.pos)
        self.expect(close, opener)
        for item in items:
            if item.kind not in ("lit", "seq"):
                raise _Fail("tuple and list elements must be literal values", item.pos)
        return _Node("seq", opener.pos, None, tuple(items))

    def expect(self, kind: str, opener: _Tok) -> None:
        t = self.peek()
        if t.kind != kind:
            raise _Fail(f"expected {kind!r} to close {opener.value!r} at position {opener.pos}, got {_show(t)}", t.pos)
        self.take()

    def no_postfix(self) -> None:
        t = self.peek()
        if t.kind == "(":
            raise _Fail("function calls are not allowed", t.pos)
        if t.kind == ".":
            raise _Fail("attribute access is not allowed", t.pos)
        if t.kind == "[":
            raise _Fail("subscripts are not allowed", t.pos)


def _show(t: _Tok) -> str:
    return t.text if t.kind == "EOF" else repr(t.text)


# -- type checking and compilation -------------------------------------------------------------------------

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


class _Compiler:
    def __init__(self, fields: Mapping[str, Field], per_kernel: bool) -> None:
        self.fields = fields
        self.per_kernel = per_kernel
        self.used: set[str] = set()

    def field(self, node: _Node) -> Field:
        name = node.value
        if name.startswith("__"):
            raise _Fail(f"names starting with '__' are not allowed ({name!r})", node.pos)
        f = self.fields.get(name)
        if f is None:
            close = difflib.get_close_matches(name, list(self.fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known fields: {', '.join(sorted(self.fields))}"
            raise _Fail(f"unknown field {name!r}{hint}", node.pos)
        if name in PER_KERNEL_FIELDS and not self.per_kernel:
            raise _Fail(f"{name!r} is only known to rules judged per kernel (denies, boosts, prefer); "
                        "locks and allows are judged once per call", node.pos)
        self.used.add(name)
        return f

    def kind_of(self, node: _Node) -> tuple[str, bool]:
        """(kind, may be None) of an operand."""
        if node.kind == "name":
            f = self.field(node)
            return f.kind, f.optional
        if node.kind == "lit":
            return _lit_kind(node.value), node.value is None
        if node.kind == "seq":
            return "seq", False
        return "bool", False

    def boolean(self, node: _Node) -> Predicate:
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
                raise _Fail(f"{node.value} is {_article(f.kind)}, not a condition; compare it "
                            f"(for example {node.value} {_example(f)})", node.pos)
            name = node.value
            return lambda env: env.get(name) is True
        if node.kind == "lit":
            if not isinstance(node.value, bool):
                raise _Fail(f"{node.value!r} is not a condition (expected a comparison or True/False)", node.pos)
            value = node.value
            return lambda env: value
        raise _Fail("a tuple or list is not a condition", node.pos)

    def compare(self, node: _Node) -> Predicate:
        op = node.value
        left, right = node.items
        lkind, lnone = self.kind_of(left)
        if op in ("in", "not in"):
            if right.kind != "seq":
                raise _Fail(f"the right side of {op!r} must be a tuple or list of values, "
                            "for example dtype in ('float16', 'bfloat16')", right.pos)
            if lkind == "seq":
                raise _Fail(f"the left side of {op!r} must be a field or a value", left.pos)
            values = frozenset(self.member(left, lkind, lnone, item) for item in right.items)
            get = self.getter(left)
            if op == "in":
                return lambda env: _member(get(env), values)
            return lambda env: not _member(get(env), values)
        rkind, rnone = self.kind_of(right)
        if lkind == "seq" and rkind == "seq":
            raise _Fail("compare a field with a value, not two tuples", node.pos)
        if op in ("==", "!="):
            ok = _compatible(lkind, rkind) or (lkind == "none" and rnone) or (rkind == "none" and lnone) \
                or (lkind == "tuple" and rkind == "seq") or (lkind == "seq" and rkind == "tuple") \
                or (lkind == "none" and rkind == "none")
        else:
            if "none" in (lkind, rkind):
                raise _Fail(f"{op!r} cannot compare with None (use == None or != None)", node.pos)
            ok = (lkind in _NUMERIC and rkind in _NUMERIC) or {lkind, rkind} <= {"tuple", "seq"}
            if not ok and lkind == rkind == "str":
                raise _Fail(f"{op!r} does not order strings; use ==, != or in", node.pos)
        if not ok:
            raise _Fail(f"cannot compare {_describe(left, lkind)} with {_describe(right, rkind)} using {op!r}",
                        node.pos)
        lget = self.getter(left, right)
        rget = self.getter(right, left)
        fn = _COMPARE[op]
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

    def member(self, left: _Node, lkind: str, lnone: bool, item: _Node) -> Any:
        if item.kind == "seq":
            if lkind != "tuple":
                raise _Fail(f"a tuple cannot be compared with {_describe(left, lkind)}", item.pos)
            return self.tuple_value(item)
        ikind = _lit_kind(item.value)
        if not (_compatible(lkind, ikind) or (ikind == "none" and lnone)):
            raise _Fail(f"{item.value!r} ({ikind}) cannot be compared with {_describe(left, lkind)}", item.pos)
        return self.normalise(left, item)

    def tuple_value(self, node: _Node) -> tuple[Any, ...]:
        out = []
        for item in node.items:
            if item.kind != "lit" or _lit_kind(item.value) not in _NUMERIC:
                raise _Fail("compute-capability tuples hold numbers, for example (8, 0)", item.pos)
            out.append(item.value)
        return tuple(out)

    def normalise(self, field_node: _Node, lit: _Node) -> Any:
        """A literal compared with an enumerated field: check it, and map dtype aliases to names."""
        value = lit.value
        if field_node.kind != "name" or not isinstance(value, str):
            return value
        f = self.fields[field_node.value]
        if field_node.value == "dtype":
            if value.removeprefix("torch.") in _DTYPE_ALIASES:
                return _DTYPE_ALIASES[value.removeprefix("torch.")]
        elif f.choices is None or value in f.choices:
            return value
        choices = sorted(set(_DTYPE_ALIASES.values())) if field_node.value == "dtype" else list(f.choices or ())
        raise _Fail(f"{value!r} is not a known {field_node.value} (known: {', '.join(choices)})", lit.pos)

    def getter(self, node: _Node, other: _Node | None = None) -> Callable[[Env], Any]:
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


def _describe(node: _Node, kind: str) -> str:
    if node.kind == "name":
        return f"{node.value} ({kind})"
    if node.kind == "lit":
        return f"{node.value!r} ({kind})"
    if node.kind == "seq":
        return "a tuple"
    return "a condition (bool)"


# -- public API ----------------------------------------------------------------------------------------------

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
    compiler = _Compiler(FIELDS if fields is None else fields, per_kernel)
    try:
        tree = _Parser(_tokenize(text)).parse()
        fn = compiler.boolean(tree)
    except _Fail as fail:
        raise ConditionError(f"{prefix}{_caret(text, fail.message, fail.pos)}", expression=text,
                             position=fail.pos) from None
    except RecursionError:  # defensive: the depth limit should make this unreachable
        raise ConditionError(f"{prefix}condition is nested too deeply", expression=text, position=0) from None
    return Condition(text, frozenset(compiler.used), fn)


def _value_node(value: Any) -> _Node:
    if isinstance(value, (list, tuple)):
        if len(value) > LIMITS["sequence_size"]:
            raise _Fail(f"too many values ({len(value)}, at most {LIMITS['sequence_size']})", 0)
        return _Node("seq", 0, None, tuple(_value_node(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, str) and len(value) > LIMITS["string_length"]:
            raise _Fail(f"string is too long (at most {LIMITS['string_length']} characters)", 0)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT_LIMIT:
            raise _Fail(f"integer {value} is out of range (|n| < 2**63)", 0)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Fail(f"number {value} is not finite", 0)
        return _Node("lit", 0, value)
    raise _Fail(f"values must be numbers, strings, booleans, null or lists of them, got {type(value).__name__}", 0)


def compile_comparison(field: str, op: str, value: Any, *, per_kernel: bool = True,
                       fields: Mapping[str, Field] | None = None) -> Condition:
    """Compile ``field <op> value`` from structured data (config files' ``batch_size_gte: 8``).

    ``op`` is one of ``== != < <= > >= in not in``; the value is type-checked like a literal in a
    condition. Nothing is parsed from text, so a value can never inject syntax.

    Raises:
        ConditionError: unknown field, unknown operator or a value of the wrong type.
    """
    shown = f"{field} {op} {value!r}"
    compiler = _Compiler(FIELDS if fields is None else fields, per_kernel)
    try:
        if op not in _COMPARE and op not in ("in", "not in"):
            raise _Fail(f"unknown operator {op!r}", 0)
        if op in ("in", "not in") and not isinstance(value, (list, tuple)):
            raise _Fail(f"{op!r} needs a list of values, got {type(value).__name__}", 0)
        node = _Node("cmp", 0, op, (_Node("name", 0, field), _value_node(value)))
        fn = compiler.boolean(node)
    except _Fail as fail:
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


def describe_fields() -> list[tuple[str, str, str]]:
    """``(name, type, description)`` for every field, for docs and ``layerzero config`` output."""
    out = []
    for name, f in FIELDS.items():
        kind = f.kind + (" or None" if f.optional else "")
        out.append((name, kind, f.doc))
    return out
