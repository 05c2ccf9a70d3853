"""transformers' padding-free packed batches on ``attn_implementation="layerzero"``, run by ``lz.attention_varlen``.

transformers trains without padding by concatenating sequences into rows: ``DataCollatorWithFlattening``
makes one row (``input_ids`` ``(1, total)``); packing collators (TRL's) make several rows of packed
sequences. ``position_ids`` restart at the first position for every sequence and, with
``return_flash_attn_kwargs=True``, ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``
come too. Every keyword reaches the attention function. :func:`packed_attention` recognises such a call and
attends per sequence with :func:`layerzero.attention_varlen` over the rows flattened into one packed
tensor, as transformers' flash path does:

- the four ``cu_seq_lens_*`` / ``max_length_*`` keywords (offsets into the flattened rows);
- else ``position_ids`` that restart inside a row (a step other than +1 starts a sequence, as transformers'
  ``find_packed_sequence_indices`` splits them for the sdpa masks; a sequence never spans two rows), when
  the attention mask transformers built is None, separates the sequences (in every row, the first query
  of each sequence does not see the token before it) or hides no padding (every query sees its own token:
  transformers' sliding-window masks of a packed row, which do not keep the sequences apart); a padding
  mask the caller passed (with padded tokens) keeps the dense path, as on the flash path. Rows without a restart (an ordinary batch) stay dense. With
  a cache transformers builds a plain causal mask (or none) for a packed row while its flash path attends
  per sequence; layerzero follows the flash path.

The offsets read from ``position_ids`` are computed once per forward (every layer gets the same tensor).
Under ``torch.compile`` they are not read (that would break the graph): the packed mask transformers
builds while tracing keeps the sequences apart on the dense path. The ``cu_seq_lens_*`` route calls
``lz.attention_varlen``, a ``torch.library`` op under compile. With ``dropout > 0`` (``attention_varlen``
has none) or ``sinks``, the call runs ``lz.attention`` with a per-row block-diagonal mask built from the
offsets instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

import layerzero.ops as lz_ops
from layerzero.ragged import LayoutCache

__all__ = ["packed_layout", "packed_attention", "block_diagonal_mask", "served_layout", "served_mask"]

Layout = tuple[torch.Tensor, torch.Tensor, int, int]
_LAST: list[tuple[weakref.ref[torch.Tensor], int, tuple[torch.device, int], Layout | None]] = []


def _as_offsets(cu: Any, device: torch.device) -> torch.Tensor:
    cu = cu if isinstance(cu, torch.Tensor) else torch.tensor(cu)
    return cu.to(device=device, dtype=torch.int32).reshape(-1)


def _max_len(given: Any, cu: torch.Tensor) -> int:
    if given is not None:
        return int(given)
    return int(cu.diff().max().item()) if cu.numel() > 1 else 0


def _from_position_ids(position_ids: torch.Tensor, rows: int, device: torch.device) -> Layout | None:
    """Offsets of the sequences in ``rows`` packed rows of ``position_ids`` (flattened, row after row; every
    row starts a sequence); None when no row holds more than one sequence."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[0] != rows:
        pos = pos.expand(rows, -1)
    length = pos.shape[1]
    inner = pos.diff(dim=-1) != 1  # (rows, length - 1): True where a new sequence starts inside a row
    if not bool(inner.any()):
        return None
    starts = torch.ones(rows, length, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = inner
    total = torch.tensor([rows * length], device=pos.device)
    cu = torch.cat((starts.reshape(-1).nonzero().reshape(-1), total)).to(device=device, dtype=torch.int32)
    longest = _max_len(None, cu)
    return cu, cu, longest, longest


def _cached_from_position_ids(position_ids: torch.Tensor, rows: int, device: torch.device) -> Layout | None:
    """:func:`_from_position_ids`, remembered for the last tensor (the layers of one forward share it)."""
    if _LAST:
        ref, version, where, layout = _LAST[0]
        if ref() is position_ids and version == position_ids._version and where == (device, rows):
            return layout
    layout = _from_position_ids(position_ids, rows, device)
    _LAST[:] = [(weakref.ref(position_ids), position_ids._version, (device, rows), layout)]
    return layout


def _separates(mask: torch.Tensor, cu: torch.Tensor, length: int) -> bool:
    """Whether a 4-D mask ``(rows or 1, heads or 1, length, length)`` hides from each sequence's first query
    the token before it (``cu``: offsets into the flattened rows)."""
    starts = cu[1:-1].long()
    row, col = starts // length, starts % length
    keep = col > 0
    row, col = row[keep], col[keep]
    if col.numel() == 0:
        return True
    if mask.shape[0] == 1:
        row = torch.zeros_like(row)
    return not bool(_visible(mask[row, 0, col, col - 1]).any().item())


def _padding_free(mask: torch.Tensor, length: int) -> bool:
    """Whether a 4-D mask lets every query see its own token: it hides no padding (transformers hides a padded
    key from every query, itself included). transformers builds such a mask for a sliding-window layer of a
    packed row without keeping the sequences apart (its packed-sequence detection serves the full causal
    masks only); the flash path attends per sequence there, and so does layerzero. O(length) to read."""
    return bool(_self_visible(mask, length).all().item())


def _visible(values: torch.Tensor) -> torch.Tensor:
    """Where a mask's ``values`` let a query see a key: True in a bool mask, above half the dtype's lowest
    value in an additive one."""
    return values if values.dtype == torch.bool else values > torch.finfo(values.dtype).min / 2


def _self_visible(mask: torch.Tensor, length: int) -> torch.Tensor:
    """``(rows or 1, length)``: whether each token sees itself (a padded one does not)."""
    return _visible(torch.diagonal(mask[:, 0, :length, :length], dim1=-2, dim2=-1))


def _no_padding_inside(mask: torch.Tensor, cu: torch.Tensor, rows: int, length: int) -> bool:
    """Whether no padded token (one the 4-D mask hides from itself) comes before a real token of its own detected
    sequence: attention per sequence would let that token see it. Left padding with ``position_ids`` of
    ``mask.cumsum(-1) - 1`` (OPT's own, a common idiom) reads as pads -1, -1, -1 then 0, 1, ...: the last pad
    steps +1 into the first real token and joins its sequence. Padding after a sequence is never seen (causal)."""
    visible = _self_visible(mask, length).expand(rows, length).reshape(-1)
    start = torch.zeros(rows * length + 1, dtype=torch.bool, device=visible.device)
    start[cu.long().clamp(max=rows * length)] = True
    pad_then_real = ~visible[:-1] & ~start[1:-1] & visible[1:]
    return not bool(pad_then_real.any().item())


_SERVED = LayoutCache(8)


def served_layout(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int) -> Layout:
    """The layout of a continuous-batching step: its offsets, with the padding after the last sequence (a
    static-shape batch pads queries and keys; the offsets then plateau) as one more sequence whose output
    rows are padding too. Read to the host once per step and key layout (its layers share the tensors)."""
    found = _SERVED.get((cu_q, cu_k), (total_q, total_k))
    if found is not None:
        return found
    oq, ok = cu_q.tolist(), cu_k.tolist()
    if oq[-1] < total_q or ok[-1] < total_k:
        oq, ok = [*oq, total_q], [*ok, total_k]
    longest = (max(b - a for a, b in zip(o[:-1], o[1:], strict=True)) if len(o) > 1 else 0 for o in (oq, ok))
    layout = (torch.tensor(oq, dtype=torch.int32, device=cu_q.device),
              torch.tensor(ok, dtype=torch.int32, device=cu_k.device), *longest)
    return _SERVED.put((cu_q, cu_k), (total_q, total_k), layout)


def packed_layout(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  kwargs: dict[str, Any]) -> Layout | None:
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` when this call is a packed batch, else None.

    ``query``/``key`` are transformers' ``(batch, heads, seq, head_dim)``; the offsets index the rows
    flattened one after the other. Only calls without a cache (as many keys as queries) are packed, as on
    transformers' flash path, and the steps of transformers' continuous batching (``generate_batch``: one
    row of new tokens, the keys each sequence's cache then its new tokens, ``write_index`` among the
    keywords), which :func:`served_layout` lays out.
    """
    rows, length = query.shape[0], query.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if rows == 1 and "write_index" in kwargs and isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor):
        return served_layout(_as_offsets(cu_q, query.device), _as_offsets(cu_k, query.device), length, key.shape[2])
    if key.shape[2] != length or kwargs.get("position_bias") is not None:
        return None
    if cu_q is not None and cu_k is not None:
        cu_q, cu_k = _as_offsets(cu_q, query.device), _as_offsets(cu_k, query.device)
        return cu_q, cu_k, _max_len(kwargs.get("max_length_q"), cu_q), _max_len(kwargs.get("max_length_k"), cu_k)
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1:] != (length,) or length < 2 \
            or position_ids.numel() not in (length, rows * length):
        return None
    if torch.compiler.is_compiling():  # reading the restarts would break the graph; transformers' mask serves
        return None
    layout = _cached_from_position_ids(position_ids, rows, query.device)
    if layout is None or (attention_mask is not None and (attention_mask.dim() != 4 or not (
            _separates(attention_mask, layout[0], length) or _padding_free(attention_mask, length))
            or not _no_padding_inside(attention_mask, layout[0], rows, length))):
        return None
    return layout


def block_diagonal_mask(cu: torch.Tensor, total: int, is_causal: bool, window: int | None,
                        rows: int = 1) -> torch.Tensor:
    """Boolean ``(rows, 1, total // rows, total // rows)`` mask (True = attend) keeping attention inside each
    sequence of each row (``cu``: offsets into the ``total`` flattened tokens)."""
    length = total // rows
    ids = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long(),
                                  output_size=total).reshape(rows, length)
    keep = ids[:, :, None] == ids[:, None, :]
    if is_causal or window is not None:
        i = torch.arange(length, device=cu.device)
        keep &= i[None, :] <= i[:, None]
        if window is not None:
            keep &= i[None, :] > i[:, None] - window
    return keep[:, None]


def served_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, is_causal: bool,
                window: int | None) -> torch.Tensor:
    """Boolean ``(1, 1, total_q, total_k)`` mask of one row whose sequences have more keys than queries (a
    continuous-batching step): each query sees its own sequence's keys, bottom-right causal (the queries are
    the newest tokens) and within the window."""
    def layout(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long(),
                                      output_size=total)
        return seq, torch.arange(total, device=cu.device) - cu.long()[seq]

    seq_q, pos_q = layout(cu_q, total_q)
    seq_k, pos_k = layout(cu_k, total_k)
    keep = seq_q[:, None] == seq_k[None, :]
    if is_causal or window is not None:
        here = pos_q + (cu_k.diff() - cu_q.diff()).long()[seq_q]  # each query's position among its keys
        keep &= pos_k[None, :] <= here[:, None]
        if window is not None:
            keep &= pos_k[None, :] > here[:, None] - window
    return keep[None, None]


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout, dropout: float,
                     scaling: float | None, is_causal: bool, window: int | None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed rows per sequence; returns transformers' ``(rows, length, heads, head_dim)``.

    ``softcap`` (Gemma 2) goes to ``attention_varlen``; dropout and ``sinks`` (GPT-OSS), which it does not
    take, run the dense op with a block-diagonal mask per row that keeps the sequences apart."""
    cu_q, cu_k, max_q, max_k = layout
    rows, length = query.shape[0], query.shape[2]
    if dropout > 0 or sinks is not None:
        mask = (block_diagonal_mask(cu_q, rows * length, is_causal, window, rows) if key.shape[2] == length
                else served_mask(cu_q, cu_k, length, key.shape[2], is_causal, window))
        out = lz_ops.attention(query, key, value, attn_mask=mask, dropout_p=float(dropout), scale=scaling,
                               softcap=softcap, sinks=sinks)
        return out.transpose(1, 2).contiguous()
    q, k, v = (t.transpose(1, 2).reshape(rows * t.shape[2], t.shape[1], t.shape[3]) for t in (query, key, value))
    out = lz_ops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal,
                                  scale=None if scaling is None else float(scaling), window=window, softcap=softcap)
    return out.reshape(rows, length, *out.shape[1:])
