"""FlashAttention 2/3, FlashInfer and xFormers: registration, constraints and layout adapters.

None of these libraries can be installed on a CPU-only machine (they ship CUDA
builds), so their adapters are tested against fakes placed in ``sys.modules``.
Each fake implements the library's documented semantics in plain PyTorch:
BSHD / BMHK / HND layouts, FlashAttention's and FlashInfer's *lower-right*
causal alignment and window anchoring, FlashAttention's ``softcap`` and
``alibi_slopes`` and FlashInfer's ``logits_soft_cap``, xFormers' upper-left
``LowerTriangularMask`` and its 5-D GQA form. The adapters are then checked
against the float64 reference, and the tests show why the lower-right specs
must reject causal calls with ``seq_q != seq_k``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import pytest
import torch

import layerzero as lz
from layerzero.backends import flash_attn as fa_backend
from layerzero.backends import flashinfer as fi_backend
from layerzero.backends import xformers as xf_backend
from layerzero.ops.attention import attention_reference
from layerzero.runtime import get_runtime
from layerzero.spec import ReasonCode
from fake_modules import fake_module as _module
from lower_right import lower_right

SM90 = dict(device="cuda", compute_capability=(9, 0))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, keep: torch.Tensor | None,
            softcap: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T) v on (..., H, S, D) tensors with an optional boolean keep mask (S_q, S_k); a positive
    ``softcap`` caps the scaled scores (``softcap * tanh(s / softcap)``) and ``bias`` is added after it."""
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * s
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1)) @ v.float()


