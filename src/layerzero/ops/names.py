"""The operation names layerzero knows, and what a name to dispatch may be (:func:`operation_problem`).

One home for the names, below every op module: ``lz.attention(operation=...)`` checks its name here, as
``dispatch()``, static tables and ``layerzero explain --op`` do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["FAMILIES", "OPERATIONS", "ALIASES", "canonical_operation", "operation_problem"]

#: The op families (``layerzero.ops.OPS``' keys): an operation's family is the part before its first dot.
FAMILIES: tuple[str, ...] = ("attention", "attention_varlen", "attention_paged", "rms_norm", "layer_norm", "rope",
                             "swiglu", "geglu", "gelu", "silu", "sample", "cross_entropy", "linear_cross_entropy")

# Operation names with built-in meaning (kernels may serve a family prefix of these).
OPERATIONS: tuple[str, ...] = (
    "attention.causal", "attention.full", "attention.cross", "attention.decode", "attention.prefill",
    "attention.sliding_window", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "gelu", "silu",
    "sample.greedy", "sample.temperature", "sample.top_k", "sample.top_p", "cross_entropy",
    "attention_varlen", "attention_paged",
    "linear_cross_entropy",
)

#: Dotted spellings of the packed and paged ops (``layerzero explain --op attention.paged``). They are not
#: ``attention.*`` operations: those are dense ``lz.attention`` calls, which the attention family's kernels
#: serve by prefix; these name other families, whose kernels take other arguments.
ALIASES: dict[str, str] = {"attention.varlen": "attention_varlen", "attention.paged": "attention_paged"}


def canonical_operation(operation: str) -> str:
    """``operation`` with a dotted alias replaced by the operation it names (``attention.paged`` ->
    ``attention_paged``)."""
    return ALIASES.get(operation, operation) if isinstance(operation, str) else operation


def operation_problem(operation: str, declared: Iterable[str]) -> str | None:
    """What is wrong with ``operation`` as a name to dispatch, or None. In a family layerzero knows, it must be
    one of :data:`OPERATIONS`, the family itself, or an operation a kernel declares (``declared``: the
    registry's kernels' operations), or one below such a declared operation: the family's kernels serve any
    ``family.*`` name by prefix, so ``attention.causl`` would otherwise run as full attention. A family
    layerzero does not know is the caller's own (its kernels decide). A dotted alias (``attention.paged``)
    names another family: dispatch it by its own name."""
    family = operation.split(".", 1)[0]
    if family not in FAMILIES or operation == family or operation in OPERATIONS:
        return None
    if operation in ALIASES:
        return f"{operation!r} is layerzero explain's spelling; dispatch it as {ALIASES[operation]!r}"
    custom = {d for d in declared if d != family and d.split(".", 1)[0] == family and d not in OPERATIONS}
    if any(operation == d or operation.startswith(d + ".") for d in custom):
        return None
    known = sorted({o for o in OPERATIONS if o.split(".", 1)[0] == family} | custom | {family})
    close = difflib.get_close_matches(operation, known, n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown operation {operation!r}{hint} (the {family} operations: {', '.join(known)})"
