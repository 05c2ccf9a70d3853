"""FlashAttention / FlashInfer masks for the fakes of those libraries (shared by the backend and residual-pair
tests): query ``i`` sits at key position ``i + sk - sq``."""

from __future__ import annotations

import torch

__all__ = ["lower_right"]


def lower_right(sq: int, sk: int, causal: bool, left: int, right: int) -> torch.Tensor | None:
    """The keep-mask of a lower-right aligned call (``left`` / ``right``: window sizes, -1 for none), or None."""
    if not causal and left < 0 and right < 0:
        return None
    i = torch.arange(sq).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk).unsqueeze(0)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep
