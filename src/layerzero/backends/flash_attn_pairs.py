"""FlashAttention-2 and -3 forward-with-residuals / backward pairs (:class:`~layerzero.spec.ResidualPair`).

Under ``torch.compile`` an attention call whose kernel is ``flash_attn_v2_attention`` or
``flash_attn_v3_attention`` becomes one ``layerzero::kernel_attention`` node (see
``layerzero.integrations.compile.residual``): the forward keeps the log-sum-exp and the backward hands it to
FlashAttention's own backward, so nothing is recomputed. The pairs call the functions FlashAttention's own
``FlashAttnFunc`` calls: ``_flash_attn_forward`` and ``_flash_attn_backward`` in
``flash_attn.flash_attn_interface`` (FA2) and in ``flash_attn_interface`` (FA3, the ``hopper/`` build).

Their signatures changed across releases, so the pairs read the parameter names (through
``torch.library.custom_op``'s wrapper where there is one) and pass every argument by name:

* FA2 2.3: ``(q, k, v, dropout_p, softmax_scale, causal, window_size, return_softmax)`` returning
  ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)``; 2.4 adds ``alibi_slopes`` (and
  ``deterministic`` to the backward), 2.6 ``softcap``; from 2.7 a custom op with ``window_size_left`` /
  ``window_size_right`` returning ``(out, softmax_lse, S_dmask, rng_state)``. The backward writes into the
  ``dq``, ``dk``, ``dv`` buffers it is given and takes ``rng_state``, which replays the forward's dropout
  mask, so dropout is exact: ``rng_state`` is the second residual.
* FA3: the 2024 betas take ``(q, k, v, softmax_scale, causal[, window_size])`` and return
  ``(out, q, k, v, out_padded, softmax_lse, ...)``; 2025 releases take the paged / varlen arguments
  (``k_new``, ``cu_seqlens_q``, ... with ``None`` for dense calls), ``window_size`` as a tuple and return
  ``(out, softmax_lse, ...)``; late 2025 a custom op with ``window_size_left`` / ``window_size_right`` and a
  backward whose causal flag is ``is_causal``. No dropout and no ALiBi in any FA3 release.

A feature the installed release has no parameter for (softcap before FA2 2.6, ALiBi before 2.4, a window
in the first FA3 beta) raises :class:`~layerzero.errors.KernelNotSupportedError` naming it, never dropped.
The pairs take the optional ``softcap`` / ``alibi_slopes`` after the eight canonical arguments and pass
them through; the compiled path sends calls with variants to the dispatched op today.

The head dim is padded to a multiple of 8 (as ``FlashAttnFunc`` does from FA2 2.7; older releases pad in
C++ and hand back padded tensors): with zero-padded values the extra output columns are zero, so the
backward re-pads the output instead of keeping a padded copy.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.errors import KernelNotSupportedError
from layerzero.spec import ResidualPair

__all__ = ["load_interface", "FA2_PAIR", "FA3_PAIR", "fa2_forward", "fa2_backward", "fa2_fake", "fa3_forward",
           "fa3_backward", "fa3_fake"]

Tensor = torch.Tensor
FA2_MODULE = "flash_attn.flash_attn_interface"
FA3_MODULE = "flash_attn_interface"


def _params(fn: Any) -> dict[str, bool]:
    """Parameter name -> whether it has no default (``custom_op`` keeps the function as ``_init_fn``)."""
    sig = inspect.signature(getattr(fn, "_init_fn", fn))
    return {n: p.default is inspect.Parameter.empty for n, p in sig.parameters.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


@functools.cache
def load_interface(module: str) -> tuple[Any, Any, dict[str, bool], dict[str, bool]]:
    """``(_flash_attn_forward, _flash_attn_backward, their parameters)`` of ``module`` (``cache_clear()``)."""
    mod = importlib.import_module(module)
    fwd, bwd = getattr(mod, "_flash_attn_forward"), getattr(mod, "_flash_attn_backward")
    return fwd, bwd, _params(fwd), _params(bwd)


def _call(fn: Any, params: dict[str, bool], known: dict[str, Any]) -> Any:
    """``fn`` with each parameter it has that ``known`` names; required ones it does not name get None."""
    return fn(**{n: known.get(n) for n, required in params.items() if n in known or required})


def _require(module: str, what: str, params: dict[str, bool], **used: bool) -> None:
    """Raise for a feature in use that this release's ``what`` has no parameter for."""
    for feature, on in used.items():
        names = ("window_size", "window_size_left") if feature == "window" else (feature,)
        if on and not any(n in params for n in names):
            raise KernelNotSupportedError(f"{module}.{what} of the installed release takes no {feature} "
                                          "(upgrade FlashAttention, or leave the variant out)")


def _window(is_causal: bool, window: int | None) -> tuple[bool, tuple[int, int]]:
    """Our window (``window`` keys ending at the query) is FlashAttention's ``(window - 1, 0)``, causal."""
    return (is_causal, (-1, -1)) if window is None else (True, (int(window) - 1, 0))


def _options(args: tuple[Any, ...]) -> dict[str, Any]:
    """The keyword arguments both versions share, by every name a release has used for them."""
    q, _k, _v, _mask, is_causal, dropout_p, scale, window = args[:8]
    softcap, alibi = (args[8], args[10]) if len(args) > 8 else (None, None)
    causal, ws = _window(is_causal, window)
    return dict(dropout_p=float(dropout_p), softmax_scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
                causal=causal, is_causal=causal, window_size=ws, window_size_left=ws[0], window_size_right=ws[1],
                softcap=0.0 if softcap is None else float(softcap), alibi_slopes=alibi, deterministic=False)


