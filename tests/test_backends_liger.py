"""Liger: registration and constraints everywhere; its Triton kernels against the reference on a GPU.

liger-kernel is pure Python but imports Triton and needs CUDA, so on a CPU
machine only registration and the constraint logic run; the ``gpu`` tests run
each adapter for real (the GPU benchmark unpacks the wheel from ``.whl/``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.backends import liger
from layerzero.ops import op_for
from layerzero.runtime import get_runtime
from layerzero.spec import ReasonCode

SM90 = dict(device="cuda", compute_capability=(9, 0))


def _reasons(kernel_id: str, **kw: object) -> set[str]:
    base = dict(dtype="bfloat16", num_tokens=128, hidden_size=4096, batch_size=128, **SM90)
    base.update(kw)
    ok, reasons = lz.validate(kernel_id, lz.SelectionContext(**base))
    return {r.code for r in reasons}


def test_every_kernel_is_registered_with_the_liger_backend() -> None:
    specs = {s.kernel_id: s for s in lz.list_kernels("liger_*")}
    assert set(specs) == set(liger.LIGER_KERNEL_IDS) == {"liger_rms_norm", "liger_layer_norm", "liger_rope",
                                                          "liger_swiglu", "liger_geglu", "liger_cross_entropy",
                                                          "liger_linear_cross_entropy",
                                                          "liger_linear_cross_entropy_wide"}
    assert {s.operation for s in specs.values()} == {"rms_norm", "layer_norm", "rope", "swiglu", "geglu",
                                                     "cross_entropy", "linear_cross_entropy"}
    assert all(s.backend == "liger" and s.platforms == frozenset({"cuda"}) for s in specs.values())


def test_missing_liger_or_triton_is_a_reason_with_the_install_command() -> None:
    info = get_runtime().backends.info("liger")
    if info.available:
        pytest.skip("liger and triton are installed here")
    exp = lz.explain_context("rms_norm", lz.SelectionContext(dtype="bfloat16", num_tokens=8, hidden_size=64, **SM90))
    (reason,) = [r for r in exp.rejection_reasons["liger_rms_norm"] if r.code == ReasonCode.BACKEND_UNAVAILABLE]
    assert "pip install liger-kernel" in reason.message
    assert ("liger_kernel" in reason.message) or ("triton" in reason.message)


def test_constraints() -> None:
    def only_hw(codes: set[str]) -> set[str]:
        return codes - {ReasonCode.BACKEND_UNAVAILABLE}

    assert only_hw(_reasons("liger_rms_norm")) == set()
    assert ReasonCode.HIDDEN_TOO_LARGE in _reasons("liger_rms_norm", hidden_size=liger.MAX_HIDDEN + 1)
    assert ReasonCode.PLATFORM_MISMATCH in _reasons("liger_layer_norm", device="cpu", compute_capability=None)
    assert ReasonCode.DTYPE_UNSUPPORTED in _reasons("liger_swiglu", dtype="float64")
    assert ReasonCode.VARIANT_UNSUPPORTED in _reasons("liger_rope", interleaved=True, head_dim=128)
    assert only_hw(_reasons("liger_rope", interleaved=False, head_dim=128)) == set()
    # under torch.compile Liger runs inside the pinned dispatched op: eligible, behind Inductor's native code
    # unless a compiled-mode measurement puts it ahead (tests/test_compiled_tuning.py)
    assert ReasonCode.COMPILE_UNSAFE not in _reasons("liger_rms_norm", compiling=True)


def test_rope_tables_reshape_to_what_liger_expects() -> None:
    cos = torch.randn(1, 1, 10, 64)  # HF's (batch, 1, seq, d) after unsqueeze(1)
    assert liger._rope_tables(cos, 3, 10).shape == (1, 10, 64)
    assert liger._rope_tables(torch.randn(10, 64), 3, 10).shape == (1, 10, 64)
    assert liger._rope_tables(torch.randn(3, 1, 10, 64), 3, 10).shape == (3, 10, 64)
    with pytest.raises(ValueError, match="shared across heads"):
        liger._rope_tables(torch.randn(1, 4, 10, 64), 1, 10)


GPU_CASES = [
    ("rms_norm", lz.SelectionContext(device="cuda", dtype="bfloat16", num_tokens=300, hidden_size=4096)),
    ("rms_norm", lz.SelectionContext(device="cuda", dtype="float16", num_tokens=1, hidden_size=8192)),
    ("layer_norm", lz.SelectionContext(device="cuda", dtype="bfloat16", num_tokens=64, hidden_size=2048)),
    ("swiglu", lz.SelectionContext(device="cuda", dtype="float16", num_tokens=33, hidden_size=11008)),
    ("rope", lz.SelectionContext(device="cuda", dtype="bfloat16", batch_size=2, num_heads=8, seq_len=40,
                                 head_dim=128, hidden_size=128)),
    ("rope", lz.SelectionContext(device="cuda", dtype="float32", batch_size=1, num_heads=1, seq_len=7,
                                 head_dim=64, hidden_size=64)),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("operation", "ctx"), GPU_CASES, ids=lambda x: x if isinstance(x, str) else
                         f"{x.dtype_name}-{x.num_tokens}x{x.hidden_size}")
def test_liger_kernels_against_the_reference(operation: str, ctx: lz.SelectionContext) -> None:
    if not get_runtime().backends.is_available("liger"):
        pytest.skip(get_runtime().backends.info("liger").reason)
    op = op_for(operation)
    spec = get_runtime().kernels.get(f"liger_{operation}")
    args = op.make_inputs(operation, ctx, torch.Generator(device="cuda").manual_seed(0))
    before = args[0].clone()
    out = spec.impl(*args)
    assert op.check_output(operation, args, out) is None
    atol, rtol = spec.tolerance_for(out.dtype)
    torch.testing.assert_close(out.double(), op.reference(operation, args), atol=4 * atol, rtol=4 * rtol)
    torch.testing.assert_close(args[0], before)  # inputs are never modified in place


@pytest.mark.gpu
def test_liger_rms_norm_backward_matches_torch() -> None:
    if not get_runtime().backends.is_available("liger"):
        pytest.skip(get_runtime().backends.info("liger").reason)
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    w = (torch.rand(1024, device="cuda") + 0.5).requires_grad_()
    liger.liger_rms_norm(x, w, 1e-6).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    torch.rms_norm(x, (1024,), w, 1e-6).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_liger_cross_entropy_leaves_the_callers_logits_alone(reduction: str) -> None:
    """Liger writes into its input (ignored rows zeroed, gradients in place of the logits with grad on);
    lz.cross_entropy through liger_cross_entropy must return F.cross_entropy's loss and gradient and leave
    the caller's logits unchanged."""
    info = get_runtime().backends.info("liger")
    if not info.available:
        pytest.skip(f"liger is not available here: {info.reason}")
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = (torch.randn(64, 4096, device="cuda", generator=g) * 3).requires_grad_(True)
    target = torch.randint(0, 4096, (64,), device="cuda", generator=g)
    target[::4] = -100
    before = logits.detach().clone()
    with lz.lock("cross_entropy", "liger_cross_entropy"):
        assert lz.which("cross_entropy", logits, target) == "liger_cross_entropy"
        loss = lz.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    assert torch.equal(logits.detach(), before)
    x64 = before.double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(x64, target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    upstream = torch.rand_like(ref)
    loss.backward(upstream.to(loss.dtype))
    ref.backward(upstream)
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(logits.detach(), before)


@pytest.mark.gpu
def test_liger_rope_on_a_transformers_layout_view_keeps_the_input_and_its_layout() -> None:
    """transformers hands rope ``q_proj(x).view(b, s, h, d).transpose(1, 2)``: Liger would rotate that storage
    in place, so the adapter copies it (one straight copy, same strides) and must leave the caller's q alone."""
    if not get_runtime().backends.is_available("liger"):
        pytest.skip(get_runtime().backends.info("liger").reason)
    g = torch.Generator(device="cuda").manual_seed(5)
    b, s, h, d = 2, 64, 4, 64
    q = torch.randn(b, s, h, d, device="cuda", generator=g).transpose(1, 2).requires_grad_(True)
    pos = torch.arange(s, device="cuda", dtype=torch.float32)
    freqs = pos[:, None] / (10000 ** (torch.arange(0, d, 2, device="cuda") / d))[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None].expand(b, s, d), emb.sin()[None].expand(b, s, d)
    before = q.detach().clone()
    out = liger.liger_rope(q, cos[:, None], sin[:, None], False)
    assert torch.equal(q.detach(), before)
    half = torch.cat([-q[..., d // 2:], q[..., : d // 2]], dim=-1)
    ref = q * cos[:, None] + half * sin[:, None]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(out)
    (g_out,) = torch.autograd.grad(out, q, up)
    (g_ref,) = torch.autograd.grad(ref, q, up)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-5)


class _InPlaceRope(torch.autograd.Function):
    """Liger's LigerRopeFunction as it treats memory (0.8.5): forward and backward transpose q (or dq) to
    (b, s, h, d), call ``.contiguous()`` (a no-op when that view is contiguous) and rotate that storage in place."""

    @staticmethod
    def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
        s = t.transpose(1, 2).contiguous()  # (b, s, h, d): the caller's storage when already contiguous
        d = s.shape[-1]
        c, sn = cos[:, :, None], sin[:, :, None] * sign
        half = torch.cat([-s[..., d // 2:], s[..., : d // 2]], dim=-1)
        s.copy_(s * c + half * sn)
        return s.transpose(1, 2)

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _InPlaceRope._rotate(q, cos, sin, 1.0), k

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _InPlaceRope._rotate(dq, cos, sin, -1.0), dk, None, None, None, None, None


def test_liger_rope_leaves_the_callers_gradient_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Liger's backward rotates the incoming gradient in place when it is laid out as transformers' q (a
    ``randn_like`` of the output, or any gradient with that storage): ``torch.autograd.grad(out, q, up)`` changed
    the caller's ``up``. The adapter hands it a copy then (CPU, with a stand-in that treats memory as Liger does)."""
    monkeypatch.setattr(liger, "_apply", lambda name: _InPlaceRope.apply)
    b, s, h, d = 2, 8, 4, 16
    q = torch.randn(b, s, h, d).transpose(1, 2).requires_grad_(True)
    pos = torch.arange(s, dtype=torch.float32)
    freqs = pos[:, None] / (10000 ** (torch.arange(0, d, 2) / d))[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None].expand(b, s, d), emb.sin()[None].expand(b, s, d)
    before = q.detach().clone()
    out = liger.liger_rope(q, cos[:, None], sin[:, None], False)
    half = torch.cat([-q[..., d // 2:], q[..., : d // 2]], dim=-1)
    ref = q * cos[:, None] + half * sin[:, None]
    torch.testing.assert_close(out, ref)
    assert torch.equal(q.detach(), before)
    up = torch.randn_like(out)  # (b, s, h, d) storage, as out's
    kept = up.clone()
    (g_out,) = torch.autograd.grad(out, q, up)
    assert torch.equal(up, kept)
    (g_ref,) = torch.autograd.grad(ref, q, up)
    torch.testing.assert_close(g_out, g_ref)


def _in_place_gated(act: Any, act_grad: Any) -> tuple[Any, Any]:
    """``swiglu_forward`` / ``swiglu_backward`` as Liger 0.8.5 treats memory: the backward writes the gradients
    of gate and up into the tensors it is given (the forward's own inputs, in Liger's autograd function)."""
    def forward(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return a, b, act(a) * b

    def backward(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        da, db = dc * b * act_grad(a), dc * act(a)
        a.copy_(da)
        b.copy_(db)
        return a, b

    return forward, backward


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_liger_gated_mlps_leave_the_callers_gate_and_up_alone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Liger's LigerSiLUMulFunction saves the caller's gate and up and its backward writes the gradients into
    them: after ``backward()`` they held gradients. The adapter's own autograd function gives the backward
    kernel copies (CPU, with stand-ins that treat memory as Liger does)."""
    def gelu_grad(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # called inside a backward
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh").sum(), x)
        return g

    silu = (torch.nn.functional.silu, lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))))
    gelu = (lambda x: torch.nn.functional.gelu(x, approximate="tanh"), gelu_grad)
    act, act_grad = silu if name == "swiglu" else gelu
    monkeypatch.setattr(liger, "_gated_kernels", lambda n: _in_place_gated(act, act_grad))
    gate, up = torch.randn(6, 32, requires_grad=True), torch.randn(6, 32, requires_grad=True)
    g, u = gate * 1.0, up * 1.0  # intermediates, as a model's projections are
    kept = g.detach().clone(), u.detach().clone()
    fn = liger.liger_swiglu if name == "swiglu" else lambda a, b: liger.liger_geglu(a, b, "tanh")
    out = fn(g, u)
    torch.testing.assert_close(out, act(g) * u)
    dy = torch.randn_like(out)
    out.backward(dy)
    assert torch.equal(g.detach(), kept[0]) and torch.equal(u.detach(), kept[1])
    ref_gate, ref_up = torch.autograd.grad((act(gate) * up * dy).sum(), (gate, up))
    torch.testing.assert_close(gate.grad, ref_gate)
    torch.testing.assert_close(up.grad, ref_up)
