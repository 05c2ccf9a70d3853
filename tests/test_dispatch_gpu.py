"""Dispatch on a CUDA GPU: every mode against the float64 reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.dispatch import (
    DispatchConfig,
    DispatchMode,
    create_dynamic_dispatcher,
    create_static_dispatcher,
    dispatch,
)
from layerzero.ops.attention import attention_reference

pytestmark = pytest.mark.gpu


def _qkv(dtype: torch.dtype, layout: str = "BHSD", b: int = 2, h: int = 8, s: int = 256, d: int = 64):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (b, h, s, d) if layout == "BHSD" else (b, s, h, d)
    return tuple(torch.randn(*shape, device="cuda", dtype=dtype, generator=g) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_dynamic_attention_matches_reference_on_gpu(dtype, layout):
    q, k, v = _qkv(dtype, layout)
    r = dispatch("attention.causal", {"query": q, "key": k, "value": v}, layout=layout)
    bhsd = (lambda t: t) if layout == "BHSD" else (lambda t: t.transpose(1, 2))
    want = attention_reference(bhsd(q), bhsd(k), bhsd(v), is_causal=True)
    atol, rtol = lz.get_global_kernel_registry().get(r.kernel_id).tolerance_for(dtype)
    torch.testing.assert_close(bhsd(r.output).double(), want, atol=atol * 4, rtol=rtol * 4)
    assert r.output.shape == q.shape and r.output.dtype == dtype
    assert dispatch("attention.causal", {"query": q, "key": k, "value": v}, layout=layout).cached


def test_static_map_with_a_gpu_kernel():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch_sdpa_flash needs sm80+")
    cfg = DispatchConfig(mode=DispatchMode.STATIC, static_kernel_map={"attention.causal": "torch_sdpa_flash"})
    d = create_static_dispatcher(cfg)
    q, k, v = _qkv(torch.float16)
    r = d.dispatch("attention.causal", {"q": q, "k": k, "v": v})
    assert r.kernel_id == "torch_sdpa_flash" and not r.fallback_used
    torch.testing.assert_close(r.output.double(), attention_reference(q, k, v, is_causal=True), atol=4e-3, rtol=4e-3)


def test_mvcc_dispatcher_on_gpu_with_timing():
    d = create_dynamic_dispatcher(config=DispatchConfig(record_timing=True), use_mvcc_cache=True)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    for _ in range(3):
        r = d.dispatch("rms_norm", {"x": x, "weight": w})
    assert r.cached and r.timing.recorded and r.timing.kernel_invoke_ns > 0
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(r.output.double(), want, atol=3e-2, rtol=3e-2)


def test_seed_kernel_ids_when_their_libraries_are_installed():
    reg = lz.get_global_kernel_registry()
    backends = lz.get_global_backend_registry()
    present = {kid: reg.find(kid) for kid in ("flash_attn_v2_attention", "liger_rms_norm")}
    usable = {kid: s for kid, s in present.items() if s is not None and backends.unavailable_reason(s.backend) is None}
    if not usable:
        pytest.skip("neither flash-attn nor liger-kernel is installed")
    ops = {"flash_attn_v2_attention": "attention.causal", "liger_rms_norm": "rms_norm"}
    d = create_static_dispatcher(DispatchConfig(mode=DispatchMode.STATIC,
                                                static_kernel_map={ops[k]: k for k in usable}))
    if "flash_attn_v2_attention" in usable:
        q, k, v = _qkv(torch.float16)
        r = d.dispatch("attention.causal", {"q": q, "k": k, "v": v})
        torch.testing.assert_close(r.output.double(), attention_reference(q, k, v, is_causal=True),
                                   atol=4e-3, rtol=4e-3)
    if "liger_rms_norm" in usable:
        x = torch.randn(32, 1024, device="cuda", dtype=torch.float16)
        w = torch.rand(1024, device="cuda", dtype=torch.float16) + 0.5
        r = d.dispatch("rms_norm", {"x": x, "weight": w})
        x64 = x.double()
        want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        torch.testing.assert_close(r.output.double(), want, atol=4e-3, rtol=4e-3)
