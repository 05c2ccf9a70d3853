"""Hot-path specializations of the torch kernels (``KernelSpec.specialize``), bound once per plan.

Building ``normalized_shape`` per call (``x.shape[-1:]``) costs about half a
microsecond on a small CPU, a large part of the dispatch budget; a plan binds
it once as a plain tuple. Plans with the same hidden size share the function.

``F.scaled_dot_product_attention`` parses every argument it is given: passing
``None, 0.0, False`` for the defaults costs about 0.4 us on the 2-core dev box,
so a plan without mask or dropout calls it with only what differs from them.
A specialized SDPA form also carries ``direct``: SDPA itself, or a
``functools.partial`` of it binding ``is_causal`` / ``enable_gqa`` (a C call,
about 0.25 us cheaper than the adapter's Python frame), which ``lz.attention``
calls as ``direct(q, k, v)`` when no scale is given.

``enable_gqa=True`` is passed only by ``torch_sdpa_gqa``'s forms: SDPA treats
equal head counts under it exactly as without it (``sdp_utils``: the same
backend checks pass, ``pre_process_group_query_attention_input`` returns k
and v untouched), so one GQA plan also serves MHA calls of its family, at
about 0.3 us of extra argument handling on the CPU; MHA plans leave it out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from layerzero.backends.torch.attention import torch_sdpa, torch_sdpa_gqa
from layerzero.backends.torch.capabilities import GQA_NATIVE
from layerzero.context import SelectionContext

__all__ = ["rms_norm_specialize", "layer_norm_specialize", "sdpa_specialize", "sdpa_gqa_specialize"]

_rms = getattr(torch, "rms_norm", None)
_ln = torch.layer_norm
_sdpa = torch.nn.functional.scaled_dot_product_attention


def torch_sdpa_plain(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _sdpa(q, k, v)
    return _sdpa(q, k, v, scale=scale)


torch_sdpa_plain.direct = _sdpa  # type: ignore[attr-defined]  # lz.attention calls _sdpa(q, k, v) itself


def torch_sdpa_causal(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _sdpa(q, k, v, None, 0.0, True)
    return _sdpa(q, k, v, None, 0.0, True, scale=scale)


torch_sdpa_causal.direct = functools.partial(_sdpa, is_causal=True)  # type: ignore[attr-defined]


def torch_sdpa_gqa_plain(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _sdpa(q, k, v, enable_gqa=True)
    return _sdpa(q, k, v, scale=scale, enable_gqa=True)


torch_sdpa_gqa_plain.direct = functools.partial(_sdpa, enable_gqa=True)  # type: ignore[attr-defined]


def torch_sdpa_gqa_causal(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    if scale is None:
        return _sdpa(q, k, v, None, 0.0, True, enable_gqa=True)
    return _sdpa(q, k, v, None, 0.0, True, scale=scale, enable_gqa=True)


torch_sdpa_gqa_causal.direct = functools.partial(_sdpa, is_causal=True,  # type: ignore[attr-defined]
                                                 enable_gqa=True)


def sdpa_gqa_specialize(ctx: SelectionContext) -> tuple[Any, Callable[..., Any]]:
    """``torch_sdpa_gqa`` for a plan with no mask, dropout, window or variant: on PyTorch >= 2.5 it calls SDPA with
    ``enable_gqa=True`` and nothing else, whatever the context's head counts, so the plan (and a
    shape-free plan of its call family) runs GQA, MQA and MHA calls alike; else the general adapter."""
    if ctx.mask_kind != "none" or ctx.dropout_p or ctx.window is not None or not GQA_NATIVE or ctx.sinks \
            or ctx.alibi:
        return "sdpa_gqa", torch_sdpa_gqa
    return ("sdpa_gqa_causal", torch_sdpa_gqa_causal) if ctx.is_causal else ("sdpa_gqa_plain", torch_sdpa_gqa_plain)


def sdpa_specialize(ctx: SelectionContext) -> tuple[Any, Callable[..., Any]]:
    """``torch_sdpa`` for a plan with no mask and no dropout (both are in the cache key); else as is."""
    if ctx.mask_kind != "none" or ctx.dropout_p:
        return "sdpa", torch_sdpa
    return ("sdpa_causal", torch_sdpa_causal) if ctx.is_causal else ("sdpa_plain", torch_sdpa_plain)


def rms_norm_specialize(ctx: SelectionContext) -> tuple[Any, Callable[..., Any]]:
    ns = (ctx.hidden_size,)

    def torch_rms_norm_fixed(x, weight, eps):  # type: ignore[no-untyped-def]
        return _rms(x, ns, weight, eps)  # type: ignore[misc]

    torch_rms_norm_fixed.direct, torch_rms_norm_fixed.const = _rms, ns  # type: ignore[attr-defined]
    return ns, torch_rms_norm_fixed


def layer_norm_specialize(ctx: SelectionContext) -> tuple[Any, Callable[..., Any]]:
    ns = (ctx.hidden_size,)

    def torch_layer_norm_fixed(x, weight, bias, eps):  # type: ignore[no-untyped-def]
        return _ln(x, ns, weight, bias, eps)

    torch_layer_norm_fixed.direct, torch_layer_norm_fixed.const = _ln, ns  # type: ignore[attr-defined]
    return ns, torch_layer_norm_fixed
