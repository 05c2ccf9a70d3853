"""Helpers for packed (varlen) and paged attention, shared by the ops and the torch kernels (no layerzero imports).

Masks are aligned **bottom-right** as in FlashAttention: with ``sq`` queries and ``sk`` keys, query ``i``
sits at key position ``i + sk - sq``; causal lets it see keys ``j <= i + sk - sq`` and a ``window`` of
``w`` lets it see the ``w`` keys ending there (FlashAttention's ``window_size=(w - 1, 0)``). A query row
that sees no key (``sk == 0``, or causal with ``i + sk - sq < 0``) gives zeros, as FlashAttention does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

from layerzero import forksafe

__all__ = ["zeros_from", "keep_mask", "softcapped_scores", "attend_math", "varlen_problem", "checked_offsets",
           "paged_problem", "gather_pages", "lengths", "LayoutCache", "interval_blocks"]


def zeros_from(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(rows, heads, dv)`` zeros for queries that see no key, on the autograd graph of q, k and v (an empty
    slice's sum: exactly 0, zero gradients, never NaN), so that ``out.sum().backward()`` works as it does when
    some query sees a key."""
    out = q.new_zeros(rows, q.shape[1], v.shape[-1], dtype=dtype)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = out + (q.narrow(0, 0, 0).sum() + k.narrow(0, 0, 0).sum() + v.narrow(0, 0, 0).sum()).to(out.dtype)
    return out


