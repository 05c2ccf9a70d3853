"""DYNAMIC mode: kernel selection per call shape, plans cached.

A dynamic dispatcher on the global registries shares the plan cache that
``lz.*`` uses (``cache_size`` entries, LRU, optional ``cache_ttl_seconds``),
so a shape warmed through either is a cache hit for both. With
``use_mvcc_cache=True`` it keeps its own :class:`~layerzero.selection.cache.MVCCPlanCache`
instead: sharded, so many threads filling new shapes do not contend on one
lock; reads take no lock; and whole-cache invalidation (any registry, policy
or config change) is one version bump.
"""

from __future__ import annotations

from collections.abc import Callable

from layerzero.runtime.config import DispatchConfig, DispatchMode
from layerzero.dispatch.dispatcher import Dispatcher
from layerzero.dispatch.runtimes import runtime_for
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import Runtime
from layerzero.selection.cache import MVCCPlanCache

__all__ = ["DynamicDispatcher", "create_dynamic_dispatcher"]


class DynamicDispatcher(Dispatcher):
    """Selection-based dispatch (see :class:`~layerzero.dispatch.dispatcher.Dispatcher`).

    Args:
        runtime: the runtime to run on.
        use_mvcc_cache: keep a sharded MVCC plan cache of its own instead of sharing the runtime's.
        shards: number of MVCC shards (a power of two).
    """

    mode = DispatchMode.DYNAMIC
    shares_plan_cache = True

    def __init__(self, runtime: Runtime, *, use_mvcc_cache: bool = False, shards: int = 16) -> None:
        self.use_mvcc_cache = bool(use_mvcc_cache)
        self._shards = shards
        cache = self._mvcc(runtime.config, runtime) if self.use_mvcc_cache else None
        super().__init__(runtime, cache=cache)

    def _mvcc(self, config: DispatchConfig, runtime: Runtime) -> MVCCPlanCache:
        return MVCCPlanCache(config.cache_size if config.enable_cache else 0, config.cache_ttl_seconds,
                             shards=self._shards, clock=runtime.clock, on_evict=runtime.telemetry.record_eviction)

    def _sync(self) -> None:
        if self.use_mvcc_cache and self.runtime.config is not self._config_seen:
            self._cache = self._mvcc(self.runtime.config, self.runtime)
        super()._sync()


def create_dynamic_dispatcher(kernel_registry: KernelRegistry | None = None,
                              backend_registry: BackendRegistry | None = None,
                              config: DispatchConfig | None = None, use_mvcc_cache: bool = False, *,
                              shards: int = 16, clock: Callable[[], float] | None = None) -> DynamicDispatcher:
    """A DYNAMIC dispatcher.

    Args:
        kernel_registry / backend_registry: default to the global ones (then the dispatcher shares the
            global runtime with ``lz.*``; a ``config`` other than the process's gives it a runtime derived
            from the global one, so it never reconfigures ``lz.*``: ``runtimes.runtime_for``).
        config: cache size / TTL, telemetry, timing, breaker and fallback settings.
        use_mvcc_cache: a sharded MVCC plan cache for many concurrent threads (lock-free reads,
            O(1) invalidation).
        shards: MVCC shard count (a power of two).
        clock: monotonic clock for TTLs and breakers (own registries only; for tests).

    Example:
        >>> d = create_dynamic_dispatcher(config=DispatchConfig(cache_size=50000), use_mvcc_cache=True)
        >>> d.dispatch("rms_norm", {"x": x, "weight": w}).output
    """
    return DynamicDispatcher(runtime_for(kernel_registry, backend_registry, config, clock=clock),
                             use_mvcc_cache=use_mvcc_cache, shards=shards)
