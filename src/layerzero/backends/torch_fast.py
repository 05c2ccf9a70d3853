"""Hot-path specializations of torch kernels (``KernelSpec.specialize``).

Building ``normalized_shape`` per call (``x.shape[-1:]``) costs about half a
microsecond on a small CPU, a large part of the dispatch budget; a plan binds
it once as a plain tuple. Plans with the same hidden size share the function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerzero.context import SelectionContext

__all__ = ["rms_norm_specialize", "layer_norm_specialize"]

_rms = getattr(torch, "rms_norm", None)
_ln = torch.layer_norm


def rms_norm_specialize(ctx: SelectionContext) -> tuple[Any, Callable[..., Any]]:
    ns = (ctx.hidden_size,)

    def torch_rms_norm_fixed(x, weight, eps):  # type: ignore[no-untyped-def]
        return _rms(x, ns, weight, eps)  # type: ignore[misc]

    return ns, torch_rms_norm_fixed


def layer_norm_specialize(ctx: SelectionContext) -> tuple[Any, Callable[..., Any]]:
    ns = (ctx.hidden_size,)

    def torch_layer_norm_fixed(x, weight, bias, eps):  # type: ignore[no-untyped-def]
        return _ln(x, ns, weight, bias, eps)

    return ns, torch_layer_norm_fixed
