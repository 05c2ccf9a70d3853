"""``lz.rms_norm`` and ``lz.layer_norm``: normalisation over the last dimension.

Kernels receive ``(x, weight, eps)`` for rms_norm and ``(x, weight, bias, eps)``
for layer_norm; ``weight`` / ``bias`` may be None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layerzero.accel import norm_hit
from layerzero.context import SelectionContext
from layerzero.ops.base import (GUARD_NAMES, OpDef, dense_guard, largest, layout_problem, number_guard, option_number,
                                pick, shown)
from layerzero.ops.contract import CallContract
from layerzero.policy.scope import LIVE
from layerzero.runtime import get_runtime
from layerzero.tensor_helpers import holds_in_dtype

__all__ = ["rms_norm", "layer_norm", "RMS_NORM", "LAYER_NORM", "RMSNormOp", "LayerNormOp"]


class _RowOp(OpDef):
    """Shared validation for ops over the last dimension with optional per-channel params."""

    params: tuple[str, ...] = ()

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """The sum of squares over a row (the mean square, the variance) stays finite in x's dtype: x * 1e30 in
        float32 overflows it, where the float64 reference does not."""
        x = args[0]
        return holds_in_dtype(largest(x) ** 2 * x.shape[-1], x.dtype)

    def _validate_rows(self, operation: str, args: tuple[Any, ...], x: Any, params: tuple[Any, ...], eps: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise self.invalid(operation, f"x must be a torch.Tensor, got {type(x).__name__}", args)
        problem = layout_problem("x", x)
        if problem is not None:
            raise self.invalid(operation, problem, args)
        if x.dim() < 1 or x.shape[-1] == 0:
            raise self.invalid(operation, "x needs a non-empty last dimension", args)
        if not x.is_floating_point():
            raise self.invalid(operation, f"x must be floating point, got {x.dtype}", args)
        for name, p in zip(self.params, params, strict=True):
            if p is None:
                continue
            if not isinstance(p, torch.Tensor):
                raise self.invalid(operation, f"{name} must be a torch.Tensor or None, got {type(p).__name__}", args)
            problem = layout_problem(name, p)
            if problem is not None:
                raise self.invalid(operation, problem, args)
            if tuple(p.shape) != (x.shape[-1],):
                raise self.invalid(operation, f"{name} must have shape ({x.shape[-1]},) to match x's last "
                                              f"dimension, got {tuple(p.shape)}", args)
            if p.device != x.device:
                raise self.invalid(operation, f"{name} is on {p.device}, x on {x.device}", args)
            if not p.is_floating_point():
                raise self.invalid(operation, f"{name} must be floating point, got {p.dtype}", args)
            if p.dtype != x.dtype:
                raise self.invalid(operation, f"{name} must have x's dtype {x.dtype}, got {p.dtype} (cast it with "
                                              f".to(x.dtype); the result of mixed dtypes differs between kernels)", args)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise self.invalid(operation, f"eps must be a positive number, got {shown(eps)}", args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        x = args[0]
        grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        return SelectionContext.from_rows(x, requires_grad=grad)

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        x = args[0]
        return self.output_meta_check(operation, out, x.shape, x.dtype, x.device)

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, hidden_size=h, num_tokens=n, batch_size=n)
                for n, h in ((1, 4096), (8, 1024), (128, 512))]


class RMSNormOp(_RowOp):
    family = "rms_norm"

    arg_names = ("x", "weight", "eps")
    input_aliases = ("input", "hidden_states", "w")
    params = ("weight",)

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        x, weight, eps = args
        self._validate_rows(operation, args, x, (weight,), eps)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        x, weight, eps = args
        x64 = x.double()
        out = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        return out * weight.double() if weight is not None else out

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        h = ctx.hidden_size or 1024
        x = torch.randn(ctx.num_tokens or 4, h, **kw)
        w = torch.rand(h, **kw) + 0.5
        return (x, w, 1e-6)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "x", "input", "hidden_states", operation=operation),
                pick(merged, "weight", "w", default=None), option_number(merged, "eps", 1e-6, operation))


class LayerNormOp(_RowOp):
    family = "layer_norm"

    arg_names = ("x", "weight", "bias", "eps")
    input_aliases = ("input", "hidden_states", "w", "b")
    params = ("weight", "bias")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        x, weight, bias, eps = args
        self._validate_rows(operation, args, x, (weight, bias), eps)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        x, weight, bias, eps = args
        x64 = x.double()
        mean = x64.mean(-1, keepdim=True)
        var = x64.var(-1, unbiased=False, keepdim=True)
        out = (x64 - mean) / torch.sqrt(var + eps)
        if weight is not None:
            out = out * weight.double()
        if bias is not None:
            out = out + bias.double()
        return out

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        h = ctx.hidden_size or 1024
        x = torch.randn(ctx.num_tokens or 4, h, **kw)
        return (x, torch.rand(h, **kw) + 0.5, torch.randn(h, **kw), 1e-5)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "x", "input", "hidden_states", operation=operation),
                pick(merged, "weight", "w", default=None), pick(merged, "bias", "b", default=None),
                option_number(merged, "eps", 1e-5, operation))


RMS_NORM = RMSNormOp()
LAYER_NORM = LayerNormOp()

#: ``lz.rms_norm``'s cached call. The key carries the weight's dtype (an int64 weight or one of another dtype
#: is its own family, which validation rejects) and eps (``eps=True`` compares equal to ``1``: the guard). The
#: shape-free plan's kernel is ``torch.rms_norm`` with the plan's normalized shape bound: it raises for
#: another hidden size or a weight of another length, and the runtime then validates (no shape guard needed).
RMS_NORM_CONTRACT = CallContract(
    name="rms_norm",
    signature="x, weight=None, eps=1e-6",
    args="x, weight, eps",
    operation='"rms_norm"',
    family='("rms_norm", x.dtype, x.is_cpu or x.device, None if weight is None else weight.dtype, eps)',
    shape="x.shape",
    shape_free=True,
    guard=number_guard("eps") + " and " + dense_guard("x", "weight?"),
    namespace=GUARD_NAMES,
    direct="plan.direct(x, plan.const, weight, eps)",  # torch.rms_norm itself, with the plan's normalized shape
    compiled=lambda runtime: norm_hit("rms_norm", runtime, LIVE),
    doc="""RMS normalisation over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``.

    ``weight`` (``(hidden,)`` or None) has x's dtype.

    Example:
        >>> y = lz.rms_norm(x, weight, eps=1e-6)
    """,
)

#: ``lz.layer_norm``'s cached call: as rms_norm's, with the bias.
LAYER_NORM_CONTRACT = CallContract(
    name="layer_norm",
    signature="x, weight=None, bias=None, eps=1e-5",
    args="x, weight, bias, eps",
    operation='"layer_norm"',
    family='("layer_norm", x.dtype, x.is_cpu or x.device, None if weight is None else weight.dtype, '
           'None if bias is None else bias.dtype, eps)',
    shape="x.shape",
    shape_free=True,
    guard=number_guard("eps") + " and " + dense_guard("x", "weight?", "bias?"),
    namespace=GUARD_NAMES,
    direct="plan.direct(x, plan.const, weight, bias, eps)",  # torch.layer_norm itself, normalized shape bound
    compiled=lambda runtime: norm_hit("layer_norm", runtime, LIVE),
    doc="""Layer normalisation over the last dimension (as ``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``).

    ``weight`` and ``bias`` (``(hidden,)`` or None) have x's dtype.

    Example:
        >>> y = lz.layer_norm(x, weight, bias)
    """,
)

_RT = get_runtime()
rms_norm = RMS_NORM.bind_contract(RMS_NORM_CONTRACT, _RT)
layer_norm = LAYER_NORM.bind_contract(LAYER_NORM_CONTRACT, _RT)
