"""The torch loss kernel: ``F.cross_entropy``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["torch_cross_entropy"]


def torch_cross_entropy(logits, target, ignore_index, label_smoothing, reduction):  # type: ignore[no-untyped-def]
    if target.dtype == torch.int32:  # lz.cross_entropy takes int32 class ids; F.cross_entropy wants int64
        target = target.long()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
