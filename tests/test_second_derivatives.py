"""Second derivatives (``create_graph=True``: gradient penalties, Hessian-vector products) are right or refused.

* Every CPU kernel with a backward either passes ``gradgradcheck`` in float64 or raises (as PyTorch's CPU SDPA
  does): none returns a second derivative that silently misses terms.
* A kernel whose backward has no derivative of its own (a library's fused kernel, marked with
  :func:`layerzero.backends.first_order.first_order`) refuses such a backward with ``KernelNotSupportedError``
  naming the kernel and the PyTorch kernel to lock; a plain backward through it is untouched, and locking the
  PyTorch kernel gives the right second derivative.
* On CUDA (``gpu``): Liger's kernels refuse, Liger's SwiGLU/GeGLU wrapper (ours) differentiates the plain op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.backends.first_order import first_order
from layerzero.errors import KernelNotSupportedError
from layerzero.registry import get_global_kernel_registry
from layerzero.spec import KernelSpec


def _cases() -> dict[str, tuple[Callable[[torch.Generator], tuple[Any, ...]], tuple[int, ...]]]:
    """operation -> (canonical float64 arguments, the positions of those that take gradients)."""
    def r(g: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rope(g: torch.Generator) -> tuple[Any, ...]:
        ang = r(g, 3, 2)
        return r(g, 1, 2, 3, 4), torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1), False
    return {
        "rms_norm": (lambda g: (r(g, 3, 5), r(g, 5).abs() + 0.5, 1e-6), (0, 1)),
        "layer_norm": (lambda g: (r(g, 3, 5), r(g, 5), r(g, 5), 1e-5), (0, 1, 2)),
        "rope": (rope, (0,)),
        "swiglu": (lambda g: (r(g, 3, 4), r(g, 3, 4)), (0, 1)),
        "geglu": (lambda g: (r(g, 3, 4), r(g, 3, 4), "tanh"), (0, 1)),
        "gelu": (lambda g: (r(g, 3, 4), "none"), (0,)),
        "silu": (lambda g: (r(g, 3, 4),), (0,)),
        "cross_entropy": (lambda g: (r(g, 4, 6), torch.tensor([0, 5, 2, 3]), -100, 0.1, "mean"), (0,)),
        "linear_cross_entropy": (lambda g: (r(g, 4, 3), r(g, 6, 3), torch.tensor([0, 5, 2, 3]), None, -100, 0.0,
                                            "mean", None), (0, 1)),
        "attention": (lambda g: (r(g, 1, 2, 3, 4), r(g, 1, 2, 3, 4), r(g, 1, 2, 3, 4), None, True, 0.0, None, None),
                      (0, 1, 2)),
    }


def _cpu_kernels() -> list[Any]:
    cases = _cases()
    out = []
    for spec in get_global_kernel_registry():
        family = spec.operation.split(".")[0]
        if family in cases and spec.supports_autograd and (spec.platforms is None or "cpu" in spec.platforms) \
                and (spec.dtypes is None or torch.float64 in spec.dtypes) and spec.backend == "torch":
            out.append(pytest.param(spec.kernel_id, family, id=spec.kernel_id))
    return out


@pytest.mark.parametrize(("kernel_id", "family"), _cpu_kernels())
def test_every_cpu_kernel_differentiates_its_backward_or_refuses(kernel_id: str, family: str) -> None:
    spec = get_global_kernel_registry().get(kernel_id)
    make, wanted = _cases()[family]
    args = list(make(torch.Generator().manual_seed(7)))
    if family == "rope" and spec.supports_interleaved:
        args[3] = True
    inputs = tuple(args[i].requires_grad_(True) for i in wanted)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, t in zip(wanted, tensors, strict=True):
            full[i] = t
        return spec.impl(*full)

    try:
        ok = torch.autograd.gradgradcheck(fn, inputs, raise_exception=False)
    except (RuntimeError, KernelNotSupportedError, NotImplementedError):
        return  # refused out loud, as PyTorch's CPU SDPA does
    assert ok, f"{kernel_id}: a second derivative that silently differs from the numerical one"


class _FirstOrderRms(torch.autograd.Function):
    """An RMSNorm whose backward is computed outside autograd, as a fused library kernel's is."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.eps = eps
        return F.rms_norm(x, x.shape[-1:], w, eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            xd, wd = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
            gx, gw = torch.autograd.grad(F.rms_norm(xd, xd.shape[-1:], wd, ctx.eps), (xd, wd), grad.detach())
        return gx, gw, None


@pytest.fixture
def first_order_rms(runtime: Any):
    def impl(x, w, eps):  # type: ignore[no-untyped-def]
        return first_order(_FirstOrderRms.apply(x, w, eps), "rms_norm", "custom_first_order_rms", "torch_rms_norm")

    lz.register_kernel(KernelSpec("custom_first_order_rms", "rms_norm", "custom", impl, priority=99))
    yield
    runtime.kernels.unregister("custom_first_order_rms")


def _penalty_grads(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A gradient penalty's gradients: d/d(x, w) of |d loss / dx|^2."""
    (gx,) = torch.autograd.grad(lz.rms_norm(x, w).square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), (x, w))


def test_a_first_order_kernel_refuses_a_second_derivative(first_order_rms: None) -> None:
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert lz.which("rms_norm", x, w) == "custom_first_order_rms"
    lz.rms_norm(x, w).sum().backward()  # a plain backward is untouched
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.rms_norm(x, (8,), w, 1e-6).sum(), x)[0])
    with pytest.raises(KernelNotSupportedError, match=r"rms_norm: custom_first_order_rms's backward has no "
                                                      r"derivative of its own.*lz.lock\('rms_norm', 'torch_rms_norm'\)"):
        _penalty_grads(x, w)
    with lz.lock("rms_norm", "torch_rms_norm"):
        got = _penalty_grads(x, w)
    (gx,) = torch.autograd.grad(F.rms_norm(x, (8,), w, 1e-6).square().sum(), x, create_graph=True)
    want = torch.autograd.grad(gx.square().sum(), (x, w))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# -- CUDA: Liger ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize(("kernel_id", "call"), [
    ("liger_rms_norm", lambda x: lz.rms_norm(x, torch.ones(x.shape[-1], device=x.device))),
    ("liger_layer_norm", lambda x: lz.layer_norm(x, torch.ones(x.shape[-1], device=x.device),
                                                  torch.zeros(x.shape[-1], device=x.device))),
    ("liger_cross_entropy", lambda x: lz.cross_entropy(x, torch.arange(x.shape[0], device=x.device) % x.shape[1])),
])
def test_liger_kernels_refuse_a_second_derivative(kernel_id: str, call: Callable[[torch.Tensor], Any]) -> None:
    pytest.importorskip("liger_kernel")
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    op = get_global_kernel_registry().get(kernel_id).operation
    with lz.lock(op, kernel_id):
        out = call(x)
        with pytest.raises(KernelNotSupportedError, match=f"{kernel_id}'s backward has no derivative"):
            torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        out = call(x)
        (g,) = torch.autograd.grad(out.float().sum(), x)  # a plain backward runs as before
    assert torch.isfinite(g).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_liger_gated_kernels_differentiate_their_backward(name: str) -> None:
    pytest.importorskip("liger_kernel")
    gate = torch.randn(32, 128, device="cuda", requires_grad=True)
    up = torch.randn(32, 128, device="cuda", requires_grad=True)
    plain = (lambda a, b: F.silu(a) * b) if name == "swiglu" else (lambda a, b: F.gelu(a, approximate="tanh") * b)
    with lz.lock(name, f"liger_{name}"):
        (gg,) = torch.autograd.grad(getattr(lz, name)(gate, up).square().sum(), gate, create_graph=True)
        got = torch.autograd.grad(gg.square().sum(), (gate, up))
    (gg,) = torch.autograd.grad(plain(gate, up).square().sum(), gate, create_graph=True)
    want = torch.autograd.grad(gg.square().sum(), (gate, up))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
