"""OpenTelemetry export through the OpenTelemetry API (the optional ``otel`` extra).

:func:`enable_otel` registers observable instruments that read the same
families as the Prometheus collector (:mod:`layerzero.telemetry.families`)
when the SDK collects, so both report the same counts, and, when a tracer
provider is in play, records spans for the slow-path events:

* ``layerzero.select``: one per kernel selection (a plan-cache miss), from
  the miss to the chosen kernel, with the operation, kernel and context;
* ``layerzero.fallback``: one per fallback, with the failing kernel, its
  error type and the kernel the call moved to.

Spans are children of whatever span is current in the caller (a request
span, say). The cached call path is untouched: nothing here runs per call.
Without ``opentelemetry`` installed, :func:`enable_otel` logs how to install
it and returns a disabled handle.

Observable instruments cannot carry histograms, so the latency histogram is
exported as ``layerzero.kernel.latency.count`` and ``layerzero.kernel.latency.sum``
(seconds); Prometheus has the full buckets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerzero import forksafe
from layerzero.telemetry.families import Family, read_families
from layerzero.telemetry.logs import logger

if TYPE_CHECKING:
    from layerzero.context import SelectionContext
    from layerzero.runtime import Runtime

__all__ = ["enable_otel", "OTelHandle", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'layerzero[otel]'  (or: pip install opentelemetry-api opentelemetry-sdk)"


@dataclass
class OTelHandle:
    """What :func:`enable_otel` set up. ``disable()`` stops metrics and spans."""

    enabled: bool
    reason: str | None = None
    metrics: bool = False
    traces: bool = False
    instruments: list[str] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def disable(self) -> None:
        """Stop reporting: observable callbacks yield nothing and no more spans are made."""
        self.enabled = False
        for fn in self._undo:
            fn()
        self._undo.clear()


class _Binding:
    """The instruments of one meter; callbacks read whichever runtime the newest handle follows."""

    def __init__(self) -> None:
        self.runtime: Callable[[], Runtime] | None = None
        self.instruments: list[str] = []

    def observe(self, family: str, which: str | None = None) -> Callable[[Any], Iterator[Any]]:
        from opentelemetry.metrics import Observation

        def callback(options: Any) -> Iterator[Any]:
            get = self.runtime
            if get is None:
                return
            fam = _family(read_families(get()), family)
            for labels, value in fam.samples:
                attrs = dict(zip(fam.labels, labels, strict=True))
                if which == "count":
                    value = value.count
                elif which == "sum":
                    value = value.sum
                yield Observation(value, attrs)

        return callback


def _family(families: list[Family], name: str) -> Family:
    for fam in families:
        if fam.prom == name:
            return fam
    raise LookupError(f"layerzero metric family {name!r} is not defined")


_bindings: dict[int, tuple[Any, _Binding]] = {}
_bindings_lock = forksafe.module_lock()
_current: OTelHandle | None = None


def _bind_meter(meter_provider: Any) -> _Binding:
    from opentelemetry import metrics

    import layerzero

    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _bindings_lock:
        found = _bindings.get(id(provider))
        if found is not None and found[0] is provider:
            return found[1]
        binding = _Binding()
        meter = provider.get_meter("layerzero", layerzero.__version__)
        for fam in read_families(_global_runtime()):
            if fam.kind == "histogram":
                for which in ("count", "sum"):
                    name = f"{fam.otel}.{which}"
                    meter.create_observable_counter(name, callbacks=[binding.observe(fam.prom, which)],
                                                    unit="{sample}" if which == "count" else fam.unit,
                                                    description=f"{fam.help} ({which})")
                    binding.instruments.append(name)
                continue
            create = meter.create_observable_counter if fam.kind == "counter" else meter.create_observable_gauge
            create(fam.otel, callbacks=[binding.observe(fam.prom)], unit=fam.unit, description=fam.help)
            binding.instruments.append(fam.otel)
        _bindings[id(provider)] = (provider, binding)
        return binding


def _global_runtime() -> Runtime:
    from layerzero.runtime import get_runtime

    return get_runtime()


class _Spans:
    """Turns the runtime's slow-path events into spans (one thread-local slot per pending event)."""

    def __init__(self, tracer: Any, rt: Runtime) -> None:
        self.tracer = tracer
        self.rt = rt
        self.local = threading.local()

    def on_miss(self, operation: str, ctx: SelectionContext) -> None:
        self.local.miss = (time.time_ns(), operation, ctx)

    def on_event(self, event: str, attrs: dict[str, Any]) -> None:
        if event == "selection":
            pending = getattr(self.local, "miss", None)
            self.local.miss = None
            if pending is None or pending[1] != attrs["operation"]:
                return
            from layerzero.selection.engine import format_context

            t0, operation, ctx = pending
            span = self.tracer.start_span("layerzero.select", start_time=t0, attributes={
                "layerzero.operation": operation, "layerzero.kernel": attrs["kernel"],
                "layerzero.device": str(ctx.device), "layerzero.dtype": ctx.dtype_name or "",
                "layerzero.context": format_context(operation, ctx)})
            span.end()
        elif event == "failure":
            self.local.failure = (time.time_ns(), attrs.get("error", ""))
        elif event == "fallback":
            t0, error = getattr(self.local, "failure", None) or (time.time_ns(), "")
            self.local.failure = None
            span = self.tracer.start_span("layerzero.fallback", start_time=t0, attributes={
                "layerzero.operation": attrs["operation"], "layerzero.from_kernel": attrs["from_kernel"],
                "layerzero.to_kernel": attrs["to_kernel"], "layerzero.error.type": error})
            span.end()


