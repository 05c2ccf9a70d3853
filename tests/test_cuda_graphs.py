"""CUDA graphs: no selection during capture, no capture-unsafe kernel captured, replay with the chosen kernel.

The logic runs on CPU with fake capturing contexts; capture and replay run on a GPU (``gpu`` marker).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.errors import CaptureError
from layerzero.integrations import cuda_graphs
from layerzero.ops import RMS_NORM
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec, ReasonCode


def _unsafe_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float() if weight is not None else out).to(x.dtype)


@pytest.fixture
def unsafe_kernel() -> Iterator[str]:
    """A correct rms_norm kernel, preferred by priority, that is not capture-safe."""
    rt = get_runtime()
    spec = KernelSpec("test_graph_unsafe_rms_norm", "rms_norm", "torch", _unsafe_rms_norm, priority=900,
                      cuda_graph_safe=False)
    rt.kernels.register(spec)
    yield spec.kernel_id
    rt.kernels.unregister(spec.kernel_id)


@pytest.fixture
def misses() -> Iterator[list[str]]:
    rt = get_runtime()
    seen: list[str] = []

    def hook(operation: str, ctx: SelectionContext) -> None:
        seen.append(operation)

    rt.on_miss.append(hook)
    yield seen
    rt.on_miss.remove(hook)


def _capturing() -> SelectionContext:
    return SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, hidden_size=4096,
                            num_tokens=8, batch_size=8, cuda_graph_capturing=True)


def test_selection_never_runs_while_capturing() -> None:
    rt = get_runtime()
    with pytest.raises(CaptureError, match=r"rms_norm\(device=cuda, sm=90.*selection was needed while a CUDA graph "
                                           r"is being captured; run the same shapes once before capture"):
        rt.plan_for(RMS_NORM, "rms_norm", _capturing())


def test_engine_rejects_kernels_that_are_not_capture_safe(unsafe_kernel: str) -> None:
    sel = lz.select("rms_norm", _capturing())
    assert unsafe_kernel not in [k.kernel_id for k in sel.ranked]
    codes = [r.code for r in sel.rejections[unsafe_kernel]]
    assert codes == [ReasonCode.CUDA_GRAPH_UNSAFE]
    not_capturing = _capturing().replace(cuda_graph_capturing=False)
    assert lz.select("rms_norm", not_capturing).selected.kernel_id == unsafe_kernel


def test_capture_safe_scope_caches_safe_plans_once(unsafe_kernel: str, misses: list[str]) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 64, generator=g), torch.rand(64, generator=g) + 0.5
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert lz.which("rms_norm", x, w) == unsafe_kernel  # outside: the preferred, unsafe kernel
    assert unsafe_kernel in cuda_graphs.unsafe_kernels()
    with cuda_graphs.capture_safe() as scope:
        for _ in range(3):
            torch.testing.assert_close(lz.rms_norm(x, w).double(), want, atol=1e-5, rtol=1e-5)
        assert misses == ["rms_norm"]  # selected once, then served from the scope's plans
        assert cuda_graphs._kernels(scope.plans) == {"rms_norm": ["torch_rms_norm"]}
    lz.rms_norm(x, w)
    assert get_runtime().plans.data  # back outside: the global cache, the unsafe kernel again
    assert [p.kernel_id for p in get_runtime().plans.data.values()] == [unsafe_kernel]


def test_capture_safe_keeps_outer_scoped_policy() -> None:
    x, w = torch.randn(2, 32), torch.rand(32)
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        with cuda_graphs.capture_safe():
            assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_capture_needs_cuda() -> None:
    with pytest.raises(CaptureError, match="CUDA graphs need a CUDA device"):
        cuda_graphs.capture(lambda: None)


# -- on a GPU ----------------------------------------------------------------------------------------------

def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, w: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    return lz.attention(q, k, v, is_causal=True), lz.rms_norm(x, w)


def _gpu_inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return [torch.randn(2, 8, 128, 64, **kw), torch.randn(2, 8, 128, 64, **kw), torch.randn(2, 8, 128, 64, **kw),
            torch.randn(16, 1024, **kw), torch.rand(1024, **kw) + 0.5]


@pytest.mark.gpu
def test_captured_graph_replays_with_the_selected_kernels(unsafe_kernel: str) -> None:
    static = _gpu_inputs(0)
    graph = cuda_graphs.capture(_block, *static)
    assert set(graph.kernels) == {"attention.causal", "rms_norm"}
    rt = get_runtime()
    for ids in graph.kernels.values():
        assert all(rt.kernels.get(k).cuda_graph_safe for k in ids)
    assert unsafe_kernel not in graph.kernels["rms_norm"]
    for seed in (1, 2):
        fresh = _gpu_inputs(seed)
        for s, f in zip(static, fresh, strict=True):
            s.copy_(f)
        out = graph.replay()
        torch.cuda.synchronize()
        with cuda_graphs.capture_safe():
            want = _block(*fresh)
        for got, ref in zip(out, want, strict=True):
            torch.testing.assert_close(got, ref)  # the same kernels, so the same bits


@pytest.mark.gpu
def test_raw_capture_of_an_unseen_shape_raises_capture_error(runtime) -> None:
    runtime.configure(runtime.config.replace(shape_free_plans=False))  # one plan per shape
    x, w = torch.randn(8, 512, device="cuda"), torch.rand(512, device="cuda")
    lz.rms_norm(x, w)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(Exception) as info:
        with torch.cuda.graph(graph):
            lz.rms_norm(torch.randn(9, 512, device="cuda"), w)  # a new shape: would need selection
    chain = [info.value, info.value.__context__, info.value.__cause__]
    assert any(isinstance(e, CaptureError) for e in chain if e is not None)


@pytest.mark.gpu
def test_unsafe_cached_plan_is_not_captured(unsafe_kernel: str) -> None:
    x, w = torch.randn(8, 512, device="cuda"), torch.rand(512, device="cuda")
    lz.rms_norm(x, w)  # cached with the unsafe kernel, outside any capture_safe scope
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(Exception) as info:
        with torch.cuda.graph(graph):
            lz.rms_norm(x, w)
    chain = [info.value, info.value.__context__, info.value.__cause__]
    assert any(isinstance(e, CaptureError) for e in chain if e is not None)


@pytest.mark.gpu
def test_capture_reports_a_shape_missed_in_warmup(runtime) -> None:
    runtime.configure(runtime.config.replace(shape_free_plans=False))  # one plan per shape
    calls = {"n": 0}
    w = torch.rand(256, device="cuda")

    def fn() -> torch.Tensor:
        calls["n"] += 1
        rows = 4 if calls["n"] <= 1 else 5  # the capture run uses a shape the warm-up never saw
        return lz.rms_norm(torch.ones(rows, 256, device="cuda"), w)

    with pytest.raises(CaptureError, match="selection was needed while a CUDA graph is being captured"):
        cuda_graphs.capture(fn, warmup=1)


@pytest.mark.gpu
def test_a_shape_free_family_serves_an_unseen_shape_during_capture(runtime) -> None:
    """With a shape-free plan (torch_rms_norm on a GPU with no measurements) a row count the warm-up never
    saw needs no selection, so it is captured, and the replay computes the right values."""
    w = torch.rand(256, device="cuda")
    lz.rms_norm(torch.randn(4, 256, device="cuda"), w)
    x = torch.randn(5, 256, device="cuda")
    assert lz.explain(x, w, operation="rms_norm").shape_free == "yes"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lz.rms_norm(x, w)
    x.copy_(torch.randn(5, 256, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)) * w.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
