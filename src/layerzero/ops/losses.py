"""``lz.cross_entropy``: the language-model loss over a vocabulary.

Canonical kernel arguments: ``(logits, target, ignore_index, label_smoothing,
reduction)`` with ``logits`` of shape ``(N, V)`` (floating point) and
``target`` of shape ``(N,)`` (integer class ids; ``ignore_index`` rows count
for nothing, as in ``F.cross_entropy``). The result is what
``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=...,
reduction=...)`` returns, in the dtype of ``logits``: a scalar for ``"mean"``
and ``"sum"``, one loss per row for ``"none"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.context import SelectionContext
from layerzero.ops.base import GUARD_NAMES, OpDef, dense_guard, number_guard, pick, shown, tensor_problem
from layerzero.ops.contract import CallContract
from layerzero.runtime import get_runtime

__all__ = ["cross_entropy", "CROSS_ENTROPY", "CrossEntropyOp", "target_range_problem"]

_REDUCTIONS = ("mean", "sum", "none")


def ignore_index_problem(ignore_index: Any) -> str | None:
    """The option check of both losses: an int the target's int64 can hold (``2**70`` ended in the kernels'
    "Overflow when unpacking long long"), or why not."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not -2**63 <= ignore_index < 2**63:
        return f"ignore_index must be an int64, got {ignore_index!r}"
    return None


def target_range_problem(target: torch.Tensor, ignore_index: int, vocab: int) -> str | None:
    """The data check of both losses: class ids outside ``[0, vocab)`` that are not ``ignore_index`` (it reads
    the target, so it runs only once a kernel raised), or None."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if not bool(bad.any()):
        return None
    where = bad.nonzero().flatten()[:8].tolist()
    ids = target[bad][:8].tolist()
    return f"target ids {ids} (rows {where}) are outside [0, {vocab}) and are not ignore_index={ignore_index}"


class CrossEntropyOp(OpDef):
    family = "cross_entropy"
    arg_names = ("logits", "target", "ignore_index", "label_smoothing", "reduction")
    input_aliases = ("input", "x", "labels")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        logits, target, ignore_index, label_smoothing, reduction = args
        for name, t in (("logits", logits), ("target", target)):
            problem = tensor_problem(name, t)
            if problem is not None:
                raise self.invalid(operation, problem, args)
        if logits.dim() != 2 or not logits.is_floating_point():
            raise self.invalid(operation, f"logits must be a 2-D floating-point (rows, vocab) tensor, got "
                                          f"{logits.dim()}-D {logits.dtype}", args)
        if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
            raise self.invalid(operation, f"target must be a 1-D int64 or int32 tensor of class ids, got "
                                          f"{target.dim()}-D {target.dtype}", args)
        if target.shape[0] != logits.shape[0]:
            raise self.invalid(operation, f"target has {target.shape[0]} rows, logits {logits.shape[0]}", args)
        if target.device != logits.device:
            raise self.invalid(operation, f"target is on {target.device}, logits on {logits.device}", args)
        if logits.shape[0] == 0 or logits.shape[1] == 0:
            raise self.invalid(operation, "empty logits (a zero-sized dimension)", args)
        if (problem := ignore_index_problem(ignore_index)) is not None:
            raise self.invalid(operation, problem, args)
        if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
                or not 0.0 <= label_smoothing < 1.0):
            raise self.invalid(operation, f"label_smoothing must be in [0, 1), got {shown(label_smoothing)}", args)
        if reduction not in _REDUCTIONS:
            raise self.invalid(operation, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}", args)

    def diagnose(self, operation: str, args: tuple[Any, ...]) -> None:
        problem = target_range_problem(args[1], args[2], args[0].shape[1])
        if problem is not None:
            raise self.invalid(operation, problem, args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        logits = args[0]
        grad = torch.is_grad_enabled() and logits.requires_grad
        return SelectionContext.from_rows(logits, requires_grad=grad)

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        logits, reduction = args[0], args[4]
        shape = (logits.shape[0],) if reduction == "none" else ()
        return self.output_meta_check(operation, out, shape, logits.dtype, logits.device)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        logits, target, ignore_index, label_smoothing, reduction = args
        return F.cross_entropy(logits.double(), target.long(), ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=float(label_smoothing))

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        rows, vocab = ctx.num_tokens or 8, ctx.hidden_size or 1000
        logits = torch.randn(rows, vocab, device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        target = torch.randint(0, vocab, (rows,), device=ctx.device, generator=generator)
        target[::7] = -100  # some ignored rows, as padding gives in practice
        return (logits * 2, target, -100, 0.0, "mean")

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "logits", "input", "x", operation=operation),
                pick(merged, "target", "labels", operation=operation), merged.get("ignore_index", -100),
                merged.get("label_smoothing", 0.0), merged.get("reduction", "mean"))

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, hidden_size=v, num_tokens=n, batch_size=n)
                for n, v in ((8, 32000), (512, 1000))]


CROSS_ENTROPY = CrossEntropyOp()

#: ``lz.cross_entropy``'s cached call: one plan per shape; the target's dtype and every option are keyed;
#: ``ignore_index=True`` and ``label_smoothing=False`` compare equal to ints, hence the guard. Class ids out of
#: range cost a read of the target, so they are checked only when a kernel raised (``CrossEntropyOp.diagnose``).
CROSS_ENTROPY_CONTRACT = CallContract(
    name="cross_entropy",
    signature="logits, target, *, ignore_index=-100, label_smoothing=0.0, reduction='mean'",
    args="logits, target, ignore_index, label_smoothing, reduction",
    operation='"cross_entropy"',
    family='("cross_entropy", logits.dtype, logits.is_cpu or logits.device, target.dtype, ignore_index, '
           'label_smoothing, reduction)',
    shape="logits.shape, target.shape",
    guard="ignore_index.__class__ is int and " + number_guard("label_smoothing") + " and "
          + dense_guard("logits", "target", shapes_keyed=True),
    namespace=GUARD_NAMES,
    doc="""Cross-entropy of ``logits`` ``(N, V)`` against class ids ``target`` ``(N,)``, as ``F.cross_entropy``.

    Example:
        >>> loss = lz.cross_entropy(logits.view(-1, vocab), labels.view(-1))
    """,
)

cross_entropy = CROSS_ENTROPY.bind_contract(CROSS_ENTROPY_CONTRACT, get_runtime())
