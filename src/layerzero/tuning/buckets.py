"""Shape buckets: which calls share one measurement.

A measurement taken for one shape stands for every shape of its bucket.
Dimensions that vary from call to call round up to powers of two
(:func:`layerzero.context.bucket_pow2`): batch size, query and key sequence
lengths, and the row count of norms and activations. Dimensions fixed by the
model stay exact: head counts, head dim, value head dim and hidden size. The
flags that change which code a kernel runs are part of the bucket too (causal,
mask kind, sliding window, dropout on/off, autograd, attention variants, RoPE variant, GELU
approximation), and whether torch.compile was tracing (``;compiled=1``: Inductor's code
around a kernel changes what is fastest, so compiled and eager measurements are kept
apart; eager buckets carry no suffix). dtype and operation are separate columns of the
database.

Examples (``bucket_of(operation, ctx)``)::

    attention.causal, batch 3, seq 1000, 32/8 heads, head_dim 128
        -> "b=4;sq=1024;sk=1024;h=32;hkv=8;d=128;dv=128;causal=1;mask=none;win=-;drop=0;grad=0"
    rms_norm, 3000 rows of 4096
        -> "n=4096;hidden=4096;grad=0"
    linear_cross_entropy, 3000 tokens of 4096 into a vocabulary of 128256, training
        -> "n=4096;hidden=128256;d=4096;grad=1"
    attention_varlen, 5 sequences of at most 1000 tokens (3000 in all), 32/8 heads, head_dim 128, causal
        -> "b=8;sq=1024;sk=1024;h=32;hkv=8;d=128;dv=128;causal=1;win=-;softcap=0;grad=0"
    attention_paged, decode of 24 sequences over 64 pages of 16 tokens, 32/8 heads, head_dim 128
        -> "b=32;sq=1;sk=1024;page=16;h=32;hkv=8;d=128;dv=128;causal=1;win=-;softcap=0;grad=0"

For ``attention_varlen`` ``sq``/``sk`` are the longest sequences (``max_seqlen_*``; the packed token count,
at most ``b * sq``, is left out as the plan key leaves it out); for ``attention_paged`` ``sk`` is the block
table's capacity and ``page`` the page size (the context's ``hidden_size``).
"""

from __future__ import annotations

from layerzero.context import SelectionContext, bucket_pow2
from layerzero.ops import canonical_operation

__all__ = ["bucket_of", "ATTENTION_FAMILIES", "RAGGED_FAMILIES"]

ATTENTION_FAMILIES: frozenset[str] = frozenset({"attention"})
#: Packed and paged attention (``lz.attention_varlen``, ``lz.attention_paged``).
RAGGED_FAMILIES: frozenset[str] = frozenset({"attention_varlen", "attention_paged"})


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _variants(ctx: SelectionContext) -> str:
    """``;var=softcap+sinks`` for attention variants (nothing without any, so older bucket keys stay)."""
    names = [n for n, on in (("softcap", ctx.softcap), ("sinks", ctx.sinks), ("alibi", ctx.alibi)) if on]
    return f";var={'+'.join(names)}" if names else ""


def _ragged_bucket(family: str, ctx: SelectionContext, grad: str) -> str:
    head = f"b={_n(bucket_pow2(ctx.batch_size))};sq={_n(bucket_pow2(ctx.seq_len_q))};sk={_n(bucket_pow2(ctx.seq_len_k))}"
    extent = "" if family == "attention_varlen" else f"page={_n(ctx.hidden_size)};"
    return (f"{head};{extent}h={_n(ctx.num_heads)};hkv={_n(ctx.num_kv_heads)};d={_n(ctx.head_dim)};"
            f"dv={_n(ctx.head_dim_v)};causal={int(ctx.is_causal)};win={_n(ctx.window)};softcap={int(ctx.softcap)};"
            f"grad={grad}")


def bucket_of(operation: str, ctx: SelectionContext) -> str:
    """The bucket key of ``ctx`` for ``operation`` (a short, stable, human-readable string)."""
    family = canonical_operation(operation).split(".", 1)[0]  # attention.paged is attention_paged
    grad = "1" if ctx.requires_grad else "0"
    compiled = ";compiled=1" if ctx.compiling else ""
    if family in ATTENTION_FAMILIES:
        return (f"b={_n(bucket_pow2(ctx.batch_size))};sq={_n(bucket_pow2(ctx.seq_len_q))};"
                f"sk={_n(bucket_pow2(ctx.seq_len_k))};h={_n(ctx.num_heads)};hkv={_n(ctx.num_kv_heads)};"
                f"d={_n(ctx.head_dim)};dv={_n(ctx.head_dim_v)};causal={int(ctx.is_causal)};"
                f"mask={ctx.mask_kind};win={_n(ctx.window)};drop={int(ctx.dropout_p > 0)};grad={grad}"
                + _variants(ctx) + compiled)
    if family in RAGGED_FAMILIES:
        return _ragged_bucket(family, ctx, grad) + compiled
    parts = [f"n={_n(bucket_pow2(ctx.num_tokens))}", f"hidden={_n(ctx.hidden_size)}"]
    if family == "rope":
        parts.append(f"d={_n(ctx.head_dim)};interleaved={int(ctx.interleaved)}")
    elif family == "linear_cross_entropy":  # hidden = the vocabulary, d = the model's hidden width
        parts.append(f"d={_n(ctx.head_dim)}")
    elif family in ("gelu", "geglu"):
        parts.append(f"approximate={ctx.approximate}")
    parts.append(f"grad={grad}")
    return ";".join(parts) + compiled
