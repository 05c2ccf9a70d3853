"""Prometheus export through ``prometheus_client``: a custom collector read at scrape time.

:class:`LayerZeroCollector` renders the families of
:mod:`layerzero.telemetry.families` from a runtime's counters when Prometheus
scrapes, so the call path never touches ``prometheus_client``. Three ways in:

* :func:`metrics_text` - the text exposition of this process (layerzero's
  metrics plus the standard process / platform / GC collectors);
* :func:`start_metrics_server` - serve ``/metrics`` from a daemon thread,
  on loopback unless told otherwise;
* :func:`register_collectors` - add layerzero's collector to an application's
  own ``CollectorRegistry`` (or ``prometheus_client.REGISTRY``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from layerzero import forksafe
from layerzero.telemetry.families import CIRCUIT_STATE_VALUES, LATENCY_BUCKETS_S, Family, Histogram, read_families

if TYPE_CHECKING:
    from layerzero.runtime import Runtime

__all__ = ["LayerZeroCollector", "metrics_text", "start_metrics_server", "register_collectors", "MetricsServer",
           "default_registry", "CIRCUIT_STATE_VALUES"]

_LE = tuple(floatToGoString(b) for b in LATENCY_BUCKETS_S) + ("+Inf",)


def _global_runtime() -> Runtime:
    from layerzero.runtime import get_runtime

    return get_runtime()


class LayerZeroCollector:
    """A ``prometheus_client`` collector for one runtime (the global one by default).

    Args:
        runtime: the runtime to read; ``None`` reads :func:`layerzero.runtime.get_runtime` at each scrape.
    """

    def __init__(self, runtime: Runtime | None = None) -> None:
        self._runtime: Callable[[], Runtime] = (lambda: runtime) if runtime is not None else _global_runtime

    def describe(self) -> Iterator[Metric]:
        """The families without samples (lets a registry detect name clashes without a scrape)."""
        for fam in read_families(self._runtime()):
            fam.samples.clear()
            yield _render(fam)

    def collect(self) -> Iterator[Metric]:
        for fam in read_families(self._runtime()):
            yield _render(fam)


def _render(fam: Family) -> Metric:
    labels = list(fam.labels)
    if fam.kind == "counter":
        metric: Any = CounterMetricFamily(fam.prom, fam.help, labels=labels)
        for values, v in fam.samples:
            metric.add_metric(list(values), v)
    elif fam.kind == "gauge":
        metric = GaugeMetricFamily(fam.prom, fam.help, labels=labels)
        for values, v in fam.samples:
            metric.add_metric(list(values), v)
    else:
        metric = HistogramMetricFamily(fam.prom, fam.help, labels=labels, unit="")
        for values, h in fam.samples:
            metric.add_metric(list(values), _cumulative(h), h.sum)
    return metric


def _cumulative(h: Histogram) -> list[tuple[str, float]]:
    out, running = [], 0
    for le, n in zip(_LE, h.buckets, strict=True):
        running += n
        out.append((le, running))
    return out


_default: CollectorRegistry | None = None
_default_lock = forksafe.module_lock()


def default_registry() -> CollectorRegistry:
    """layerzero's own registry: its collector plus the process, platform and GC collectors."""
    global _default
    with _default_lock:
        if _default is None:
            reg = CollectorRegistry()
            reg.register(LayerZeroCollector())
            for make in (ProcessCollector, PlatformCollector, GCCollector):
                try:
                    make(registry=reg)
                except Exception:  # not every platform has /proc; the layerzero metrics still work
                    pass
            _default = reg
        return _default


def register_collectors(registry: CollectorRegistry, runtime: Runtime | None = None) -> LayerZeroCollector:
    """Add layerzero's collector to ``registry`` and return it (``registry.unregister(c)`` removes it).

    Example:
        >>> from prometheus_client import REGISTRY
        >>> layerzero.telemetry.register_collectors(REGISTRY)   # now served by your own /metrics
    """
    collector = LayerZeroCollector(runtime)
    registry.register(collector)
    return collector


def metrics_text(runtime: Runtime | None = None) -> str:
    """The Prometheus text exposition of this process (of ``runtime`` only, when one is given).

    Example:
        >>> text = layerzero.telemetry.metrics_text()
        >>> "layerzero_dispatch_total" in text
        True
    """
    if runtime is None:
        registry = default_registry()
    else:
        registry = CollectorRegistry()
        registry.register(LayerZeroCollector(runtime))
    return generate_latest(registry).decode("utf-8")


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread). ``close()`` stops it."""

    addr: str
    port: int
    _httpd: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(port: int, addr: str = "127.0.0.1", *, registry: CollectorRegistry | None = None
                         ) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread (``port=0`` picks a free port).

    The default address is loopback: exposing metrics on other interfaces is an explicit choice
    (``addr="0.0.0.0"``).

    Example:
        >>> server = layerzero.telemetry.start_metrics_server(9464)
        >>> server.url
        'http://127.0.0.1:9464/metrics'
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"start_metrics_server(): port must be an int between 0 and 65535, got {port!r}")
    httpd, thread = _start_http_server(port, addr=addr, registry=registry or default_registry())
    return MetricsServer(addr, int(httpd.server_address[1]), httpd, thread)
