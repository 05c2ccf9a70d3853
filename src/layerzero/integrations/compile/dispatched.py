"""The dispatched custom ops: ``layerzero::attention`` and its ``*_backward`` op, and what the row-wise ops share.

A traced ``lz.*`` call becomes one of these opaque nodes when no kernel could be chosen at trace time (a
policy scope is live, or selection failed and should explain itself at run time) or when the chosen kernel
is neither traceable PyTorch nor declares a forward-with-residuals / backward pair (see :mod:`.traced`).
The eager implementation is the ordinary dispatched call (``lz.attention``), so the graph runs the kernel
layerzero selects at run time, with its cache, fallbacks and policy.

Backward: each ``*_backward`` op recomputes the forward through the dispatched kernel with autograd on and
differentiates it (a kernel without a backward is never selected when inputs require grad): the forward runs
twice per training step on this path. Attention with dropout carries a seed tensor so the recomputed
dropout mask matches the forward one.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import layerzero.ops  # noqa: F401  (loads the op modules)

__all__ = ["attention_op", "attention_backward_op", "dense", "recompute_grads", "needs_of", "scatter", "autograd_on",
           "lz_attention", "ATTENTION_MOD", "run_attention"]

Tensor = torch.Tensor

# ``layerzero.ops.attention`` the attribute is the function; the module is fetched by name.
ATTENTION_MOD = importlib.import_module("layerzero.ops.attention")
lz_attention = ATTENTION_MOD.attention  # the original public function (captured before anything wraps it)


def dense(out: Tensor) -> Tensor:
    # The fake implementations promise contiguous outputs; compiled code may view them by those strides.
    return out if out.is_contiguous() else out.contiguous()


_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in
                       ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")
                       if hasattr(torch._C.DispatchKey, name))


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
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


def recompute_grads(fn: Callable[..., Tensor], grad: Tensor, args: Sequence[Any], needs: Sequence[bool]
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
    with autograd_on():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    return [torch.zeros_like(w) if g is None else dense(g) for g, w in zip(grads, wrt, strict=True)]


def needs_of(ctx: Any, indices: Sequence[int], tensors: Sequence[Tensor | None]) -> list[bool]:
    return [t is not None and bool(ctx.needs_input_grad[i]) for i, t in zip(indices, tensors, strict=True)]


def scatter(needs: Sequence[bool], grads: Sequence[Tensor]) -> list[Tensor | None]:
    it = iter(grads)
    return [next(it) if n else None for n in needs]


# ---------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------

def run_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float,
                   scale: float | None, window: int | None, operation: str, seed: Tensor | None,
                   softcap: float | None = None, sinks: Tensor | None = None,
                   alibi_slopes: Tensor | None = None) -> Tensor:
    variants = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    if seed is None or dropout_p == 0.0:
        return lz_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                             window=window, operation=operation, **variants)
    # Seed only the generators this call draws from, inside a fork: the caller's RNG streams are untouched.
    value = int(seed.item())
    cuda = q.device.type == "cuda"
    with torch.random.fork_rng(devices=[q.device] if cuda else []):
        torch.random.default_generator.manual_seed(value)
        if cuda:
            torch.cuda.default_generators[q.device.index if q.device.index is not None
                                          else torch.cuda.current_device()].manual_seed(value)
        return lz_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                             window=window, operation=operation, **variants)


@torch.library.custom_op("layerzero::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float,
                 scale: float | None, window: int | None, operation: str, seed: Tensor | None,
                 softcap: float | None = None, sinks: Tensor | None = None,
                 alibi_slopes: Tensor | None = None) -> Tensor:
    """``lz.attention`` in BHSD layout as one graph node (``seed`` fixes dropout for the backward)."""
    return dense(run_attention(q, k, v, attn_mask, is_causal, dropout_p, scale, window, operation, seed,
                                 softcap, sinks, alibi_slopes))


@attention_op.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float,
                    scale: float | None, window: int | None, operation: str, seed: Tensor | None,
                    softcap: float | None = None, sinks: Tensor | None = None,
                    alibi_slopes: Tensor | None = None) -> Tensor:
    ATTENTION_MOD.ATTENTION.validate(operation, (q, k, v, attn_mask, is_causal, dropout_p, scale, window, softcap,
                                                  sinks, alibi_slopes))
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))


@torch.library.custom_op("layerzero::attention_backward", mutates_args=())
def attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                          dropout_p: float, scale: float | None, window: int | None, operation: str,
                          seed: Tensor | None, needs: list[bool], softcap: float | None = None,
                          sinks: Tensor | None = None, alibi_slopes: Tensor | None = None) -> list[Tensor]:
    """Gradients of ``layerzero::attention`` for the inputs flagged in ``needs`` (q, k, v, attn_mask, sinks)."""
    def fn(q_: Tensor, k_: Tensor, v_: Tensor, m_: Tensor | None, s_: Tensor | None) -> Tensor:
        return run_attention(q_, k_, v_, m_, is_causal, dropout_p, scale, window, operation, seed, softcap, s_,
                              alibi_slopes)
    return recompute_grads(fn, grad, (q, k, v, attn_mask, sinks), needs)


@attention_backward_op.register_fake
def _attention_backward_fake(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                             is_causal: bool, dropout_p: float, scale: float | None, window: int | None,
                             operation: str, seed: Tensor | None, needs: list[bool], softcap: float | None = None,
                             sinks: Tensor | None = None, alibi_slopes: Tensor | None = None) -> list[Tensor]:
    present = [t for t in (q, k, v, attn_mask, sinks) if t is not None]
    return [t.new_empty(t.shape) for t, n in zip(present, needs, strict=True) if n]


def _attention_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, k, v, attn_mask, is_causal, dropout_p, scale, window, operation, seed, softcap, sinks, alibi = inputs
    ctx.save_for_backward(q, k, v, attn_mask, seed, sinks, alibi)
    ctx.options = (is_causal, dropout_p, scale, window, operation, softcap)


def _attention_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    q, k, v, attn_mask, seed, sinks, alibi = ctx.saved_tensors
    is_causal, dropout_p, scale, window, operation, softcap = ctx.options
    needs = needs_of(ctx, (0, 1, 2, 3, 11), (q, k, v, attn_mask, sinks))
    present = [n for n, t in zip(needs, (q, k, v, attn_mask, sinks), strict=True) if t is not None]
    grads = attention_backward_op(grad.contiguous(), q, k, v, attn_mask, is_causal, dropout_p, scale, window,
                                  operation, seed, present, softcap, sinks, alibi) if any(needs) else []
    dq, dk, dv, dmask, dsinks = scatter(needs, grads)
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, dsinks, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)
