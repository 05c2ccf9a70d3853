"""``lz.linear_cross_entropy``: a language model's loss from its final hidden states and LM-head weight.

Canonical kernel arguments: ``(hidden, weight, target, bias, ignore_index, label_smoothing, reduction,
softcap)`` with ``hidden`` ``(N, H)``, ``weight`` ``(V, H)`` (an ``nn.Linear`` weight), ``target`` ``(N,)``
class ids and ``bias`` ``(V,)`` or None. The result is the loss of
``F.cross_entropy(z, target, ignore_index=..., label_smoothing=..., reduction=...)`` with
``z = hidden @ weight.T + bias``, capped as ``softcap * tanh(z / softcap)`` when ``softcap`` is set (Gemma 2's
final-logit softcapping), computed from logits in float32 as transformers' loss does: float32 for half
precision inputs, float64 for float64 ones. Kernels need not materialize the ``(N, V)`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.context import SelectionContext
from layerzero.ops.base import (GUARD_NAMES, OpDef, dense_guard, finite_number, largest, number_guard, pick, shown,
                                tensor_problem)
from layerzero.ops.contract import CallContract
from layerzero.ops.losses import ignore_index_problem, target_range_problem
from layerzero.runtime import get_runtime
from layerzero.tensor_helpers import holds_in_dtype

__all__ = ["linear_cross_entropy", "LINEAR_CROSS_ENTROPY", "LinearCrossEntropyOp", "loss_dtype",
           "linear_cross_entropy_reference"]

_REDUCTIONS = ("mean", "sum", "none")


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the loss for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   bias: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                                   reduction: str, softcap: float | None) -> torch.Tensor:
    """The loss computed the plain way, in float64 (full logits)."""
    z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, target.long(), ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                           reduction=reduction)


class LinearCrossEntropyOp(OpDef):
    family = "linear_cross_entropy"
    arg_names = ("hidden", "weight", "target", "bias", "ignore_index", "label_smoothing", "reduction", "softcap")
    input_aliases = ("hidden_states", "input", "x", "lm_head_weight", "w", "labels")

    def _tensors(self, operation: str, args: tuple[Any, ...]) -> None:
        hidden, weight, target, bias = args[:4]
        named = (("hidden", hidden), ("weight", weight), ("target", target)) + ((("bias", bias),) if bias is not None
                                                                               else ())
        for name, t in named:
            problem = tensor_problem(name, t)
            if problem is not None:
                raise self.invalid(operation, problem, args)
        if hidden.dim() != 2 or not hidden.is_floating_point():
            raise self.invalid(operation, f"hidden must be a 2-D floating-point (rows, hidden) tensor, got "
                                          f"{hidden.dim()}-D {hidden.dtype} (flatten the batch: hidden.view(-1, H))",
                               args)
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
            raise self.invalid(operation, f"weight must be (vocab, hidden={hidden.shape[1]}), got "
                                          f"{tuple(weight.shape)}", args)
        if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
            raise self.invalid(operation, f"target must be a 1-D int64 or int32 tensor of class ids, got "
                                          f"{target.dim()}-D {target.dtype}", args)
        if target.shape[0] != hidden.shape[0]:
            raise self.invalid(operation, f"target has {target.shape[0]} rows, hidden {hidden.shape[0]}", args)
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            raise self.invalid(operation, f"bias must be (vocab={weight.shape[0]},), got {tuple(bias.shape)}", args)
        for name, t in named[1:]:
            if t.device != hidden.device:
                raise self.invalid(operation, f"{name} is on {t.device}, hidden on {hidden.device}", args)
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != hidden.dtype:
                raise self.invalid(operation, f"{name} has dtype {t.dtype}, hidden {hidden.dtype} (cast one; under "
                                              f"autocast, cast both to the autocast dtype)", args)
        if hidden.shape[0] == 0 or hidden.shape[1] == 0 or weight.shape[0] == 0:
            raise self.invalid(operation, "empty hidden or weight (a zero-sized dimension)", args)

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        self._tensors(operation, args)
        ignore_index, label_smoothing, reduction, softcap = args[4:]
        if (problem := ignore_index_problem(ignore_index)) is not None:
            raise self.invalid(operation, problem, args)
        if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
                or not 0.0 <= label_smoothing < 1.0):
            raise self.invalid(operation, f"label_smoothing must be in [0, 1), got {shown(label_smoothing)}", args)
        if reduction not in _REDUCTIONS:
            raise self.invalid(operation, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}", args)
        if softcap is not None and (not finite_number(softcap) or softcap <= 0):
            raise self.invalid(operation, f"softcap must be None or a positive finite number, got {softcap!r}", args)

    def diagnose(self, operation: str, args: tuple[Any, ...]) -> None:
        problem = target_range_problem(args[2], args[4], args[1].shape[0])  # target, ignore_index, vocab
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        hidden, weight, bias = args[0], args[1], args[3]
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        # hidden_size is the vocabulary (the width of the logits, as for cross_entropy); head_dim the model's
        # hidden width (the reduction dimension of the LM head's matmul).
        return SelectionContext.from_rows(hidden, requires_grad=grad).replace(hidden_size=weight.shape[0],
                                                                             head_dim=hidden.shape[1])

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        hidden, reduction = args[0], args[6]
        shape = (hidden.shape[0],) if reduction == "none" else ()
        return self.output_meta_check(operation, out, shape, loss_dtype(hidden.dtype), hidden.device)

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """The logits ``hidden @ weight.T`` stay finite in hidden's dtype."""
        hidden, weight = args[0], args[1]
        return holds_in_dtype(largest(hidden) * largest(weight) * hidden.shape[-1], hidden.dtype)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        return linear_cross_entropy_reference(*args)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        rows, vocab, hidden = ctx.num_tokens or 8, ctx.hidden_size or 1000, ctx.head_dim or 64
        kw: dict[str, Any] = dict(device=ctx.device, generator=generator)
        dtype = ctx.dtype or torch.float32
        h = torch.randn(rows, hidden, **kw).to(dtype)
        w = (torch.randn(vocab, hidden, **kw) / math.sqrt(hidden)).to(dtype)
        target = torch.randint(0, vocab, (rows,), **kw)
        target[::7] = -100  # some ignored rows, as padding and prompts give in practice
        return (h, w, target, None, -100, 0.0, "mean", None)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "hidden", "hidden_states", "input", "x", operation=operation),
                pick(merged, "weight", "lm_head_weight", "w", operation=operation),
                pick(merged, "target", "labels", operation=operation), merged.get("bias"),
                merged.get("ignore_index", -100), merged.get("label_smoothing", 0.0), merged.get("reduction", "mean"),
                merged.get("softcap"))

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, hidden_size=v, head_dim=h, num_tokens=n,
                                 batch_size=n) for n, h, v in ((8, 64, 32000), (512, 256, 4096))]


