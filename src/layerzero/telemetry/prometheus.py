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
import weakref
from collections.abc import Callable, Iterator, Mapping
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

__all__ = ["LayerZeroCollector", "metrics_text", "start_metrics_server", "register_collectors", "add_runtime",
           "remove_runtime", "MetricsServer", "default_registry", "CIRCUIT_STATE_VALUES"]

_LE = tuple(floatToGoString(b) for b in LATENCY_BUCKETS_S) + ("+Inf",)


def _global_runtime() -> Runtime:
    from layerzero.runtime import get_runtime

    return get_runtime()


class LayerZeroCollector:
    """A ``prometheus_client`` collector for one runtime (the global one by default), and any more added.

    Args:
        runtime: the runtime to read; ``None`` reads :func:`layerzero.runtime.get_runtime` at each scrape.
        labels: constant labels added to every sample of that runtime.

    A dispatcher with a config of its own counts in a runtime of its own (``dispatcher.runtime``): :meth:`add` it
    with a label that tells it apart (``collector.add(serving.runtime, {"dispatcher": "serving"})``), so both are
    one set of metric families (a registry refuses two collectors of the same names).
    """

    def __init__(self, runtime: Runtime | None = None, labels: Mapping[str, str] | None = None) -> None:
        # the collector's own runtime is held (as before ``add``); an added one weakly
        first: Callable[[], Runtime | None] = (lambda: runtime) if runtime is not None else _global_runtime
        self._sources: list[tuple[Callable[[], Runtime | None], tuple[tuple[str, str], ...]]] = [
            (first, _constant(labels))]

    def add(self, runtime: Runtime, labels: Mapping[str, str] | None = None) -> None:
        """Read ``runtime`` too, its samples labelled with ``labels`` (held weakly: a dispatcher that goes away
        leaves the scrape)."""
        self._sources.append((weakref.ref(runtime), _constant(labels)))

    def remove(self, runtime: Runtime) -> None:
        """Stop reading ``runtime``."""
        self._sources = [(src, const) for src, const in self._sources
                         if src is _global_runtime or src() is not runtime]

    def _families(self) -> list[tuple[Family, tuple[tuple[str, str], ...]]]:
        out = []
        for source, const in list(self._sources):
            rt = source()
            if rt is not None:
                out += [(fam, const) for fam in read_families(rt)]
        self._sources = [(src, const) for src, const in self._sources
                         if src is _global_runtime or src() is not None]
        return out

    def describe(self) -> Iterator[Metric]:
        """The families without samples (lets a registry detect name clashes without a scrape)."""
        for metric in _render(self._families()):
            metric.samples.clear()
            yield metric

    def collect(self) -> Iterator[Metric]:
        yield from _render(self._families())


def _constant(labels: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in sorted((labels or {}).items()))


def _render(fams: list[tuple[Family, tuple[tuple[str, str], ...]]]) -> list[Metric]:
    """One metric per family name, every source's samples in it; a constant label a source lacks reads ""."""
    keys = sorted({k for _, const in fams for k, _ in const})
    merged: dict[str, Any] = {}
    for fam, const in fams:
        labels = list(fam.labels) + keys
        extra = [dict(const).get(k, "") for k in keys]
        metric = merged.get(fam.prom)
        if metric is None:
            kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}.get(fam.kind)
            metric = merged[fam.prom] = (kind(fam.prom, fam.help, labels=labels) if kind is not None else
                                         HistogramMetricFamily(fam.prom, fam.help, labels=labels, unit=""))
        for values, v in fam.samples:
            if fam.kind in ("counter", "gauge"):
                metric.add_metric([*values, *extra], v)
            else:
                metric.add_metric([*values, *extra], _cumulative(v), v.sum)
    return list(merged.values())


def _cumulative(h: Histogram) -> list[tuple[str, float]]:
    out, running = [], 0
    for le, n in zip(_LE, h.buckets, strict=True):
        running += n
        out.append((le, running))
    return out


_default: CollectorRegistry | None = None
_default_lock = forksafe.module_lock()


_default_collector = LayerZeroCollector()


def add_runtime(runtime: Runtime, labels: Mapping[str, str]) -> None:
    """Export ``runtime`` too (a dispatcher with a config of its own: ``dispatcher.runtime``) from layerzero's own
    registry (:func:`metrics_text`, :func:`start_metrics_server`), its samples labelled with ``labels``.

    Example:
        >>> layerzero.telemetry.add_runtime(serving.runtime, {"dispatcher": "serving"})
    """
    if not labels:
        raise ValueError("add_runtime(): labels must tell this runtime's samples apart, "
                         "e.g. {'dispatcher': 'serving'}")
    _default_collector.add(runtime, labels)


def remove_runtime(runtime: Runtime) -> None:
    """Undo :func:`add_runtime` (a runtime that is garbage-collected leaves on its own)."""
    _default_collector.remove(runtime)


def default_registry() -> CollectorRegistry:
    """layerzero's own registry: its collector plus the process, platform and GC collectors."""
    global _default
    with _default_lock:
        if _default is None:
            reg = CollectorRegistry()
            reg.register(_default_collector)
            for make in (ProcessCollector, PlatformCollector, GCCollector):
                try:
                    make(registry=reg)
                except Exception:  # not every platform has /proc; the layerzero metrics still work
                    pass
            _default = reg
        return _default


def register_collectors(registry: CollectorRegistry, runtime: Runtime | None = None,
                        labels: Mapping[str, str] | None = None) -> LayerZeroCollector:
    """Add layerzero's collector to ``registry`` and return it (``registry.unregister(c)`` removes it).

    ``runtime`` and ``labels``: see :class:`LayerZeroCollector`; a dispatcher with a config of its own counts in
    its own runtime, which the returned collector's ``add`` exports beside the global one.

    Example:
        >>> from prometheus_client import REGISTRY
        >>> collector = layerzero.telemetry.register_collectors(REGISTRY)   # now served by your own /metrics
        >>> collector.add(serving.runtime, {"dispatcher": "serving"})      # a dispatcher with its own config
    """
    collector = LayerZeroCollector(runtime, labels)
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
