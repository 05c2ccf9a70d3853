"""Telemetry: the shared counters, and exporters (Prometheus, OpenTelemetry) that read them."""

from __future__ import annotations

from layerzero.telemetry.core import CacheStats, KernelStats, Telemetry

__all__ = ["Telemetry", "KernelStats", "CacheStats"]