_lock = forksafe.module_lock()
_current: OTelHandle | None = None


def enable_otel(meter_provider: Any = None, tracer_provider: Any = None, *, runtime: Runtime | None = None,
                metrics: bool = True, traces: bool = True) -> OTelHandle:
    """Export layerzero's counts as OpenTelemetry metrics and its selections / fallbacks as spans.

    Args:
        meter_provider: an SDK ``MeterProvider``; defaults to the global one (``metrics.get_meter_provider()``).
        tracer_provider: a ``TracerProvider``; defaults to the global one.
        runtime: the runtime to follow; defaults to the global runtime shared by ``lz.*`` and dispatchers.
        metrics / traces: turn either half off.

    Calling it again replaces the previous setup (its handle is disabled).

    Returns:
        An :class:`OTelHandle`; ``handle.enabled`` is False (with ``handle.reason``) when OpenTelemetry
        is not installed, in which case nothing else happens.

    Example:
        >>> from opentelemetry.sdk.metrics import MeterProvider
        >>> handle = layerzero.telemetry.enable_otel(meter_provider=MeterProvider(metric_readers=[reader]))
    """
    try:
        import opentelemetry.metrics  # noqa: F401
        import opentelemetry.trace
    except ImportError:
        reason = f"OpenTelemetry is not installed, so layerzero exports nothing to it; {INSTALL_HINT}"
        logger.warning("%s", reason)
        return OTelHandle(False, reason)
    global _current
    rt = runtime
    handle = OTelHandle(True, metrics=metrics, traces=traces)
    with _lock:
        if _current is not None:  # the newest call replaces the previous setup (no doubled spans)
            _current.disable()
        _current = handle
        if metrics:
            binding = _bind_meter(meter_provider)
            binding.runtime = (lambda: rt) if rt is not None else _global_runtime
            handle.instruments = list(binding.instruments)

            def stop_metrics() -> None:
                binding.runtime = None

            handle._undo.append(stop_metrics)
        if traces:
            import layerzero

            provider = tracer_provider if tracer_provider is not None else opentelemetry.trace.get_tracer_provider()
            target = rt if rt is not None else _global_runtime()
            spans = _Spans(provider.get_tracer("layerzero", layerzero.__version__), target)
            target.on_miss.append(spans.on_miss)
            target.telemetry.add_listener(spans.on_event)

            def stop_traces() -> None:
                if spans.on_miss in target.on_miss:
                    target.on_miss.remove(spans.on_miss)
                target.telemetry.remove_listener(spans.on_event)

            handle._undo.append(stop_traces)
    return handle
