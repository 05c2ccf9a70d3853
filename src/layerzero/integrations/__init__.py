"""Integrations with the libraries layerzero runs inside of.

- :mod:`layerzero.integrations.transformers`: the ``"layerzero"`` attention
  implementation for HuggingFace transformers, and ``patch`` / ``unpatch`` of
  norm and activation modules.
- :mod:`layerzero.integrations.compile`: ``torch.compile`` support: PyTorch's own
  kernels traced natively (selected at trace time, guarded), others as
  ``torch.library`` custom ops; no graph breaks.
- :mod:`layerzero.integrations.cuda_graphs`: capture-safe plans and CUDA graph capture.
- :mod:`layerzero.integrations.hooks`: post-import hooks that set the first two
  up when their library is imported (``import layerzero`` imports neither).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from layerzero.integrations.hooks import pending, when_imported

__all__ = ["install_import_hooks", "pending"]


def _compile_ready(module: ModuleType) -> None:
    # Importing layerzero.integrations.compile installs its stand-ins; when that import is what loaded
    # torch._dynamo, the module is still half-initialized here and installs itself when its body finishes.
    if "layerzero.integrations.compile" not in sys.modules:
        importlib.import_module("layerzero.integrations.compile")


def _transformers_ready(module: ModuleType) -> None:
    importlib.import_module("layerzero.integrations.transformers").register()


def install_import_hooks() -> None:
    """Set up the torch.compile and transformers integrations when (or if) their libraries load."""
    when_imported("torch._dynamo", _compile_ready)
    when_imported("transformers.modeling_utils", _transformers_ready)
