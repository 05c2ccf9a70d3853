"""lz.attention_varlen / lz.attention_paged against float64 references, and the library adapters against fakes.

The fakes (modules put in ``sys.modules``) compute with torch what the libraries document: FlashAttention's
bottom-right causal mask and ``window_size=(left, right)``, ``softcap=0.0`` meaning none, zeros for rows that
see no key; FlashInfer's CSR page lists and ``window_left``; xFormers' block-diagonal masks.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.backends import flash_attn_varlen, flashinfer_ragged, xformers_varlen
from layerzero.backends import flashinfer as fi_backend
from layerzero.backends import xformers as xf_backend
from layerzero.backends.torch.varlen import torch_paged_dense, torch_paged_sdpa, torch_varlen_sdpa
from layerzero.errors import InvalidInputError
from layerzero.ops import op_for
from layerzero.ops.attention_paged import page_table, paged_reference
from layerzero.ops.attention_varlen import cu_seqlens, varlen_reference
from layerzero.ragged import attend_math

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-10}
VARIANTS = [dict(is_causal=False), dict(is_causal=True), dict(is_causal=True, window=3), dict(window=5),
            dict(is_causal=True, softcap=4.0), dict(is_causal=True, scale=0.3)]


def _opts(kw: dict[str, Any]) -> tuple[Any, ...]:
    return (kw.get("is_causal", False), kw.get("scale"), kw.get("window"), kw.get("softcap"))


def _packed(lens_q: list[int], lens_k: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int
            ) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dtype)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k)


def _paged(lens: list[int], sq: int, hq: int, hkv: int, d: int, page: int, dtype: torch.dtype, seed: int
           ) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    max_pages = -(-max(lens) // page) + 1
    pages = len(lens) * max_pages + 2
    q = torch.randn(len(lens), sq, hq, d, generator=g).to(dtype)
    kc = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    return q, kc, vc, page_table(lens, page, max_pages, pages, g), torch.tensor(lens, dtype=torch.int32)


LENS = [([5, 1, 0, 9], [5, 1, 0, 9]), ([3, 4], [7, 4]), ([6, 2], [2, 0]), ([1], [1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("lens", LENS, ids=["ragged-0-1", "q<k", "q>k-empty-k", "single"])
def test_varlen_matches_reference(dtype: torch.dtype, heads: tuple[int, int], lens: Any) -> None:
    for i, kw in enumerate(VARIANTS):
        args = _packed(*lens, *heads, 16, dtype, seed=i)
        out = lz.attention_varlen(*args, **kw)
        ref = varlen_reference(*args, *_opts(kw))
        assert out.shape == (args[0].shape[0], heads[0], 16) and out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"{kw}: {m}")
        direct = torch_varlen_sdpa(*args, *_opts(kw))
        torch.testing.assert_close(direct.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_varlen_semantics_bottom_right_and_empty_rows() -> None:
    q, k, v, cu_q, cu_k, mq, mk = _packed([2], [5], 2, 2, 8, torch.float64, 0)
    out = lz.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=True)
    # bottom-right: the last query sees all 5 keys, the first 4 of them
    full = attend_math(q[1:], k, v, False, None, None, None, torch.float64)
    torch.testing.assert_close(out[1:], full)
    first = attend_math(q[:1], k[:4], v[:4], False, None, None, None, torch.float64)
    torch.testing.assert_close(out[:1], first)
    q, k, v, cu_q, cu_k, mq, mk = _packed([3], [1], 2, 2, 8, torch.float64, 1)
    out = lz.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, is_causal=True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))  # rows that see no key are zeros
    torch.testing.assert_close(out[2], v[0].repeat(1, 1).view_as(out[2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq", [1, 3], ids=["decode", "chunked-prefill"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_paged_matches_reference(dtype: torch.dtype, sq: int, heads: tuple[int, int]) -> None:
    for i, kw in enumerate([dict(), dict(is_causal=False), dict(window=4), dict(softcap=3.0), dict(scale=0.2)]):
        args = _paged([37, 3, 16, 9], sq, *heads, 16, 8, dtype, seed=i)
        ref = paged_reference(*args, kw.get("is_causal", True), kw.get("scale"), kw.get("window"), kw.get("softcap"))
        out = lz.attention_paged(*args, **kw)
        assert out.shape == (4, sq, heads[0], 16) and out.dtype == dtype
        for got in (out, torch_paged_sdpa(*args, kw.get("is_causal", True), kw.get("scale"), kw.get("window"),
                                          kw.get("softcap")),
                    torch_paged_dense(*args, kw.get("is_causal", True), kw.get("scale"), kw.get("window"),
                                      kw.get("softcap"))):
            torch.testing.assert_close(got.double(), ref, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"{kw}: {m}")


def test_paged_equals_varlen_on_the_same_tokens() -> None:
    """A paged cache is a packed batch in another layout: the two ops agree."""
    lens, sq = [12, 5, 1], 1
    q, kc, vc, table, seq_lens = _paged(lens, sq, 4, 2, 16, 4, torch.float64, 3)
    from layerzero.ragged import gather_pages
    k = torch.cat([gather_pages(kc, table[b], n) for b, n in enumerate(lens)])
    v = torch.cat([gather_pages(vc, table[b], n) for b, n in enumerate(lens)])
    out_v = lz.attention_varlen(q.reshape(-1, 4, 16), k, v, cu_seqlens([sq] * 3), cu_seqlens(lens), sq, max(lens),
                                is_causal=True)
    torch.testing.assert_close(lz.attention_paged(q, kc, vc, table, seq_lens).reshape(-1, 4, 16), out_v)


def _bad(fn: Any, match: str) -> None:
    for _ in range(2):  # cold, then with the plan of the valid call cached
        with pytest.raises(InvalidInputError, match=match):
            fn()


def test_bad_varlen_inputs_cold_and_warm() -> None:
    q, k, v, cu_q, cu_k, mq, mk = _packed([3, 4], [3, 4], 4, 2, 8, torch.float32, 0)
    lz.attention_varlen(q, k, v, cu_q, cu_k, mq, mk)
    _bad(lambda: lz.attention_varlen(q, k, v, cu_q.long(), cu_k, mq, mk), "cu_seqlens_q must be a 1-D int32")
    _bad(lambda: lz.attention_varlen(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32), cu_k, mq, mk),
         "cu_seqlens_q must be non-decreasing, got 5 then 3 at sequence 1")
    _bad(lambda: lz.attention_varlen(q, k, v, torch.tensor([1, 3, 7], dtype=torch.int32), cu_k, mq, mk),
         "cu_seqlens_q must start at 0, got 1")
    _bad(lambda: lz.attention_varlen(q, k, v, cu_q, cu_k, 2, mk), "a sequence of 4 tokens is longer than max_seqlen_q=2")
    _bad(lambda: lz.attention_varlen(q[:6], k, v, cu_q, cu_k, mq, mk), "cu_seqlens_q ends at 7, but the packed tensor")
    _bad(lambda: lz.attention_varlen(torch.randn(7, 3, 8), k, v, cu_q, cu_k, mq, mk), r"query heads \(3\) must be")
    _bad(lambda: lz.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, softcap=0.0), "softcap must be a positive")
    _bad(lambda: lz.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, window=0), "window must be a positive int")
    _bad(lambda: lz.attention_varlen(q, k, v, cu_q, cu_k, 4.0, mk), "max_seqlen_q must be a non-negative int")


def test_bad_paged_inputs_cold_and_warm() -> None:
    q, kc, vc, table, seq_lens = _paged([9, 3], 2, 4, 2, 8, 4, torch.float32, 0)
    lz.attention_paged(q, kc, vc, table, seq_lens)
    bad = table.clone()
    bad[1, 0] = kc.shape[0]
    _bad(lambda: lz.attention_paged(q, kc, vc, bad, seq_lens), rf"block_table\[1\] holds page {kc.shape[0]}, outside")
    _bad(lambda: lz.attention_paged(q, kc, vc, table, torch.tensor([9, 1], dtype=torch.int32)),
         r"seq_lens\[1\]=1 is less than seq_q=2")
    _bad(lambda: lz.attention_paged(q, kc, vc, table, torch.tensor([9, 99], dtype=torch.int32)),
         r"seq_lens\[1\]=99 exceeds the block table's capacity")
    _bad(lambda: lz.attention_paged(q, kc, vc, table.long(), seq_lens), "block_table must be a 2-D int32")
    _bad(lambda: lz.attention_paged(q, kc, vc, table[:1], seq_lens), "block_table has 1 rows")


def test_operation_aliases_and_dispatch() -> None:
    assert op_for("attention.paged").family == "attention_paged"
    assert op_for("attention.varlen").family == "attention_varlen"
    args = _packed([3, 2], [3, 2], 2, 2, 8, torch.float32, 0)
    from layerzero.dispatch import dispatch
    r = dispatch("attention_varlen", {"q": args[0], "k": args[1], "v": args[2], "cu_seqlens_q": args[3]},
                 is_causal=True)
    torch.testing.assert_close(r.output.double(), varlen_reference(*args, True), atol=1e-5, rtol=1e-5)
    assert r.kernel_id == "torch_varlen_sdpa"


def test_dispatch_flags_are_checked_and_paged_defaults_to_causal() -> None:
    """``dispatch(..., is_causal="false")`` ran causal attention (``bool("false")`` is True); a 0-d cu_seqlens
    ended in "'int' object is not subscriptable"; ``is_causal=None`` made paged attention non-causal."""
    from layerzero.dispatch import dispatch

    q, cu = torch.randn(5, 2, 8), cu_seqlens([3, 2])
    varlen = {"q": q, "k": q, "v": q, "cu_seqlens_q": cu}
    table, seq_lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([7, 3], dtype=torch.int32)
    paged = {"q": torch.randn(2, 2, 2, 8), "k_cache": torch.randn(4, 4, 2, 8), "v_cache": torch.randn(4, 4, 2, 8),
             "block_table": table, "seq_lens": seq_lens}
    for operation, inputs in (("attention_varlen", varlen), ("attention_paged", paged)):
        for bad in ("false", "True", 2):
            with pytest.raises(InvalidInputError, match=f"{operation}: is_causal must be a bool, got {bad!r}"):
                dispatch(operation, inputs, is_causal=bad)
    expected = lz.attention_paged(*paged.values())  # causal by default, as is_causal=None
    torch.testing.assert_close(dispatch("attention_paged", paged, is_causal=None).output, expected)
    assert not torch.allclose(dispatch("attention_paged", paged, is_causal=False).output, expected)
    with pytest.raises(InvalidInputError, match=r"cu_seqlens_q must be a 1-D int32 tensor .* got 0-D"):
        dispatch("attention_varlen", {**varlen, "cu_seqlens_q": torch.tensor(5, dtype=torch.int32)})


def test_paged_calls_that_need_gradients_never_get_a_kernel_without_a_backward() -> None:
    """The paged op told selection no call needs gradients, so a kernel without autograd (most paged kernels on
    a GPU) served calls whose inputs require grad, and the output had no grad_fn."""
    from layerzero.spec import KernelSpec

    def inference_only(*args: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch_paged_dense(*args)

    lz.register_kernel(KernelSpec("test_inference_only_paged", "attention_paged", "custom", inference_only,
                                  priority=99, supports_autograd=False))
    try:
        table, seq_lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([7, 3], dtype=torch.int32)
        q, kc, vc = torch.randn(2, 1, 4, 8), torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8)
        assert lz.which("attention_paged", q, kc, vc, table, seq_lens) == "test_inference_only_paged"
        lz.attention_paged(q, kc, vc, table, seq_lens)  # a cached no-grad plan first
        qg = q.clone().requires_grad_()
        assert lz.which("attention_paged", qg, kc, vc, table, seq_lens) != "test_inference_only_paged"
        out = lz.attention_paged(qg, kc, vc, table, seq_lens)
        out.sum().backward()
        ref = paged_reference(qg.detach().double().requires_grad_(), kc.double(), vc.double(), table, seq_lens)
        ref.sum().backward()
        torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-5)
        assert qg.grad is not None and qg.grad.abs().sum() > 0
    finally:
        lz.get_runtime().kernels.unregister("test_inference_only_paged")


# -- library adapters against fakes of their documented semantics ----------------------------------------------

def _fa_window(sq: int, sk: int, causal: bool, window_size: tuple[int, int]) -> torch.Tensor:
    """FlashAttention's mask: key j visible to query i iff i + sk - sq - left <= j <= i + sk - sq + right."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(sq).unsqueeze(1) + sk - sq
    j = torch.arange(sk).unsqueeze(0)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def _fa_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
            window_size: tuple[int, int], softcap: float) -> torch.Tensor:
    hq, hkv = q.shape[1], k.shape[1]
    kk, vv = k.repeat_interleave(hq // hkv, 1).float(), v.repeat_interleave(hq // hkv, 1).float()
    s = (q.shape[-1] ** -0.5) if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * s
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_fa_window(q.shape[0], k.shape[0], causal, window_size), float("-inf"))
    p = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)  # "If the row of the mask is all zero, output is 0"
    return torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,  # type: ignore[no-untyped-def]
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    oq, ok = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([_fa_one(q[oq[b]:oq[b + 1]], k[ok[b]:ok[b + 1]], v[ok[b]:ok[b + 1]], softmax_scale, causal,
                              window_size, softcap) for b in range(len(oq) - 1)])


