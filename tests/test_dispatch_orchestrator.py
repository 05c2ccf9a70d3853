"""The orchestrator and the global dispatcher: mode routing (AUTO included), timing, telemetry, config."""

from __future__ import annotations

import sys

import pytest
import torch

import layerzero as lz
import layerzero.dispatch.dispatcher as dispatcher_mod
from layerzero.dispatch import (
    DispatchConfig,
    DispatchMode,
    DynamicDispatcher,
    create_dynamic_dispatcher,
    create_orchestrator,
    dispatch,
    get_global_dispatcher,
)
from layerzero.dispatch.result import NOT_TIMED
from layerzero.errors import ConfigError, NoKernelError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec


@pytest.fixture(autouse=True)
def detach_config_dispatcher():
    """The global config is restored by conftest; the config dispatcher a test attaches is detached here."""
    yield
    get_global_dispatcher().set_config_dispatcher(None)


def rms_ref(x, w, eps=1e-6):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.fixture
def norm_inputs():
    g = torch.Generator().manual_seed(9)
    return {"x": torch.randn(4, 32, generator=g), "weight": torch.rand(32, generator=g) + 0.5}


def test_global_dispatcher_is_one_object_on_the_global_runtime(norm_inputs):
    g = get_global_dispatcher()
    assert g is get_global_dispatcher() and g.runtime is get_runtime()
    r = dispatch("rms_norm", norm_inputs)
    torch.testing.assert_close(r.output.double(), rms_ref(norm_inputs["x"], norm_inputs["weight"]),
                               atol=1e-5, rtol=1e-5)
    assert r.mode == "dynamic"


def test_auto_routes_static_then_config_then_dynamic(norm_inputs):
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.AUTO,
                                           static_kernel_map={"rms_norm": "torch_rms_norm_composed"}))
    assert o.mode is DispatchMode.AUTO
    assert o.mode_for("rms_norm") is DispatchMode.STATIC
    assert o.mode_for("attention.causal") is DispatchMode.DYNAMIC
    r = o.dispatch("rms_norm", norm_inputs)
    assert (r.mode, r.kernel_id) == ("static", "torch_rms_norm_composed")
    assert o.resolve("rms_norm") is get_runtime().kernels.get("torch_rms_norm_composed").impl
    with pytest.raises(NoKernelError, match=r"dispatched in DYNAMIC mode.*static operations only"):
        o.resolve("attention.causal")
    # A loaded config takes every operation without a static entry.
    class StandInConfigDispatcher(DynamicDispatcher):  # stands in for the config-file dispatcher
        mode = DispatchMode.CONFIG

    cfg_d = StandInConfigDispatcher(get_runtime())
    o.set_config_dispatcher(cfg_d)
    assert o.mode_for("attention.causal") is DispatchMode.CONFIG
    assert o.mode_for("rms_norm") is DispatchMode.STATIC
    q = k = v = torch.randn(1, 2, 4, 8)
    assert o.dispatch("attention.causal", {"q": q, "k": k, "v": v}).mode == "config"
    o.set_config_dispatcher(None)
    assert o.mode_for("attention.causal") is DispatchMode.DYNAMIC
    # The global dispatcher follows the runtime's config (the orchestrator above set it).
    assert get_global_dispatcher().mode_for("rms_norm") is DispatchMode.STATIC


def test_strict_modes(norm_inputs):
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.STATIC, static_kernel_map={"rms_norm": "torch_rms_norm"}))
    assert o.dispatch("rms_norm", norm_inputs).mode == "static"
    with pytest.raises(NoKernelError, match=r"static dispatcher has no kernel for 'layer_norm'"):
        o.dispatch("layer_norm", norm_inputs)
    dyn = create_orchestrator(DispatchConfig(mode=DispatchMode.DYNAMIC, static_kernel_map={"rms_norm": "torch_rms_norm"}))
    assert dyn.mode_for("rms_norm") is DispatchMode.DYNAMIC
    cfg = create_orchestrator(DispatchConfig(mode=DispatchMode.CONFIG))
    with pytest.raises(ConfigError, match=r"dispatch mode CONFIG needs a config: set DispatchConfig.config_path"):
        cfg.dispatch("rms_norm", norm_inputs)


