"""Public operations (``lz.attention``, ``lz.rms_norm``, ...) and their op definitions.

Each operation validates nothing on a cache hit: it builds a key from tensor
metadata, reads the plan from the runtime's cache and calls it. Validation,
context building and selection run on a miss (``Runtime.miss``).
"""

from __future__ import annotations

from layerzero.errors import InvalidInputError
from layerzero.ops.attention import ATTENTION, attention
from layerzero.ops.attention_paged import ATTENTION_PAGED, attention_paged
from layerzero.ops.attention_varlen import ATTENTION_VARLEN, attention_varlen
from layerzero.ops.base import OpDef
from layerzero.ops.elementwise import GEGLU, GELU, ROPE, SILU, SWIGLU, geglu, gelu, rope, silu, swiglu
from layerzero.ops.linear_losses import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from layerzero.ops.losses import CROSS_ENTROPY, cross_entropy
from layerzero.ops.names import ALIASES, FAMILIES, OPERATIONS, canonical_operation, operation_problem
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
