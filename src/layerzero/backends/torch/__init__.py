"""The torch backend: PyTorch's own kernels (SDPA and its aten kernels, norms, RoPE, activations, loss, sampling).

Modules, each importing only the ones before it: ``capabilities`` (what this
torch build supports, probed once), the kernels by kind (``attention``,
``norms``, ``elementwise``, ``losses``, ``sampling``), ``fast`` (hot-path
specializations a plan binds once), ``attention_specs`` (the SDPA kernels'
constraints, as PyTorch's dispatcher checks them) and ``specs`` (every spec and
``register()``). This package satisfies :class:`layerzero.backends.base.Backend`.
"""

from __future__ import annotations

from layerzero.backends.torch.capabilities import TORCH_VERSION
from layerzero.backends.torch.specs import BACKENDS, KERNEL_IDS, TORCH_KERNEL_IDS, register

__all__ = ["register", "KERNEL_IDS", "BACKENDS", "TORCH_KERNEL_IDS", "TORCH_VERSION"]
