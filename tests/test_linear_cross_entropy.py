"""``lz.linear_cross_entropy``: the loss and its three gradients against float64 on fresh inputs, per dtype;
the chunked kernel's memory; its edge cases; the Liger adapter's argument binding (fakes of each signature:
Liger needs CUDA) and, on a GPU, Liger for real; torch.compile.

The registry-generated reference tests (tests/test_kernels_reference.py) cover every kernel too.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.backends import liger
from layerzero.backends.torch.linear_losses import chunk_rows, torch_linear_cross_entropy_chunked
from layerzero.ops.linear_losses import linear_cross_entropy_reference
from layerzero.tuning.buckets import bucket_of

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("torch_linear_cross_entropy_chunked", "torch_linear_cross_entropy_naive")
# (loss, gradient) tolerances relative to the float64 reference, per input dtype
TOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (3e-2, 6e-2), torch.float16: (5e-3, 1e-2)}


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, *, bias: bool, seed: int, device: str = "cpu",
            ignore_every: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator(device=device).manual_seed(seed)
    hid = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, device=device) * (2 / math.sqrt(h))).to(dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, device=device).to(dtype).requires_grad_(True) if bias else None
    target = torch.randint(0, v, (n,), generator=g, device=device)
    target[::ignore_every] = -100
    return hid, w, target, b


def _check(kernel: str, dtype: torch.dtype, reduction: str, smoothing: float, softcap: float | None, bias: bool,
           device: str = "cpu") -> None:
    hid, w, target, b = _inputs(333, 48, 1500, dtype, bias=bias, seed=hash((kernel, reduction, smoothing)) % 1000,
                                device=device)
    params = [hid, w] + ([b] if b is not None else [])
    with lz.lock("linear_cross_entropy", kernel):
        loss = lz.linear_cross_entropy(hid, w, target, b, label_smoothing=smoothing, reduction=reduction,
                                       softcap=softcap)
    assert loss.dtype == torch.float32
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    ref = linear_cross_entropy_reference(p64[0], p64[1], target, p64[2] if bias else None, -100, smoothing,
                                         reduction, softcap)
    up = torch.randn(ref.shape, dtype=torch.float64, device=device) + 1.0
    ltol, gtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), atol=ltol, rtol=ltol)
    grads = torch.autograd.grad(loss, params, up.float())
    refs = torch.autograd.grad(ref, p64, up)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, refs, strict=False):
        assert got.dtype == dtype, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=gtol * scale, rtol=gtol,
                                   msg=lambda m, n=name: f"{kernel} {dtype} {reduction} grad {n}: {m}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("reduction", "smoothing", "softcap", "bias"),
                         [("mean", 0.0, None, False), ("mean", 0.1, 30.0, True), ("sum", 0.2, None, True),
                          ("none", 0.0, 5.0, False), ("none", 0.1, None, True)])
def test_loss_and_gradients_match_float64(kernel: str, dtype: torch.dtype, reduction: str, smoothing: float,
                                          softcap: float | None, bias: bool) -> None:
    _check(kernel, dtype, reduction, smoothing, softcap, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", (*KERNELS, "liger_linear_cross_entropy", "liger_linear_cross_entropy_wide"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("reduction", "smoothing", "softcap", "bias"),
                         [("mean", 0.0, None, False), ("mean", 0.1, 30.0, True), ("sum", 0.0, None, False),
                          ("none", 0.1, None, False)])
def test_loss_and_gradients_match_float64_on_cuda(kernel: str, dtype: torch.dtype, reduction: str, smoothing: float,
                                                  softcap: float | None, bias: bool) -> None:
    ok, reasons = lz.validate(kernel, lz.SelectionContext(device="cuda", dtype=dtype, num_tokens=333, hidden_size=1500,
                                                          head_dim=48, requires_grad=True))
    if not ok:
        pytest.skip("; ".join(str(r) for r in reasons))
    _check(kernel, dtype, reduction, smoothing, softcap, bias, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", (*KERNELS, "liger_linear_cross_entropy", "liger_linear_cross_entropy_wide"))
def test_a_frozen_hidden_still_gives_the_head_its_gradient_on_cuda(kernel: str) -> None:
    ok, reasons = lz.validate(kernel, lz.SelectionContext(device="cuda", dtype="bfloat16", num_tokens=256,
                                                          hidden_size=1000, head_dim=64, requires_grad=True))
    if not ok:
        pytest.skip("; ".join(str(r) for r in reasons))
    hid, w, target, _ = _inputs(256, 64, 1000, torch.bfloat16, bias=False, seed=9, device="cuda")
    frozen = hid.detach()
    with lz.lock("linear_cross_entropy", kernel):
        lz.linear_cross_entropy(frozen, w, target).backward()
    w64 = w.detach().double().requires_grad_(True)
    linear_cross_entropy_reference(frozen, w64, target, None, -100, 0.0, "mean", None).backward()
    assert w.grad is not None and frozen.grad is None
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=6e-2 * w64.grad.abs().max().item(), rtol=6e-2)


def test_edge_cases_follow_f_cross_entropy() -> None:
    hid, w, target, _ = _inputs(70, 16, 200, torch.float64, bias=False, seed=3)
    every = torch.full_like(target, -100)
    for red in ("mean", "sum", "none"):
        got = lz.linear_cross_entropy(hid, w, every, reduction=red)
        want = linear_cross_entropy_reference(hid, w, every, None, -100, 0.0, red, None)
        torch.testing.assert_close(got, want, equal_nan=True)  # mean over nothing is NaN, as in PyTorch
    sevens = torch.where(target == -100, 7, target)
    got = lz.linear_cross_entropy(hid, w, sevens.int(), ignore_index=7)  # int32 ids, another ignore_index
    torch.testing.assert_close(got, linear_cross_entropy_reference(hid, w, sevens, None, 7, 0.0, "mean", None))
    with torch.no_grad():  # no graph: the forward computes no gradient
        assert not lz.linear_cross_entropy(hid, w, target).requires_grad
    loss = torch_linear_cross_entropy_chunked(hid, w, target, None, -100, 0.0, "mean", None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_only_the_tensors_that_want_grad_get_it() -> None:
    hid, w, target, _ = _inputs(130, 16, 300, torch.float32, bias=False, seed=4)
    frozen = w.detach()
    lz.linear_cross_entropy(hid, frozen, target).backward()
    assert hid.grad is not None and frozen.grad is None
    h2 = hid.detach()
    lz.linear_cross_entropy(h2, w, target, reduction="none").sum().backward()
    assert w.grad is not None and h2.grad is None


def test_chunk_rows() -> None:
    assert chunk_rows(8192, 2048, 128256) == 256  # Liger's rule at the H200 shape
    assert chunk_rows(1024, 64, 65536) == 64
    assert chunk_rows(10, 4096, 32000) == 10
    assert chunk_rows(4096, 4096, 4096) == 512  # at most an eighth of the rows


def test_dispatch_names_buckets_and_policies() -> None:
    from layerzero.dispatch import dispatch

    hid, w, target, _ = _inputs(64, 16, 100, torch.float32, bias=False, seed=5)
    with torch.no_grad():
        r = dispatch("linear_cross_entropy", {"hidden_states": hid, "lm_head_weight": w, "labels": target},
                     label_smoothing=0.1)
        torch.testing.assert_close(r.output, lz.linear_cross_entropy(hid, w, target, label_smoothing=0.1))
        assert r.kernel_id in KERNELS
        ctx = lz.SelectionContext(dtype="bfloat16", num_tokens=3000, hidden_size=128256, head_dim=4096,
                                  requires_grad=True)
        assert bucket_of("linear_cross_entropy", ctx) == "n=4096;hidden=128256;d=4096;grad=1"
        with lz.lock("linear_cross_entropy", "torch_linear_cross_entropy_naive"):
            assert lz.which("linear_cross_entropy", hid, w, target) == "torch_linear_cross_entropy_naive"
        assert lz.which("linear_cross_entropy", hid, w, target) == "torch_linear_cross_entropy_naive"  # small logits
        with lz.lock("linear_cross_entropy", "torch_linear_cross_entropy_chunked", condition="num_tokens <= 64"):
            assert lz.which("linear_cross_entropy", hid, w, target) == "torch_linear_cross_entropy_chunked"
            assert lz.which("linear_cross_entropy", hid.repeat(2, 1), w, target.repeat(2)) \
                == "torch_linear_cross_entropy_naive"
        big = lz.SelectionContext(dtype="float32", num_tokens=4096, hidden_size=65536, head_dim=64)
        assert lz.select("linear_cross_entropy", big).selected.kernel_id == "torch_linear_cross_entropy_chunked"
        reasons = lz.explain_context("linear_cross_entropy", big).rejection_reasons["torch_linear_cross_entropy_naive"]
        assert any("full logits of 4096 x 65536" in r.message for r in reasons)


def _lce_values(args: tuple[Any, ...], forward: Any) -> dict[str, Any]:
    names = list(inspect.signature(forward).parameters)[1:]
    return dict(zip(names, args, strict=True))


class _Fake05:
    """LigerFusedLinearCrossEntropyFunction of 0.5: no ce_weight, a bare loss."""

    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ignore_index=-100, lse_square_scale=0.0,  # type: ignore[no-untyped-def]
                label_smoothing=0.0, reduction="mean", softcap=None):
        raise AssertionError("not called")

    @classmethod
    def apply(cls, *args: Any) -> Any:
        v = _lce_values(args, cls.forward)
        assert v["lse_square_scale"] == 0.0
        return linear_cross_entropy_reference(v["_input"], v["weight"], v["target"], v["bias"], v["ignore_index"],
                                              v["label_smoothing"], v["reduction"], v["softcap"]).float()


class _Fake08(_Fake05):
    """0.8: ce_weight before ignore_index, accum_dtype and more after softcap, a tuple back."""

    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100,  # type: ignore[no-untyped-def]
                lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False,
                accum_dtype=None, use_token_scaling=False, return_token_accuracy=False,
                return_predicted_tokens=False):
        raise AssertionError("not called")

    @classmethod
    def apply(cls, *args: Any) -> Any:
        v = _lce_values(args, cls.forward)
        assert v["ce_weight"] is None and v["return_z_loss"] is False and v["accum_dtype"] is None
        return (_Fake05.apply(v["_input"], v["weight"], v["target"], v["bias"], v["ignore_index"], 0.0,
                              v["label_smoothing"], v["reduction"], v["softcap"]), None, None, None)


class _Fake085(_Fake05):
    """0.8.5: chunk_mem_const last; records what the wide kernel asked for."""

    seen: list[int] = []

    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100,  # type: ignore[no-untyped-def]
                lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False,
                accum_dtype=None, use_token_scaling=False, return_token_accuracy=False,
                return_predicted_tokens=False, ce_impl=None, ce_mode=None, chunk_mem_const=1):
        raise AssertionError("not called")

    @classmethod
    def apply(cls, *args: Any) -> Any:
        v = _lce_values(args, cls.forward)
        cls.seen.append(v["chunk_mem_const"])
        return (_Fake05.apply(v["_input"], v["weight"], v["target"], v["bias"], v["ignore_index"], 0.0,
                              v["label_smoothing"], v["reduction"], v["softcap"]), None, None, None)


def test_the_wide_kernel_asks_liger_for_wider_chunks_and_older_ligers_say_they_cannot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liger, "_liger_version", lambda: (0, 8, 5))
    hid, w, target, b = _inputs(20, 8, 50, torch.float64, bias=True, seed=7)
    monkeypatch.setattr(liger, "_function", lambda name: _Fake085)
    _Fake085.seen.clear()
    got = liger.liger_linear_cross_entropy_wide(hid, w, target, b, -100, 0.1, "mean", None)
    torch.testing.assert_close(got, linear_cross_entropy_reference(hid, w, target, b, -100, 0.1, "mean", None))
    liger.liger_linear_cross_entropy(hid, w, target, b, -100, 0.1, "mean", None)
    assert _Fake085.seen == [liger.WIDE_CHUNK_MEM, 1]
    monkeypatch.setattr(liger, "_function", lambda name: _Fake08)
    with pytest.raises(TypeError, match="chunk_mem_const"):
        liger.liger_linear_cross_entropy_wide(hid, w, target, b, -100, 0.1, "mean", None)


@pytest.mark.parametrize("fake", [_Fake05, _Fake08], ids=["liger0.5", "liger0.8"])
def test_liger_adapter_binds_arguments_by_name(fake: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liger, "_function", lambda name: fake)
    monkeypatch.setattr(liger, "_liger_version", lambda: (0, 8, 5))
    hid, w, target, b = _inputs(20, 8, 50, torch.float64, bias=True, seed=6)
    for red, ls, cap in (("mean", 0.1, None), ("sum", 0.0, 7.0), ("none", 0.2, 3.0)):
        got = liger.liger_linear_cross_entropy(hid, w, target, b, -100, ls, red, cap)
        torch.testing.assert_close(got, linear_cross_entropy_reference(hid, w, target, b, -100, ls, red, cap))
    every = torch.full_like(target, -100)
    assert liger.liger_linear_cross_entropy(hid, w, every, None, -100, 0.0, "mean", None).isnan()
    monkeypatch.setattr(liger, "_liger_version", lambda: (0, 8, 1))
    with pytest.raises(ValueError, match="before 0.8.2"):
        liger.liger_linear_cross_entropy(hid, w, target, b, -100, 0.0, "none", None)
    with pytest.raises(TypeError, match="no \\['nonsense'\\] parameter"):
        liger.bind_fused_linear_cross_entropy(fake.forward, {"nonsense": 1})


def test_torch_compile_traces_it() -> None:
    hid, w, target, _ = _inputs(150, 16, 300, torch.float32, bias=False, seed=8)

    def step(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return lz.linear_cross_entropy(h * 2, weight, target, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=False)
    loss = compiled(hid, w)
    loss.backward()
    gh, gw = hid.grad.clone(), w.grad.clone()
    hid.grad = w.grad = None
    want = step(hid, w)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gh, hid.grad)
    torch.testing.assert_close(gw, w.grad)


def test_cpu_extra_peak_memory_is_under_half_the_logits() -> None:
    """scripts/lce_memory.py at a 65k vocabulary (forward and backward, torch.profiler's allocator events)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lce_memory.py"), "--rows", "1024", "--hidden", "64",
                          "--vocab", "65536", "--kernel", "torch_linear_cross_entropy_chunked", "--check", "0.5"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "extra peak / full logits" in out.stdout


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_chunked_kernel_has_a_second_derivative(reduction: str, softcap: float | None) -> None:
    """Its gradients come from a hand-written pass: a Hessian-vector product (or a gradient penalty) got the
    regularizer's term only, the loss's Hessian silently dropped (mean/sum), or an in-place error (none). Under
    create_graph=True its backward now differentiates the plain loss: gradgradcheck passes."""
    torch.manual_seed(0)
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, -100, 4])

    def chunked(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with lz.lock("linear_cross_entropy", "torch_linear_cross_entropy_chunked"):
            return lz.linear_cross_entropy(h, w, t, reduction=reduction, softcap=softcap, label_smoothing=0.1)

    def plain(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = h @ w.T
        z = z if softcap is None else softcap * torch.tanh(z / softcap)
        return torch.nn.functional.cross_entropy(z, t, reduction=reduction, label_smoothing=0.1)

    for fn in (chunked, plain):
        loss = fn(h, w)
        loss = loss.sum() if reduction == "none" else loss
        gh, gw = torch.autograd.grad(loss + 0.5 * (h ** 2).sum(), (h, w), create_graph=True)
        hvp = torch.autograd.grad(gh.sum() + gw.sum(), (h, w))
        if fn is chunked:
            got = (gh.detach(), gw.detach(), *hvp)
        else:
            torch.testing.assert_close(got, (gh.detach(), gw.detach(), *hvp))
    assert torch.autograd.gradgradcheck(chunked, (h, w))
