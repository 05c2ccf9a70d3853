"""The orchestrator: one dispatcher that routes each operation to the mode serving it.

Routing by ``DispatchConfig.mode``:

==============  ===============================================================
``STATIC``      the static table (``static_kernel_map``); an operation missing
                from it is an error
``DYNAMIC``     selection per call shape, cached
``CONFIG``      the config-file dispatcher (``config_path``)
``HOT_RELOAD``  the config-file dispatcher that follows edits to the file
``AUTO``        STATIC for operations with a static entry, else CONFIG when a
                config is loaded (``config_path`` set, or a dispatcher given to
                :meth:`DispatchOrchestrator.set_config_dispatcher`), else DYNAMIC
==============  ===============================================================

:func:`get_global_dispatcher` is the orchestrator on the global runtime; it
follows the runtime's config (``get_runtime().configure(...)``, or the
``LAYERZERO_*`` environment variables at start-up). The module-level
:func:`dispatch` goes through it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.runtime.config import DispatchConfig, DispatchMode
from layerzero.dispatch.dispatcher import Dispatcher
from layerzero.dispatch.runtimes import runtime_for
from layerzero.dispatch.generic import hot_key
from layerzero.dispatch.dynamic import DynamicDispatcher
from layerzero.dispatch.result import DispatchResult, DispatchStats, DispatchTelemetry
from layerzero.dispatch.static import StaticDispatcher, check_static_map, create_static_dispatcher
from layerzero.errors import ConfigError, InvalidInputError, NoKernelError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import Runtime, get_runtime

__all__ = ["DispatchOrchestrator", "create_orchestrator", "get_global_dispatcher", "dispatch"]

_FACTORIES = {
    DispatchMode.CONFIG: ("config_driven", "create_config_dispatcher"),
    DispatchMode.HOT_RELOAD: ("hot_reload", "create_hot_reload_dispatcher"),
}


class DispatchOrchestrator(Dispatcher):
    """Routes every operation to the static, config or dynamic dispatcher (see the module docstring).

    Args:
        runtime: the runtime all its dispatchers share.
        use_mvcc_cache: give the dynamic dispatcher a sharded MVCC plan cache.
    """

    shares_plan_cache = True

    def __init__(self, runtime: Runtime, *, use_mvcc_cache: bool = False) -> None:
        super().__init__(runtime)
        self._lock = forksafe.lock(self)
        self.dynamic = DynamicDispatcher(runtime, use_mvcc_cache=use_mvcc_cache)
        self.static: StaticDispatcher = create_static_dispatcher(runtime.config, runtime=runtime)
        self._config_dispatcher: Dispatcher | None = None
        self._attached = False
        self._config_error: Exception | None = None
        self._routes: dict[str, Dispatcher] = {}
        self._config_seen = runtime.config
        # The inherited hot path (Dispatcher.dispatch) serves cached calls of operations routed to the dynamic
        # dispatcher when it shares the runtime's plan cache: the same plans, without a second dispatch call.
        # Only such operations get a hot-path entry (see _dispatch), so its results say "dynamic".
        self._mode_value = DispatchMode.DYNAMIC.value

    @property  # type: ignore[override]
    def mode(self) -> DispatchMode:
        """The configured mode (``AUTO`` routes per operation; see :meth:`mode_for`)."""
        return self.runtime.config.mode

    # -- routing -----------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """The runtime's config object changed: rebuild the static table, re-resolve routes."""
        with self._lock:
            cfg = self.runtime.config
            if cfg is self._config_seen:
                return
            old = self._config_seen
            self.static = create_static_dispatcher(cfg, runtime=self.runtime)
            if not self._attached and (cfg.config_path != old.config_path or cfg.mode != old.mode):
                self._close_config_dispatcher()
            self._config_error = None
            self._routes = {}
            self._fast = {}
            self._config_seen = cfg

    def _close_config_dispatcher(self) -> None:
        d, self._config_dispatcher = self._config_dispatcher, None
        close = getattr(d, "close", None)
        if callable(close):
            close()

    def config_dispatcher(self) -> Dispatcher | None:
        """The config-file dispatcher in use (loaded from ``config_path`` on first need), or None."""
        if self._config_dispatcher is None and not self._attached and self.runtime.config.config_path is not None:
            with self._lock:
                if self._config_dispatcher is None:
                    self._config_dispatcher = self._load_config_dispatcher()
        return self._config_dispatcher

    def set_config_dispatcher(self, dispatcher: Dispatcher | None) -> None:
        """Use ``dispatcher`` for CONFIG routing (AUTO then routes non-static operations to it); None detaches."""
        with self._lock:
            if self._config_dispatcher is not dispatcher:
                self._close_config_dispatcher()
            self._config_dispatcher = dispatcher
            self._attached = dispatcher is not None
            self._routes = {}
            self._fast = {}

    def _load_config_dispatcher(self) -> Dispatcher:
        cfg = self.runtime.config
        modname, fname = _FACTORIES[DispatchMode.HOT_RELOAD if cfg.mode is DispatchMode.HOT_RELOAD
                                    else DispatchMode.CONFIG]
        try:
            module = importlib.import_module(f"layerzero.dispatch.{modname}")
            factory: Callable[..., Dispatcher] = getattr(module, fname)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"config_path={cfg.config_path!r} needs layerzero.dispatch.{modname}.{fname}, "
                              f"which is not available ({type(exc).__name__}: {exc})") from exc
        offered: dict[str, Any] = {
            "config_path": cfg.config_path, "kernel_registry": self.runtime.kernels,
            "backend_registry": self.runtime.backends, "config": cfg,
            "watch_interval_seconds": cfg.watch_interval_seconds, "validate_on_reload": cfg.validate_on_reload,
        }
        params = inspect.signature(factory).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            offered = {k: v for k, v in offered.items() if k in params}
        return factory(**offered)

    def mode_for(self, operation: str) -> DispatchMode:
        """The mode that serves ``operation`` now (resolves AUTO)."""
        if self.runtime.config is not self._config_seen:
            self._refresh()
        mode = self.runtime.config.mode
        if mode is DispatchMode.AUTO:
            if self.static.serves(operation):
                return DispatchMode.STATIC
            if self.config_dispatcher() is not None:
                return DispatchMode.CONFIG
            return DispatchMode.DYNAMIC
        return mode

    def route(self, operation: str) -> Dispatcher:
        """The dispatcher that serves ``operation``."""
        if self.runtime.config is not self._config_seen:
            self._refresh()
        found = self._routes.get(operation)
        if found is not None:
            return found
        mode = self.mode_for(operation)
        if mode is DispatchMode.STATIC:
            if not self.static.serves(operation):
                raise self.static._missing(operation)
            target: Dispatcher = self.static
        elif mode is DispatchMode.DYNAMIC:
            target = self.dynamic
        else:
            cd = self.config_dispatcher()
            if cd is None:
                raise ConfigError(f"dispatch mode {mode.name} needs a config: set DispatchConfig.config_path "
                                  f"(or LAYERZERO_CONFIG), or call set_config_dispatcher()")
            target = cd
        if len(self._routes) < 4096:
            self._routes[operation] = target
        return target

    # -- dispatch --------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """The runtime changed: re-resolve routes if its config did; drop the hot-path entries."""
        if self.runtime.config is not self._config_seen:
            self._refresh()
        self._timed = self.runtime.config.record_timing
        self._fast = {}
        self._version = self.runtime.version

    # ``dispatch`` is the inherited one: its hot path serves cached calls of operations routed to the dynamic
    # dispatcher (no routing, no second dispatch call); every other call comes to _dispatch.
    def _dispatch(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None,
                  kwargs: dict[str, Any]) -> DispatchResult:
        """Route ``operation`` (see :meth:`route`) and dispatch it there."""
        if self.runtime.config is not self._config_seen:
            self._refresh()
        try:
            target = self._routes.get(operation) or self.route(operation)
        except TypeError:
            if isinstance(operation, str):
                raise
            # an unhashable operation ([], {}): bad input, not a crash
            raise InvalidInputError(f"dispatch(): operation must be a non-empty string, got {operation!r}") from None
        result = target.dispatch(operation, inputs, context, **kwargs)
        dyn = self.dynamic
        key = hot_key(operation, kwargs)  # None: options no entry carries
        if key is not None and self._fast.get(key) is None and len(self._fast) < 4096:
            fast = dyn._fast.get(key) if target is dyn and dyn._cache is None else None
            if fast is not None and self._version == self.runtime.version:
                self._fast[key] = fast.copy()  # the dynamic dispatcher's names: its hot path is ours now
            elif not kwargs and key not in self._fast:
                self._fast[key] = None  # routed elsewhere, or names mapped in full: no KeyError per call
        return result

    def resolve(self, operation: str) -> Callable[..., Any]:
        """The kernel callable of a static operation (dynamic ones depend on the inputs: use ``dispatch``)."""
        if self.mode_for(operation) is DispatchMode.STATIC:
            return self.static.resolve(operation)
        raise NoKernelError(f"{operation!r} is dispatched in {self.mode_for(operation).name} mode, where the kernel "
                            f"depends on the inputs; resolve() serves static operations only "
                            f"(static: {', '.join(self.static.operations) or 'none'})", operation=operation)

    def invalidate(self) -> None:
        self.runtime.invalidate("orchestrator.invalidate()")
        self.dynamic.invalidate()
        cd = self._config_dispatcher
        if cd is not None:
            cd.invalidate()

    def get_telemetry(self) -> DispatchTelemetry:
        """Shared runtime counters, with the dynamic dispatcher's plan cache in ``cache_stats``."""
        return self.dynamic.get_telemetry()

    @property
    def stats(self) -> DispatchStats:
        """The config dispatcher's reload stats when one is loaded, else zeros."""
        cd = self._config_dispatcher
        if cd is not None:
            return cd.stats
        return DispatchStats(self.runtime.config.mode.value)

    def close(self) -> None:
        """Stop a hot-reload watcher, if one runs."""
        with self._lock:
            if not self._attached:
                self._close_config_dispatcher()


