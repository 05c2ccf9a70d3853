"""What the cached hot path reads instead of a circuit breaker, and the guards a plan's kernel needs per call.

A plan's ``gate`` is its kernel's breaker or one of the stand-ins here: while ``gate.blocked`` the op calls
the plan's slow runner instead of its kernel. The guards cover what no plan key carries: grad mode and
``requires_grad``, deterministic mode, CUDA-graph capture, and the inputs' strides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layerzero.ops.base import OpDef
from layerzero.telemetry.core import KernelStats

__all__ = ["Gate", "ALWAYS_SLOW", "NEVER_SLOW", "SINK", "guard_trips", "contiguous"]


class Gate:
    """Stand-in for a circuit breaker on the hot path."""

    __slots__ = ("blocked",)

    def __init__(self, blocked: bool) -> None:
        self.blocked = blocked


ALWAYS_SLOW = Gate(True)
NEVER_SLOW = Gate(False)
SINK = KernelStats("__telemetry_disabled__")  # counts nobody reads, so the hot path needs no branch


def guard_trips(args: tuple[Any, ...], grad: bool, capture: bool, det: bool) -> bool:
    """Whether a flag the plan key does not carry asks for another kernel: grad wanted from a kernel without
    autograd, deterministic mode for a kernel that is not, capture for a kernel that is not capture-safe."""
    if grad and torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return True
    if det and torch.are_deterministic_algorithms_enabled():
        return True
    if capture:
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_cuda:
                return bool(torch.cuda.is_current_stream_capturing())
    return False


def contiguous(op: OpDef, args: tuple[Any, ...]) -> bool:
    """What the context builders record as ``is_contiguous`` for these arguments
    (:meth:`SelectionContext.from_attention`: q, k and v have a stride-1 last dimension;
    :meth:`SelectionContext.from_rows`: the first tensor is contiguous)."""
    try:
        if op.family == "attention":
            return args[0].stride(-1) == 1 and args[1].stride(-1) == 1 and args[2].stride(-1) == 1
        first = args[0]
        if isinstance(first, Mapping):  # the generic op's inputs dict
            first = next((v for v in first.values() if isinstance(v, torch.Tensor)), None)
        return not isinstance(first, torch.Tensor) or first.is_contiguous()
    except Exception:  # not tensors after all: the other path validates and names the problem
        return False
