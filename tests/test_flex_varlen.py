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