def fake_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,  # type: ignore[no-untyped-def]
                                 page_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                                 softcap=0.0, **_):
    table = block_table if block_table is not None else page_table
    page = k_cache.shape[1]
    outs = []
    for b, n in enumerate(cache_seqlens.tolist()):
        pages = table[b, : -(-n // page)].long()
        kk = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
        vv = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        outs.append(_fa_one(q[b], kk, vv, softmax_scale, causal, window_size, softcap))
    return torch.stack(outs)


@pytest.fixture
def fake_libs(monkeypatch: pytest.MonkeyPatch) -> None:
    fa2 = types.ModuleType("flash_attn")
    fa2.flash_attn_varlen_func = fake_flash_attn_varlen_func  # type: ignore[attr-defined]
    fa2.flash_attn_with_kvcache = fake_flash_attn_with_kvcache  # type: ignore[attr-defined]
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_varlen_func = lambda *a, **kw: (fake_flash_attn_varlen_func(*a, **kw), None)  # type: ignore[attr-defined]
    fa3.flash_attn_with_kvcache = (  # type: ignore[attr-defined]
        lambda q, kc, vc, block_table=None, **kw: fake_flash_attn_with_kvcache(q, kc, vc, **kw))
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flashinfer", _fake_flashinfer())
    monkeypatch.setitem(sys.modules, "xformers.ops", _fake_xformers_ops())
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha.attn_bias", _fake_attn_bias())
    fi_backend.load_library.cache_clear()
    xf_backend.load_library.cache_clear()
    yield
    fi_backend.load_library.cache_clear()
    xf_backend.load_library.cache_clear()


class _Planned:
    plans = 0

    def __init__(self, workspace: torch.Tensor, layout: str) -> None:
        assert layout == "NHD"

    def _plan(self, qo: list[int], kv: list[int], causal: bool, window_left: int, soft_cap: float | None,
              sm_scale: float | None) -> None:
        _Planned.plans += 1
        self.qo, self.kv = qo, kv
        self.opts = (sm_scale, causal, (window_left, -1 if not causal else 0), soft_cap or 0.0)


class _Ragged(_Planned):
    def plan(self, qo_indptr, kv_indptr, hq, hkv, d, causal=False, window_left=-1, logits_soft_cap=None,  # type: ignore[no-untyped-def]
             sm_scale=None, **_):
        self._plan(qo_indptr.tolist(), kv_indptr.tolist(), causal, window_left, logits_soft_cap, sm_scale)

    def run(self, q, k, v):  # type: ignore[no-untyped-def]
        return torch.cat([_fa_one(q[self.qo[b]:self.qo[b + 1]], k[self.kv[b]:self.kv[b + 1]],
                                  v[self.kv[b]:self.kv[b + 1]], *self.opts) for b in range(len(self.qo) - 1)])


class _Paged(_Planned):
    decode = False

    def plan(self, *a, causal=False, window_left=-1, logits_soft_cap=None, sm_scale=None, **_):  # type: ignore[no-untyped-def]
        if self.decode:
            indptr, indices, last, hq, hkv, d, page = a
            qo = list(range(indptr.shape[0]))
        else:
            qo_indptr, indptr, indices, last, hq, hkv, d, page = a
            qo = qo_indptr.tolist()
        self._plan(qo, indptr.tolist(), causal or self.decode, window_left, logits_soft_cap, sm_scale)
        self.indices, self.last, self.page = indices.tolist(), last.tolist(), page

    def run(self, q, cache):  # type: ignore[no-untyped-def]
        kc, vc = cache
        q = q if not self.decode else q.unsqueeze(1).reshape(-1, *q.shape[1:])
        outs = []
        for b in range(len(self.kv) - 1):
            pages = torch.tensor(self.indices[self.kv[b]:self.kv[b + 1]], dtype=torch.long)
            n = (len(pages) - 1) * self.page + self.last[b] if len(pages) else 0
            kk = kc[pages].reshape(-1, *kc.shape[2:])[:n]
            vv = vc[pages].reshape(-1, *vc.shape[2:])[:n]
            outs.append(_fa_one(q[self.qo[b]:self.qo[b + 1]], kk, vv, *self.opts))
        return torch.cat(outs)


class _Decode(_Paged):
    decode = True


def _fake_flashinfer() -> types.ModuleType:
    fi = types.ModuleType("flashinfer")
    fi.BatchPrefillWithRaggedKVCacheWrapper = _Ragged  # type: ignore[attr-defined]
    fi.BatchPrefillWithPagedKVCacheWrapper = _Paged  # type: ignore[attr-defined]
    fi.BatchDecodeWithPagedKVCacheWrapper = _Decode  # type: ignore[attr-defined]
    return fi


class _BlockDiagonal:
    causal = False

    def __init__(self, lens_q: list[int], lens_k: list[int]) -> None:
        self.lens_q, self.lens_k = lens_q, lens_k

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int] | None = None) -> Any:
        return cls(list(q_seqlen), list(kv_seqlen if kv_seqlen is not None else q_seqlen))


