"""The dispatched row-wise custom ops: ``layerzero::rms_norm``, ``layer_norm``, ``rope``, ``swiglu``, ``geglu``,
``gelu``, ``silu`` and ``cross_entropy``, each with a recomputing ``*_backward`` op (see :mod:`.dispatched`)."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from layerzero.integrations.compile.dispatched import dense, needs_of, recompute_grads, scatter

__all__ = ["rms_norm_op", "layer_norm_op", "rope_op", "swiglu_op", "geglu_op", "gelu_op", "silu_op", "cross_entropy_op",
           "NORMS_MOD", "ELEMENTWISE_MOD", "LOSSES_MOD", "lz_rms_norm", "lz_layer_norm", "lz_rope", "lz_swiglu",
           "lz_geglu", "lz_gelu", "lz_silu", "lz_cross_entropy"]

Tensor = torch.Tensor

NORMS_MOD = importlib.import_module("layerzero.ops.norms")
ELEMENTWISE_MOD = importlib.import_module("layerzero.ops.elementwise")
LOSSES_MOD = importlib.import_module("layerzero.ops.losses")

# The original public functions (captured before anything could wrap them).
lz_rms_norm = NORMS_MOD.rms_norm
lz_layer_norm = NORMS_MOD.layer_norm
lz_rope = ELEMENTWISE_MOD.rope
lz_swiglu = ELEMENTWISE_MOD.swiglu
lz_geglu = ELEMENTWISE_MOD.geglu
lz_gelu = ELEMENTWISE_MOD.gelu
lz_silu = ELEMENTWISE_MOD.silu
lz_cross_entropy = LOSSES_MOD.cross_entropy


# ---------------------------------------------------------------------------------------------------
# row-wise operations: one forward op and one recomputing backward op each
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("layerzero::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``lz.rms_norm`` as one graph node."""
    return dense(lz_rms_norm(x, weight, eps))


@rms_norm_op.register_fake
def _rms_norm_fake(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    NORMS_MOD.RMS_NORM.validate("rms_norm", (x, weight, eps))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, needs: list[bool]
                         ) -> list[Tensor]:
    return recompute_grads(lambda x_, w_: lz_rms_norm(x_, w_, eps), grad, (x, weight), needs)


@rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, needs: list[bool]
                            ) -> list[Tensor]:
    present = [t for t in (x, weight) if t is not None]
    return [t.new_empty(t.shape) for t, n in zip(present, needs, strict=True) if n]


def _rms_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, weight = ctx.saved_tensors
    needs = needs_of(ctx, (0, 1), (x, weight))
    present = [n for n, t in zip(needs, (x, weight), strict=True) if t is not None]
    grads = rms_norm_backward_op(grad.contiguous(), x, weight, ctx.eps, present) if any(needs) else []
    dx, dw = scatter(needs, grads)
    return dx, dw, None


rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


@torch.library.custom_op("layerzero::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``lz.layer_norm`` as one graph node."""
    return dense(lz_layer_norm(x, weight, bias, eps))


@layer_norm_op.register_fake
def _layer_norm_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    NORMS_MOD.LAYER_NORM.validate("layer_norm", (x, weight, bias, eps))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                           needs: list[bool]) -> list[Tensor]:
    return recompute_grads(lambda x_, w_, b_: lz_layer_norm(x_, w_, b_, eps), grad, (x, weight, bias), needs)


@layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                              needs: list[bool]) -> list[Tensor]:
    present = [t for t in (x, weight, bias) if t is not None]
    return [t.new_empty(t.shape) for t, n in zip(present, needs, strict=True) if n]


def _ln_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _ln_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, weight, bias = ctx.saved_tensors
    needs = needs_of(ctx, (0, 1, 2), (x, weight, bias))
    present = [n for n, t in zip(needs, (x, weight, bias), strict=True) if t is not None]
    grads = layer_norm_backward_op(grad.contiguous(), x, weight, bias, ctx.eps, present) if any(needs) else []
    dx, dw, db = scatter(needs, grads)
    return dx, dw, db, None


layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup)


