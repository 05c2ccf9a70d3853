"""OpenTelemetry export: an in-memory metric reader sees the Prometheus counts; spans for selection and fallback."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

# Optional dependencies: without them the module is skipped (not a collection error, e.g. under pytest -m gpu).
pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero import telemetry  # noqa: E402
from layerzero.registry import get_global_kernel_registry  # noqa: E402
from layerzero.spec import KernelSpec  # noqa: E402
from layerzero.telemetry.families import FAMILIES  # noqa: E402


@pytest.fixture
def otel(runtime):
    runtime.telemetry.reset()
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    handle = telemetry.enable_otel(meter_provider=MeterProvider(metric_readers=[reader]),
                                   tracer_provider=tracer_provider)
    yield handle, reader, exporter, tracer_provider
    handle.disable()
    runtime.telemetry.reset()


@pytest.fixture
def broken_silu():
    def broken(x):
        raise RuntimeError("simulated silu crash")

    spec = KernelSpec("custom_broken_silu", "silu", "custom", broken, priority=1000)
    lz.register_kernel(spec)
    yield spec
    get_global_kernel_registry().unregister(spec.kernel_id)


def otel_points(reader: InMemoryMetricReader) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            if sm.scope.name != "layerzero":
                continue
            for m in sm.metrics:
                for p in m.data.data_points:
                    out.setdefault(m.name, {})[tuple(sorted(p.attributes.items()))] = p.value
    return out


def prom_points() -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(telemetry.metrics_text()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_otel_reader_sees_the_prometheus_counts(otel, broken_silu, runtime):
    handle, reader, _, _ = otel
    assert handle.enabled and "layerzero.dispatch.calls" in handle.instruments
    x = torch.randn(3, 16)
    for _ in range(3):
        torch.testing.assert_close(lz.silu(x).double(), torch.nn.functional.silu(x.double()), atol=1e-6, rtol=1e-5)
    w = torch.randn(16)
    for _ in range(4):
        lz.rms_norm(x, w)
    runtime.telemetry.record_reload(True, source="test")
    prom = prom_points()
    got = otel_points(reader)
    from layerzero.runtime import get_runtime
    from layerzero.telemetry.families import read_families

    fams = {f.prom: f for f in read_families(get_runtime())}
    compared = 0
    for name in FAMILIES:
        fam = fams[name]
        if fam.kind == "histogram":
            continue
        otel_name = fam.otel
        prom_series = prom.get(name, {})
        otel_series = got.get(otel_name, {})
        assert otel_series == prom_series, name
        compared += len(prom_series)
    assert compared > 20
    assert got["layerzero.fallbacks"][(("from_kernel", "custom_broken_silu"), ("operation", "silu"),
                                       ("to_kernel", "torch_silu"))] == 3
    assert got["layerzero.dispatch.calls"][(("kernel", "torch_rms_norm"), ("operation", "rms_norm"))] == 4
    assert got["layerzero.cache.misses"][()] == 2
    assert got["layerzero.config.reloads"][(("result", "success"),)] == 1


def test_spans_for_selection_and_fallback(otel, broken_silu):
    _, _, exporter, tracer_provider = otel
    tracer = tracer_provider.get_tracer("app")
    x = torch.randn(2, 8)
    with tracer.start_as_current_span("request") as request:
        lz.silu(x)  # miss: select, then the broken kernel falls back
        lz.silu(x)  # cached: fast path fails, falls back again
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("layerzero.select") == 1
    assert names.count("layerzero.fallback") == 2
    select = next(s for s in spans if s.name == "layerzero.select")
    assert select.attributes["layerzero.operation"] == "silu"
    assert select.attributes["layerzero.kernel"] == "custom_broken_silu"
    assert "hidden_size=8" in select.attributes["layerzero.context"]
    assert select.parent is not None and select.parent.span_id == request.get_span_context().span_id
    assert select.end_time >= select.start_time
    fb = next(s for s in spans if s.name == "layerzero.fallback")
    assert fb.attributes["layerzero.from_kernel"] == "custom_broken_silu"
    assert fb.attributes["layerzero.to_kernel"] == "torch_silu"
    assert fb.attributes["layerzero.error.type"] == "RuntimeError"


def test_cached_calls_make_no_spans(otel):
    _, _, exporter, _ = otel
    x = torch.randn(2, 8)
    for _ in range(500):
        lz.gelu(x)
    assert [s.name for s in exporter.get_finished_spans()] == ["layerzero.select"]


def test_disable_stops_spans_and_hooks(otel, runtime):
    handle, _, exporter, _ = otel
    handle.disable()
    assert not handle.enabled
    assert not any(getattr(h, "__self__", None).__class__.__name__ == "_Spans" for h in runtime.on_miss)
    lz.silu(torch.randn(2, 4))
    assert exporter.get_finished_spans() == ()


def test_enabling_again_replaces_the_previous_setup(otel):
    first, _, exporter1, _ = otel
    exporter2 = InMemorySpanExporter()
    tp2 = TracerProvider()
    tp2.add_span_processor(SimpleSpanProcessor(exporter2))
    second = telemetry.enable_otel(meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
                                   tracer_provider=tp2)
    try:
        assert not first.enabled and second.enabled
        lz.silu(torch.randn(3, 4))
        assert len(exporter1.get_finished_spans()) == 0
        assert [s.name for s in exporter2.get_finished_spans()] == ["layerzero.select"]
    finally:
        second.disable()


def test_without_opentelemetry_it_is_a_noop_with_a_clear_message(monkeypatch, caplog, runtime):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # makes `import opentelemetry...` raise ImportError
    hooks = list(runtime.on_miss)
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        handle = telemetry.enable_otel()
    assert not handle.enabled
    assert "OpenTelemetry is not installed" in handle.reason and "pip install 'layerzero[otel]'" in handle.reason
    assert any("OpenTelemetry is not installed" in r.getMessage() for r in caplog.records)
    assert runtime.on_miss == hooks
    handle.disable()  # harmless
