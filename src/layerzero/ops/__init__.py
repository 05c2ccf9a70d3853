"""Public operations (``lz.attention``, ``lz.rms_norm``, ...) and their op definitions.

Each operation validates nothing on a cache hit: it builds a key from tensor
metadata, reads the plan from the runtime's cache and calls it. Validation,
context building and selection run on a miss (``Runtime.miss``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from layerzero.errors import InvalidInputError
from layerzero.ops.attention import ATTENTION, attention
from layerzero.ops.attention_paged import ATTENTION_PAGED, attention_paged
from layerzero.ops.attention_varlen import ATTENTION_VARLEN, attention_varlen
from layerzero.ops.base import OpDef
from layerzero.ops.elementwise import GEGLU, GELU, ROPE, SILU, SWIGLU, geglu, gelu, rope, silu, swiglu
from layerzero.ops.linear_losses import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from layerzero.ops.losses import CROSS_ENTROPY, cross_entropy
from layerzero.ops.norms import LAYER_NORM, RMS_NORM, layer_norm, rms_norm
from layerzero.ops.sampling import SAMPLE, sample

__all__ = ["attention", "attention_varlen", "attention_paged", "rms_norm", "layer_norm", "rope", "swiglu", "geglu",
           "gelu", "silu", "sample", "cross_entropy", "linear_cross_entropy", "OPS", "op_for", "OpDef", "OPERATIONS",
           "ALIASES", "canonical_operation", "operation_problem"]

OPS: dict[str, OpDef] = {
    "attention": ATTENTION,
    "attention_varlen": ATTENTION_VARLEN,
    "attention_paged": ATTENTION_PAGED,
    "rms_norm": RMS_NORM,
    "layer_norm": LAYER_NORM,
    "rope": ROPE,
    "swiglu": SWIGLU,
    "geglu": GEGLU,
    "gelu": GELU,
    "silu": SILU,
    "sample": SAMPLE,
    "cross_entropy": CROSS_ENTROPY,
    "linear_cross_entropy": LINEAR_CROSS_ENTROPY,
}

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


def op_for(operation: str) -> OpDef:
    """The op definition serving ``operation`` (by its family, the part before the first dot)."""
    if not isinstance(operation, str):
        raise InvalidInputError(f"operation must be a string, got {type(operation).__name__}")
    family = ALIASES.get(operation, operation).split(".", 1)[0]
    op = OPS.get(family)
    if op is None:
        raise InvalidInputError(f"unknown operation {operation!r}; operations have these families: "
                                f"{', '.join(sorted(OPS))}")
    return op


def operation_problem(operation: str, declared: Iterable[str]) -> str | None:
    """What is wrong with ``operation`` as a name to dispatch, or None. In a family layerzero knows, it must be
    one of :data:`OPERATIONS`, the family itself, or an operation a kernel declares (``declared``: the
    registry's kernels' operations), or one below such a declared operation: the family's kernels serve any
    ``family.*`` name by prefix, so ``attention.causl`` would otherwise run as full attention. A family
    layerzero does not know is the caller's own (its kernels decide). A dotted alias (``attention.paged``)
    names another family: dispatch it by its own name."""
    family = operation.split(".", 1)[0]
    if family not in OPS or operation == family or operation in OPERATIONS:
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