def create_orchestrator(config: DispatchConfig | None = None, kernel_registry: KernelRegistry | None = None,
                        backend_registry: BackendRegistry | None = None, *, use_mvcc_cache: bool = False,
                        clock: Callable[[], float] | None = None) -> DispatchOrchestrator:
    """An orchestrator routing per ``config.mode`` (AUTO: static entry, else loaded config, else dynamic).

    On the global registries (the default) it shares the global runtime, and ``config`` becomes the
    process's dispatch config (what ``dispatch()`` and ``lz.*`` use): the orchestrator is the process's
    router. Every other dispatcher given a config of its own gets a runtime derived from the global one
    and leaves the process's config alone.

    Example:
        >>> o = create_orchestrator(DispatchConfig(mode=DispatchMode.AUTO,
        ...                                        static_kernel_map={"rms_norm": "torch_rms_norm"}))
        >>> o.mode_for("rms_norm"), o.mode_for("attention.causal")
        (<DispatchMode.STATIC: 'static'>, <DispatchMode.DYNAMIC: 'dynamic'>)
    """
    check_static_map(config, kernel_registry, backend_registry)  # a bad table must not reach the runtime
    return DispatchOrchestrator(runtime_for(kernel_registry, backend_registry, config, clock=clock,
                                            process_wide=True), use_mvcc_cache=use_mvcc_cache)


_global: DispatchOrchestrator | None = None
_global_lock = forksafe.module_lock()


def get_global_dispatcher() -> DispatchOrchestrator:
    """The process-wide orchestrator on the global runtime (shared with ``lz.*``)."""
    global _global
    d = _global
    if d is None:
        with _global_lock:
            if _global is None:
                _global = DispatchOrchestrator(get_runtime())
            d = _global
    return d


def dispatch(operation: str, inputs: Mapping[str, Any], context: SelectionContext | None = None,
             **kwargs: Any) -> DispatchResult:
    """Dispatch through :func:`get_global_dispatcher`.

    Example:
        >>> result = dispatch("attention.causal", {"query": q, "key": k, "value": v})
        >>> result.output, result.kernel_id, result.timing.total_us
    """
    d = _global if _global is not None else get_global_dispatcher()
    return d.dispatch(operation, inputs, context, **kwargs)
