"""The names a condition may use: each field's type, whether it may be unknown, and its choices.

The checker type-checks conditions against :data:`FIELDS`; the config-file
schema reads it for suffixed condition keys (``batch_size_gte``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Field", "FIELDS", "PER_KERNEL_FIELDS", "DTYPE_ALIASES", "describe_fields"]


@dataclass(frozen=True, slots=True)
class Field:
    """A name a condition may use. ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``tuple``."""

    kind: str
    optional: bool
    doc: str
    choices: tuple[str, ...] | None = None


DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                 "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32",
                 "float64": "float64", "fp64": "float64", "double": "float64", "int64": "int64",
                 "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
                 "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
                 "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz",
                 "complex64": "complex64", "complex128": "complex128"}
_PLATFORMS = ("cpu", "cuda", "mps", "xpu", "hip", "hpu", "mtia", "meta", "xla", "privateuseone")

FIELDS: dict[str, Field] = {
    "platform": Field("str", False, "device type: 'cuda', 'cpu', 'mps', ...", _PLATFORMS),
    "device": Field("str", False, "device string: 'cuda:0', 'cpu'"),
    "device_index": Field("int", True, "device index (None when not given)"),
    "sm": Field("int", False, "compute capability as an integer: 80, 90; 0 on a CPU"),
    "compute_capability": Field("tuple", True, "compute capability as a pair: compute_capability >= (8, 0)"),
    "dtype": Field("str", True, "dtype by name: 'float16', 'bfloat16', 'float32' (fp16/bf16 accepted)",
                   tuple(sorted(set(DTYPE_ALIASES)))),
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
    "softcap": Field("bool", False, "attention-logit softcapping is on (lz.attention(softcap=...))"),
    "sinks": Field("bool", False, "attention sinks are given (lz.attention(sinks=...))"),
    "alibi": Field("bool", False, "ALiBi slopes are given (lz.attention(alibi_slopes=...))"),
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


def describe_fields() -> list[tuple[str, str, str]]:
    """``(name, type, description)`` for every field, for docs and ``layerzero config`` output."""
    out = []
    for name, f in FIELDS.items():
        kind = f.kind + (" or None" if f.optional else "")
        out.append((name, kind, f.doc))
    return out
