"""Prometheus export: a real /metrics endpoint, the collector on an application registry, stable names."""

from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import layerzero as lz
from layerzero import telemetry
from layerzero.runtime.config import DispatchConfig
from layerzero.registry import get_global_kernel_registry
from layerzero.spec import KernelSpec
from layerzero.telemetry.families import FAMILIES

EXPECTED_FAMILIES = (
    "layerzero_dispatch_total", "layerzero_selections_total", "layerzero_fallback_total",
    "layerzero_kernel_failures_total", "layerzero_kernel_errors_total", "layerzero_cache_hits_total",
    "layerzero_cache_misses_total", "layerzero_cache_evictions_total", "layerzero_cache_invalidations_total",
    "layerzero_cache_size", "layerzero_cache_capacity", "layerzero_circuit_state",
    "layerzero_breaker_transitions_total", "layerzero_config_reloads_total", "layerzero_tuning_runs_total",
    "layerzero_policy_changes_total", "layerzero_telemetry_enabled", "layerzero_kernel_latency_seconds",
)


def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.fixture
def tel(runtime):
    runtime.telemetry.reset()
    yield runtime.telemetry
    runtime.telemetry.reset()


@pytest.fixture
def broken_rms_norm():
    """A high-priority rms_norm kernel that always raises, so calls fall back to torch_rms_norm."""

    def broken(x, weight, eps):
        raise RuntimeError("simulated kernel crash")

    spec = KernelSpec("custom_broken_rms", "rms_norm", "custom", broken, priority=1000)
    lz.register_kernel(spec)
    yield spec
    get_global_kernel_registry().unregister(spec.kernel_id)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_metric_names_are_stable():
    assert FAMILIES == EXPECTED_FAMILIES
    text = telemetry.metrics_text()
    for name in EXPECTED_FAMILIES:
        assert f"# TYPE {name} " in text, name


def test_scrape_real_endpoint_after_dispatches(tel):
    x, w = torch.randn(3, 64), torch.randn(64)
    for _ in range(7):
        y = lz.rms_norm(x, w)
    torch.testing.assert_close(y.double(), rms_ref(x, w), atol=1e-5, rtol=1e-5)
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 4, 8, 16)
    for _ in range(3):
        lz.attention(q, k, k, is_causal=True)
    kernel = lz.which("attention.causal", q, k, k)
    with telemetry.start_metrics_server(0) as server:
        assert server.addr == "127.0.0.1"
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    found = samples(text)
    assert value(found, "layerzero_dispatch_total", operation="rms_norm", kernel="torch_rms_norm") == 7
    assert value(found, "layerzero_dispatch_total", operation="attention.causal", kernel=kernel) == 3
    assert value(found, "layerzero_selections_total", operation="rms_norm", kernel="torch_rms_norm") == 1
    assert value(found, "layerzero_cache_misses_total") == 2
    assert value(found, "layerzero_cache_hits_total") == 8
    assert value(found, "layerzero_cache_size") >= 2
    assert value(found, "layerzero_circuit_state", kernel="torch_rms_norm") == 0
    assert value(found, "layerzero_telemetry_enabled") == 1
    assert ("process_cpu_seconds_total", ()) in found or any(n.startswith("python_") for n, _ in found)


def test_fallback_failures_and_breaker_are_counted(tel, runtime, broken_rms_norm):
    x, w = torch.randn(5, 32), torch.randn(32)
    threshold = runtime.config.failure_threshold
    for _ in range(threshold + 2):
        y = lz.rms_norm(x, w)
        torch.testing.assert_close(y.double(), rms_ref(x, w), atol=1e-5, rtol=1e-5)
    found = samples(telemetry.metrics_text())
    key = dict(operation="rms_norm", from_kernel="custom_broken_rms", to_kernel="torch_rms_norm")
    # Each failure before the breaker opened fell back; once open the kernel is skipped, not retried.
    assert value(found, "layerzero_fallback_total", **key) == threshold
    assert value(found, "layerzero_kernel_failures_total", kernel="custom_broken_rms") == threshold
    assert value(found, "layerzero_kernel_errors_total", error="RuntimeError") == threshold
    assert value(found, "layerzero_circuit_state", kernel="custom_broken_rms") == 2
    assert value(found, "layerzero_breaker_transitions_total", kernel="custom_broken_rms", **{"from": "CLOSED",
                                                                                              "to": "OPEN"}) == 1
    assert value(found, "layerzero_dispatch_total", operation="rms_norm", kernel="torch_rms_norm") == threshold + 2
    # user calls = invocations - fallback attempts; one of them selected
    assert value(found, "layerzero_cache_misses_total") == 1
    assert value(found, "layerzero_cache_hits_total") == threshold + 1