class _BlockDiagonalCausalBR(_BlockDiagonal):
    causal = True


def _fake_attn_bias() -> types.ModuleType:
    m = types.ModuleType("xformers.ops.fmha.attn_bias")
    m.BlockDiagonalMask = _BlockDiagonal  # type: ignore[attr-defined]
    m.BlockDiagonalCausalFromBottomRightMask = _BlockDiagonalCausalBR  # type: ignore[attr-defined]
    return m


def _fake_xformers_ops() -> types.ModuleType:
    def mea(q, k, v, attn_bias=None, scale=None, **_):  # type: ignore[no-untyped-def]
        if q.dim() == 5:  # BMGHK: merge (kv_heads, group) back into query heads
            q, k, v = (t.flatten(2, 3) for t in (q, k, v))
        q, k, v = q[0], k[0], v[0]
        oq = cu_seqlens(attn_bias.lens_q).tolist()
        ok = cu_seqlens(attn_bias.lens_k).tolist()
        parts = [_fa_one(q[oq[b]:oq[b + 1]], k[ok[b]:ok[b + 1]], v[ok[b]:ok[b + 1]], scale, attn_bias.causal,
                         (-1, -1), 0.0) for b in range(len(oq) - 1)]
        return torch.cat(parts).unsqueeze(0)

    m = types.ModuleType("xformers.ops")
    m.memory_efficient_attention = mea  # type: ignore[attr-defined]
    return m


