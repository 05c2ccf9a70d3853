"""Regular expressions for ``_match`` conditions, restricted so that matching time stays bounded.

Python's ``re`` backtracks, so ``(a+)+$`` can take exponential time. Rather
than add a dependency with match timeouts, :func:`compile_safe_regex` accepts
only a syntax that cannot blow up, checked by one left-to-right scan
(:class:`_Scan`) before ``re.compile`` sees the pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from layerzero.config_file.validate import type_name

__all__ = ["compile_safe_regex", "REGEX_LIMITS"]

REGEX_LIMITS = {"pattern_length": 200, "subject_length": 128, "branching": 1 << 16}
_BRACE = re.compile(r"\{(\d{0,4})(,(\d{0,4}))?\}")


def compile_safe_regex(pattern: str) -> re.Pattern[str]:
    """Compile a ``_match`` pattern whose worst-case matching time is bounded.

    Python's ``re`` backtracks, so ``(a+)+$`` can take exponential time. Rather than add a
    dependency with match timeouts, the syntax is restricted to what cannot blow up:
    a quantifier (``* + ? {m,n}``) may follow only a single character, ``.``, an escape or a
    ``[...]`` class (never a group); no backreferences, lookarounds or conditionals; the product
    of the quantifiers' branching (``*``/``+`` count as the 128-character subject limit,
    ``{m,n}`` as ``n-m+1``, ``?`` as 2) and of the alternatives of each group (``(a|b|c)`` as 3,
    since ``(a|a)(a|a)...`` backtracks through every combination) is at most 65536; patterns
    hold at most 200 characters.
    Subjects longer than 128 characters never match.

    Raises:
        ValueError: naming what is not allowed and where.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"must be a string pattern, got {type_name(pattern)}")
    if not pattern or len(pattern) > REGEX_LIMITS["pattern_length"]:
        raise ValueError(f"pattern must have 1 to {REGEX_LIMITS['pattern_length']} characters")
    _check_regex_syntax(pattern)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


def _check_regex_syntax(pattern: str) -> None:
    """Raise ``ValueError`` at the first construct :func:`compile_safe_regex` refuses."""
    scan = _Scan(pattern)
    while scan.i < len(pattern):
        c = pattern[scan.i]
        if c == "\\":
            scan.escape()
        elif c == "[":
            scan.char_class()
        elif c == "(":
            scan.open_group()
        elif c == ")":
            scan.close_group()
        elif c in "*+?{":
            scan.quantifier(c)
        elif c in "|^$":
            scan.bar_or_anchor(c)
        else:
            scan.prev = "atom"
            scan.i += 1
    scan.branch(scan.alternatives[0], 0)  # the pattern's own top-level alternatives


@dataclass
class _Scan:
    """One pass over a pattern: the position, what came before and the backtracking budget spent."""

    p: str
    i: int = 0
    prev: str | None = None  # what the previous item was: "atom", "group", "quantified", "atom_done" or None
    alternatives: list[int] = field(default_factory=lambda: [1])  # branches so far per open group, pattern first
    branching: int = 1

    def branch(self, k: int, pos: int) -> None:
        """Spend a group's ``k`` alternatives of the budget."""
        self.branching *= k
        if self.branching > REGEX_LIMITS["branching"]:
            raise ValueError(f"too many alternatives and repetitions (position {pos}); each group's "
                             "alternatives multiply the backtracking budget like quantifiers do")

    def escape(self) -> None:
        """``\\x``: an atom, except the zero-width ``\\A \\Z \\b \\B``; backreferences are refused."""
        if self.i + 1 >= len(self.p):
            raise ValueError("pattern ends with a lone backslash")
        nxt = self.p[self.i + 1]
        if nxt in "123456789":
            raise ValueError(f"backreferences (\\{nxt}) are not allowed (position {self.i})")
        self.prev = None if nxt in "AZbB" else "atom"
        self.i += 2

    def char_class(self) -> None:
        """``[...]`` (a leading ``^`` or ``]`` and escapes inside included): one atom."""
        p, n = self.p, len(self.p)
        j = self.i + 1
        if j < n and p[j] == "^":
            j += 1
        if j < n and p[j] == "]":
            j += 1
        while j < n and p[j] != "]":
            j += 2 if p[j] == "\\" else 1
        if j >= n:
            raise ValueError(f"unterminated character class at position {self.i}")
        self.prev = "atom"
        self.i = j + 1

    def open_group(self) -> None:
        """``(``, ``(?:`` or ``(?P<name>``; every other ``(?`` construct is refused."""
        p, i = self.p, self.i
        self.alternatives.append(1)
        if p.startswith("(?", i) and not (p.startswith("(?:", i) or p.startswith("(?P<", i)):
            raise ValueError(f"only (...), (?:...) and (?P<name>...) groups are allowed; lookarounds, "
                             f"conditionals, flags and backreferences are not (position {i})")
        self.prev = None
        if p.startswith("(?:", i):
            self.i = i + 3
        elif p.startswith("(?P<", i):
            end = p.find(">", i)
            if end < 0:
                raise ValueError(f"unterminated group name at position {i}")
            self.i = end + 1
        else:
            self.i = i + 1

    def close_group(self) -> None:
        """``)``: the group's alternatives are spent; an unbalanced ``)`` is left to re.compile's error."""
        if len(self.alternatives) > 1:
            self.branch(self.alternatives.pop(), self.i)
        self.prev = "group"
        self.i += 1

    def quantifier(self, c: str) -> None:
        """``* + ? {m,n}`` after an atom spends its branching; a lazy/possessive modifier spends none."""
        if c == "{":
            brace = _brace(self.p, self.i)
            if brace is None:  # a literal brace
                self.prev = "atom"
                self.i += 1
                return
            factor, length = brace
        else:
            factor, length = (2 if c == "?" else REGEX_LIMITS["subject_length"]), 1
        if self.prev == "quantified" and c in "?+" and self.p[self.i - 1] in "*+?}":
            self.i += 1  # lazy (*?) or possessive (*+) modifier of the quantifier before: no new branching
            self.prev = "atom_done"
            return
        if self.prev == "group":
            raise ValueError(f"a quantifier after a group is not allowed (position {self.i}); "
                             f"repeat single characters or classes instead")
        if self.prev != "atom":
            raise ValueError(f"nothing to repeat at position {self.i}")
        self.branching *= factor
        if self.branching > REGEX_LIMITS["branching"]:
            raise ValueError(f"too many repetitions (position {self.i}); at most two unbounded quantifiers "
                             "such as .* fit the backtracking budget")
        self.prev = "quantified"
        self.i += length

    def bar_or_anchor(self, c: str) -> None:
        """``|`` adds an alternative to the innermost group; ``^`` and ``$`` match no character."""
        if c == "|":
            self.alternatives[-1] += 1
        self.prev = None
        self.i += 1


def _brace(p: str, i: int) -> tuple[int, int] | None:
    """``(branching, length)`` of the ``{m,n}`` quantifier at ``i``; ``None`` when the brace is a literal."""
    m = _BRACE.match(p, i)
    if m is None or (m.group(1) == "" and m.group(3) in (None, "")):
        return None
    low = int(m.group(1) or 0)
    high = REGEX_LIMITS["subject_length"] if m.group(2) and not m.group(3) else int(m.group(3) or low)
    return max(high - low + 1, 1), len(m.group(0))
