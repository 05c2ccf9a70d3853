"""``layerzero bench``'s packed and paged attention lines: each op against the plain PyTorch a caller would write.

* ``lz.attention_varlen`` on a packed batch of five causal sequences (1 to 64 tokens, 128 in all) against a
  loop of one ``F.scaled_dot_product_attention`` per sequence over slices of the packed tensors;
* ``lz.attention_paged`` decoding four sequences (9 to 128 cached tokens) from pages of 16 tokens laid out
  at random in the pool, against gathering each sequence's pages into a dense padded ``(batch, heads,
  max_tokens, head_dim)`` K/V and one masked SDPA call.

Both pairs are checked to give the same output before they are timed. The lines carry no budget (they
compare kernels' work, not call overhead): the ratio says what layerzero's selected kernel costs next to
the hand-written PyTorch, on tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.bench.overhead import OverheadRow
from layerzero.timing import PairResult

__all__ = ["run_ragged", "VARLEN_LENGTHS", "PAGED_LENGTHS"]

VARLEN_LENGTHS = (37, 5, 64, 1, 21)
PAGED_LENGTHS = (100, 37, 128, 9)
_HEADS, _DIM, _PAGE = 8, 64, 16

Pair = Callable[[Callable[[], Any], Callable[[], Any]], PairResult]


def _kernel_of(operation: str, args: tuple[Any, ...]) -> str:
    from layerzero.inspection import cache_keys
    from layerzero.runtime import get_runtime

    keys = cache_keys(operation, args)
    data = get_runtime().plans.data
    plan = None if keys is None else data.get(keys[0]) or data.get(keys[1])
    return "kernel: ?" if plan is None else f"kernel: {plan.kernel_id}"


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return {"rtol": tol, "atol": tol}


def _row(path: str, direct: str, res: PairResult, note: str) -> OverheadRow:
    return OverheadRow(path, direct, res, "none (for comparison)", True, f"{note}; {res.ratio:.2f}x the direct call",
                       res.ratio, info=True)


def _varlen_line(kw: dict[str, Any], pair: Pair) -> OverheadRow:
    import layerzero as lz
    from layerzero.ops.attention_varlen import cu_seqlens

    total, longest = sum(VARLEN_LENGTHS), max(VARLEN_LENGTHS)
    q, k, v = (torch.randn(total, _HEADS, _DIM, **kw) for _ in range(3))
    cu = cu_seqlens(list(VARLEN_LENGTHS), q.device)
    bounds = list(zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True))
    sdpa = F.scaled_dot_product_attention

    def loop() -> torch.Tensor:
        return torch.cat([sdpa(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                               is_causal=True).transpose(0, 1) for a, b in bounds])

    def ours() -> torch.Tensor:
        return lz.attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)

    torch.testing.assert_close(ours(), loop(), **_tolerance(q.dtype))
    args = (q, k, v, cu, cu, longest, longest, True, None, None, None)
    return _row(f"lz.attention_varlen, {len(VARLEN_LENGTHS)} causal sequences ({total} tokens)",
                "SDPA per sequence (loop)", pair(loop, ours), _kernel_of("attention_varlen", args))


def _paged_line(kw: dict[str, Any], pair: Pair) -> OverheadRow:
    import layerzero as lz
    from layerzero.ops.attention_paged import page_table

    batch, max_pages = len(PAGED_LENGTHS), -(-max(PAGED_LENGTHS) // _PAGE)
    pool = batch * max_pages + 4
    gen = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(pool, _PAGE, _HEADS, _DIM, **kw) for _ in range(2))
    table = page_table(list(PAGED_LENGTHS), _PAGE, max_pages, pool, gen, kc.device)
    seq_lens = torch.tensor(PAGED_LENGTHS, dtype=torch.int32, device=kc.device)
    q = torch.randn(batch, 1, _HEADS, _DIM, **kw)
    width = max_pages * _PAGE
    pad = (torch.arange(width, device=kc.device)[None, :] < seq_lens[:, None].long())[:, None, None, :]
    index = table.long()
    sdpa = F.scaled_dot_product_attention

    def dense() -> torch.Tensor:
        k = kc[index].reshape(batch, width, _HEADS, _DIM).transpose(1, 2)
        v = vc[index].reshape(batch, width, _HEADS, _DIM).transpose(1, 2)
        return sdpa(q.transpose(1, 2), k, v, attn_mask=pad).transpose(1, 2)

    def ours() -> torch.Tensor:
        return lz.attention_paged(q, kc, vc, table, seq_lens)

    torch.testing.assert_close(ours(), dense(), **_tolerance(q.dtype))
    args = (q, kc, vc, table, seq_lens, True, None, None, None)
    return _row(f"lz.attention_paged decode, batch {batch} ({min(PAGED_LENGTHS)}-{max(PAGED_LENGTHS)} tokens, "
                f"pages of {_PAGE})", "gather pages + dense SDPA", pair(dense, ours),
                _kernel_of("attention_paged", args))


def run_ragged(device: str, dtype: torch.dtype, quick: bool, sync: Callable[[], None] | None,
               progress: Callable[[str], None]) -> list[OverheadRow]:
    """The varlen and the paged line (see the module docstring)."""
    from layerzero.timing import interleaved

    rounds = 30 if quick else 200

    def pair(direct: Callable[[], Any], cand: Callable[[], Any]) -> PairResult:
        return interleaved(direct, cand, rounds=rounds, batch=5, sync=sync)

    kw: dict[str, Any] = dict(device=device, dtype=dtype)
    progress("ragged lz.attention_varlen")
    rows = [_varlen_line(kw, pair)]
    progress("ragged lz.attention_paged")
    rows.append(_paged_line(kw, pair))
    return rows