def _repeat_kv(t: torch.Tensor, hq: int, dim: int) -> torch.Tensor:
    return t.repeat_interleave(hq // t.shape[dim], dim=dim)


def _fa_alibi(slopes: torch.Tensor, b: int, sq: int, sk: int) -> torch.Tensor:
    """flash_attn's ALiBi: "a bias of (-alibi_slope * |i + seqlen_k - seqlen_q - j|) is added to the attention
    score of query i and key j"; slopes (nheads,) or (batch_size, nheads), fp32 -> (b, h, sq, sk)."""
    assert slopes.dtype == torch.float32, "alibi_slopes must be fp32"
    dist = (torch.arange(sq).view(-1, 1) + sk - sq - torch.arange(sk).view(1, -1)).abs().float()
    per = slopes.expand(b, -1) if slopes.dim() == 1 else slopes
    return -per[:, :, None, None] * dist


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),  # type: ignore[no-untyped-def]
                         softcap=0.0, alibi_slopes=None, **_: object):
    """flash_attn.flash_attn_func on BSHD tensors, lower-right aligned; softcap > 0 caps the scaled scores."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "FlashAttention needs a contiguous last dimension"
    qh, kh, vh = q.transpose(1, 2), _repeat_kv(k, q.shape[2], 2).transpose(1, 2), _repeat_kv(v, q.shape[2], 2).transpose(1, 2)
    keep = lower_right(q.shape[1], k.shape[1], causal, window_size[0], window_size[1])
    bias = None if alibi_slopes is None else _fa_alibi(alibi_slopes, q.shape[0], q.shape[1], k.shape[1])
    return _attend(qh, kh, vh, softmax_scale, keep, softcap, bias).transpose(1, 2).to(q.dtype)


def fake_fa3_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,  # type: ignore[no-untyped-def]
                  **kw: object):
    assert "alibi_slopes" not in kw, "FA3's flash_attn_func has no alibi_slopes"
    out = fake_flash_attn_func(q, k, v, 0.0, softmax_scale, causal, window_size, softcap)
    return out, torch.zeros(1)  # older FA3 releases return (out, lse)


def fake_single_prefill(q, k, v, causal=False, kv_layout="NHD", sm_scale=None, window_left=-1,  # type: ignore[no-untyped-def]
                        logits_soft_cap=0.0, **_: object):
    assert kv_layout == "HND" and q.dim() == 3 and k.dim() == 3
    qh = q.transpose(0, 1)  # (H, Sq, D)
    kh, vh = _repeat_kv(k, qh.shape[0], 0), _repeat_kv(v, qh.shape[0], 0)
    keep = lower_right(qh.shape[1], kh.shape[1], causal, window_left, 0 if window_left >= 0 else -1)
    return _attend(qh, kh, vh, sm_scale, keep, logits_soft_cap).transpose(0, 1).to(q.dtype)


class FakeBatchDecode:
    plans = 0

    def __init__(self, workspace: torch.Tensor, kv_layout: str) -> None:
        assert kv_layout == "HND" and workspace.dtype == torch.uint8
        self.args: dict[str, object] = {}

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):  # type: ignore[no-untyped-def]
        FakeBatchDecode.plans += 1
        self.args = dict(indptr=indptr, indices=indices, last=last_page_len, hq=num_qo_heads, hkv=num_kv_heads,
                         d=head_dim, page=page_size, **kw)

    def run(self, q, kv):  # type: ignore[no-untyped-def]
        k_cache, v_cache = kv  # (pages, kv_heads, page_size, d) in HND
        a = self.args
        outs = []
        for b in range(q.shape[0]):
            pages = a["indices"][a["indptr"][b]:a["indptr"][b + 1]].tolist()
            k = torch.cat([k_cache[p] for p in pages], dim=1)[:, : int(a["last"][b])]
            v = torch.cat([v_cache[p] for p in pages], dim=1)[:, : int(a["last"][b])]
            qh = q[b].unsqueeze(1)  # (H, 1, D)
            out = _attend(qh, _repeat_kv(k, a["hq"], 0), _repeat_kv(v, a["hq"], 0), a["sm_scale"], None,
                          a.get("logits_soft_cap", 0.0))
            outs.append(out.squeeze(1))
        return torch.stack(outs).to(q.dtype)


class FakeBatchPrefill:
    """FlashInfer's batched prefill over a paged HND cache: ragged q (qo_indptr), causal aligned lower-right."""

    plans = 0

    def __init__(self, workspace: torch.Tensor, kv_layout: str) -> None:
        assert kv_layout == "HND" and workspace.dtype == torch.uint8
        self.args: dict[str, object] = {}

    def plan(self, qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,  # type: ignore[no-untyped-def]
             **kw):
        FakeBatchPrefill.plans += 1
        self.args = dict(qo=qo_indptr, indptr=indptr, indices=indices, last=last_page_len, hq=num_qo_heads,
                         hkv=num_kv_heads, d=head_dim, page=page_size, **kw)

    def run(self, q, kv):  # type: ignore[no-untyped-def]
        k_cache, v_cache = kv
        a = self.args
        assert q.dim() == 3 and q.shape[0] == int(a["qo"][-1])
        outs = []
        for b in range(len(a["qo"]) - 1):
            rows = q[int(a["qo"][b]):int(a["qo"][b + 1])].transpose(0, 1)  # (H, Sq, D)
            pages = a["indices"][a["indptr"][b]:a["indptr"][b + 1]].tolist()
            k = torch.cat([k_cache[p] for p in pages], dim=1)[:, : int(a["last"][b])]
            v = torch.cat([v_cache[p] for p in pages], dim=1)[:, : int(a["last"][b])]
            wl = a["window_left"]
            keep = lower_right(rows.shape[1], k.shape[1], a["causal"], wl, 0 if wl >= 0 else -1)
            out = _attend(rows, _repeat_kv(k, a["hq"], 0), _repeat_kv(v, a["hq"], 0), a["sm_scale"], keep,
                          a.get("logits_soft_cap", 0.0))
            outs.append(out.transpose(0, 1))
        return torch.cat(outs).to(q.dtype)


class FakeLowerTriangularMask:
    """xformers' LowerTriangularMask: upper-left aligned causal."""


def fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):  # type: ignore[no-untyped-def]
    five = query.dim() == 5
    if five:  # BMGHK -> fold G and H
        b, m, g, h, d = query.shape
        query = query.reshape(b, m, g * h, d)
        key = key.reshape(b, key.shape[1], g * h, d)
        value = value.reshape(b, value.shape[1], g * h, value.shape[-1])
    keep = None
    if isinstance(attn_bias, FakeLowerTriangularMask):
        i = torch.arange(query.shape[1]).unsqueeze(1)
        keep = torch.arange(key.shape[1]).unsqueeze(0) <= i
    out = _attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, keep)
    out = out.transpose(1, 2).to(query.dtype)
    return out.reshape(b, m, g, h, -1) if five else out


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    mods = {
        "flash_attn": _module("flash_attn", flash_attn_func=fake_flash_attn_func),
        "flash_attn_interface": _module("flash_attn_interface", flash_attn_func=fake_fa3_func),
        "flashinfer": _module("flashinfer", single_prefill_with_kv_cache=fake_single_prefill,
                              BatchDecodeWithPagedKVCacheWrapper=FakeBatchDecode,
                              BatchPrefillWithPagedKVCacheWrapper=FakeBatchPrefill),
        "xformers": _module("xformers"),
        "xformers.ops": _module("xformers.ops", memory_efficient_attention=fake_memory_efficient_attention),
        "xformers.ops.fmha": _module("xformers.ops.fmha"),
        "xformers.ops.fmha.attn_bias": _module("xformers.ops.fmha.attn_bias",
                                               LowerTriangularMask=FakeLowerTriangularMask),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    caches = (fa_backend._func, fi_backend.load_library, xf_backend.load_library)
    for c in caches:
        c.cache_clear()
    fi_backend._wrappers.clear()
    get_runtime().backends.refresh()
    yield
    for c in caches:
        c.cache_clear()
    fi_backend._wrappers.clear()
    fi_backend._workspaces.clear()
    monkeypatch.undo()
    get_runtime().backends.refresh()


def _qkv(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


KERNELS = ("flash_attn_v2_attention", "flash_attn_v3_attention", "flashinfer_prefill", "flashinfer_batch_prefill",
           "flashinfer_decode",
           "xformers_attention")


def test_registered_without_their_libraries_and_rejected_with_the_install_command() -> None:
    ctx = lz.SelectionContext(dtype="bfloat16", batch_size=1, seq_len=128, num_heads=8, head_dim=64, **SM90)
    exp = lz.explain_context("attention.full", ctx)
    for kid, pip in (("flash_attn_v2_attention", "pip install flash-attn"),
                     ("flashinfer_prefill", "pip install flashinfer-python"),
                     ("xformers_attention", "pip install xformers")):
        (reason,) = [r for r in exp.rejection_reasons[kid] if r.code == ReasonCode.BACKEND_UNAVAILABLE]
        assert "is not installed" in reason.message and pip in reason.message
    assert set(KERNELS) <= {s.kernel_id for s in lz.list_kernels("attention")}


def test_xformers_without_its_compiled_extension_is_unavailable(fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """xFormers imports when its extension fails to load (a wheel for another torch); it must not be selected."""
    load_error = RuntimeError("xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
                              "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)")
    monkeypatch.setitem(sys.modules, "xformers", _module("xformers", _has_cpp_library=False,
                                                         _cpp_lib=_module("xformers._cpp_lib",
                                                                          _cpp_library_load_exception=load_error)))
    rt = get_runtime()
    rt.backends.refresh()
    info = rt.backends.info("xformers")
    assert not info.available
    assert "C++/CUDA extension did not load" in info.reason and "PyTorch 2.10.0+cu128" in info.reason
    ctx = lz.SelectionContext(dtype="bfloat16", batch_size=1, seq_len=128, num_heads=8, head_dim=64, **SM90)
    (reason,) = [r for r in lz.explain_context("attention.full", ctx).rejection_reasons["xformers_attention"]
                 if r.code == ReasonCode.BACKEND_UNAVAILABLE]
    assert "extension did not load" in reason.message
    monkeypatch.setitem(sys.modules, "xformers", _module("xformers", _has_cpp_library=True))
    rt.backends.refresh()
    assert rt.backends.info("xformers").available


def test_constraints_from_the_libraries_docs() -> None:
    def reasons(kid: str, **kw: object) -> set[str]:
        base = dict(dtype="float16", batch_size=1, seq_len=256, num_heads=8, head_dim=128, **SM90)
        base.update(kw)
        return {r.code for r in lz.validate(kid, lz.SelectionContext(**base))[1]}

    assert ReasonCode.HEAD_DIM_TOO_LARGE in reasons("flash_attn_v2_attention", head_dim=320)
    assert ReasonCode.SM_TOO_OLD in reasons("flash_attn_v2_attention", compute_capability=(7, 5))
    assert ReasonCode.SM_TOO_NEW in reasons("flash_attn_v3_attention", compute_capability=(10, 0))
    assert ReasonCode.DTYPE_UNSUPPORTED in reasons("flash_attn_v2_attention", dtype="float32")
    assert ReasonCode.CAUSAL_ALIGNMENT in reasons("flash_attn_v2_attention", seq_len_q=16, seq_len_k=256,
                                                  is_causal=True)
    assert ReasonCode.CAUSAL_ALIGNMENT in reasons("flash_attn_v2_attention", seq_len_q=16, seq_len_k=256, window=8)
    assert ReasonCode.MASK_UNSUPPORTED in reasons("flash_attn_v3_attention", mask_kind="bool")
    assert ReasonCode.DROPOUT_UNSUPPORTED in reasons("flash_attn_v3_attention", dropout_p=0.1)
    assert ReasonCode.HEAD_DIM_ALIGNMENT in reasons("flashinfer_prefill", head_dim=96)
    assert ReasonCode.BATCH_TOO_LARGE in reasons("flashinfer_prefill", batch_size=2)
    assert ReasonCode.CUSTOM in reasons("flashinfer_decode", seq_len_q=4, seq_len_k=256)
    assert ReasonCode.GRAD_UNSUPPORTED in reasons("flashinfer_decode", seq_len_q=1, requires_grad=True)
    assert ReasonCode.WINDOW_UNSUPPORTED in reasons("xformers_attention", window=16)
    assert ReasonCode.HEAD_DIM_ALIGNMENT in reasons("xformers_attention", head_dim=60)
    assert ReasonCode.PLATFORM_MISMATCH in reasons("xformers_attention", device="cpu", compute_capability=None)


@pytest.mark.usefixtures("fakes")
def test_installed_libraries_become_candidates() -> None:
    ctx = lz.SelectionContext(dtype="bfloat16", batch_size=1, seq_len=256, num_heads=8, num_kv_heads=2,
                              head_dim=128, is_causal=True, **SM90)
    sel = lz.select("attention.causal", ctx)
    ranked = [s.kernel_id for s in sel.ranked]
    assert ranked[:2] == ["flash_attn_v3_attention", "flash_attn_v2_attention"]
    assert {"flashinfer_prefill", "xformers_attention"} <= set(ranked)
    assert "flashinfer_decode" not in ranked


CASES = [  # (hq, hkv, sq, sk, causal, window, scale)
    pytest.param(4, 4, 24, 24, False, None, None, id="mha-full"),
    pytest.param(4, 4, 24, 24, True, None, None, id="mha-causal"),
    pytest.param(8, 2, 24, 24, True, None, 0.3, id="gqa-causal-scale"),
    pytest.param(8, 1, 24, 24, True, 5, None, id="mqa-window"),
    pytest.param(4, 2, 9, 33, False, None, None, id="gqa-cross"),
]


@pytest.mark.usefixtures("fakes")
@pytest.mark.parametrize("kernel", ["flash_attn_v2_attention", "flash_attn_v3_attention", "xformers_attention"])
@pytest.mark.parametrize(("hq", "hkv", "sq", "sk", "causal", "window", "scale"), CASES)
def test_bshd_adapters_match_the_reference(kernel: str, hq: int, hkv: int, sq: int, sk: int, causal: bool,
                                           window: int | None, scale: float | None) -> None:
    spec = get_runtime().kernels.get(kernel)
    ctx = lz.SelectionContext(dtype="float16", batch_size=2, seq_len_q=sq, seq_len_k=sk, num_heads=hq,
                              num_kv_heads=hkv, head_dim=32, is_causal=causal, window=window, **SM90)
    if spec.check(ctx):
        pytest.skip("; ".join(map(str, spec.check(ctx))))
    q, k, v = _qkv(2, hq, hkv, sq, sk, 32)
    out = spec.impl(q, k, v, None, causal, 0.0, scale, window)
    assert out.shape == (2, hq, sq, 32)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, None, causal, 0.0, scale, window),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("fakes")
def test_lower_right_alignment_is_why_causal_cross_lengths_are_rejected() -> None:
    q, k, v = _qkv(1, 4, 4, 8, 32, 16)
    fa = fa_backend.flash_attn_v2_attention(q, k, v, None, True, 0.0, None, None)
    ref = attention_reference(q, k, v, None, True)
    assert (fa.double() - ref).abs().max() > 0.1  # FlashAttention's causal mask differs from SDPA's here
    ctx = lz.SelectionContext(dtype="float16", batch_size=1, seq_len_q=8, seq_len_k=32, num_heads=4, head_dim=16,
                              is_causal=True, **SM90)
    assert not {"flash_attn_v2_attention", "flashinfer_prefill", "flashinfer_batch_prefill"} & {s.kernel_id for s in lz.select(
        "attention.causal", ctx).ranked}


@pytest.mark.usefixtures("fakes")
@pytest.mark.parametrize(("hq", "hkv", "sq", "causal", "window"), [
    (4, 4, 20, True, None), (8, 2, 20, False, None), (8, 2, 20, True, 6), (4, 1, 1, False, None)])
def test_flashinfer_prefill_adapter(hq: int, hkv: int, sq: int, causal: bool, window: int | None) -> None:
    q, k, v = _qkv(1, hq, hkv, sq, sq, 64)
    out = fi_backend.flashinfer_prefill(q, k, v, None, causal, 0.0, None, window)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, None, causal, 0.0, None, window),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("fakes")
@pytest.mark.parametrize(("b", "hq", "hkv", "sq", "causal", "window", "scale"), [
    (3, 4, 4, 20, True, None, None), (2, 8, 2, 17, False, None, 0.3), (4, 8, 2, 20, True, 6, None),
    (2, 4, 1, 1, False, None, None)])
def test_flashinfer_batch_prefill_adapter(b: int, hq: int, hkv: int, sq: int, causal: bool, window: int | None,
                                          scale: float | None) -> None:
    FakeBatchPrefill.plans = 0
    q, k, v = _qkv(b, hq, hkv, sq, sq, 64)
    for _ in range(2):
        q = torch.randn_like(q)
        out = fi_backend.flashinfer_batch_prefill(q, k, v, None, causal, 0.0, scale, window)
        assert out.shape == q.shape
        torch.testing.assert_close(out.double(), attention_reference(q, k, v, None, causal, 0.0, scale, window),
                                   atol=1e-5, rtol=1e-5)
    assert FakeBatchPrefill.plans == 1  # planned once per shape, run per call
    wrapper = next(w for key, w in fi_backend._wrappers.items() if key[0] == "prefill")
    assert wrapper.args["qo"].tolist() == list(range(0, (b + 1) * sq, sq)) and wrapper.args["page"] == sq
    assert wrapper.args["causal"] == (causal or window is not None)


@pytest.mark.usefixtures("fakes")
def test_batched_prefill_is_selected_for_batches_and_single_prefill_for_one_request() -> None:
    def ranked(batch: int) -> list[str]:
        ctx = lz.SelectionContext(dtype="bfloat16", batch_size=batch, seq_len=256, num_heads=8, num_kv_heads=2,
                                  head_dim=128, is_causal=True, **SM90)
        return [s.kernel_id for s in lz.select("attention.causal", ctx).ranked if s.backend == "flashinfer"]

    assert ranked(1) == ["flashinfer_prefill", "flashinfer_batch_prefill"]
    assert ranked(8) == ["flashinfer_batch_prefill"]


@pytest.mark.usefixtures("fakes")
def test_flashinfer_decode_uses_kv_as_one_page_per_sequence_and_plans_once() -> None:
    FakeBatchDecode.plans = 0
    q, k, v = _qkv(3, 8, 2, 1, 40, 64)
    for seed in (1, 2):
        q = torch.randn_like(q)
        out = fi_backend.flashinfer_decode(q, k, v, None, False, 0.0, 0.2, None)
        assert out.shape == (3, 8, 1, 64)
        torch.testing.assert_close(out.double(), attention_reference(q, k, v, None, False, 0.0, 0.2),
                                   atol=1e-5, rtol=1e-5)
    assert FakeBatchDecode.plans == 1
    wrapper = next(iter(fi_backend._wrappers.values()))
    assert wrapper.args["page"] == 40 and wrapper.args["indices"].tolist() == [0, 1, 2]
    assert wrapper.args["sm_scale"] == 0.2 and wrapper.args["q_data_type"] == torch.float32


def test_missing_library_error_names_the_install_command() -> None:
    fa_backend._func.cache_clear()
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(ImportError, match="install with: pip install flash-attn"):
        fa_backend.flash_attn_v2_attention(q, k, v, None, False, 0.0, None, None)
    fa_backend._func.cache_clear()