def test_register_collectors_on_application_registry(tel):
    registry = CollectorRegistry()
    collector = telemetry.register_collectors(registry)
    x = torch.randn(2, 16)
    lz.silu(x)
    lz.silu(x)
    assert registry.get_sample_value("layerzero_dispatch_total", {"operation": "silu", "kernel": "torch_silu"}) == 2
    assert registry.get_sample_value("layerzero_cache_hits_total") == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        telemetry.register_collectors(registry)
    registry.unregister(collector)
    assert registry.get_sample_value("layerzero_cache_hits_total") is None


def test_per_operation_series_and_kernel_totals(tel):
    q = torch.randn(1, 2, 4, 8)
    lz.attention(q, q, q, is_causal=True)
    lz.attention(q, q, q)
    causal = lz.which("attention.causal", q, q, q)
    full = lz.which("attention.full", q, q, q)
    stats = {(s.operation, s.kernel_id): s.calls for s in tel.kernel_operations()}
    assert stats[("attention.causal", causal)] == 1
    assert stats[("attention.full", full)] == 1
    if causal == full:  # one kernel, two series; the per-kernel view sums them
        assert tel.kernels[causal].calls == 2


def test_latency_histogram_when_asked(tel, runtime):
    old = runtime.config
    runtime.configure(old.replace(latency_histogram=True))
    try:
        x = torch.randn(4, 128)
        for _ in range(6):
            lz.gelu(x)
        found = samples(telemetry.metrics_text())
    finally:
        runtime.configure(old)
    labels = dict(operation="gelu", kernel="torch_gelu")
    assert value(found, "layerzero_kernel_latency_seconds_count", **labels) == 6
    assert value(found, "layerzero_kernel_latency_seconds_sum", **labels) > 0
    buckets = sorted((float(dict(lbl)["le"]), v) for (n, lbl), v in found.items()
                     if n == "layerzero_kernel_latency_seconds_bucket" and dict(lbl)["kernel"] == "torch_gelu")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 6  # cumulative, +Inf holds every sample


def test_telemetry_disabled_counts_nothing(tel, runtime):
    old = runtime.config
    runtime.configure(DispatchConfig(enable_telemetry=False))
    try:
        x = torch.randn(2, 8)
        lz.silu(x)
        lz.silu(x)
        found = samples(telemetry.metrics_text())
    finally:
        runtime.configure(old)
    assert value(found, "layerzero_telemetry_enabled") == 0
    assert ("layerzero_dispatch_total", (("kernel", "torch_silu"), ("operation", "silu"))) not in found \
        or value(found, "layerzero_dispatch_total", operation="silu", kernel="torch_silu") == 0


def test_telemetry_disabled_counts_no_breaker_reload_tuning_or_policy_event(tel, runtime, broken_rms_norm):
    """``enable_telemetry=False`` records nothing: breaker transitions, reloads, tuning runs, policy changes and
    invalidations were still counted and exported (beside ``layerzero_telemetry_enabled 0``)."""
    old = runtime.config
    runtime.configure(DispatchConfig(enable_telemetry=False, failure_threshold=2))
    tel.reset()
    try:
        x, w = torch.randn(2, 8), torch.rand(8) + 0.5
        for _ in range(3):
            lz.rms_norm(x, w)
        assert str(runtime.breakers.get("custom_broken_rms").state) != "CLOSED"
        tel.record_reload(True, source="a.yaml")
        tel.record_tuning_run(operation="rms_norm", winner="torch_rms_norm")
        lz.lock("rms_norm", "torch_rms_norm").undo()
        found = samples(telemetry.metrics_text())
        assert not tel.breaker_transitions and tel.reloads == tel.tuning_runs == tel.policy_changes == 0
        assert tel.cache_invalidations == 0
    finally:
        runtime.configure(old)
    assert not [k for k, v in found.items() if k[0].startswith(("layerzero_breaker", "layerzero_config_reloads",
                                                                 "layerzero_tuning", "layerzero_policy")) and v]


