"""Checks shared by ``lz.attention_varlen`` and ``lz.attention_paged``: scalar options and index tensors.

Each function returns the problem as a sentence, or None; the ops raise it as an ``InvalidInputError``
naming the operation and every input.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from layerzero.ops.base import finite_number, kind, shown, tensor_problem, window_problem

__all__ = ["option_problem", "index_problem", "float_problem", "heads_problem"]


def option_problem(is_causal: Any, scale: Any, window: Any, softcap: Any) -> str | None:
    """``is_causal`` a bool, ``scale`` finite, ``window`` a positive int, ``softcap`` positive and finite."""
    if not isinstance(is_causal, bool):
        return f"is_causal must be a bool, got {kind(is_causal)}"
    if scale is not None and not finite_number(scale):
        return f"scale must be a finite number or None, got {shown(scale)}"
    problem = window_problem(window)
    if problem is not None:
        return problem
    if softcap is not None and (not finite_number(softcap) or softcap <= 0):
        return f"softcap must be a positive finite number or None, got {shown(softcap)}"
    return None


def float_problem(tensors: dict[str, Any], dims: dict[str, int], shapes: dict[str, str]) -> str | None:
    """q/k/v-like tensors: tensors of the given ranks, one floating dtype, one device."""
    for name, t in tensors.items():
        problem = tensor_problem(name, t)
        if problem is not None:
            return problem
        if t.dim() != dims[name]:
            return f"{name} must be {dims[name]}-D {shapes[name]}, got {t.dim()}-D"
    first = next(iter(tensors.values()))
    if len({t.dtype for t in tensors.values()}) != 1:
        return f"{', '.join(tensors)} must share a dtype, got {', '.join(str(t.dtype) for t in tensors.values())}"
    if not first.is_floating_point():
        return f"attention needs floating-point inputs, got {first.dtype}"
    if len({t.device for t in tensors.values()}) != 1:
        return (f"{', '.join(tensors)} must be on one device, got "
                f"{', '.join(str(t.device) for t in tensors.values())}")
    return None


def index_problem(name: str, t: Any, dim: int, device: torch.device, what: str) -> str | None:
    """An int32 index tensor of rank ``dim`` on ``device``."""
    problem = tensor_problem(name, t)
    if problem is not None:
        return problem
    if t.dtype != torch.int32 or t.dim() != dim:
        return f"{name} must be a {dim}-D int32 tensor {what}, got {t.dim()}-D {t.dtype}"
    if t.device != device:
        return f"{name} is on {t.device}, q on {device} (index tensors live on q's device)"
    return None


def heads_problem(hq: int, hkv: int, d: int, dk: int) -> str | None:
    if d == 0 or hq == 0:
        return "empty attention inputs (a zero-sized head or head_dim dimension)"
    if dk != d:
        return f"q and k head dims differ: {d} vs {dk}"
    if hkv == 0 or hq % hkv:
        return f"query heads ({hq}) must be divisible by key/value heads ({hkv}) for grouped-query attention"
    return None
