"""A SwiGLU MLP that keeps less for the backward: ``down(swiglu(x Wg^T, x Wu^T))`` as one autograd node.

Autograd keeps four tensors for a plain ``down_proj(swiglu(gate_proj(x), up_proj(x)))``: ``x`` (for the
gate and up weight gradients), ``gate`` and ``up`` (for the SwiGLU backward) and the product
``c = swiglu(gate, up)`` (for the down weight gradient). :class:`LeanSwiGLUMLP` keeps ``x``, ``gate`` and
``up`` only and recomputes ``c`` in the backward, one elementwise pass: at a Llama-7B-like width the product is
a third of the MLP's saved activations (on an H200, 8 layers of 8192 tokens x 8192: 2304 MB saved instead of
3328 MB, and the step was no slower: 32.1 ms against 33.8 ms, ``scripts/gpu_training_probe.py``).

Both SwiGLU passes go through ``lz.swiglu``, so the kernel is still selected per shape (the forward as an
inference bucket, the recompute and its backward as a training bucket) and Liger's in-place backward keeps
its memory advantage. :func:`lean_applies` says when the patched MLP forward takes this path: gradients on,
not compiling (Inductor makes its own recompute decisions), three bias-free ``nn.Linear`` projections
without hooks, and floating-point weights of the input's dtype.

One backward per forward: Liger's SwiGLU backward writes its gradients into the saved ``gate`` and ``up`` in
place, so a second backward through the same graph (``retain_graph=True``) would read gradients as
activations. Models that need that call ``patch(model, mlp=False)``. Under ``create_graph=True`` (a gradient
penalty, a Hessian-vector product) the backward differentiates the plain MLP instead, so a second derivative is
the plain module's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import layerzero.ops as lz_ops
from layerzero.tensor_helpers import differentiable_grads

__all__ = ["LeanSwiGLUMLP", "lean_applies"]


class LeanSwiGLUMLP(torch.autograd.Function):
    """``down(swiglu(x @ wg.T, x @ wu.T))``; saves ``x``, ``gate``, ``up``; recomputes the product."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,  # type: ignore[override]
                wd: torch.Tensor) -> torch.Tensor:
        gate = F.linear(x, wg)
        up = F.linear(x, wu)
        out = F.linear(lz_ops.swiglu(gate, up), wd)
        ctx.save_for_backward(x, wg, wu, wd, gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, wg, wu, wd, gate, up = ctx.saved_tensors
        need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow (see _twice_differentiable)
            return _twice_differentiable(ctx.needs_input_grad, dout, x, wg, wu, wd)
        with torch.enable_grad():
            g = gate.detach().requires_grad_(True)
            u = up.detach().requires_grad_(True)
            c = lz_ops.swiglu(g, u)  # the recompute; a training bucket, so its backward is the kernel's own
        d2 = dout.reshape(-1, dout.shape[-1])
        dwd = d2.T @ c.detach().reshape(-1, c.shape[-1]) if need_wd else None
        dg, du = torch.autograd.grad(c, (g, u), dout @ wd)
        del c
        x2 = x.reshape(-1, x.shape[-1])
        dg2, du2 = dg.reshape(-1, dg.shape[-1]), du.reshape(-1, du.shape[-1])
        dx = None
        if need_x:
            dx = torch.addmm(dg2 @ wg, du2, wu).reshape(x.shape)
        dwg = dg2.T @ x2 if need_wg else None
        dwu = du2.T @ x2 if need_wu else None
        return dx, dwg, dwu, dwd


def _twice_differentiable(need: tuple[bool, ...], dout: torch.Tensor, x: torch.Tensor, wg: torch.Tensor,
                          wu: torch.Tensor, wd: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward under ``create_graph=True`` (a gradient penalty, a Hessian-vector product): the lean one
    recomputes the product outside any graph and a fused kernel's backward has no derivative of its own, so
    their gradients' own derivative would be missing. This differentiates the plain MLP instead (what autograd
    would have kept, for this backward only)."""
    out = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    return differentiable_grads(out, (x, wg, wu, wd), need, dout)


def _plain_linear(m: nn.Module, dtype: torch.dtype) -> bool:
    return (type(m) is nn.Linear and m.bias is None and m.weight.dtype == dtype and m.weight.is_floating_point()
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks))


def lean_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s patched forward may run :class:`LeanSwiGLUMLP` for ``x``."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    projections = (module.gate_proj, module.up_proj, module.down_proj)
    if not all(_plain_linear(m, x.dtype) for m in projections):
        return False
    return x.requires_grad or any(m.weight.requires_grad for m in projections)
