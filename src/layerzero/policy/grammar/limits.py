"""Size bounds of the condition grammar and the failure its stages raise.

Every stage (lexer, parser, checker) raises :class:`GrammarFailure` with a
message and a character position; :mod:`layerzero.policy.conditions` turns it
into a :class:`~layerzero.errors.ConditionError` with a caret line.
"""

from __future__ import annotations

__all__ = ["LIMITS", "INT_LIMIT", "GrammarFailure"]

LIMITS: dict[str, int] = {
    "expression_length": 2000,   # characters
    "tokens": 400,
    "depth": 24,                 # nested parentheses / brackets / not
    "string_length": 256,        # characters in one string literal
    "number_length": 24,         # characters in one number literal
    "sequence_size": 64,         # elements of one tuple/list literal
}

INT_LIMIT = 2**63


class GrammarFailure(Exception):
    """A condition is not accepted: ``message`` says why, ``pos`` where (a character offset)."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
