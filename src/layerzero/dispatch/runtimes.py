"""Which runtime a dispatcher runs on: the global one, one derived from it, or one of its own."""

from __future__ import annotations

import time
from collections.abc import Callable

from layerzero.errors import InvalidInputError
from layerzero.registry import BackendRegistry, KernelRegistry, get_global_backend_registry, get_global_kernel_registry
from layerzero.runtime import Runtime, get_runtime
from layerzero.runtime.config import DispatchConfig

__all__ = ["runtime_for"]


def runtime_for(kernel_registry: KernelRegistry | None = None, backend_registry: BackendRegistry | None = None,
                config: DispatchConfig | None = None, *, clock: Callable[[], float] | None = None,
                process_wide: bool = False) -> Runtime:
    """The runtime a dispatcher on these registries uses.

    The global registries (or ``None``) give the global runtime, or, when ``config`` differs from its
    config, a runtime derived from it (``Runtime.derive``: the same registries, policy and measurements,
    its own config, plan cache, breakers and telemetry), so a dispatcher's config never reconfigures
    ``lz.*``; other registries get a new runtime of their own. ``process_wide=True`` (the orchestrator,
    which configures the process's ``dispatch()``) applies ``config`` to the global runtime instead.

    Raises:
        InvalidInputError: ``clock`` was given for the global runtime (it always uses ``time.monotonic``).
    """
    if config is not None and not isinstance(config, DispatchConfig):
        raise InvalidInputError(f"config must be a DispatchConfig, got {type(config).__name__}")
    kernels = get_global_kernel_registry() if kernel_registry is None else kernel_registry
    backends = get_global_backend_registry() if backend_registry is None else backend_registry
    if kernels is get_global_kernel_registry() and backends is get_global_backend_registry():
        if clock is not None:
            raise InvalidInputError("clock= needs a dispatcher on its own registries; the global runtime shared "
                                    "with lz.* always uses time.monotonic")
        rt = get_runtime()
        if config is None or config == rt.config:
            return rt
        if process_wide:
            rt.configure(config)
            return rt
        return rt.derive(config)
    return Runtime(kernels, backends, config if config is not None else DispatchConfig.from_env(),
                   clock=clock if clock is not None else time.monotonic)
