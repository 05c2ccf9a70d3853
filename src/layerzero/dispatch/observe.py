"""What a dispatcher reports: its config and registries, telemetry snapshots, reload counters and circuit-breaker
state (the :class:`Observable` part of every :class:`~layerzero.dispatch.dispatcher.Dispatcher`), read from its
runtime and its plan cache."""

from __future__ import annotations

import difflib
from typing import Any

from layerzero.dispatch.result import DispatchStats, DispatchTelemetry, KernelCounters
from layerzero.errors import KernelNotFoundError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime.breaker import CircuitStats
from layerzero.runtime.config import DispatchConfig
from layerzero.telemetry.core import CacheStats

__all__ = ["Observable"]


class Observable:
    """Telemetry and breaker access for a dispatcher (``self.runtime``, ``self.plan_cache``)."""

    __slots__ = ()
    runtime: Any
    plan_cache: Any
    mode: Any

    @property
    def config(self) -> DispatchConfig:
        """The dispatcher's config (its runtime's)."""
        return self.runtime.config  # type: ignore[no-any-return]

    @property
    def kernel_registry(self) -> KernelRegistry:
        return self.runtime.kernels  # type: ignore[no-any-return]

    @property
    def backend_registry(self) -> BackendRegistry:
        return self.runtime.backends  # type: ignore[no-any-return]

    @property
    def stats(self) -> DispatchStats:
        """Reload counters (a dispatcher that never reloads reports zeros)."""
        return DispatchStats(self.mode.value)

    def get_telemetry(self) -> DispatchTelemetry:
        """A snapshot of cache statistics, per-kernel counters and selections per operation."""
        rt = self.runtime
        tel = rt.telemetry
        shared = tel.cache_stats
        own = self.plan_cache
        if own is rt.plans:
            cache_stats = shared
        else:
            size, capacity = own.stats()
            cache_stats = CacheStats(shared.hits, shared.misses, size, capacity, own.evictions, shared.invalidations)
        kernels = {kid: KernelCounters(kid, s.operation, s.calls, s.failures, s.fallbacks, s.latency_count,
                                       s.latency_sum_us)
                   for kid, s in sorted(tel.kernels.items())}
        selections: dict[str, dict[str, int]] = {}
        for (operation, kid), n in sorted(tel.selections.items()):
            selections.setdefault(operation, {})[kid] = n
        return DispatchTelemetry(rt.config.enable_telemetry, cache_stats, kernels, selections,
                                 dict(tel.fallback_pairs), dict(tel.breaker_transitions))

    def get_circuit_stats(self, kernel_id: str) -> CircuitStats:
        """``state``, ``state_transitions``, ``failures``, ``successes``, ``last_failure`` of a kernel's breaker.

        Raises:
            KernelNotFoundError: no registered kernel (and no breaker) has this id.
        """
        rt = self.runtime
        if kernel_id not in rt.kernels and kernel_id not in rt.breakers.all():
            known = [s.kernel_id for s in rt.kernels] + list(rt.breakers.all())
            close = difflib.get_close_matches(str(kernel_id), known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KernelNotFoundError(f"get_circuit_stats(): unknown kernel {kernel_id!r}{hint}")
        return rt.circuit_stats(kernel_id)

    def reset_circuit(self, kernel_id: str) -> None:
        """Close a kernel's breaker now (operator action)."""
        self.get_circuit_stats(kernel_id)
        self.runtime.breakers.get(kernel_id).reset()
