"""FlexAttention over a paged KV cache (``lz.attention_paged``): the pages are read where they lie.

The cache pool ``(num_pages, page_size, kv_heads, d)`` is one key sequence of ``num_pages * page_size``
tokens, shared by the whole batch (FlexAttention broadcasts a key batch of one). A block mask whose key
blocks are the pages (``BLOCK_SIZE = (128, page_size)``) lists, for each sequence and block of 128 queries,
the physical pages it reads, in logical order:

* **full** pages, every token visible to every query of the block (no ``mask_mod`` evaluated there);
* **partial** pages (the sequence's last page, the pages the causal frontier or a window cuts), where the
  ``mask_mod`` maps a physical token to its logical position through a page-to-position table and keeps it
  when it is valid (``< seq_lens[b]``), causal (bottom-right: the ``seq_q`` queries are the newest tokens)
  and inside the window.

No page is gathered or copied, and nothing is read to the host: a decode step's cost is the pages it
reads. The block mask and the position table are built on the device once per step's layout (every layer
of a step passes the same ``block_table`` and ``seq_lens``; the cache key is their storage and version, so
an in-place update of the lengths builds a new one).

The batch is padded to a power of two (sequences of length 0, which read no page), so the compiled graph
has a static batch and head count, which FlexAttention's split-KV decoding kernel needs (``seq_q < 128``,
query heads per KV head a power of two), and a serving loop whose batch size moves compiles a handful of
graphs, not one per size. Each (batch bucket, heads, page size, mask kind) is its own code object (see
:func:`layerzero.backends.flex.compiled_call`), so Dynamo's recompile limit is not reached; a family that
still cannot compile is rejected with the reason, never run unfused.

On an H100 (torch 2.11, 32 / 8 heads, head_dim 128, bf16, ``scripts/gpu_varlen_paged.py``) a decode step
takes 0.32-1.27x the time of ``torch_paged_dense`` (which gathers the pages; median 0.45x over batch 1-64,
contexts 1k-32k, pages of 16 and 256; the one loss: batch 1 at 32k with pages of 16), so it ranks above
it; building a step's block mask (the compiled builder) costs another 95-290 µs, once for all the step's
layers.

Page sizes must be multiples of 16 (the key block of Triton's ``tl.dot``), and chunked prefill of 128 or
more queries needs pages of a multiple of 128 (FlexAttention's main kernel takes key blocks of 64-128).
A pool of 2**31 elements or more is past the 32-bit offsets of FlexAttention's kernels: the call is
declined (:class:`~layerzero.errors.KernelDeclinedError`), the next kernel serves it and nothing is counted
against this one. Like ``torch_paged_dense``, it does not read the page table's values on CUDA: entries
outside the pool read no page (their tokens are masked), so a bad table gives a wrong result instead of a
device fault.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from layerzero.backends import flex
from layerzero.context import SelectionContext
from layerzero.errors import KernelDeclinedError
from layerzero.ragged import LayoutCache, interval_blocks, paged_problem
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["flex_paged_kernel", "paged_block_mask", "page_blocks", "flex_paged_specs", "register", "BACKENDS",
           "KERNEL_IDS", "Q_BLOCK", "MASKS"]

#: Queries per row block of the block mask (FlexAttention's default sparse block size).
Q_BLOCK = 128
MASKS = LayoutCache(8)  # a mask holds a (batch, num_pages) position table: a few steps' worth, not more


def _bucket(b: int) -> int:
    """The padded batch: the next power of two (1, 2, 4, ...)."""
    return 1 << max(b - 1, 0).bit_length()


def page_blocks(table: torch.Tensor, seq_lens: torch.Tensor, seq_q: int, num_pages: int, page: int, is_causal: bool,
                window: int | None, batch: int, full: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)`` for FlexAttention's BlockMask.

    Shapes ``(batch, 1, rows)`` and ``(batch, 1, rows, max_pages)`` (int32), ``rows = ceil(seq_q / 128)``;
    ``batch`` may exceed the table's (padding rows read no page). For row block ``r`` of sequence ``b``, with
    ``L = seq_lens[b]``, its queries sit at positions ``first = L - seq_q + 128 r`` to ``last``; it reads the
    logical pages ``[a, e)``: ``e`` ends at the last page holding a position ``<= last`` (causal) or ``< L``,
    ``a`` starts at the window (the first page holding a position ``> first - window``). Of those, the pages
    ``[fa, fe)`` are full: every token ``<= first`` (causal) or ``< L``, and ``> last - window``. The partial
    pages are ``[a, fa)`` then ``[fe, e)``; every index is a physical page, ``block_table[b, logical]``
    (clamped into the pool: a bad entry then names a page whose tokens the ``mask_mod`` masks).
    ``full=False`` lists every page as partial (the decoding kernel splits the key range by the pool's size
    when a mask has full blocks, so a decode step would run on a few of its thread blocks).
    """
    b0, width = table.shape
    dev = table.device
    lens = torch.zeros(batch, dtype=torch.long, device=dev)
    lens[:b0] = seq_lens.long()
    rows = -(-seq_q // Q_BLOCK)
    r = torch.arange(rows, device=dev).view(1, rows) * Q_BLOCK
    first = lens.view(batch, 1) - seq_q + r                                  # (batch, rows)
    last = first + torch.clamp(seq_q - r, max=Q_BLOCK) - 1
    used = torch.div(lens + page - 1, page, rounding_mode="floor").view(batch, 1)
    masked = is_causal or window is not None
    if masked:
        e = torch.minimum(used, torch.div(last, page, rounding_mode="floor") + 1)
        fe = torch.div(first + 1, page, rounding_mode="floor")
    else:
        e = used.expand(batch, rows)
        fe = torch.div(lens, page, rounding_mode="floor").view(batch, 1).expand(batch, rows)
    e = e.clamp(min=0)
    if window is not None:
        a = torch.div(first - window + 1, page, rounding_mode="floor").clamp(min=0)
        fa = -torch.div(-(last - window + 1), page, rounding_mode="floor")  # ceil
    else:
        a = fa = torch.zeros_like(e)
    kv_num, logical, full_num, full_logical = interval_blocks(a, fa, fe, e, width, full)
    tab = torch.zeros(batch, width, dtype=torch.long, device=dev)
    tab[:b0] = table.long().clamp(0, num_pages - 1)
    pick = lambda idx: torch.gather(tab, 1, idx.reshape(batch, -1)).view(batch, 1, rows, width)  # noqa: E731
    as32 = lambda t: t.to(torch.int32).view(batch, 1, rows)  # noqa: E731
    return as32(kv_num), pick(logical).to(torch.int32), as32(full_num), pick(full_logical).to(torch.int32)


def _positions(table: torch.Tensor, seq_lens: torch.Tensor, num_pages: int, page: int, batch: int) -> torch.Tensor:
    """``(batch, num_pages + 1)`` int32: the logical page index of each physical page a sequence uses, else -1.

    Table entries past a sequence's last page (and outside the pool) go to the spare last column, so they
    neither read nor overwrite anything."""
    b0, width = table.shape
    dev = table.device
    used = torch.div(seq_lens.long() + page - 1, page, rounding_mode="floor").view(b0, 1)
    j = torch.arange(width, device=dev).view(1, width)
    target = table.long()
    target = torch.where((j < used) & (target >= 0) & (target < num_pages), target, num_pages)
    pos = torch.full((batch, num_pages + 1), -1, dtype=torch.int32, device=dev)
    pos[:b0].scatter_(1, target, j.expand(b0, width).to(torch.int32))
    return pos


@functools.cache
def _no_q_blocks() -> dict[str, Any]:
    """``compute_q_blocks=False`` where this torch's ``BlockMask.from_kv_blocks`` takes it (inference only:
    the transposed indices serve the backward pass)."""
    from torch.nn.attention.flex_attention import BlockMask

    takes = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
    return {"compute_q_blocks": False} if takes else {}


def _layout_tensors(table: torch.Tensor, seq_lens: torch.Tensor, seq_q: int, num_pages: int, page: int,
                    is_causal: bool, window: int | None, batch: int, full: bool) -> tuple[torch.Tensor, ...]:
    """Everything a step's block mask holds: :func:`page_blocks`, the page-to-position table, the lengths and
    each sequence's query offset (``lens - seq_q``), padded to ``batch`` (one pure function: compiled on CUDA)."""
    blocks = page_blocks(table, seq_lens, seq_q, num_pages, page, is_causal, window, batch, full=full)
    lens = torch.zeros(batch, dtype=torch.long, device=table.device)
    lens[:table.shape[0]] = seq_lens.long()
    return (*blocks, _positions(table, seq_lens, num_pages, page, batch), lens, lens - seq_q)


def paged_block_mask(table: torch.Tensor, seq_lens: torch.Tensor, seq_q: int, num_pages: int, page: int,
                     is_causal: bool, window: int | None) -> Any:
    """The cached BlockMask of this step's layout (see the module docstring); batch padded to a power of two."""
    tensors, extra = (table, seq_lens), (seq_q, num_pages, page, bool(is_causal), window)
    found = MASKS.get(tensors, extra)
    if found is not None:
        return found
    from torch.nn.attention.flex_attention import BlockMask

    batch = _bucket(table.shape[0])
    decoding = seq_q < Q_BLOCK  # FlexAttention's split-KV decoding kernel: no full blocks (see page_blocks)
    kv_num, kv_idx, full_num, full_idx, pos, lens, shift = flex.built(
        _layout_tensors, table, seq_lens, seq_q, num_pages, page, bool(is_causal), window, batch, not decoding)
    causal = bool(is_causal) or window is not None
    w = window

    def paged(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        logical = pos[b, kv_idx // page]
        at = logical * page + kv_idx % page
        keep = (logical >= 0) & (at < lens[b])
        if causal:
            here = q_idx + shift[b]
            keep = keep & (at <= here)
            if w is not None:
                keep = keep & (at > here - w)
        return keep

    if (table.is_cpu or not _no_q_blocks()) and kv_idx.shape[-1] < num_pages:
        # Inductor's CPU kernel wants an index row as wide as the pool, and an older torch transposes them densely
        pad = (0, num_pages - kv_idx.shape[-1])
        kv_idx, full_idx = torch.nn.functional.pad(kv_idx, pad), torch.nn.functional.pad(full_idx, pad)
    fulls = (None, None) if decoding else (full_num, full_idx)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, *fulls, BLOCK_SIZE=(Q_BLOCK, page), mask_mod=paged,
                                    seq_lengths=(seq_q, num_pages * page), **_no_q_blocks())
    return MASKS.put(tensors, extra, mask)


def _family(q: torch.Tensor, vc: torch.Tensor, page: int, is_causal: bool, window: int | None,
            scale: float | None) -> tuple[Any, ...]:
    return (*flex.family_key(q.device, q.dtype, q.shape[-1], vc.shape[-1], is_causal, window, scale, variants=True),
            "paged", page)


def flex_paged_kernel(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap,  # type: ignore[no-untyped-def]
                      *, compiled=True):
    """``attention_paged`` through FlexAttention on the cache pool in place (canonical arguments)."""
    b, sq, hq, d = q.shape
    num_pages, page, hkv = kc.shape[0], kc.shape[1], kc.shape[2]
    flex.check_offsets("flex_attention_paged", f"a pool of {num_pages} pages x {page} tokens x {hkv} heads x {d}",
                       kc, vc)
    try:  # the pool as one key sequence: a view, never a copy of the cache
        kb = kc.view(1, num_pages * page, hkv, d).transpose(1, 2)
        vb = vc.view(1, num_pages * page, hkv, vc.shape[-1]).transpose(1, 2)
    except RuntimeError as exc:  # pages not laid out back to back (a slice of an interleaved K/V cache, say)
        raise KernelDeclinedError(f"flex_attention_paged: the cache's pages are not one strided sequence of tokens "
                                  f"(k_cache strides {kc.stride()}): {exc}", kernel_id="flex_attention_paged") from exc
    if not q.is_cuda:  # a host read costs nothing here: name bad tables and lengths as the torch kernels do
        problem = paged_problem(sq, num_pages, page, table, seq_lens)
        if problem is not None:
            raise ValueError(problem)
    bm = paged_block_mask(table, seq_lens, sq, num_pages, page, is_causal, window)
    batch = bm.kv_num_blocks.shape[0]
    if batch != b:  # padded in q's own layout, so padded and unpadded calls trace alike (same strides)
        padded = q.new_zeros(batch, sq, hq, d)
        padded[:b] = q
        q = padded
    qb = q.transpose(1, 2)
    flex.load()
    mod = None if softcap is None else flex.score_mod(softcap, None, sq, num_pages * page, q.device)
    if compiled:
        for t in (bm.kv_indices, bm.full_kv_indices):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 3)  # the table's width grows with the longest sequence
        out = flex.compiled_call(_family(q, vc, page, is_causal, window, scale), qb, kb, vb, bm, scale, mod, False,
                                 static_bh=True)
    else:
        out = flex.variant_call(qb, kb, vb, bm, scale, mod, False)
    return out[:b].transpose(1, 2)


def _check(ctx: SelectionContext) -> list[Reason]:
    out = flex.check(ctx)
    page = ctx.hidden_size  # the paged op's context carries the page size here
    if page is not None and page % 16:
        out.append(Reason(ReasonCode.CUSTOM, f"page_size={page} is not a multiple of 16 (FlexAttention's key "
                                             "blocks are the pages; tl.dot needs 16)"))
    elif page is not None and (ctx.seq_len_q or 1) >= Q_BLOCK and page % 128:
        out.append(Reason(ReasonCode.CUSTOM, f"seq_q={ctx.seq_len_q} >= {Q_BLOCK} runs FlexAttention's main kernel, "
                                             f"whose key blocks need pages of a multiple of 128 (page_size={page})"))
    if page is not None and ctx.dtype is not None and ctx.head_dim is not None:
        failed = flex.failure((*flex.family_key(ctx.device, ctx.dtype, ctx.head_dim, ctx.head_dim_v or ctx.head_dim,
                                                ctx.is_causal, ctx.window, ctx.scale, variants=True), "paged", page))
        if failed is not None:
            out.append(Reason(ReasonCode.COMPILE_UNSAFE, failed))
    return out


def flex_paged_specs() -> list[KernelSpec]:
    return [
        KernelSpec("flex_attention_paged", "attention_paged", "flex", flex_paged_kernel, priority=40,
                   supports_autograd=False, extra_check=_check,
                   description="FlexAttention on the cache pool in place: the pages are the key blocks of a block "
                               "mask built on the device per step (no gather, no host read); batch padded to a "
                               "power of two for the split-KV decoding kernel", **flex.SPEC_FIELDS),
    ]


# The layerzero.backends.base.Backend contract.
BACKENDS: tuple[str, ...] = ("flex",)
KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in flex_paged_specs())


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Declare the flex backend (as :mod:`layerzero.backends.flex` does) and add the paged kernel."""
    flex.declare(backends)
    return [kernels.register(s) for s in flex_paged_specs() if s.kernel_id not in kernels]
