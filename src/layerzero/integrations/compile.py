"""torch.compile support: layerzero operations as ``torch.library`` custom ops.

Importing this module defines the custom ops ``layerzero::attention``,
``layerzero::rms_norm``, ``layerzero::layer_norm``, ``layerzero::rope``,
``layerzero::swiglu``, ``layerzero::geglu``, ``layerzero::gelu``, ``layerzero::silu``,
``layerzero::cross_entropy`` (each with a
fake implementation for tracing and autograd) and their ``*_backward`` ops.
Their eager implementation is the ordinary dispatched call (``lz.attention``
and friends), so a compiled graph runs the kernel layerzero selects on this
machine, with its cache, fallbacks and policy, at run time.

:func:`install` makes Dynamo trace ``lz.attention`` & co. as these ops: it
registers each public function with ``torch.compiler.substitute_in_graph``,
so under ``torch.compile`` the call becomes one opaque node (no graph break,
no selection at trace time) while eager calls run the original function
unchanged: the eager hot path does no extra work. ``import layerzero``
arranges for :func:`install` to run when ``torch._dynamo`` is first imported
(see ``layerzero.integrations.hooks``), so users do nothing.

Backward: each ``*_backward`` op recomputes the forward through the
dispatched kernel with autograd on and differentiates it (a kernel without a
backward is never selected when inputs require grad). Attention with dropout
carries a seed tensor so the recomputed dropout mask matches the forward one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import layerzero.ops  # noqa: F401  (loads the op modules)

__all__ = ["install", "installed", "CUSTOM_OPS", "attention_op", "rms_norm_op", "layer_norm_op", "rope_op",
           "swiglu_op", "geglu_op", "gelu_op", "silu_op", "cross_entropy_op"]

log = logging.getLogger("layerzero")

Tensor = torch.Tensor

# ``layerzero.ops.attention`` the attribute is the function; the modules are fetched by name.
_attention_mod = importlib.import_module("layerzero.ops.attention")
_norms_mod = importlib.import_module("layerzero.ops.norms")
_elementwise_mod = importlib.import_module("layerzero.ops.elementwise")
_losses_mod = importlib.import_module("layerzero.ops.losses")

# The original public functions (captured before anything could wrap them).
_lz_attention = _attention_mod.attention
_lz_rms_norm = _norms_mod.rms_norm
_lz_layer_norm = _norms_mod.layer_norm
_lz_rope = _elementwise_mod.rope
_lz_swiglu = _elementwise_mod.swiglu
_lz_geglu = _elementwise_mod.geglu
_lz_gelu = _elementwise_mod.gelu
_lz_silu = _elementwise_mod.silu
_lz_cross_entropy = _losses_mod.cross_entropy


def _dense(out: Tensor) -> Tensor:
    # The fake implementations promise contiguous outputs; compiled code may view them by those strides.
    return out if out.is_contiguous() else out.contiguous()


_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in
                       ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")
                       if hasattr(torch._C.DispatchKey, name))


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """Record autograd again inside a custom op's implementation.

    torch.library runs an op's implementation below the autograd dispatch keys, so tensors made there
    never record a graph. The backward ops below recompute the forward through the dispatched kernel and
    differentiate it, so they put the autograd keys back for that recomputation only.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _recompute_grads(fn: Callable[..., Tensor], grad: Tensor, args: Sequence[Any], needs: Sequence[bool]
                     ) -> list[Tensor]:
    """Gradients of ``fn(*args)`` for the tensor args flagged in ``needs`` (in order), by recomputation."""
    leaves: list[Any] = []
    wrt: list[Tensor] = []
    it = iter(needs)
    for a in args:
        if isinstance(a, Tensor):
            need = next(it)
            leaf = a.detach().requires_grad_(need)
            if need:
                wrt.append(leaf)
            leaves.append(leaf)
        else:
            leaves.append(a)
    if not wrt:
        return []
    with _autograd_on():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    return [torch.zeros_like(w) if g is None else _dense(g) for g, w in zip(grads, wrt, strict=True)]


def _needs(ctx: Any, indices: Sequence[int], tensors: Sequence[Tensor | None]) -> list[bool]:
    return [t is not None and bool(ctx.needs_input_grad[i]) for i, t in zip(indices, tensors, strict=True)]