def test_a_kernel_that_declines_is_no_cache_hit(tel, runtime):
    """A kernel raising ``KernelDeclinedError`` hands each cached call to the next kernel: two kernel calls, one
    cache hit (hits were derived as calls - fallbacks - misses and counted the handoff as a hit)."""
    from layerzero.errors import KernelDeclinedError

    def declining(x, approximate):  # type: ignore[no-untyped-def]
        raise KernelDeclinedError("too big for me")

    lz.register_kernel(KernelSpec("custom_declining_gelu", "gelu", "custom", declining, priority=1000))
    try:
        x = torch.randn(2, 8)
        for _ in range(10):
            lz.gelu(x)
        stats = tel.cache_stats
    finally:
        get_global_kernel_registry().unregister("custom_declining_gelu")
    assert (stats.hits, stats.misses) == (9, 1)
    found = samples(telemetry.metrics_text())
    assert value(found, "layerzero_cache_hits_total") == 9


def test_a_kernel_error_whose_message_cannot_be_read_still_falls_back(tel, runtime):
    class Unprintable(RuntimeError):
        def __str__(self) -> str:
            raise ValueError("cannot render")

    def broken(x, approximate):  # type: ignore[no-untyped-def]
        raise Unprintable()

    lz.register_kernel(KernelSpec("custom_unprintable_gelu", "gelu", "custom", broken, priority=1000))
    try:
        x = torch.randn(2, 8)
        for _ in range(runtime.config.failure_threshold + 1):
            torch.testing.assert_close(lz.gelu(x), torch.nn.functional.gelu(x))
        assert "message could not be read" in str(runtime.breakers.get("custom_unprintable_gelu").stats().last_failure)
    finally:
        get_global_kernel_registry().unregister("custom_unprintable_gelu")


def test_reload_and_tuning_counters(tel):
    tel.record_reload(True, source="a.yaml")
    tel.record_reload(False, source="b.yaml", error="dispatch_rules[0].priority: must be between 0 and 1000")
    tel.record_tuning_run(operation="rms_norm", winner="torch_rms_norm")
    found = samples(telemetry.metrics_text())
    assert value(found, "layerzero_config_reloads_total", result="success") == 1
    assert value(found, "layerzero_config_reloads_total", result="failure") == 1
    assert value(found, "layerzero_tuning_runs_total") == 1


def test_metrics_text_for_a_private_runtime():
    from layerzero.runtime import Runtime

    rt = Runtime(config=DispatchConfig(cache_size=7))
    text = telemetry.metrics_text(rt)
    assert "layerzero_cache_capacity 7.0" in text
    assert "process_" not in text


def test_start_metrics_server_rejects_bad_port():
    with pytest.raises(ValueError, match="port must be an int between 0 and 65535, got 70000"):
        telemetry.start_metrics_server(70000)


def test_scrapes_add_nothing_to_the_call_path(tel):
    """Exporters read at scrape time: cached calls emit no events for any listener."""
    events: list[str] = []
    tel.add_listener(lambda e, a: events.append(e))
    x = torch.randn(2, 32)
    lz.silu(x)  # miss: one selection event
    first = list(events)
    for _ in range(1000):
        lz.silu(x)
    assert events == first == ["selection"]


def test_dispatch_and_ops_share_one_registry(tel):
    from layerzero.dispatch import dispatch

    x, w = torch.randn(6, 48), torch.randn(48)
    for _ in range(3):
        result = dispatch("rms_norm", {"x": x, "weight": w})
    for _ in range(2):
        lz.rms_norm(x, w)
    torch.testing.assert_close(result.output.double(), rms_ref(x, w), atol=1e-5, rtol=1e-5)
    found = samples(telemetry.metrics_text())
    assert value(found, "layerzero_dispatch_total", operation="rms_norm", kernel=result.kernel_id) == 5
    assert value(found, "layerzero_cache_hits_total") + value(found, "layerzero_cache_misses_total") == 5


