"""``layerzero::kernel_attention``: one named attention kernel as an opaque node with a real backward.

Used under ``torch.compile`` when the kernel chosen at trace time is not PyTorch code Dynamo can trace
(FlashAttention, FlashInfer, xFormers, ...) and its spec declares a
:class:`~layerzero.spec.ResidualPair`. The forward op runs ``pair.forward`` and returns the output with the
residuals (the log-sum-exp, ...); autograd saves them, and the backward op hands them to ``pair.backward``.
The forward runs once per training step: nothing is recomputed.

The kernel is fixed when the graph is traced (the graph is guarded on the runtime's version, see
:mod:`.choose`), so this path has no run-time fallback: a kernel that raises here raises
:class:`~layerzero.errors.KernelExecutionError` naming it.
"""

from __future__ import annotations

from typing import Any

import torch

from layerzero.errors import KernelExecutionError
from layerzero.integrations.compile.choose import RUNTIME
from layerzero.integrations.compile.dispatched import dense
from layerzero.spec import ResidualPair

__all__ = ["kernel_attention_op", "kernel_attention_backward_op", "residual_attention"]

Tensor = torch.Tensor


def _pair(kernel_id: str) -> ResidualPair:
    spec = RUNTIME.kernels.find(kernel_id)
    if spec is None or spec.residual_pair is None:
        raise KernelExecutionError(f"attention under torch.compile: kernel {kernel_id!r} was chosen when the graph "
                                   "was traced but is no longer registered with a forward-with-residuals pair")
    return spec.residual_pair


def _call(kernel_id: str, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        raise KernelExecutionError(f"attention under torch.compile: {kernel_id} {what} raised "
                                   f"{type(exc).__name__}: {exc} (this compiled path has no fallback; a policy "
                                   "that denies the kernel recompiles with another)") from exc


@torch.library.custom_op("layerzero::kernel_attention", mutates_args=())
def kernel_attention_op(kernel_id: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                        dropout_p: float, scale: float | None, window: int | None) -> list[Tensor]:
    """``[out, *residuals]`` of ``kernel_id``'s forward-with-residuals (BHSD)."""
    args = (q, k, v, attn_mask, is_causal, dropout_p, scale, window)
    out, residuals = _call(kernel_id, "forward", _pair(kernel_id).forward, *args)
    return [dense(out), *(dense(r) for r in residuals)]


@kernel_attention_op.register_fake
def _kernel_attention_fake(kernel_id: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                           is_causal: bool, dropout_p: float, scale: float | None, window: int | None
                           ) -> list[Tensor]:
    args = (q, k, v, attn_mask, is_causal, dropout_p, scale, window)
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    return [out, *_pair(kernel_id).fake(*args)]


@torch.library.custom_op("layerzero::kernel_attention_backward", mutates_args=())
def kernel_attention_backward_op(kernel_id: str, grad: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                 attn_mask: Tensor | None, out: Tensor, residuals: list[Tensor], is_causal: bool,
                                 dropout_p: float, scale: float | None, window: int | None) -> list[Tensor]:
    """``[dq, dk, dv]`` from ``kernel_id``'s backward on the saved output and residuals."""
    args = (q, k, v, attn_mask, is_causal, dropout_p, scale, window)
    grads = _call(kernel_id, "backward", _pair(kernel_id).backward, grad, args, out, tuple(residuals))
    return [torch.zeros_like(t) if g is None else dense(g) for g, t in zip(grads[:3], (q, k, v), strict=True)]


@kernel_attention_backward_op.register_fake
def _kernel_attention_backward_fake(kernel_id: str, grad: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    attn_mask: Tensor | None, out: Tensor, residuals: list[Tensor], is_causal: bool,
                                    dropout_p: float, scale: float | None, window: int | None) -> list[Tensor]:
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]


def _setup(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    kernel_id, q, k, v, attn_mask, is_causal, dropout_p, scale, window = inputs
    ctx.save_for_backward(q, k, v, attn_mask, *output)
    ctx.options = (kernel_id, is_causal, dropout_p, scale, window)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    q, k, v, attn_mask, out, *residuals = ctx.saved_tensors
    kernel_id, is_causal, dropout_p, scale, window = ctx.options
    grad = grads[0]
    if grad is None or not any(ctx.needs_input_grad[1:4]):
        return (None,) * 9
    dq, dk, dv = kernel_attention_backward_op(kernel_id, grad.contiguous(), q, k, v, attn_mask, out, residuals,
                                              is_causal, dropout_p, scale, window)
    return None, dq, dk, dv, None, None, None, None, None


kernel_attention_op.register_autograd(_backward, setup_context=_setup)


def residual_attention(kernel_id: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                       dropout_p: float, scale: float | None, window: int | None) -> Tensor:
    """The output of :func:`kernel_attention_op` (what the traced ``lz.attention`` returns on this path)."""
    return kernel_attention_op(kernel_id, q, k, v, attn_mask, is_causal, float(dropout_p), scale, window)[0]