def test_bad_static_map_leaves_the_global_runtime_untouched(norm_inputs):
    before = get_runtime().config
    with pytest.raises(ConfigError, match=r"static_kernel_map\['rms_norm'\]: unknown kernel 'no_such_kernel'"):
        create_orchestrator(DispatchConfig(mode=DispatchMode.AUTO, static_kernel_map={"rms_norm": "no_such_kernel"}))
    assert get_runtime().config is before
    assert dispatch("rms_norm", norm_inputs).output.shape == norm_inputs["x"].shape


def test_orchestrator_on_private_registries(norm_inputs):
    kr = KernelRegistry()
    kr.register(KernelSpec("mine_rms", "rms_norm", "custom", lambda x, w, eps: rms_ref(x, w, eps).to(x.dtype)))
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.AUTO), kr, BackendRegistry(), use_mvcc_cache=True)
    assert o.runtime is not get_runtime()
    r = o.dispatch("rms_norm", norm_inputs)
    assert (r.kernel_id, r.mode) == ("mine_rms", "dynamic")
    assert o.get_telemetry().cache_stats.size == 1


def test_timing_recorded_by_default_and_never_when_off(norm_inputs, monkeypatch):
    assert DispatchConfig().record_timing and get_runtime().config.record_timing
    for _ in range(2):  # a miss, then a hit
        r = dispatch("rms_norm", norm_inputs)
        t = r.timing
        assert t.recorded
        assert t.cache_lookup_ns > 0 and t.kernel_invoke_ns > 0
        # the miss builds the context apart; the hit (the hot path) builds no context: its key and the cache read
        # are one step, its lookup (the seed's profiling snippet prints it)
        assert t.context_build_ns > 0 if not r.cached else t.context_build_ns == 0
        assert t.total_us >= t.selection_us + t.kernel_invoke_ns / 1000.0 - 1e-6
        assert t.execution_us * 1000.0 >= t.kernel_invoke_ns - 1
    assert get_runtime().telemetry.kernels[r.kernel_id].latency_count == 0  # the histogram is opt-in

    get_runtime().configure(get_runtime().config.replace(record_timing=False))

    def no_clock() -> int:
        raise AssertionError("a clock was read with record_timing=False")

    monkeypatch.setattr(dispatcher_mod, "perf_ns", no_clock)
    monkeypatch.setattr("time.perf_counter_ns", no_clock)
    monkeypatch.setattr("time.perf_counter", no_clock)
    for _ in range(2):
        r = dispatch("rms_norm", norm_inputs)
        assert r.timing is NOT_TIMED and r.timing.total_us == 0.0


def test_telemetry_counts_and_hit_rate(norm_inputs):
    get_runtime().telemetry.reset()
    g = get_global_dispatcher()
    for _ in range(100):
        g.dispatch("rms_norm", norm_inputs)
    tel = g.get_telemetry()
    assert (tel.cache_stats.misses, tel.cache_stats.hits) == (1, 99)
    assert tel.cache_stats.hit_rate == pytest.approx(0.99)
    kid = g.dispatch("rms_norm", norm_inputs).kernel_id
    assert g.get_telemetry().kernel(kid).calls == 101
    assert tel.selections["rms_norm"] == {kid: 1}
    assert tel.cache_stats.capacity == get_runtime().config.cache_size


def test_telemetry_disabled_records_nothing(norm_inputs):
    kr = KernelRegistry()
    kr.register(KernelSpec("mine_rms", "rms_norm", "custom", lambda x, w, eps: rms_ref(x, w, eps).to(x.dtype)))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(enable_telemetry=False))
    for _ in range(5):
        d.dispatch("rms_norm", norm_inputs)
    tel = d.get_telemetry()
    assert not tel.enabled
    assert (tel.total_calls, tel.cache_stats.hits, tel.cache_stats.misses, tel.selections) == (0, 0, 0, {})