def _scatter(needs: Sequence[bool], grads: Sequence[Tensor]) -> list[Tensor | None]:
    it = iter(grads)
    return [next(it) if n else None for n in needs]


# ---------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------

def _run_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float,
                   scale: float | None, window: int | None, operation: str, seed: Tensor | None) -> Tensor:
    if seed is None or dropout_p == 0.0:
        return _lz_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                             window=window, operation=operation)
    # Seed only the generators this call draws from, inside a fork: the caller's RNG streams are untouched.
    value = int(seed.item())
    cuda = q.device.type == "cuda"
    with torch.random.fork_rng(devices=[q.device] if cuda else []):
        torch.random.default_generator.manual_seed(value)
        if cuda:
            torch.cuda.default_generators[q.device.index if q.device.index is not None
                                          else torch.cuda.current_device()].manual_seed(value)
        return _lz_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                             window=window, operation=operation)


@torch.library.custom_op("layerzero::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float,
                 scale: float | None, window: int | None, operation: str, seed: Tensor | None) -> Tensor:
    """``lz.attention`` in BHSD layout as one graph node (``seed`` fixes dropout for the backward)."""
    return _dense(_run_attention(q, k, v, attn_mask, is_causal, dropout_p, scale, window, operation, seed))


@attention_op.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float,
                    scale: float | None, window: int | None, operation: str, seed: Tensor | None) -> Tensor:
    _attention_mod.ATTENTION.validate(operation, (q, k, v, attn_mask, is_causal, dropout_p, scale, window))
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))


@torch.library.custom_op("layerzero::attention_backward", mutates_args=())
def attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                          dropout_p: float, scale: float | None, window: int | None, operation: str,
                          seed: Tensor | None, needs: list[bool]) -> list[Tensor]:
    """Gradients of ``layerzero::attention`` for the inputs flagged in ``needs`` (q, k, v, attn_mask)."""
    def fn(q_: Tensor, k_: Tensor, v_: Tensor, m_: Tensor | None) -> Tensor:
        return _run_attention(q_, k_, v_, m_, is_causal, dropout_p, scale, window, operation, seed)
    return _recompute_grads(fn, grad, (q, k, v, attn_mask), needs)


@attention_backward_op.register_fake
def _attention_backward_fake(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                             is_causal: bool, dropout_p: float, scale: float | None, window: int | None,
                             operation: str, seed: Tensor | None, needs: list[bool]) -> list[Tensor]:
    present = [t for t in (q, k, v, attn_mask) if t is not None]
    return [t.new_empty(t.shape) for t, n in zip(present, needs, strict=True) if n]


def _attention_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, k, v, attn_mask, is_causal, dropout_p, scale, window, operation, seed = inputs
    ctx.save_for_backward(q, k, v, attn_mask, seed)
    ctx.options = (is_causal, dropout_p, scale, window, operation)


def _attention_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    q, k, v, attn_mask, seed = ctx.saved_tensors
    is_causal, dropout_p, scale, window, operation = ctx.options
    needs = _needs(ctx, (0, 1, 2, 3), (q, k, v, attn_mask))
    present = [n for n, t in zip(needs, (q, k, v, attn_mask), strict=True) if t is not None]
    grads = attention_backward_op(grad.contiguous(), q, k, v, attn_mask, is_causal, dropout_p, scale, window,
                                  operation, seed, present) if any(needs) else []
    dq, dk, dv, dmask = _scatter(needs, grads)
    return dq, dk, dv, dmask, None, None, None, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------------
# row-wise operations: one forward op and one recomputing backward op each
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("layerzero::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``lz.rms_norm`` as one graph node."""
    return _dense(_lz_rms_norm(x, weight, eps))


@rms_norm_op.register_fake
def _rms_norm_fake(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    _norms_mod.RMS_NORM.validate("rms_norm", (x, weight, eps))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, needs: list[bool]
                         ) -> list[Tensor]:
    return _recompute_grads(lambda x_, w_: _lz_rms_norm(x_, w_, eps), grad, (x, weight), needs)


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
    needs = _needs(ctx, (0, 1), (x, weight))
    present = [n for n, t in zip(needs, (x, weight), strict=True) if t is not None]
    grads = rms_norm_backward_op(grad.contiguous(), x, weight, ctx.eps, present) if any(needs) else []
    dx, dw = _scatter(needs, grads)
    return dx, dw, None


rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


@torch.library.custom_op("layerzero::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``lz.layer_norm`` as one graph node."""
    return _dense(_lz_layer_norm(x, weight, bias, eps))


@layer_norm_op.register_fake
def _layer_norm_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    _norms_mod.LAYER_NORM.validate("layer_norm", (x, weight, bias, eps))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                           needs: list[bool]) -> list[Tensor]:
    return _recompute_grads(lambda x_, w_, b_: _lz_layer_norm(x_, w_, b_, eps), grad, (x, weight, bias), needs)


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
    needs = _needs(ctx, (0, 1, 2), (x, weight, bias))
    present = [n for n, t in zip(needs, (x, weight, bias), strict=True) if t is not None]
    grads = layer_norm_backward_op(grad.contiguous(), x, weight, bias, ctx.eps, present) if any(needs) else []
    dx, dw, db = _scatter(needs, grads)
    return dx, dw, db, None


layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup)


