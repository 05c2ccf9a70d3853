"""The condition lexer: text into tokens (names, numbers, strings, comparison operators, brackets).

Only ASCII names, decimal numbers and quoted strings (whose only escapes are
a backslash before a backslash or a quote) are accepted. Python keywords
other than ``and or not in`` and the constants are refused here, and a
character that has no place in the grammar fails with a hint (``&``: use
'and'). Sizes are bounded by :data:`~layerzero.policy.grammar.limits.LIMITS`.
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from typing import Any

from layerzero.policy.grammar.limits import INT_LIMIT, LIMITS, GrammarFailure

__all__ = ["Token", "tokenize", "KEYWORDS", "CONSTANTS"]

_DIGITS = "0123456789"  # str.isdigit() would accept '²' and other non-ASCII digits
KEYWORDS = frozenset({"and", "or", "not", "in"})
CONSTANTS: dict[str, Any] = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
_HINTS = {"&": "use 'and'", "|": "use 'or'", "!": "use 'not' (or '!=')", "=": "use '==' to compare",
          "*": "arithmetic is not allowed", "+": "arithmetic is not allowed", "/": "arithmetic is not allowed",
          "%": "arithmetic is not allowed", ":": "lambdas and slices are not allowed",
          "{": "dicts and sets are not allowed", "}": "dicts and sets are not allowed",
          "@": "decorators and matrix products are not allowed", "`": "backticks are not allowed",
          ";": "only one expression is allowed", "~": "bitwise operators are not allowed",
          "^": "bitwise operators are not allowed"}


@dataclass(frozen=True, slots=True)
class Token:
    """One token: ``kind`` NUM STR NAME OP ( ) [ ] , - . or EOF, its value, position and source text."""

    kind: str   # NUM STR NAME OP ( ) [ ] , - . EOF
    value: Any
    pos: int
    text: str = ""


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an EOF token.

    Raises:
        GrammarFailure: a character, word or literal the grammar does not accept, or too many tokens.
    """
    toks: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if len(toks) >= LIMITS["tokens"]:
            raise GrammarFailure(f"too many tokens (at most {LIMITS['tokens']})", i)
        if c.isascii() and (c.isalpha() or c == "_"):
            j = i + 1
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            if word not in KEYWORDS and word not in CONSTANTS and (keyword.iskeyword(word)
                                                                     or keyword.issoftkeyword(word)):
                hint = " (use == or !=)" if word == "is" else ""
                raise GrammarFailure(f"{word!r} is not allowed in conditions{hint}", i)
            toks.append(Token("NAME", word, i, word))
            i = j
        elif (c in _DIGITS) or (c == "." and i + 1 < n and (text[i + 1] in _DIGITS)):
            i = _number(text, i, toks)
        elif c in "'\"":
            i = _string(text, i, toks)
        elif text.startswith(("==", "!=", "<=", ">="), i):
            toks.append(Token("OP", text[i:i + 2], i, text[i:i + 2]))
            i += 2
        elif c in "<>":
            toks.append(Token("OP", c, i, c))
            i += 1
        elif c in "()[],-.":
            toks.append(Token(c, c, i, c))
            i += 1
        else:
            hint = _HINTS.get(c)
            shown = repr(c) if c.isprintable() else f"U+{ord(c):04X}"
            raise GrammarFailure(f"unexpected character {shown}" + (f" ({hint})" if hint else ""), i)
    toks.append(Token("EOF", None, n, "end of condition"))
    return toks


def _number(text: str, i: int, toks: list[Token]) -> int:
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
        raise GrammarFailure(f"malformed number {text[i:j + 1]!r}", i)
    raw = text[i:j]
    if len(raw) > LIMITS["number_length"]:
        raise GrammarFailure(f"number literal is too long ({len(raw)} characters, "
                             f"at most {LIMITS['number_length']})", i)
    if "__" in raw or raw.endswith("_") or raw.startswith("_"):
        raise GrammarFailure(f"malformed number {raw!r}", i)
    if is_float:
        value: Any = float(raw.replace("_", ""))
        if not math.isfinite(value):
            raise GrammarFailure(f"number {raw} is out of range", i)
    else:
        digits = raw.replace("_", "")
        if len(digits) > 1 and digits[0] == "0":
            raise GrammarFailure(f"malformed number {raw!r} (no leading zeros)", i)
        value = int(digits)
        if value >= INT_LIMIT:
            raise GrammarFailure(f"integer {raw} is out of range (|n| < 2**63)", i)
    toks.append(Token("NUM", value, i, raw))
    return j


def _string(text: str, i: int, toks: list[Token]) -> int:
    quote, j, n = text[i], i + 1, len(text)
    out: list[str] = []
    while True:
        if j >= n or text[j] in "\r\n":
            raise GrammarFailure("unterminated string literal", i)
        c = text[j]
        if c == quote:
            break
        if c == "\\":
            if j + 1 < n and text[j + 1] in "\\'\"":
                out.append(text[j + 1])
                j += 2
                continue
            raise GrammarFailure("only \\\\, \\' and \\\" escapes are allowed in strings", j)
        out.append(c)
        j += 1
        if len(out) > LIMITS["string_length"]:
            raise GrammarFailure(f"string literal is too long (at most {LIMITS['string_length']} characters)", i)
    toks.append(Token("STR", "".join(out), i, text[i:j + 1]))
    return j + 1