def _pad8(t: Tensor, d: int) -> Tensor:
    return t if d % 8 == 0 else F.pad(t, (0, 8 - d % 8))


def _check_fa2(params: dict[str, bool], opts: dict[str, Any], what: str) -> None:
    _require(FA2_MODULE, what, params, softcap=opts["softcap"] > 0, alibi_slopes=opts["alibi_slopes"] is not None,
             window=opts["window_size"] != (-1, -1))


def fa2_forward(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                softcap=None, sinks=None, alibi_slopes=None):
    """FA2's ``_flash_attn_forward`` on BSHD views: ``(out, (softmax_lse, rng_state))``, out in BHSD."""
    fwd, _bwd, params, _ = load_interface(FA2_MODULE)
    opts = _options((q, k, v, mask, is_causal, dropout_p, scale, window, softcap, sinks, alibi_slopes))
    _check_fa2(params, opts, "_flash_attn_forward")
    d = q.shape[-1]
    qt, kt, vt = (_pad8(t.transpose(1, 2), d) for t in (q, k, v))
    res = _call(fwd, params, dict(opts, q=qt, k=kt, v=vt, return_softmax=False))
    # 2.7+: (out, softmax_lse, S_dmask, rng_state); before: (out, q, k, v, out_padded, softmax_lse, S_dmask, rng)
    out, lse = (res[0], res[1]) if "window_size_left" in params else (res[0], res[5])
    rng = res[-1] if res[-1] is not None else torch.zeros(2, dtype=torch.int64, device=q.device)
    return out[..., :d].transpose(1, 2), (lse, rng)


def fa2_backward(grad, args, out, residuals):  # type: ignore[no-untyped-def]
    """FA2's ``_flash_attn_backward`` on the saved output, log-sum-exp and ``rng_state``: ``(dq, dk, dv)``."""
    _fwd, bwd, _, params = load_interface(FA2_MODULE)
    q, k, v = args[:3]
    opts = _options(tuple(args))
    _check_fa2(params, opts, "_flash_attn_backward")
    d = q.shape[-1]
    qt, kt, vt, ot, gt = (_pad8(t.transpose(1, 2), d) for t in (q, k, v, out, grad))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    lse, rng = residuals
    _call(bwd, params, dict(opts, dout=gt, q=qt, k=kt, v=vt, out=ot, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                            rng_state=rng))
    return tuple(g[..., :d].transpose(1, 2) for g in (dq, dk, dv))


def fa2_fake(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
             softcap=None, sinks=None, alibi_slopes=None):
    """The residuals' metadata: float32 (batch, heads, seq_q) log-sum-exp and FA2's (2,) int64 ``rng_state``."""
    return (q.new_empty(q.shape[:3], dtype=torch.float32), q.new_empty((2,), dtype=torch.int64))


def _check_fa3(params: dict[str, bool], opts: dict[str, Any], what: str) -> None:
    _require(FA3_MODULE, what, params, softcap=opts["softcap"] > 0, window=opts["window_size"] != (-1, -1),
             dropout_p=opts["dropout_p"] > 0, alibi_slopes=opts["alibi_slopes"] is not None)


def fa3_forward(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                softcap=None, sinks=None, alibi_slopes=None):
    """FA3's ``_flash_attn_forward`` on BSHD views: ``(out, (softmax_lse,))``, out in BHSD."""
    fwd, _bwd, params, _ = load_interface(FA3_MODULE)
    opts = _options((q, k, v, mask, is_causal, dropout_p, scale, window, softcap, sinks, alibi_slopes))
    _check_fa3(params, opts, "_flash_attn_forward")
    res = _call(fwd, params, dict(opts, q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2)))
    # 2025 on: (out, softmax_lse, ...); the 2024 betas: (out, q, k, v, out_padded, softmax_lse, S_dmask)
    out, lse = (res[0], res[1]) if "k_new" in params else (res[0], res[5])
    return out.transpose(1, 2), (lse,)


def fa3_backward(grad, args, out, residuals):  # type: ignore[no-untyped-def]
    """FA3's ``_flash_attn_backward`` on the saved output and log-sum-exp: ``(dq, dk, dv)``."""
    _fwd, bwd, _, params = load_interface(FA3_MODULE)
    q, k, v = (t.transpose(1, 2) for t in args[:3])
    opts = _options(tuple(args))
    _check_fa3(params, opts, "_flash_attn_backward")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opts.pop("dropout_p")  # no FA3 release has one; a name it lacks is never passed anyway
    _call(bwd, params, dict(opts, dout=grad.transpose(1, 2), q=q, k=k, v=v, out=out.transpose(1, 2),
                            softmax_lse=residuals[0], dq=dq, dk=dk, dv=dv))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def fa3_fake(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
             softcap=None, sinks=None, alibi_slopes=None):
    """The residual's metadata: a float32 (batch, heads, seq_q) log-sum-exp."""
    return (q.new_empty(q.shape[:3], dtype=torch.float32),)


FA2_PAIR = ResidualPair(fa2_forward, fa2_backward, fa2_fake)
FA3_PAIR = ResidualPair(fa3_forward, fa3_backward, fa3_fake)