def test_an_unregistered_kernel_leaves_no_breaker_or_counters_behind(tel, runtime):
    """An open breaker of a removed kernel was exported as fenced off for good (the documented alert never
    cleared), and kernels churned through the registry grew the counters without bound."""
    def broken(x, approximate):  # type: ignore[no-untyped-def]
        raise RuntimeError("no")

    x = torch.randn(2, 8)
    for n in range(3):
        kid = f"custom_churned_gelu_{n}"
        lz.register_kernel(KernelSpec(kid, "gelu", "custom", broken, priority=1000))
        for _ in range(runtime.config.failure_threshold + 1):
            lz.gelu(x)
        assert value(samples(telemetry.metrics_text()), "layerzero_circuit_state", kernel=kid) == 2
        calls = tel.total_calls
        get_global_kernel_registry().unregister(kid)
        assert tel.total_calls == calls  # the totals keep what the kernel ran
        found = samples(telemetry.metrics_text())
        assert not [k for k in found if ("kernel", kid) in k[1] and k[0] in (
            "layerzero_circuit_state", "layerzero_dispatch_total", "layerzero_selections_total")]
        assert kid not in runtime.breakers.all() and kid not in tel.kernels


def test_a_dispatcher_with_its_own_config_is_exported_beside_the_global_runtime(tel):
    """A dispatcher with a config of its own counts in its own runtime; registered with a label of its own it is
    exported beside the global runtime in one registry (without a label the two collide)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from layerzero.dispatch import create_dynamic_dispatcher

    d = create_dynamic_dispatcher(config=DispatchConfig(cache_size=50000))
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    for _ in range(5):
        d.dispatch("rms_norm", {"x": x, "weight": w})
    lz.rms_norm(x, w)
    reg = CollectorRegistry()
    collector = telemetry.register_collectors(reg)
    collector.add(d.runtime, {"dispatcher": "serving"})
    found = samples(generate_latest(reg).decode())
    assert value(found, "layerzero_dispatch_total", operation="rms_norm", kernel="torch_rms_norm",
                 dispatcher="serving") == 5
    assert value(found, "layerzero_dispatch_total", operation="rms_norm", kernel="torch_rms_norm",
                 dispatcher="") >= 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # a second collector of the same names
        telemetry.register_collectors(reg, d.runtime)
    del collector
    # layerzero's own registry (metrics_text, the metrics server): add_runtime
    telemetry.add_runtime(d.runtime, {"dispatcher": "serving"})
    try:
        found = samples(telemetry.metrics_text())
    finally:
        telemetry.remove_runtime(d.runtime)
    assert value(found, "layerzero_dispatch_total", operation="rms_norm", kernel="torch_rms_norm",
                 dispatcher="serving") == 5
    assert "dispatcher=" not in telemetry.metrics_text()
    with pytest.raises(ValueError, match="labels must tell"):
        telemetry.add_runtime(d.runtime, {})


def test_churned_kernels_and_unbounded_operation_names_keep_telemetry_bounded(tel, runtime):
    """A failing kernel churned through the registry left its fallback pairs and breaker transitions behind;
    a custom operation's sub-names (``my.op.<tag>``) each made counters: both are bounded now, the totals kept."""
    from layerzero.dispatch import dispatch
    from layerzero.telemetry.core import MAX_OPERATIONS

    def broken(x, approximate):  # type: ignore[no-untyped-def]
        raise RuntimeError("no")

    x = torch.randn(2, 8)
    for n in range(5):
        lz.register_kernel(KernelSpec(f"custom_gone_gelu_{n}", "gelu", "custom", broken, priority=1000))
        for _ in range(runtime.config.failure_threshold + 1):
            lz.gelu(x)
        get_global_kernel_registry().unregister(f"custom_gone_gelu_{n}")
    assert not tel.fallback_pairs and not tel.breaker_transitions
    assert tel.total_fallbacks == 5 * runtime.config.failure_threshold  # the totals keep them

    def my_op(x):  # type: ignore[no-untyped-def]
        return x + 1

    lz.register_kernel(KernelSpec("user_tagged_op", "my.op", "custom", my_op))
    try:
        for i in range(MAX_OPERATIONS + 50):
            dispatch(f"my.op.v{i}", {"x": x})
        assert len(tel._kernel_ops["user_tagged_op"]) <= MAX_OPERATIONS + 1
    finally:
        get_global_kernel_registry().unregister("user_tagged_op")
