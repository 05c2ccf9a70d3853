"""The torch elementwise kernels: RoPE (rotate-half and interleaved), SwiGLU, GeGLU, GELU, SiLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerzero.tensor_helpers import half_cos_sin

__all__ = ["torch_rope", "torch_rope_interleaved", "torch_swiglu", "torch_geglu", "torch_gelu", "torch_silu"]


def torch_rope(x, cos, sin, interleaved):  # type: ignore[no-untyped-def]
    c, s = half_cos_sin(x, cos, sin, False)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def torch_rope_interleaved(x, cos, sin, interleaved):  # type: ignore[no-untyped-def]
    c, s = half_cos_sin(x, cos, sin, True)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def torch_swiglu(gate, up):  # type: ignore[no-untyped-def]
    return F.silu(gate) * up



def torch_geglu(gate, up, approximate):  # type: ignore[no-untyped-def]
    return F.gelu(gate, approximate=approximate) * up


def torch_gelu(x, approximate):  # type: ignore[no-untyped-def]
    return F.gelu(x, approximate=approximate)


def torch_silu(x):  # type: ignore[no-untyped-def]
    return F.silu(x)
