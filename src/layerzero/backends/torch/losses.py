"""The torch loss kernel: ``F.cross_entropy``."""

from __future__ import annotations

import torch.nn.functional as F

__all__ = ["torch_cross_entropy"]


def torch_cross_entropy(logits, target, ignore_index, label_smoothing, reduction):  # type: ignore[no-untyped-def]
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
