"""FlexAttention over packed batches (``flex_attention_varlen``) against the float64 reference, on the CPU
through eager FlexAttention (exact, unfused): document masks with bottom-right causal alignment, windows,
softcap, GQA, sequences of 0 and 1 tokens, queries shorter and longer than keys; the block-mask cache."""

from __future__ import annotations

import pytest
import torch

from layerzero.backends.flex_varlen import flex_varlen_kernel, varlen_block_mask
from layerzero.ops.attention_varlen import cu_seqlens, varlen_reference

pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CASES = [
    ([5, 1, 9], [5, 1, 9], dict(is_causal=True)),
    ([3, 0, 7, 1], [6, 2, 7, 4], dict(is_causal=True)),        # q shorter than k: bottom-right
    ([4, 6], [2, 6], dict(is_causal=True)),                     # q longer than k: early rows see nothing
    ([8, 5], [8, 5], dict(is_causal=True, window=3)),
    ([7, 2], [7, 9], dict(is_causal=False)),
    ([6, 6], [6, 6], dict(is_causal=True, softcap=2.0)),
]


@pytest.mark.parametrize("lens_q,lens_k,kw", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_flex_varlen_matches_the_float64_reference(lens_q: list[int], lens_k: list[int], kw: dict, hq: int,
                                                   hkv: int) -> None:
    g = torch.Generator().manual_seed(sum(lens_q) * 7 + hkv)
    q = torch.randn(sum(lens_q), hq, 16, generator=g)
    k = torch.randn(sum(lens_k), hkv, 16, generator=g)
    v = torch.randn(sum(lens_k), hkv, 16, generator=g)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), kw.get("is_causal", False), None, kw.get("window"),
            kw.get("softcap"))
    out = flex_varlen_kernel(*args, compiled=False)
    want = varlen_reference(*(t.double() if t.is_floating_point() else t for t in args[:5]), *args[5:])
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_block_masks_are_cached_per_layout_and_rebuilt_after_an_edit() -> None:
    cu = cu_seqlens([3, 5])
    first = varlen_block_mask(cu, cu, 8, 8, True, None)
    assert varlen_block_mask(cu, cu, 8, 8, True, None) is first
    assert varlen_block_mask(cu, cu, 8, 8, False, None) is not first
    cu[1] = 4  # an in-place edit: a new layout
    assert varlen_block_mask(cu, cu, 8, 8, True, None) is not first


def test_bad_offsets_are_named_on_the_cpu() -> None:
    q = torch.randn(7, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        flex_varlen_kernel(q, q, q, torch.tensor([1, 3, 7], dtype=torch.int32), cu_seqlens([3, 4]), 4, 4, True,
                           None, None, None, compiled=False)


def _visible(lens_q: list[int], lens_k: list[int], is_causal: bool, window: int | None) -> torch.Tensor:
    """Dense ``(total_q, total_k)``: which packed key each packed query attends to (the rule)."""
    vis = torch.zeros(sum(lens_q), sum(lens_k), dtype=torch.bool)
    oq = ok = 0
    for nq, nk in zip(lens_q, lens_k):
        for i in range(nq):
            here = i + nk - nq
            for j in range(nk):
                ok_ = (not (is_causal or window is not None)) or j <= here
                if window is not None:
                    ok_ = ok_ and j > here - window
                vis[oq + i, ok + j] = ok_
        oq, ok = oq + nq, ok + nk
    return vis


@pytest.mark.parametrize("seed", range(10))
def test_the_block_lists_cover_every_visible_pair_and_full_blocks_are_fully_visible(seed: int) -> None:
    import random

    from layerzero.backends.flex_varlen import BLOCK, varlen_blocks

    rng = random.Random(seed)
    n = rng.randint(1, 6)
    lens_q = [rng.choice([0, 1, rng.randint(1, 300)]) for _ in range(n)]
    lens_k = [q if rng.random() < 0.5 else rng.choice([0, rng.randint(0, 300)]) for q in lens_q]
    if not sum(lens_q) or not sum(lens_k):
        lens_q[0] += 5
        lens_k[0] += 7
    is_causal = rng.random() < 0.8
    window = rng.choice([None, 1, 40, 200]) if is_causal else None
    tq, tk = sum(lens_q), sum(lens_k)
    num, idx, full_num, full_idx, *_ = varlen_blocks(cu_seqlens(lens_q), cu_seqlens(lens_k), tq, tk, is_causal,
                                                     window)
    vis = _visible(lens_q, lens_k, is_causal, window)
    kb = -(-tk // BLOCK)
    for r in range(num.shape[-1]):
        partial = idx[0, 0, r, :int(num[0, 0, r])].tolist()
        full = full_idx[0, 0, r, :int(full_num[0, 0, r])].tolist()
        assert len(set(partial + full)) == len(partial) + len(full)
        rows = vis[r * BLOCK:(r + 1) * BLOCK]
        needed = {c for c in range(kb) if bool(rows[:, c * BLOCK:(c + 1) * BLOCK].any())}
        assert needed <= set(partial) | set(full), (r, sorted(needed - set(partial) - set(full)))
        for c in full:
            block = rows[:, c * BLOCK:(c + 1) * BLOCK]
            assert rows.shape[0] == BLOCK and block.shape[1] == BLOCK and bool(block.all()), (r, c)


def test_compiled_on_the_cpu_walks_the_block_lists() -> None:
    """Inductor's CPU FlexAttention reads only the listed key blocks and skips the mask on full ones (it has
    no log-sum-exp output, so the kernel's zeroing of rows that see nothing is left out here)."""
    pytest.importorskip("torch._inductor")
    from torch.nn.attention.flex_attention import flex_attention

    run = torch.compile(flex_attention, dynamic=False)
    for lens_q, lens_k, window in (([200, 1, 90], [200, 1, 90], None), ([150, 20, 0], [300, 5, 140], 64)):
        g = torch.Generator().manual_seed(len(lens_q))
        q = torch.randn(sum(lens_q), 4, 16, generator=g)
        k = torch.randn(sum(lens_k), 2, 16, generator=g)
        v = torch.randn(sum(lens_k), 2, 16, generator=g)
        cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
        bm = varlen_block_mask(cu_q, cu_k, q.shape[0], k.shape[0], True, window)
        try:
            out = run(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=bm, enable_gqa=True)
        except Exception as exc:  # no C++ toolchain for Inductor on this machine
            if "compiler" in str(exc).lower() or "InvalidCxxCompiler" in type(exc).__name__:
                pytest.skip(f"Inductor cannot compile on this CPU: {type(exc).__name__}")
            raise
        want = varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k, max(lens_q), max(lens_k), True,
                                None, window, None)
        seen = _visible(lens_q, lens_k, True, window).any(1)
        torch.testing.assert_close(out[0].transpose(0, 1)[seen].double(), want[seen], atol=1e-5, rtol=1e-5)
