"""``lz.attention``'s variants (``softcap``, ``sinks``, ``alibi_slopes``): validation, keys and call guards.

Accepted values:

* ``softcap``: a finite positive ``float`` or ``int`` (not a bool), or None;
* ``sinks``: a strided floating tensor of shape ``(heads,)`` (the query heads) in float32 or q's dtype, on
  q's device (GPT-OSS keeps them as a parameter of the model's dtype);
* ``alibi_slopes``: a strided float32 tensor of shape ``(heads,)`` or ``(batch, heads)``, on q's device
  (FlashAttention's contract).

The family key carries which variants are present and the dtype and device of their tensors
(:func:`variant_key`); :func:`variants_admitted` checks per call what it does not carry (the softcap's
value, the tensors' shapes and layouts), so a cached plan never meets a value validation would refuse.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from layerzero.ops.base import finite_number

__all__ = ["variant_problem", "variant_key", "variants_admitted"]


def _softcap_problem(softcap: Any) -> str | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        return f"softcap must be a finite positive number or None, got {type(softcap).__name__} {softcap!r}"
    if not (finite_number(softcap) and softcap > 0):
        return f"softcap must be a finite positive number or None, got {softcap!r}"
    return None


def _tensor_problem(name: str, t: Any, q: torch.Tensor, shapes: tuple[tuple[int, ...], ...],
                    dtypes: tuple[torch.dtype, ...], dtype_text: str) -> str | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor or None, got {type(t).__name__}"
    if t.layout is not torch.strided:
        return f"{name} must be a dense (strided) tensor, got layout {t.layout}"
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        return f"{name} must have shape {want} (the query heads), got {tuple(t.shape)}"
    if t.dtype not in dtypes:
        return f"{name} must be {dtype_text}, got {str(t.dtype).removeprefix('torch.')}"
    if t.device != q.device:
        return f"{name} is on {t.device}, q on {q.device}"
    return None


def variant_problem(q: torch.Tensor, softcap: Any = None, sinks: Any = None, alibi_slopes: Any = None) -> str | None:
    """The first problem of the variant arguments of a call with a validated 4-D ``q``, or None."""
    b, h = q.shape[0], q.shape[1]
    q_dtype = str(q.dtype).removeprefix("torch.")
    return (_softcap_problem(softcap)
            or _tensor_problem("sinks", sinks, q, ((h,),), (torch.float32, q.dtype),
                               f"float32 or q's dtype ({q_dtype})")
            or _tensor_problem("alibi_slopes", alibi_slopes, q, ((h,), (b, h)), (torch.float32,),
                               "float32 (as FlashAttention takes them)"))


def variant_key(softcap: Any, sinks: Any, alibi_slopes: Any) -> tuple[Any, ...]:
    """The family key's variant part: which variants are present, with their tensors' dtype and device."""
    return (softcap is not None,
            None if sinks is None else (sinks.dtype, sinks.device),
            None if alibi_slopes is None else (alibi_slopes.dtype, alibi_slopes.device, alibi_slopes.dim()))


def variants_admitted(q: Any, softcap: Any, sinks: Any, alibi_slopes: Any) -> bool:
    """Whether a cached plan may take these variant values (what :func:`variant_key` does not carry)."""
    if softcap is not None:
        cls = softcap.__class__
        if not ((cls is float or cls is int) and 0 < softcap < math.inf):  # nan fails both comparisons
            return False
    h = q.shape[1]
    if sinks is not None and (sinks.layout is not torch.strided or sinks.shape != (h,)):
        return False
    if alibi_slopes is not None:
        shape = alibi_slopes.shape
        if alibi_slopes.layout is not torch.strided or not (shape == (h,) or shape == (q.shape[0], h)):
            return False
    return True
