"""``lz.attention_paged``: attention of new queries against a paged KV cache (decode and chunked prefill).

The cache is a pool of pages, ``k_cache``/``v_cache`` ``(num_pages, page_size, kv_heads, head_dim)``;
sequence ``b``'s ``j``-th token lives at page ``block_table[b, j // page_size]``, slot ``j % page_size``, and
it has ``seq_lens[b]`` valid tokens, the new ones included. ``q`` ``(batch, seq_q, heads, head_dim)`` holds
the ``seq_q`` newest tokens of each sequence (``seq_q = 1``: decode), so the causal mask and window are
aligned bottom-right (FlashAttention's ``flash_attn_with_kvcache`` and FlashInfer's meaning). Kernels get
``(q, k_cache, v_cache, block_table, seq_lens, is_causal, scale, window, softcap)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.ops.attention_ragged import float_problem, heads_problem, index_problem, option_problem
from layerzero.ops.base import FLOAT_MAX, OpDef, option_flag, pick
from layerzero.ops.contract import CallContract
from layerzero.ragged import attend_math, gather_pages, paged_problem
from layerzero.runtime import get_runtime

__all__ = ["attention_paged", "ATTENTION_PAGED", "PagedAttentionOp", "paged_reference", "page_table"]

_SHAPES = {"q": "(batch, seq_q, heads, head_dim)", "k_cache": "(num_pages, page_size, kv_heads, head_dim)",
           "v_cache": "(num_pages, page_size, kv_heads, head_dim)"}


def paged_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, is_causal: bool = True, scale: float | None = None,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Float64 reference: each sequence's pages gathered into dense K/V, then bottom-right attention."""
    out = torch.zeros(*q.shape[:3], v_cache.shape[-1], dtype=torch.float64, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        k = gather_pages(k_cache, block_table[b], n)
        v = gather_pages(v_cache, block_table[b], n)
        out[b] = attend_math(q[b], k, v, is_causal, scale, window, softcap, torch.float64)
    return out


def page_table(seq_lens: list[int], page_size: int, max_pages: int, num_pages: int,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """A block table giving the sequences distinct pages in a random order of the pool (int32)."""
    need = sum(-(-n // page_size) for n in seq_lens)
    if need > num_pages:
        raise ValueError(f"{need} pages needed, the pool has {num_pages}")
    pool = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    at = 0
    for b, n in enumerate(seq_lens):
        used = -(-n // page_size)
        table[b, :used] = torch.tensor(pool[at:at + used], dtype=torch.int32)
        at += used
    return table.to(device)


class PagedAttentionOp(OpDef):
    family = "attention_paged"
    arg_names = ("q", "k_cache", "v_cache", "block_table", "seq_lens", "is_causal", "scale", "window", "softcap")
    input_aliases = ("query", "key_cache", "value_cache", "block_tables", "cache_seqlens")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        q, kc, vc, table, seq_lens, is_causal, scale, window, softcap = args
        problem = float_problem({"q": q, "k_cache": kc, "v_cache": vc}, {"q": 4, "k_cache": 4, "v_cache": 4},
                                _SHAPES)
        if problem is None:
            problem = heads_problem(q.shape[2], kc.shape[2], q.shape[3], kc.shape[3])
        if problem is None and kc.shape[:3] != vc.shape[:3]:
            problem = (f"k_cache and v_cache must agree on pages, page size and heads, got {tuple(kc.shape)} and "
                       f"{tuple(vc.shape)}")
        if problem is None and (0 in q.shape[:2] or 0 in kc.shape[:2]):
            problem = "empty attention inputs (no sequence, query, page or page slot)"
        problem = problem or index_problem("block_table", table, 2, q.device, "(batch, max_pages)")
        problem = problem or index_problem("seq_lens", seq_lens, 1, q.device, "(batch,)")
        if problem is None and (table.shape[0] != q.shape[0] or seq_lens.shape[0] != q.shape[0]):
            problem = (f"block_table has {table.shape[0]} rows and seq_lens {seq_lens.shape[0]} entries, "
                       f"q a batch of {q.shape[0]}")
        if problem is None and q.shape[1] > table.shape[1] * kc.shape[1]:
            problem = (f"seq_q={q.shape[1]} new tokens do not fit in {table.shape[1]} pages of {kc.shape[1]} "
                       "tokens")
        problem = problem or option_problem(is_causal, scale, window, softcap)
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def diagnose(self, operation: str, args: tuple[Any, ...]) -> None:
        q, kc, _, table, seq_lens = args[:5]
        problem = paged_problem(q.shape[1], kc.shape[0], kc.shape[1], table, seq_lens)
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        q, kc, vc, table, seq_lens, is_causal, scale, window, softcap = args
        return SelectionContext(
            device=q.device, dtype=q.dtype, batch_size=q.shape[0], seq_len_q=q.shape[1],
            seq_len_k=table.shape[1] * kc.shape[1], num_heads=q.shape[2], num_kv_heads=kc.shape[2],
            head_dim=q.shape[3], head_dim_v=vc.shape[3], num_tokens=q.shape[0] * q.shape[1], hidden_size=kc.shape[1],
            is_causal=is_causal,
            scale=scale, window=window, softcap=softcap is not None,
            requires_grad=torch.is_grad_enabled() and (q.requires_grad or kc.requires_grad or vc.requires_grad),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            is_contiguous=q.stride(-1) == 1 and kc.stride(-1) == 1 and vc.stride(-1) == 1,
            cuda_graph_capturing=q.is_cuda and torch.cuda.is_current_stream_capturing(),
            compiling=torch.compiler.is_compiling())

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        q, vc = args[0], args[2]
        return self.output_meta_check(operation, out, (*q.shape[:3], vc.shape[-1]), q.dtype, q.device)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        return paged_reference(*args)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        b, sq = ctx.batch_size or 3, ctx.seq_len_q or 1
        page = ctx.hidden_size or 16  # the context's page size (see context())
        capacity = max(ctx.seq_len_k or 64, sq)
        max_pages = -(-capacity // page)
        lens = [max(sq, (capacity * (b - i)) // b) for i in range(b)]  # ragged, the first one the longest
        pages = b * max_pages + 3
        hq = ctx.num_heads or 4
        hkv, d = ctx.num_kv_heads or hq, ctx.head_dim or 32
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        q = torch.randn(b, sq, hq, d, **kw)
        kc = torch.randn(pages, page, hkv, d, **kw)
        vc = torch.randn(pages, page, hkv, ctx.head_dim_v or d, **kw)
        gen = generator if generator is not None and generator.device.type == "cpu" else None
        table = page_table(lens, page, max_pages, pages, gen, ctx.device)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=ctx.device)
        return (q, kc, vc, table, seq_lens, ctx.is_causal, ctx.scale, ctx.window, None)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
                         ) -> tuple[Any, ...]:
        m = {**inputs, **kwargs}
        return (pick(m, "query", "q", operation=operation), pick(m, "k_cache", "key_cache", operation=operation),
                pick(m, "v_cache", "value_cache", operation=operation),
                pick(m, "block_table", "block_tables", operation=operation),
                pick(m, "seq_lens", "cache_seqlens", operation=operation), option_flag(m, "is_causal", operation, default=True),
                m.get("scale"), m.get("window"), m.get("softcap"))

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, batch_size=b, seq_len_q=sq, seq_len_k=sk,
                                 num_heads=4, num_kv_heads=kv, head_dim=32, is_causal=True)
                for b, sq, sk, kv in ((3, 1, 64, 2), (2, 4, 48, 4))]


ATTENTION_PAGED = PagedAttentionOp()

_DOC = """Attention of ``q``, the newest ``seq_q`` tokens of each sequence, against a paged KV cache.

    Args:
        q: ``(batch, seq_q, heads, head_dim)`` (``seq_q = 1`` decodes; more is chunked prefill).
        k_cache, v_cache: ``(num_pages, page_size, kv_heads, head_dim)``; GQA/MQA when kv_heads divides heads.
        block_table: int32 ``(batch, max_pages)``: sequence ``b``'s token ``j`` is at page
            ``block_table[b, j // page_size]``; entries past a sequence's last page are not read.
        seq_lens: int32 ``(batch,)``, each sequence's valid cached tokens including the new ones
            (``seq_q <= seq_lens[b] <= max_pages * page_size``).
        is_causal: the new tokens see the cache and the new tokens up to their own (bottom-right causal).
        scale, window, softcap: as in :func:`layerzero.attention_varlen`.

    Returns:
        ``(batch, seq_q, heads, head_dim)`` in q's dtype.

    Example:
        >>> out = lz.attention_paged(q, k_cache, v_cache, block_table, seq_lens)
    """

#: ``lz.attention_paged``'s cached call: an exact key (a serving step's batch and table widths take few
#: values) without the pool's page count, which selection never sees (so ``lz.warmup`` / ``lz.solve`` shapes
#: serve any pool); the guard keeps what validation checks of it (both caches have the same, non-zero
#: count). The page table's and lengths' values are data checks, made by the torch kernels as they read
#: them and named by :meth:`PagedAttentionOp.diagnose` once a kernel raised.
ATTENTION_PAGED_CONTRACT = CallContract(
    name="attention_paged",
    signature="q, k_cache, v_cache, block_table, seq_lens, *, is_causal=True, scale=None, window=None, softcap=None",
    args="q, k_cache, v_cache, block_table, seq_lens, is_causal, scale, window, softcap",
    operation='"attention_paged"',
    family='("attention_paged", q.dtype, q.is_cpu or q.device, k_cache.dtype, v_cache.dtype, block_table.dtype, '
           'seq_lens.dtype, block_table.is_cpu, seq_lens.is_cpu, is_causal, window, softcap is None)',
    shape="q.shape, k_cache.shape[1:], v_cache.shape[1:], block_table.shape, seq_lens.shape",
    guard="(k_cache.shape[0] == v_cache.shape[0] and k_cache.shape[0] > 0 and is_causal.__class__ is bool and (window is None or window.__class__ is int) "
          "and (scale is None or (scale.__class__ is float or scale.__class__ is int) "
          "and -FLOAT_MAX <= scale <= FLOAT_MAX) "
          "and (softcap is None or (softcap.__class__ is float or softcap.__class__ is int) and 0 < softcap <= FLOAT_MAX))",
    namespace={"FLOAT_MAX": FLOAT_MAX},
    doc=_DOC,
)

attention_paged = ATTENTION_PAGED.bind_contract(ATTENTION_PAGED_CONTRACT, get_runtime())
