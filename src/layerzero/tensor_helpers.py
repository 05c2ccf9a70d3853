"""Small tensor helpers shared by the op references (``layerzero.ops``) and the torch kernels (no layerzero imports)."""

from __future__ import annotations

import torch

__all__ = ["window_mask", "half_cos_sin"]


def window_mask(sq: int, sk: int, window: int | None, is_causal: bool, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for causal/sliding-window attention, upper-left aligned."""
    if window is None and not is_causal:
        return None
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    keep = j <= i  # a window is always causal
    if window is not None:
        keep &= j > i - window
    return keep


def half_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin reduced to head_dim // 2 entries (one per rotated pair)."""
    half = x.shape[-1] // 2
    if cos.shape[-1] == half:
        return cos, sin
    if interleaved:
        return cos[..., ::2], sin[..., ::2]
    return cos[..., :half], sin[..., :half]