_VARLEN_ADAPTERS = [(flash_attn_varlen.fa2_varlen, VARIANTS), (flash_attn_varlen.fa3_varlen, VARIANTS),
                    (flashinfer_ragged.flashinfer_varlen, VARIANTS),
                    (xformers_varlen.xformers_varlen, [dict(is_causal=False), dict(is_causal=True),
                                                       dict(is_causal=True, scale=0.3)])]


@pytest.mark.parametrize(("fn", "variants"), _VARLEN_ADAPTERS, ids=["fa2", "fa3", "flashinfer", "xformers"])
@pytest.mark.parametrize("lens", LENS, ids=["ragged-0-1", "q<k", "q>k-empty-k", "single"])
def test_varlen_adapters_against_fakes(fake_libs: None, fn: Any, variants: list[dict[str, Any]], lens: Any) -> None:
    for i, kw in enumerate(variants):
        args = _packed(*lens, 4, 2, 16, torch.float32, seed=i)
        torch.testing.assert_close(fn(*args, *_opts(kw)).double(), varlen_reference(*args, *_opts(kw)),
                                   atol=2e-5, rtol=2e-5, msg=lambda m: f"{kw}: {m}")


_PAGED_ADAPTERS = [flash_attn_varlen.fa2_paged, flash_attn_varlen.fa3_paged, flashinfer_ragged.flashinfer_paged]


