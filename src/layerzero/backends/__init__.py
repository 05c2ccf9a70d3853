"""Backend plugins: one module per library.

Each module (or package, like ``torch``) meets :class:`layerzero.backends.base.Backend`:
``register(kernels, backends)``, ``BACKENDS`` and ``KERNEL_IDS``. The torch backend is
always there. Other backends register their kernel specs with lazy
implementations whether or not their library is installed, so a missing
library shows up as a ``BACKEND_UNAVAILABLE`` rejection ("liger is not
available: python package 'liger_kernel' is not installed (install with: pip
install liger-kernel)") instead of an import error, and nothing heavy is
imported until a kernel of that backend is first called.
"""

from __future__ import annotations

import importlib
import logging

from layerzero.backends.base import Backend
from layerzero.registry import BackendRegistry, KernelRegistry

__all__ = ["BUILTIN_BACKENDS", "load_builtin_backends"]

log = logging.getLogger("layerzero")

# Modules under layerzero.backends, in registration order.
BUILTIN_BACKENDS: tuple[str, ...] = ("torch", "flash_attn", "flashinfer", "xformers", "flex", "liger", "flash_attn_varlen",
                                     "flashinfer_ragged", "xformers_varlen", "flex_varlen", "flex_paged")

_loaded: set[int] = set()


def load_builtin_backends(kernels: KernelRegistry, backends: BackendRegistry) -> None:
    """Register every built-in backend into the given registries (once per registry)."""
    if id(kernels) in _loaded:
        return
    _loaded.add(id(kernels))
    for name in BUILTIN_BACKENDS:
        try:
            module: Backend = importlib.import_module(f"layerzero.backends.{name}")  # type: ignore[assignment]
            module.register(kernels, backends)
        except Exception as exc:  # one broken plugin must not take the others down
            log.warning("backend module %s failed to register: %s: %s", name, type(exc).__name__, exc)
