"""Kernels whose backward has no derivative of its own: a second derivative through them raises.

A library's fused backward (Liger's Triton passes, FlashAttention's and xFormers' CUDA kernels) writes its
gradients outside autograd: under ``create_graph=True`` (a gradient penalty, a Hessian-vector product, MAML)
PyTorch takes those gradients as constants, so the second derivative silently misses every term that goes
through the kernel. Their autograd functions are not marked ``once_differentiable``, so nothing says so.

:func:`first_order` marks such a kernel's output: a backward through it with grad mode on (``create_graph=True``)
raises :class:`~layerzero.errors.KernelNotSupportedError` naming the operation, the kernel and the PyTorch kernel
to lock for that training step, before any gradient is made. A plain backward is untouched. The PyTorch kernels
and layerzero's own autograd functions (the chunked linear cross-entropy, Liger's SwiGLU/GeGLU wrapper, the
patched MLP's lean node) differentiate their backward instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from layerzero.errors import KernelNotSupportedError

__all__ = ["first_order", "second_derivative_refused"]


def second_derivative_refused(operation: str, kernel_id: str, native: str) -> KernelNotSupportedError:
    """The error a backward with ``create_graph=True`` through ``kernel_id`` raises."""
    return KernelNotSupportedError(
        f"{operation}: {kernel_id}'s backward has no derivative of its own, so a second derivative through it "
        f"(backward with create_graph=True: a gradient penalty, a Hessian-vector product) would silently miss "
        f"its terms; run that forward with a PyTorch kernel (with lz.lock({operation!r}, {native!r}): ...) or "
        f"call backward without create_graph", kernel_id=kernel_id)


@functools.cache
def _refusing_hook(operation: str, kernel_id: str, native: str) -> Callable[[Any], None]:
    def hook(grad_outputs: Any) -> None:
        if torch.is_grad_enabled():  # autograd runs a create_graph=True backward with grad mode on
            raise second_derivative_refused(operation, kernel_id, native)
    return hook


def first_order(out: Any, operation: str, kernel_id: str, native: str) -> Any:
    """``out`` (a tensor, or a tuple whose first item is one), its autograd node set to refuse a backward with
    ``create_graph=True`` (see the module docstring); ``native``: the PyTorch kernel the error suggests."""
    if torch.is_grad_enabled():
        node = getattr(out[0] if isinstance(out, tuple) else out, "grad_fn", None)
        if node is not None:
            node.register_prehook(_refusing_hook(operation, kernel_id, native))
    return out