LINEAR_CROSS_ENTROPY = LinearCrossEntropyOp()

#: ``lz.linear_cross_entropy``'s cached call: one plan per shape; the dtypes and every option are keyed
#: (``softcap=True`` would hash like 1, hence the guard's class checks); out-of-range class ids are checked only
#: when a kernel raised (``LinearCrossEntropyOp.diagnose``).
LINEAR_CROSS_ENTROPY_CONTRACT = CallContract(
    name="linear_cross_entropy",
    signature="hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, reduction='mean', "
              "softcap=None",
    args="hidden, weight, target, bias, ignore_index, label_smoothing, reduction, softcap",
    operation='"linear_cross_entropy"',
    family='("linear_cross_entropy", hidden.dtype, hidden.is_cpu or hidden.device, weight.dtype, target.dtype, '
           'bias is None or bias.dtype, ignore_index, label_smoothing, reduction, softcap)',
    shape="hidden.shape, weight.shape, target.shape, bias is None or bias.shape",
    # the weight's device too: a CPU matmul with a meta weight returns a CPU tensor of whatever memory (torch 2.13)
    guard="ignore_index.__class__ is int and " + number_guard("label_smoothing") + " and "
          + number_guard("softcap", optional=True) + " and weight.device == hidden.device and "
          + dense_guard("hidden", "weight", "target", "bias?", shapes_keyed=True),
    namespace=GUARD_NAMES,
    doc="""The loss of ``F.cross_entropy(hidden @ weight.T + bias, target)`` without materializing the logits.

    ``hidden`` ``(N, H)``, ``weight`` ``(V, H)`` (the LM head's), ``target`` ``(N,)``; ``softcap`` caps the
    logits as ``softcap * tanh(z / softcap)`` first (Gemma 2). The loss is float32 (float64 for float64 inputs).

    Example:
        >>> loss = lz.linear_cross_entropy(hidden.view(-1, H), model.lm_head.weight, labels.view(-1))
    """,
)

linear_cross_entropy = LINEAR_CROSS_ENTROPY.bind_contract(LINEAR_CROSS_ENTROPY_CONTRACT, get_runtime())
