"""Dispatch: configs, modes and dispatchers as the performance guide describes them.

    from layerzero.dispatch import dispatch, get_global_dispatcher, DispatchConfig, DispatchMode
    result = dispatch("attention.causal", {"query": q, "key": k, "value": v})
    result.output, result.kernel_id, result.timing

The config and breaker types load eagerly (the runtime needs them); the
dispatchers load on first use, because they are built on the runtime (the
``_LAZY`` table says where each name lives). A few names this package used to
find by searching its modules keep working for one release with a
``DeprecationWarning`` (``_DEPRECATED``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from layerzero.runtime.breaker import CircuitBreaker, CircuitBreakerConfig, CircuitState, CircuitStats
from layerzero.runtime.config import DispatchConfig, DispatchMode

_LAZY: dict[str, str] = {
    "Dispatcher": "dispatcher",
    "runtime_for": "runtimes",
    "DispatchResult": "result",
    "DispatchTiming": "result",
    "DispatchTelemetry": "result",
    "DispatchStats": "result",
    "KernelCounters": "result",
    "DynamicDispatcher": "dynamic",
    "create_dynamic_dispatcher": "dynamic",
    "StaticDispatcher": "static",
    "StaticDispatcherBuilder": "static",
    "create_static_dispatcher": "static",
    "DispatchOrchestrator": "orchestrator",
    "create_orchestrator": "orchestrator",
    "get_global_dispatcher": "orchestrator",
    "dispatch": "orchestrator",
    "GenericOp": "generic",
    "INPUT_NAMES": "generic",
    "check_static_map": "static",
    "ConfigDrivenDispatcher": "config_driven",
    "create_config_dispatcher": "config_driven",
    "HotReloadDispatcher": "hot_reload",
    "ReloadStats": "hot_reload",
    "create_hot_reload_dispatcher": "hot_reload",
    "resolve_config_path": "config_driven",
    "WATCHDOG_AVAILABLE": "hot_reload",
}

#: Names ``layerzero.dispatch`` used to find by searching its peer modules for any public name; they keep
#: working for one release, with a ``DeprecationWarning`` naming their home.
_DEPRECATED: dict[str, str] = {
    "load_config": "layerzero.config_file.schema",
    "validate_config": "layerzero.config_file.schema",
    "CompiledConfig": "layerzero.config_file.schema",
    "ConfigSource": "layerzero.dispatch.config_driven",
}

__all__ = ["DispatchConfig", "DispatchMode", "CircuitBreaker", "CircuitBreakerConfig", "CircuitState",
           "CircuitStats", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"layerzero.dispatch.{module}"), name)
        globals()[name] = value
        return value
    home = _DEPRECATED.get(name)
    if home is not None:
        warnings.warn(f"layerzero.dispatch.{name} is deprecated; import it from {home} (it leaves "
                      f"layerzero.dispatch in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module 'layerzero.dispatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