def test_stats_for_dispatchers_that_never_reload():
    s = get_global_dispatcher().stats
    assert (s.total_reloads, s.failed_reloads, s.last_reload_time_ms) == (0, 0, 0.0)


def test_auto_and_config_modes_load_the_config_file(tmp_path, norm_inputs):
    pytest.importorskip("layerzero.dispatch.config_driven")
    path = tmp_path / "dispatch.yaml"
    path.write_text('version: "1.0"\n'
                    'dispatch_rules:\n'
                    '  - operation: "rms_norm"\n'
                    '    kernel: torch_rms_norm_composed\n'
                    '    priority: 100\n')
    auto = create_orchestrator(DispatchConfig(mode=DispatchMode.AUTO, config_path=str(path),
                                              static_kernel_map={"layer_norm": "torch_layer_norm"}))
    assert auto.mode_for("rms_norm") is DispatchMode.CONFIG
    assert auto.mode_for("layer_norm") is DispatchMode.STATIC
    r = auto.dispatch("rms_norm", norm_inputs)
    assert (r.mode, r.kernel_id) == ("config", "torch_rms_norm_composed")
    torch.testing.assert_close(r.output.double(), rms_ref(norm_inputs["x"], norm_inputs["weight"]),
                               atol=1e-5, rtol=1e-5)
    assert dispatch("rms_norm", norm_inputs).kernel_id == "torch_rms_norm_composed"  # the global one follows
    assert lz.which("rms_norm", norm_inputs["x"], norm_inputs["weight"]) != "torch_rms_norm_composed"
    strict = create_orchestrator(DispatchConfig(mode=DispatchMode.CONFIG, config_path=str(path)))
    assert strict.dispatch("rms_norm", norm_inputs).mode == "config"
    assert strict.stats.total_reloads == 0


def test_hot_reload_mode_routes_to_the_watching_dispatcher(tmp_path, norm_inputs):
    pytest.importorskip("layerzero.dispatch.hot_reload")
    path = tmp_path / "dispatch.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm_composed}\n')
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.HOT_RELOAD, config_path=str(path),
                                           watch_interval_seconds=60.0))
    try:
        r = o.dispatch("rms_norm", norm_inputs)
        assert (r.mode, r.kernel_id) == ("hot_reload", "torch_rms_norm_composed")
        path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n')
        o.config_dispatcher().reload()
        assert o.dispatch("rms_norm", norm_inputs).kernel_id == "torch_rms_norm"
        assert o.stats.total_reloads >= 1
    finally:
        o.close()


def test_config_path_without_config_module_is_a_clear_error(tmp_path, norm_inputs, monkeypatch):
    monkeypatch.setitem(sys.modules, "layerzero.dispatch.config_driven", None)  # as if it were not installed
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.CONFIG, config_path=str(tmp_path / "lz.yaml")))
    with pytest.raises(ConfigError, match=r"needs layerzero.dispatch.config_driven.create_config_dispatcher"):
        o.dispatch("rms_norm", norm_inputs)


def test_env_overrides_reach_a_new_config(monkeypatch):
    monkeypatch.setenv("LAYERZERO_DISPATCH_MODE", "auto")
    monkeypatch.setenv("LAYERZERO_CACHE_SIZE", "2048")
    monkeypatch.setenv("LAYERZERO_RECORD_TIMING", "1")
    cfg = DispatchConfig.from_env()
    assert (cfg.mode, cfg.cache_size, cfg.record_timing) == (DispatchMode.AUTO, 2048, True)
    with pytest.raises(ValueError, match=r"DispatchConfig.cache_size: must be >= 0, got -1"):
        DispatchConfig(cache_size=-1)