@torch.library.custom_op("layerzero::rope", mutates_args=())
def rope_op(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``lz.rope`` as one graph node."""
    return dense(lz_rope(x, cos, sin, interleaved))


@rope_op.register_fake
def _rope_fake(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    ELEMENTWISE_MOD.ROPE.validate("rope", (x, cos, sin, interleaved))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::rope_backward", mutates_args=())
def rope_backward_op(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, needs: list[bool]
                     ) -> list[Tensor]:
    return recompute_grads(lambda x_, c_, s_: lz_rope(x_, c_, s_, interleaved), grad, (x, cos, sin), needs)


@rope_backward_op.register_fake
def _rope_backward_fake(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, needs: list[bool]
                        ) -> list[Tensor]:
    return [t.new_empty(t.shape) for t, n in zip((x, cos, sin), needs, strict=True) if n]


def _rope_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, cos, sin, interleaved = inputs
    ctx.save_for_backward(x, cos, sin)
    ctx.interleaved = interleaved


def _rope_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, cos, sin = ctx.saved_tensors
    needs = needs_of(ctx, (0, 1, 2), (x, cos, sin))
    grads = rope_backward_op(grad.contiguous(), x, cos, sin, ctx.interleaved, needs) if any(needs) else []
    dx, dcos, dsin = scatter(needs, grads)
    return dx, dcos, dsin, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


@torch.library.custom_op("layerzero::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    """``lz.swiglu`` as one graph node."""
    return dense(lz_swiglu(gate, up))


@swiglu_op.register_fake
def _swiglu_fake(gate: Tensor, up: Tensor) -> Tensor:
    ELEMENTWISE_MOD.SWIGLU.validate("swiglu", (gate, up))
    return gate.new_empty(gate.shape)


@torch.library.custom_op("layerzero::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, needs: list[bool]) -> list[Tensor]:
    return recompute_grads(lz_swiglu, grad, (gate, up), needs)


@swiglu_backward_op.register_fake
def _swiglu_backward_fake(grad: Tensor, gate: Tensor, up: Tensor, needs: list[bool]) -> list[Tensor]:
    return [t.new_empty(t.shape) for t, n in zip((gate, up), needs, strict=True) if n]


def _swiglu_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    gate, up = ctx.saved_tensors
    needs = needs_of(ctx, (0, 1), (gate, up))
    grads = swiglu_backward_op(grad.contiguous(), gate, up, needs) if any(needs) else []
    return tuple(scatter(needs, grads))


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("layerzero::geglu", mutates_args=())
def geglu_op(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    """``lz.geglu`` as one graph node."""
    return dense(lz_geglu(gate, up, approximate))


@geglu_op.register_fake
def _geglu_fake(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    ELEMENTWISE_MOD.GEGLU.validate("geglu", (gate, up, approximate))
    return gate.new_empty(gate.shape)


@torch.library.custom_op("layerzero::geglu_backward", mutates_args=())
def geglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, approximate: str, needs: list[bool]) -> list[Tensor]:
    return recompute_grads(lambda g, u: lz_geglu(g, u, approximate), grad, (gate, up), needs)


@geglu_backward_op.register_fake
def _geglu_backward_fake(grad: Tensor, gate: Tensor, up: Tensor, approximate: str, needs: list[bool]
                         ) -> list[Tensor]:
    return [t.new_empty(t.shape) for t, n in zip((gate, up), needs, strict=True) if n]


def _geglu_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    gate, up, approximate = inputs
    ctx.save_for_backward(gate, up)
    ctx.approximate = approximate


def _geglu_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    gate, up = ctx.saved_tensors
    needs = needs_of(ctx, (0, 1), (gate, up))
    grads = geglu_backward_op(grad.contiguous(), gate, up, ctx.approximate, needs) if any(needs) else []
    return (*scatter(needs, grads), None)


geglu_op.register_autograd(_geglu_backward, setup_context=_geglu_setup)


@torch.library.custom_op("layerzero::gelu", mutates_args=())
def gelu_op(x: Tensor, approximate: str) -> Tensor:
    """``lz.gelu`` as one graph node."""
    return dense(lz_gelu(x, approximate))


@gelu_op.register_fake
def _gelu_fake(x: Tensor, approximate: str) -> Tensor:
    ELEMENTWISE_MOD.GELU.validate("gelu", (x, approximate))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::gelu_backward", mutates_args=())
def gelu_backward_op(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    return recompute_grads(lambda x_: lz_gelu(x_, approximate), grad, (x,), (True,))[0]


@gelu_backward_op.register_fake
def _gelu_backward_fake(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    return x.new_empty(x.shape)


def _gelu_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.approximate = inputs[1]


def _gelu_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    (x,) = ctx.saved_tensors
    return gelu_backward_op(grad.contiguous(), x, ctx.approximate), None


gelu_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


@torch.library.custom_op("layerzero::silu", mutates_args=())
def silu_op(x: Tensor) -> Tensor:
    """``lz.silu`` as one graph node."""
    return dense(lz_silu(x))


@silu_op.register_fake
def _silu_fake(x: Tensor) -> Tensor:
    ELEMENTWISE_MOD.SILU.validate("silu", (x,))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::silu_backward", mutates_args=())
def silu_backward_op(grad: Tensor, x: Tensor) -> Tensor:
    return recompute_grads(lz_silu, grad, (x,), (True,))[0]


@silu_backward_op.register_fake
def _silu_backward_fake(grad: Tensor, x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _silu_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _silu_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    (x,) = ctx.saved_tensors
    return (silu_backward_op(grad.contiguous(), x),)


silu_op.register_autograd(_silu_backward, setup_context=_silu_setup)


@torch.library.custom_op("layerzero::cross_entropy", mutates_args=())
def cross_entropy_op(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                     reduction: str) -> Tensor:
    """``lz.cross_entropy`` as one graph node."""
    return dense(lz_cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                    reduction=reduction))


@cross_entropy_op.register_fake
def _cross_entropy_fake(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                        reduction: str) -> Tensor:
    LOSSES_MOD.CROSS_ENTROPY.validate("cross_entropy", (logits, target, ignore_index, label_smoothing, reduction))
    return logits.new_empty((logits.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("layerzero::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad: Tensor, logits: Tensor, target: Tensor, ignore_index: int,
                              label_smoothing: float, reduction: str) -> Tensor:
    def loss(x: Tensor) -> Tensor:
        return lz_cross_entropy(x, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 reduction=reduction)

    return recompute_grads(loss, grad, (logits,), (True,))[0]


@cross_entropy_backward_op.register_fake
def _cross_entropy_backward_fake(grad: Tensor, logits: Tensor, target: Tensor, ignore_index: int,
                                 label_smoothing: float, reduction: str) -> Tensor:
    return logits.new_empty(logits.shape)


def _cross_entropy_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    logits, target, ignore_index, label_smoothing, reduction = inputs
    ctx.save_for_backward(logits, target)
    ctx.options = (ignore_index, label_smoothing, reduction)


def _cross_entropy_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    logits, target = ctx.saved_tensors
    dlogits = cross_entropy_backward_op(grad.contiguous(), logits, target, *ctx.options) \
        if ctx.needs_input_grad[0] else None
    return dlogits, None, None, None, None


cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)