@pytest.mark.parametrize("fn", _PAGED_ADAPTERS, ids=["fa2", "fa3", "flashinfer"])
@pytest.mark.parametrize("sq", [1, 3])
def test_paged_adapters_against_fakes(fake_libs: None, fn: Any, sq: int) -> None:
    for i, kw in enumerate([dict(is_causal=True), dict(is_causal=True, window=4), dict(is_causal=True, softcap=3.0),
                            dict(is_causal=True, scale=0.2)]):
        args = _paged([37, 3, 16, 9], sq, 8, 2, 16, 8, torch.float32, seed=i)
        o = (kw.get("is_causal", True), kw.get("scale"), kw.get("window"), kw.get("softcap"))
        torch.testing.assert_close(fn(*args, *o).double(), paged_reference(*args, *o), atol=2e-5, rtol=2e-5,
                                   msg=lambda m: f"{kw}: {m}")


def test_flashinfer_plans_once_per_batch_layout(fake_libs: None) -> None:
    args = _paged([12, 5], 1, 4, 2, 16, 4, torch.float32, seed=0)
    before = _Planned.plans
    for _ in range(3):  # the layers of one serving step
        flashinfer_ragged.flashinfer_paged(*args, True, None, None, None)
    assert _Planned.plans == before + 1
    q, kc, vc, table, seq_lens = args
    flashinfer_ragged.flashinfer_paged(q, kc, vc, table, seq_lens + 1, True, None, None, None)  # the next step
    assert _Planned.plans == before + 2


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_queries_that_see_no_key_stay_on_the_graph(softcap: float | None) -> None:
    """No key at all (a total of 0 keys, or every sequence empty on the key side): the zeros that come back are
    on q's, k's and v's graph (zero gradients), as they are when some query sees a key; they were detached, and
    ``out.sum().backward()`` raised."""
    q = torch.randn(5, 2, 8, requires_grad=True)
    k, v = torch.randn(0, 2, 8, requires_grad=True), torch.randn(0, 2, 8, requires_grad=True)
    for cu_k, causal in ((cu_seqlens([0]), False), (cu_seqlens([0]), True)):
        out = lz.attention_varlen(q, k, v, cu_seqlens([5]), cu_k, 5, 0, is_causal=causal, softcap=softcap)
        assert out.requires_grad and torch.equal(out, torch.zeros(5, 2, 8))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))
    empty = torch.randn(0, 2, 8, requires_grad=True)
    out = lz.attention_varlen(empty, k, v, cu_seqlens([0]), cu_seqlens([0]), 0, 0, softcap=softcap)
    assert out.shape == (0, 2, 8) and out.requires_grad


@pytest.mark.parametrize("pad", [-1, 99])
def test_block_table_slots_past_the_used_pages_may_hold_anything(pad: int) -> None:
    """Serving engines pad a block table's unused slots (-1, or any number): only the used pages must be in the
    pool. torch_paged_dense gathered every slot and raised IndexError on each such call (its breaker opened
    after five); every CPU kernel now matches the reference and no breaker counts."""
    kc, vc, q = torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16), torch.randn(2, 1, 4, 16)
    table = torch.tensor([[0, 1, 2], [3, pad, pad]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 3], dtype=torch.int32)
    want = paged_reference(q, kc, vc, table, seq_lens, True, None, None, None)
    for kid in ("torch_paged_dense", "torch_paged_sdpa"):
        with lz.lock("attention_paged", kid):
            for _ in range(6):
                torch.testing.assert_close(lz.attention_paged(q, kc, vc, table, seq_lens), want.to(q.dtype),
                                           atol=1e-5, rtol=1e-5)
    assert not any(b.failures for b in lz.get_runtime().breakers.all().values())
