"""The dispatched custom ops of the serving operations: ``layerzero::attention_varlen``, ``attention_paged`` and
``sample``, built by :func:`~.dispatched_rows.define_dispatched` like the row-wise ones.

Their kernels read the batch layout from tensor *values* (``cu_seqlens``, ``block_table``, ``seq_lens``: the
per-sequence SDPA path walks them in Python) or draw random numbers, so none is traced: under
``torch.compile`` each call is one opaque node that selects its kernel at run time, as ``lz.*`` does eagerly.
Packed (varlen) attention is differentiable; its backward recomputes the forward (see :mod:`.dispatched`).
"""

from __future__ import annotations

import importlib

import torch

from layerzero.integrations.compile.dispatched_rows import RowOp, define_dispatched

__all__ = ["attention_varlen_op", "attention_paged_op", "sample_op", "lz_attention_varlen", "lz_attention_paged",
           "lz_sample", "VARLEN_MOD", "PAGED_MOD", "SAMPLING_MOD", "SERVING_OPS"]

Tensor = torch.Tensor

VARLEN_MOD = importlib.import_module("layerzero.ops.attention_varlen")
PAGED_MOD = importlib.import_module("layerzero.ops.attention_paged")
SAMPLING_MOD = importlib.import_module("layerzero.ops.sampling")

lz_attention_varlen = VARLEN_MOD.attention_varlen
lz_attention_paged = PAGED_MOD.attention_paged
lz_sample = SAMPLING_MOD.sample


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
            max_seqlen_k: int, is_causal: bool, scale: float | None, window: int | None, softcap: float | None
            ) -> Tensor:
    return lz_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=is_causal,
                               scale=scale, window=window, softcap=softcap)


def _paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, is_causal: bool,
           scale: float | None, window: int | None, softcap: float | None) -> Tensor:
    return lz_attention_paged(q, k_cache, v_cache, block_table, seq_lens, is_causal=is_causal, scale=scale,
                              window=window, softcap=softcap)


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, seed: Tensor | None
            ) -> Tensor:
    """``lz.sample``; ``seed`` (drawn from the caller's generator when it passed one) seeds a generator here,
    since a custom op cannot take a ``torch.Generator``; without one the device's default generator is used."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(int(seed.item()))
    return lz_sample(logits, temperature, top_k, top_p, generator)


_ATTENTION_TAIL = "bool is_causal, float? scale, int? window, float? softcap) -> Tensor"

SERVING_OPS: tuple[RowOp, ...] = (
    RowOp("attention_varlen", "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
          f"SymInt max_seqlen_q, SymInt max_seqlen_k, {_ATTENTION_TAIL}", _varlen, VARLEN_MOD.ATTENTION_VARLEN,
          (0, 1, 2), lambda args: (*args[0].shape[:-1], args[2].shape[-1])),
    RowOp("attention_paged", f"(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
          f"{_ATTENTION_TAIL}", _paged, PAGED_MOD.ATTENTION_PAGED, (),
          lambda args: (*args[0].shape[:-1], args[2].shape[-1])),
    RowOp("sample", "(Tensor logits, float temperature, SymInt? top_k, float? top_p, Tensor? seed) -> Tensor", _sample,
          SAMPLING_MOD.SAMPLE, (), lambda args: tuple(args[0].shape[:-1]), lambda args: torch.int64,
          lambda args: (*args[:4], None)),
)

_DEFINED = {row.name: define_dispatched(row) for row in SERVING_OPS}
attention_varlen_op = _DEFINED["attention_varlen"]
attention_paged_op = _DEFINED["attention_paged"]
sample_op = _DEFINED["sample"]
