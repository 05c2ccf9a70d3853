"""The patched SwiGLU MLP's training path (layerzero.integrations.lean_mlp): same gradients, less saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerzero.integrations import transformers as lzt
from layerzero.integrations.lean_mlp import LeanSwiGLUMLP, lean_applies


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool = False, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, dtype=dtype)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(t, nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (1, 1, 16)])
def test_gradients_match_autograd_in_float64(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    mlp = MLP(16, 40)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = mlp(x)
    g_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, *mlp.parameters()), g_out)
    out = LeanSwiGLUMLP.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    grads = torch.autograd.grad(out, (x, *mlp.parameters()), g_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_frozen_weights_get_no_gradient_and_input_still_does() -> None:
    torch.manual_seed(1)
    mlp = MLP(8, 24).requires_grad_(False)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    LeanSwiGLUMLP.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in mlp.parameters())
    ref_x = x.detach().clone().requires_grad_(True)
    mlp(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("frozen", [(), ("up",), ("gate", "up", "down")])
def test_a_second_derivative_is_the_plain_mlps(frozen: tuple[str, ...]) -> None:
    """A gradient penalty or a Hessian-vector product through the lean node: its hand-written backward has no
    derivative of its own, so under create_graph=True it differentiates the plain MLP (gradgradcheck), also with
    some weights frozen."""
    torch.manual_seed(2)
    mlp = MLP(6, 10).double()
    for name in frozen:
        getattr(mlp, f"{name}_proj").weight.requires_grad_(False)
    weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *w: LeanSwiGLUMLP.apply(x, *w), (x, *weights))
    # a gradient penalty, as a user writes it: the same parameter gradients as the plain module's
    wrt = [x, *(p for p in mlp.parameters() if p.requires_grad)]
    (gx,) = torch.autograd.grad(LeanSwiGLUMLP.apply(x, *weights).square().sum(), x, create_graph=True)
    lean = torch.autograd.grad(gx.square().sum(), wrt)
    (gx,) = torch.autograd.grad(mlp(x).square().sum(), x, create_graph=True)
    plain = torch.autograd.grad(gx.square().sum(), wrt)
    for got, want in zip(lean, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_keeps_a_third_less_than_autograd() -> None:
    torch.manual_seed(2)
    mlp = MLP(32, 128, dtype=torch.float32)
    x = torch.randn(64, 32, requires_grad=True)
    plain, _ = _saved_bytes(lambda: mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    lean, _ = _saved_bytes(lambda: LeanSwiGLUMLP.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight,
                                                       mlp.down_proj.weight))
    inter_bytes = 64 * 128 * 4
    assert lean <= plain - inter_bytes  # at least the product (and, here, silu(gate)) is not kept


def test_patched_mlp_trains_through_the_lean_path_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    ref = MLP(16, 48, dtype=torch.float32)
    model = MLP(16, 48, dtype=torch.float32)
    model.load_state_dict(ref.state_dict())
    report = lzt.patch(model)
    assert "swiglu_mlp" in report.patched
    x = torch.randn(4, 6, 16)
    seen = []
    real = LeanSwiGLUMLP.apply
    monkeypatch.setattr(LeanSwiGLUMLP, "apply", lambda *a: seen.append(1) or real(*a))
    ref(x).square().mean().backward()
    model(x).square().mean().backward()
    assert seen == [1]
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))  # inference: the plain patched path
    assert seen == [1]
    lzt.unpatch(model)


def test_falls_back_where_the_lean_node_does_not_apply() -> None:
    x = torch.randn(2, 8)
    biased = MLP(8, 16, bias=True, dtype=torch.float32)
    assert not lean_applies(biased, x)
    plain = MLP(8, 16, dtype=torch.float32)
    assert lean_applies(plain, x)
    with torch.no_grad():
        assert not lean_applies(plain, x)
    assert not lean_applies(plain, x.double())  # weights of another dtype
    handle = plain.up_proj.register_forward_hook(lambda *_: None)  # a LoRA-like hook must still run
    assert not lean_applies(plain, x)
    handle.remove()
    frozen = MLP(8, 16, dtype=torch.float32).requires_grad_(False)
    assert not lean_applies(frozen, x)  # nothing wants a gradient: the plain path saves nothing either
