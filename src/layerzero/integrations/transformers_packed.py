"""transformers' padding-free packed batches on ``attn_implementation="layerzero"``, run by ``lz.attention_varlen``.

transformers trains without padding by concatenating a batch into one row (``DataCollatorWithFlattening``):
``input_ids`` ``(1, total)``, ``position_ids`` restarting at the first position for every sequence and,
with ``return_flash_attn_kwargs=True``, ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
``max_length_k``. Every keyword reaches the attention function. :func:`packed_attention` recognises such a
call and attends per sequence with :func:`layerzero.attention_varlen`:

- the four ``cu_seq_lens_*`` / ``max_length_*`` keywords, as transformers' flash path takes them;
- else ``position_ids`` of one row that restart (a step other than +1 starts a sequence, as transformers'
  ``find_packed_sequence_indices`` splits them for the sdpa masks), when the attention mask transformers
  built is None or separates the sequences (its first query of each sequence does not see the token
  before it); a padding mask the caller passed (with padded tokens) keeps the dense path, as on the
  flash path. With a cache transformers builds a plain causal mask (or none) for a packed row while
  its flash path attends per sequence; layerzero follows the flash path.

The offsets read from ``position_ids`` are computed once per forward (every layer gets the same tensor).
Under ``torch.compile`` they are not read (that would break the graph): the packed mask transformers
builds while tracing keeps the sequences apart on the dense path. The ``cu_seq_lens_*`` route calls
``lz.attention_varlen``, which is not a ``torch.library`` op yet, so it breaks a compiled graph there.
With ``dropout > 0`` (``attention_varlen`` has none) the call runs ``lz.attention`` with a block-diagonal
mask built from the offsets instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

import layerzero.ops as lz_ops

__all__ = ["packed_layout", "packed_attention", "block_diagonal_mask"]

Layout = tuple[torch.Tensor, torch.Tensor, int, int]
_LAST: list[tuple[weakref.ref[torch.Tensor], int, torch.device, Layout | None]] = []


def _as_offsets(cu: Any, device: torch.device) -> torch.Tensor:
    cu = cu if isinstance(cu, torch.Tensor) else torch.tensor(cu)
    return cu.to(device=device, dtype=torch.int32).reshape(-1)


def _max_len(given: Any, cu: torch.Tensor) -> int:
    if given is not None:
        return int(given)
    return int(cu.diff().max().item()) if cu.numel() > 1 else 0


def _from_position_ids(position_ids: torch.Tensor, device: torch.device) -> Layout | None:
    """Offsets of the sequences in one packed row of ``position_ids``; None when it is one sequence."""
    pos = position_ids.reshape(-1)
    starts = (pos.diff() != 1).nonzero().reshape(-1) + 1
    if starts.numel() == 0:
        return None
    total = torch.tensor([0, pos.numel()], device=pos.device)
    cu = torch.cat((total[:1], starts, total[1:])).to(device=device, dtype=torch.int32)
    longest = _max_len(None, cu)
    return cu, cu, longest, longest


def _cached_from_position_ids(position_ids: torch.Tensor, device: torch.device) -> Layout | None:
    """:func:`_from_position_ids`, remembered for the last tensor (the layers of one forward share it)."""
    if _LAST:
        ref, version, dev, layout = _LAST[0]
        if ref() is position_ids and version == position_ids._version and dev == device:
            return layout
    layout = _from_position_ids(position_ids, device)
    _LAST[:] = [(weakref.ref(position_ids), position_ids._version, device, layout)]
    return layout


def _separates(mask: torch.Tensor, cu: torch.Tensor) -> bool:
    """Whether a 4-D mask hides from each sequence's first query the token before it."""
    starts = cu[1:-1].long()
    starts = starts[starts > 0]
    if starts.numel() == 0:
        return True
    seen = mask[0, 0, starts, starts - 1]
    hidden = ~seen if seen.dtype == torch.bool else seen <= torch.finfo(seen.dtype).min / 2
    return bool(hidden.all().item())


def packed_layout(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  kwargs: dict[str, Any]) -> Layout | None:
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` when this call is a packed batch, else None.

    ``query``/``key`` are transformers' ``(batch, heads, seq, head_dim)``; only batch 1 without a cache
    (as many keys as queries) is a packed batch, as on transformers' flash path.
    """
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or kwargs.get("position_bias") is not None:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        cu_q, cu_k = _as_offsets(cu_q, query.device), _as_offsets(cu_k, query.device)
        return cu_q, cu_k, _max_len(kwargs.get("max_length_q"), cu_q), _max_len(kwargs.get("max_length_k"), cu_k)
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.numel() != query.shape[2] or query.shape[2] < 2:
        return None
    if torch.compiler.is_compiling():  # reading the restarts would break the graph; transformers' mask serves
        return None
    layout = _cached_from_position_ids(position_ids, query.device)
    if layout is None or (attention_mask is not None and (attention_mask.dim() != 4
                                                          or not _separates(attention_mask, layout[0]))):
        return None
    return layout


def block_diagonal_mask(cu: torch.Tensor, total: int, is_causal: bool, window: int | None) -> torch.Tensor:
    """Boolean ``(1, 1, total, total)`` mask (True = attend) keeping attention inside each sequence."""
    ids = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long(),
                                  output_size=total)
    keep = ids[:, None] == ids[None, :]
    if is_causal or window is not None:
        i = torch.arange(total, device=cu.device)
        keep &= i[None, :] <= i[:, None]
        if window is not None:
            keep &= i[None, :] > i[:, None] - window
    return keep[None, None]


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout, dropout: float,
                     scaling: float | None, is_causal: bool, window: int | None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one packed row per sequence; returns transformers' ``(1, total, heads, head_dim)``.

    ``softcap`` (Gemma 2) goes to ``attention_varlen``; dropout and ``sinks`` (GPT-OSS), which it does not
    take, run the dense op with a block-diagonal mask that keeps the sequences apart."""
    cu_q, cu_k, max_q, max_k = layout
    if dropout > 0 or sinks is not None:
        mask = block_diagonal_mask(cu_q, query.shape[2], is_causal, window)
        out = lz_ops.attention(query, key, value, attn_mask=mask, dropout_p=float(dropout), scale=scaling,
                               softcap=softcap, sinks=sinks)
        return out.transpose(1, 2).contiguous()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = lz_ops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal,
                                  scale=None if scaling is None else float(scaling), window=window, softcap=softcap)
    return out.unsqueeze(0)
