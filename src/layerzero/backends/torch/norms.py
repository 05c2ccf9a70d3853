"""The torch norm kernels: fused ``torch.rms_norm`` / ``torch.layer_norm`` and float32-composed versions."""

from __future__ import annotations

import torch

__all__ = ["torch_rms_norm", "torch_rms_norm_composed", "torch_layer_norm", "torch_layer_norm_composed"]

_rms = torch.rms_norm if hasattr(torch, "rms_norm") else None


def torch_rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    return _rms(x, x.shape[-1:], weight, eps)  # type: ignore[misc]


def _wide(x: torch.Tensor) -> torch.dtype:
    # Half types are computed in float32 and rounded once, after the weight (as torch.rms_norm; HF's LlamaRMSNorm
    # rounds before the weight too, one bf16 step apart on a quarter of the elements); float64 stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def torch_rms_norm_composed(x, weight, eps):  # type: ignore[no-untyped-def]
    xf = x.to(_wide(x))
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    if weight is not None:
        out = out * weight.to(xf.dtype)
    return out.to(x.dtype)


def torch_layer_norm(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    return torch.layer_norm(x, x.shape[-1:], weight, bias, eps)


def torch_layer_norm_composed(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    xf = x.to(_wide(x))
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(xf.dtype)
    if bias is not None:
        out = out + bias.to(xf.dtype)
    return out.to(x.dtype)