@torch.library.custom_op("layerzero::rope", mutates_args=())
def rope_op(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``lz.rope`` as one graph node."""
    return _dense(_lz_rope(x, cos, sin, interleaved))


@rope_op.register_fake
def _rope_fake(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    _elementwise_mod.ROPE.validate("rope", (x, cos, sin, interleaved))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::rope_backward", mutates_args=())
def rope_backward_op(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, needs: list[bool]
                     ) -> list[Tensor]:
    return _recompute_grads(lambda x_, c_, s_: _lz_rope(x_, c_, s_, interleaved), grad, (x, cos, sin), needs)


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
    needs = _needs(ctx, (0, 1, 2), (x, cos, sin))
    grads = rope_backward_op(grad.contiguous(), x, cos, sin, ctx.interleaved, needs) if any(needs) else []
    dx, dcos, dsin = _scatter(needs, grads)
    return dx, dcos, dsin, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


@torch.library.custom_op("layerzero::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    """``lz.swiglu`` as one graph node."""
    return _dense(_lz_swiglu(gate, up))


@swiglu_op.register_fake
def _swiglu_fake(gate: Tensor, up: Tensor) -> Tensor:
    _elementwise_mod.SWIGLU.validate("swiglu", (gate, up))
    return gate.new_empty(gate.shape)


@torch.library.custom_op("layerzero::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, needs: list[bool]) -> list[Tensor]:
    return _recompute_grads(_lz_swiglu, grad, (gate, up), needs)


@swiglu_backward_op.register_fake
def _swiglu_backward_fake(grad: Tensor, gate: Tensor, up: Tensor, needs: list[bool]) -> list[Tensor]:
    return [t.new_empty(t.shape) for t, n in zip((gate, up), needs, strict=True) if n]


def _swiglu_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    gate, up = ctx.saved_tensors
    needs = _needs(ctx, (0, 1), (gate, up))
    grads = swiglu_backward_op(grad.contiguous(), gate, up, needs) if any(needs) else []
    return tuple(_scatter(needs, grads))


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("layerzero::geglu", mutates_args=())
def geglu_op(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    """``lz.geglu`` as one graph node."""
    return _dense(_lz_geglu(gate, up, approximate))


@geglu_op.register_fake
def _geglu_fake(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    _elementwise_mod.GEGLU.validate("geglu", (gate, up, approximate))
    return gate.new_empty(gate.shape)


@torch.library.custom_op("layerzero::geglu_backward", mutates_args=())
def geglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, approximate: str, needs: list[bool]) -> list[Tensor]:
    return _recompute_grads(lambda g, u: _lz_geglu(g, u, approximate), grad, (gate, up), needs)


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
    needs = _needs(ctx, (0, 1), (gate, up))
    grads = geglu_backward_op(grad.contiguous(), gate, up, ctx.approximate, needs) if any(needs) else []
    return (*_scatter(needs, grads), None)


geglu_op.register_autograd(_geglu_backward, setup_context=_geglu_setup)


@torch.library.custom_op("layerzero::gelu", mutates_args=())
def gelu_op(x: Tensor, approximate: str) -> Tensor:
    """``lz.gelu`` as one graph node."""
    return _dense(_lz_gelu(x, approximate))


@gelu_op.register_fake
def _gelu_fake(x: Tensor, approximate: str) -> Tensor:
    _elementwise_mod.GELU.validate("gelu", (x, approximate))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::gelu_backward", mutates_args=())
def gelu_backward_op(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    return _recompute_grads(lambda x_: _lz_gelu(x_, approximate), grad, (x,), (True,))[0]


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
    return _dense(_lz_silu(x))


@silu_op.register_fake
def _silu_fake(x: Tensor) -> Tensor:
    _elementwise_mod.SILU.validate("silu", (x,))
    return x.new_empty(x.shape)


@torch.library.custom_op("layerzero::silu_backward", mutates_args=())
def silu_backward_op(grad: Tensor, x: Tensor) -> Tensor:
    return _recompute_grads(_lz_silu, grad, (x,), (True,))[0]


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
    return _dense(_lz_cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                    reduction=reduction))


@cross_entropy_op.register_fake
def _cross_entropy_fake(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                        reduction: str) -> Tensor:
    _losses_mod.CROSS_ENTROPY.validate("cross_entropy", (logits, target, ignore_index, label_smoothing, reduction))
    return logits.new_empty((logits.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("layerzero::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad: Tensor, logits: Tensor, target: Tensor, ignore_index: int,
                              label_smoothing: float, reduction: str) -> Tensor:
    def loss(x: Tensor) -> Tensor:
        return _lz_cross_entropy(x, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 reduction=reduction)

    return _recompute_grads(loss, grad, (logits,), (True,))[0]


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


CUSTOM_OPS: dict[str, Any] = {
    "attention": attention_op, "rms_norm": rms_norm_op, "layer_norm": layer_norm_op, "rope": rope_op,
    "swiglu": swiglu_op, "geglu": geglu_op, "gelu": gelu_op, "silu": silu_op, "cross_entropy": cross_entropy_op,
}


# ---------------------------------------------------------------------------------------------------
# what Dynamo traces in place of the public functions (same signatures as the originals)
# ---------------------------------------------------------------------------------------------------

def _traced_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                      dropout_p: float = 0.0, scale: float | None = None, layout: str = "BHSD",
                      window: int | None = None, operation: str | None = None) -> Tensor:
    if operation is None:
        operation = "attention.causal" if is_causal else "attention.full"
    elif operation == "attention.causal":
        is_causal = True
    bshd = layout == "BSHD"
    if bshd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    out = attention_op(q, k, v, attn_mask, is_causal, float(dropout_p), scale, window, operation, seed)
    return out.transpose(1, 2) if bshd else out


def _traced_rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    return rms_norm_op(x, weight, float(eps))


def _traced_layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                       eps: float = 1e-5) -> Tensor:
    return layer_norm_op(x, weight, bias, float(eps))


def _traced_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    return rope_op(x, cos, sin, interleaved)


def _traced_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_op(gate, up)


def _traced_geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    return geglu_op(gate, up, approximate)


def _traced_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return gelu_op(x, approximate)


def _traced_silu(x: Tensor) -> Tensor:
    return silu_op(x)


def _traced_cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                          reduction: str = "mean") -> Tensor:
    return cross_entropy_op(logits, target, int(ignore_index), float(label_smoothing), reduction)


_SUBSTITUTIONS: tuple[tuple[Callable[..., Any], Callable[..., Any]], ...] = (
    (_lz_attention, _traced_attention),
    (_lz_rms_norm, _traced_rms_norm),
    (_lz_layer_norm, _traced_layer_norm),
    (_lz_rope, _traced_rope),
    (_lz_swiglu, _traced_swiglu),
    (_lz_geglu, _traced_geglu),
    (_lz_gelu, _traced_gelu),
    (_lz_silu, _traced_silu),
    (_lz_cross_entropy, _traced_cross_entropy),
)

_installed: list[str] = []


def install() -> list[str]:
    """Make Dynamo trace the public operations as the custom ops above (idempotent).

    Returns the names of the functions substituted. A function whose signature no longer matches
    its traced stand-in is skipped with a warning (Dynamo would then trace its body as usual).
    """
    if _installed:
        return list(_installed)
    for original, traced in _SUBSTITUTIONS:
        try:
            torch.compiler.substitute_in_graph(original)(traced)
        except (TypeError, ValueError) as exc:
            log.warning("layerzero: torch.compile substitution for %s skipped: %s", original.__name__, exc)
            continue
        _installed.append(original.__name__)
    return list(_installed)


def installed() -> list[str]:
    """The public functions Dynamo currently traces as layerzero custom ops."""
    return list(_installed)
