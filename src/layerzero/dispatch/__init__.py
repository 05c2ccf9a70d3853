"""Dispatch: configs, modes and dispatchers as the performance guide describes them.

    from layerzero.dispatch import dispatch, get_global_dispatcher, DispatchConfig, DispatchMode
    result = dispatch("attention.causal", {"query": q, "key": k, "value": v})
    result.output, result.kernel_id, result.timing

The config and breaker types load eagerly (the runtime needs them); the
dispatchers load on first use, because they are built on the runtime.
Any other public name of the ``config_driven`` and ``hot_reload`` modules is
looked up there on first use too.
"""

from __future__ import annotations

import importlib
from typing import Any

from layerzero.runtime.breaker import CircuitBreaker, CircuitBreakerConfig, CircuitState, CircuitStats
from layerzero.runtime.config import DispatchConfig, DispatchMode

_LAZY: dict[str, str] = {
    "Dispatcher": "dispatcher",
    "runtime_for": "dispatcher",
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
}
_PEER_MODULES = ("config_driven", "hot_reload")

__all__ = ["DispatchConfig", "DispatchMode", "CircuitBreaker", "CircuitBreakerConfig", "CircuitState",
           "CircuitStats", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"layerzero.dispatch.{module}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        for peer in _PEER_MODULES:
            try:
                mod = importlib.import_module(f"layerzero.dispatch.{peer}")
            except ModuleNotFoundError as exc:
                if exc.name != f"layerzero.dispatch.{peer}":
                    raise
                continue
            if hasattr(mod, name):
                value = getattr(mod, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module 'layerzero.dispatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
