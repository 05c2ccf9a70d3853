"""The contract every backend module meets: :class:`Backend`.

A backend module (``layerzero.backends.<lib>``, or a package such as
``layerzero.backends.torch``) declares the backends it provides and the
kernels they have, and registers both on request. It imports its library
lazily: ``register`` only declares the backend (module name, pip hint and an
optional probe) on the :class:`~layerzero.registry.BackendRegistry`, which
probes availability and version when first asked, so a missing library is a
rejection reason, never an import error.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """What ``load_builtin_backends`` uses of a backend module (``isinstance(module, Backend)`` checks it).

    Attributes:
        BACKENDS: the backend names ``register`` declares (``("flash_attn", "flash_attn_v3")``).
        KERNEL_IDS: the ids of the kernels ``register`` may add, in registration order.
    """

    BACKENDS: tuple[str, ...]
    KERNEL_IDS: tuple[str, ...]

    def register(self, kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
        """Declare the backends on ``backends`` and add the kernels not yet in ``kernels``; return those added."""
        ...
