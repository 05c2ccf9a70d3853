"""Telemetry: the shared counters, and exporters (Prometheus, OpenTelemetry) that read them.

The counters (:class:`Telemetry`, one per runtime) are bumped by ``lz.*`` and
every dispatcher; exporters read them only when scraped or collected, so
nothing is pushed per call. Exporters load lazily: ``import layerzero`` does
not import ``prometheus_client`` or ``opentelemetry``.

Example:
    >>> from layerzero import telemetry
    >>> print(telemetry.metrics_text())              # Prometheus text exposition
    >>> server = telemetry.start_metrics_server(9464) # serves http://127.0.0.1:9464/metrics
    >>> telemetry.enable_otel()                       # OpenTelemetry metrics and spans
"""

from __future__ import annotations

from typing import Any

from layerzero.telemetry.core import LATENCY_BUCKETS_US, CacheStats, KernelStats, Telemetry
from layerzero.telemetry.logs import format_event, log_event

__all__ = [
    "Telemetry", "KernelStats", "CacheStats", "LATENCY_BUCKETS_US", "format_event", "log_event",
    # Prometheus (layerzero.telemetry.prometheus)
    "LayerZeroCollector", "metrics_text", "start_metrics_server", "register_collectors", "add_runtime",
    "remove_runtime", "MetricsServer", "CIRCUIT_STATE_VALUES",
    # OpenTelemetry (layerzero.telemetry.otel)
    "enable_otel", "OTelHandle",
]

_LAZY = {
    "LayerZeroCollector": "layerzero.telemetry.prometheus",
    "metrics_text": "layerzero.telemetry.prometheus",
    "start_metrics_server": "layerzero.telemetry.prometheus",
    "register_collectors": "layerzero.telemetry.prometheus",
    "add_runtime": "layerzero.telemetry.prometheus",
    "remove_runtime": "layerzero.telemetry.prometheus",
    "MetricsServer": "layerzero.telemetry.prometheus",
    "CIRCUIT_STATE_VALUES": "layerzero.telemetry.families",
    "enable_otel": "layerzero.telemetry.otel",
    "OTelHandle": "layerzero.telemetry.otel",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'layerzero.telemetry' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