def keep_mask(sq: int, sk: int, is_causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean ``(sq, sk)`` mask (True = attend), bottom-right aligned; None when every key is visible."""
    if not is_causal and window is None:
        return None
    i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk, device=device).unsqueeze(0)
    keep = j <= i  # a window is always causal
    if window is not None:
        keep &= j > i - window
    return keep


def softcapped_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``tanh(scores / softcap) * softcap`` (Gemma 2's logit softcapping, applied before masking)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attend_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
                window: int | None, softcap: float | None, compute: torch.dtype) -> torch.Tensor:
    """One sequence, ``(s, heads, d)`` in and out, computed in ``compute`` precision; GQA by head repetition."""
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    if sq == 0 or sk == 0:
        return zeros_from(q, k, v, sq, compute)
    qh, kh, vh = q.to(compute).transpose(0, 1), k.to(compute).transpose(0, 1), v.to(compute).transpose(0, 1)
    if hq != hkv:
        kh, vh = kh.repeat_interleave(hq // hkv, 0), vh.repeat_interleave(hq // hkv, 0)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    scores = softcapped_scores((qh @ kh.transpose(-2, -1)) * s, softcap)
    keep = keep_mask(sq, sk, is_causal, window, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # rows that see no key give zeros
    return (probs @ vh).transpose(0, 1)


def lengths(cu: torch.Tensor) -> list[int]:
    """Per-sequence lengths from cumulative offsets (one host read)."""
    offsets = cu.tolist()
    return [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _cu_problem(name: str, offsets: list[int], total: int, max_len: int, max_name: str) -> str | None:
    if offsets[0] != 0:
        return f"{name} must start at 0, got {offsets[0]}"
    steps = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if any(s < 0 for s in steps):
        at = next(i for i, s in enumerate(steps) if s < 0)
        return f"{name} must be non-decreasing, got {offsets[at]} then {offsets[at + 1]} at sequence {at}"
    if offsets[-1] != total:
        return f"{name} ends at {offsets[-1]}, but the packed tensor has {total} tokens"
    longest = max(steps, default=0)
    if longest > max_len:
        return f"a sequence of {longest} tokens is longer than {max_name}={max_len}"
    return None


def checked_offsets(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                    max_k: int) -> tuple[list[int], list[int]]:
    """The offsets as lists (one host read each); ``ValueError`` naming what is wrong with their values."""
    oq, ok = cu_q.tolist(), cu_k.tolist()
    problem = (_cu_problem("cu_seqlens_q", oq, q.shape[0], max_q, "max_seqlen_q")
               or _cu_problem("cu_seqlens_k", ok, k.shape[0], max_k, "max_seqlen_k"))
    if problem is not None:
        raise ValueError(problem)
    return oq, ok


def varlen_problem(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                   max_k: int) -> str | None:
    """What is wrong with the offsets' values (they are read: a device sync on a GPU), or None."""
    try:
        checked_offsets(q, k, cu_q, cu_k, max_q, max_k)
    except ValueError as exc:
        return str(exc)
    return None


def paged_problem(seq_q: int, num_pages: int, page_size: int, block_table: torch.Tensor,
                  seq_lens: torch.Tensor) -> str | None:
    """What is wrong with ``seq_lens`` and the used entries of ``block_table`` (both are read), or None."""
    capacity = block_table.shape[1] * page_size
    for b, n in enumerate(seq_lens.tolist()):
        if n < seq_q:
            return f"seq_lens[{b}]={n} is less than seq_q={seq_q} (seq_lens counts the new tokens too)"
        if n > capacity:
            return (f"seq_lens[{b}]={n} exceeds the block table's capacity of {block_table.shape[1]} pages x "
                    f"{page_size} tokens = {capacity}")
        used = block_table[b, : -(-n // page_size)]
        bad = (used < 0) | (used >= num_pages)
        if bool(bad.any()):
            return (f"block_table[{b}] holds page {int(used[bad][0])}, outside [0, {num_pages}) "
                    f"(k_cache has {num_pages} pages)")
    return None


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` tokens of one sequence, ``(n, kv_heads, d)``, from its page list (a copy)."""
    page_size = cache.shape[1]
    used = pages[: -(-n // page_size)].long()
    return cache.index_select(0, used).reshape(-1, *cache.shape[2:])[:n]


class LayoutCache:
    """A small LRU of what was built from index tensors (a block mask per packed or paged layout).

    Keyed by the tensors' memory, layout and version counter, so every layer of one forward (or one decode
    step) finds the entry, and an in-place edit (the version moves) misses it. Each entry holds its tensors:
    while it lives their memory cannot be freed and handed to a new tensor, which would otherwise find a
    stale entry at the same address (a serving loop's fresh ``seq_lens`` every step lands there)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], tuple[tuple[torch.Tensor, ...], Any]] = OrderedDict()
        self._lock = forksafe.lock(self)

    @staticmethod
    def key(tensors: tuple[torch.Tensor, ...], extra: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*((t.untyped_storage().data_ptr(), t.storage_offset(), t._version, tuple(t.shape), t.stride(),
                   t.device.type, t.device.index) for t in tensors), *extra)

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple[Any, ...]) -> Any:
        found = self._entries.get(self.key(tensors, extra))
        return None if found is None else found[1]

    def put(self, tensors: tuple[torch.Tensor, ...], extra: tuple[Any, ...], value: Any) -> Any:
        with self._lock:
            self._entries[self.key(tensors, extra)] = (tensors, value)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def interval_blocks(a: torch.Tensor, fa: torch.Tensor, fe: torch.Tensor, e: torch.Tensor, width: int, full: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block mask's rows from intervals of block indices: per row the blocks ``[a, e)`` are visited, of which
    ``[fa, fe)`` are full (every pair visible: no mask evaluated there) and the rest partial.

    Returns ``(partial_count, partial_index, full_count, full_index)``: counts shaped like ``a``, index rows of
    ``width`` entries (partial ``[a, fa)`` then ``[fe, e)``; full ``[fa, fe)``), clamped into ``[0, width)``
    past each row's count. ``full=False`` lists every block as partial. Counts below zero read as none."""
    fa = torch.maximum(fa, a)
    fe = torch.minimum(fe, e)
    empty = fa >= fe
    if not full:
        empty = torch.ones_like(empty)
    fa = torch.where(empty, e, fa)
    fe = torch.where(empty, e, fe)
    a = torch.minimum(a, fa)
    n1 = (fa - a).unsqueeze(-1)
    j = torch.arange(width, device=a.device)
    partial = torch.where(j < n1, a.unsqueeze(-1) + j, fe.unsqueeze(-1) + j - n1).clamp(0, width - 1)
    whole = (fa.unsqueeze(-1) + j).clamp(0, width - 1)
    return (fa - a + e - fe).clamp(min=0), partial, (fe - fa).clamp(min=0), whole
