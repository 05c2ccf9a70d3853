"""Circuit breakers and fallback through dispatchers: every transition, shared state with lz.*, error reports."""

from __future__ import annotations

import logging

import pytest
import torch

import layerzero as lz
from layerzero.dispatch import (
    CircuitState,
    DispatchConfig,
    StaticDispatcherBuilder,
    create_dynamic_dispatcher,
    dispatch,
    get_global_dispatcher,
)
from layerzero.errors import AllKernelsFailedError, InvalidInputError, KernelNotFoundError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


class Flaky:
    """An rms_norm kernel that raises while ``failing`` is set, counting its calls."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls = 0

    def __call__(self, x, weight, eps):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.failing:
            raise RuntimeError("injected kernel fault")
        return torch.rms_norm(x, x.shape[-1:], weight, eps)


def rms_ref(x, w, eps=1e-6):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(5, 32, generator=g), "weight": torch.rand(32, generator=g) + 0.5}


def private(flaky: Flaky, clock: FakeClock, **cfg):
    kr = KernelRegistry()
    kr.register(KernelSpec("flaky_rms", "rms_norm", "custom", flaky, priority=90))
    kr.register(KernelSpec("plain_rms", "rms_norm", "custom",
                           lambda x, w, eps: rms_ref(x, w, eps).to(x.dtype), priority=10))
    config = DispatchConfig(failure_threshold=3, recovery_timeout_seconds=10.0, log_fallbacks=False, **cfg)
    return create_dynamic_dispatcher(kr, BackendRegistry(), config, clock=clock)


def test_every_breaker_transition(inputs):
    flaky, clock = Flaky(), FakeClock()
    d = private(flaky, clock)
    want = rms_ref(inputs["x"], inputs["weight"])
    # CLOSED: each failure falls back to the next kernel and the caller gets a correct result.
    for n in range(3):
        r = d.dispatch("rms_norm", inputs)
        assert (r.kernel_id, r.fallback_used, r.attempts) == ("plain_rms", True, 2)
        torch.testing.assert_close(r.output.double(), want, atol=1e-6, rtol=1e-6)
        if n < 2:
            assert d.get_circuit_stats("flaky_rms").state is CircuitState.CLOSED
    # CLOSED -> OPEN after failure_threshold=3 failures.
    st = d.get_circuit_stats("flaky_rms")
    assert (st.state, st.state_transitions, st.failures, st.successes) == (CircuitState.OPEN, 1, 3, 0)
    assert st.last_failure == "RuntimeError: injected kernel fault"
    # OPEN: the kernel is skipped without being called.
    calls = flaky.calls
    for _ in range(4):
        assert d.dispatch("rms_norm", inputs).kernel_id == "plain_rms"
    assert flaky.calls == calls
    clock.t += 9.9
    d.dispatch("rms_norm", inputs)
    assert flaky.calls == calls and d.get_circuit_stats("flaky_rms").state is CircuitState.OPEN
    # OPEN -> HALF_OPEN once recovery_timeout_seconds passed; the probe fails -> OPEN again.
    clock.t += 0.2
    r = d.dispatch("rms_norm", inputs)
    assert flaky.calls == calls + 1 and r.kernel_id == "plain_rms"
    st = d.get_circuit_stats("flaky_rms")
    assert st.state is CircuitState.OPEN and st.state_transitions == 3
    assert [t[:2] for t in st.transitions] == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "OPEN")]
    # HALF_OPEN -> CLOSED after a successful probe.
    flaky.failing = False
    clock.t += 10.5
    r = d.dispatch("rms_norm", inputs)
    assert (r.kernel_id, r.fallback_used) == ("flaky_rms", False)
    st = d.get_circuit_stats("flaky_rms")
    assert (st.state, st.state_transitions, st.successes) == (CircuitState.CLOSED, 5, 1)
    assert [t[:2] for t in st.transitions][-2:] == [("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")]
    # Back on the fast path: no fallback.
    assert d.dispatch("rms_norm", inputs).kernel_id == "flaky_rms"
    tel = d.get_telemetry()
    assert tel.kernel("flaky_rms").failures == 4
    assert tel.fallbacks[("rms_norm", "flaky_rms", "plain_rms")] >= 3
    assert tel.breaker_transitions[("flaky_rms", "CLOSED", "OPEN")] == 1


def test_failures_spread_over_time_do_not_open_the_breaker(inputs):
    flaky, clock = Flaky(), FakeClock()
    d = private(flaky, clock)
    for _ in range(5):
        d.dispatch("rms_norm", inputs)
        clock.t += 11.0  # each failure is older than recovery_timeout when the next one comes
    assert d.get_circuit_stats("flaky_rms").state is CircuitState.CLOSED


def test_all_kernels_failed_lists_each_attempt(inputs):
    kr = KernelRegistry()
    kr.register(KernelSpec("bad_a", "rms_norm", "custom", Flaky(), priority=90))

    def bad_b(x, w, eps):
        raise ValueError("kernel b has no tiles for this shape")

    kr.register(KernelSpec("bad_b", "rms_norm", "custom", bad_b, priority=80))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(log_fallbacks=False))
    with pytest.raises(AllKernelsFailedError, match=r"every kernel failed for rms_norm \(inputs: x=Tensor\(shape=\(5, 32\)") as err:
        d.dispatch("rms_norm", inputs)
    text = str(err.value)
    assert "bad_a: RuntimeError: injected kernel fault" in text
    assert "bad_b: ValueError: kernel b has no tiles for this shape" in text
    assert [kid for kid, _ in err.value.attempts] == ["bad_a", "bad_b"]
    assert isinstance(err.value, lz.LayerZeroError)


def test_max_fallback_attempts_and_disabled_fallback(inputs):
    kr = KernelRegistry()
    for i, prio in enumerate((90, 80, 70)):
        kr.register(KernelSpec(f"bad_{i}", "rms_norm", "custom", Flaky(), priority=prio))
    kr.register(KernelSpec("good", "rms_norm", "custom", Flaky(failing=False), priority=10))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(max_fallback_attempts=1, log_fallbacks=False))
    with pytest.raises(AllKernelsFailedError) as err:
        d.dispatch("rms_norm", inputs)
    assert [kid for kid, _ in err.value.attempts] == ["bad_0", "bad_1"]
    d3 = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(max_fallback_attempts=3,
                                                                         log_fallbacks=False))
    r = d3.dispatch("rms_norm", inputs)
    assert (r.kernel_id, r.attempts, r.fallback_used) == ("good", 4, True)
    off = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(enable_fallback=False, log_fallbacks=False))
    with pytest.raises(AllKernelsFailedError) as err:
        off.dispatch("rms_norm", inputs)
    assert [kid for kid, _ in err.value.attempts] == ["bad_0"]


def test_fallbacks_are_logged_once_per_event(inputs, caplog):
    flaky = Flaky()
    kr = KernelRegistry()
    kr.register(KernelSpec("flaky_rms", "rms_norm", "custom", flaky, priority=90))
    kr.register(KernelSpec("plain_rms", "rms_norm", "custom", Flaky(failing=False), priority=10))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(failure_threshold=100))
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        d.dispatch("rms_norm", inputs)
        d.dispatch("rms_norm", inputs)
    lines = [r.getMessage() for r in caplog.records if "injected kernel fault" in r.getMessage()]
    assert len(lines) == 2
    assert all("from_kernel=flaky_rms" in ln and "to_kernel=plain_rms" in ln for ln in lines)
    quiet = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(failure_threshold=100, log_fallbacks=False))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        quiet.dispatch("rms_norm", inputs)
    assert not [r for r in caplog.records if "injected kernel fault" in r.getMessage()]


def test_bad_input_is_not_counted_as_a_kernel_failure():
    kr = KernelRegistry()
    kr.register(KernelSpec("plain_rms", "rms_norm", "custom", Flaky(failing=False)))
    d = create_dynamic_dispatcher(kr, BackendRegistry())
    with pytest.raises(InvalidInputError, match=r"weight must have shape \(32,\)"):
        d.dispatch("rms_norm", {"x": torch.randn(2, 32), "weight": torch.rand(16)})
    assert d.get_circuit_stats("plain_rms").failures == 0


def _register_global_flaky(flaky: Flaky, name: str = "test_flaky_attention") -> None:
    def impl(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
        flaky.calls += 1
        if flaky.failing:
            raise RuntimeError("injected attention fault")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale=scale)

    lz.register_kernel(KernelSpec(name, "attention", "custom", impl, priority=999, platforms={"cpu"}))


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))


def test_breaker_opened_through_dispatch_is_open_for_lz_attention():
    flaky = Flaky()
    _register_global_flaky(flaky)
    rt = get_runtime()
    try:
        q, k, v = _qkv()
        threshold = rt.config.failure_threshold
        for _ in range(threshold):
            r = dispatch("attention.causal", {"q": q, "k": k, "v": v})
            assert r.fallback_used and r.kernel_id != "test_flaky_attention"
        assert get_global_dispatcher().get_circuit_stats("test_flaky_attention").state is CircuitState.OPEN
        calls = flaky.calls
        out = lz.attention(q, k, v, is_causal=True)  # cached plan: its breaker is open, so it skips the kernel
        q2, k2, v2 = _qkv(1)
        lz.attention(q2[:, :, :5], k2[:, :, :5], v2[:, :, :5], is_causal=True)  # new shape: selection skips it
        assert flaky.calls == calls
        assert lz.which("attention.causal", q2, k2, v2) != "test_flaky_attention"
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        lz.get_global_kernel_registry().unregister("test_flaky_attention")


def test_breaker_opened_through_lz_is_open_for_dispatch():
    flaky = Flaky()
    _register_global_flaky(flaky, "test_flaky_attention_b")
    rt = get_runtime()
    try:
        q, k, v = _qkv(2)
        for _ in range(rt.config.failure_threshold):
            lz.attention(q, k, v, is_causal=True)
        calls = flaky.calls
        r = dispatch("attention.causal", {"query": q, "key": k, "value": v})
        assert r.kernel_id != "test_flaky_attention_b" and flaky.calls == calls
        st = get_global_dispatcher().get_circuit_stats("test_flaky_attention_b")
        assert st.state is CircuitState.OPEN and st.failures == rt.config.failure_threshold
    finally:
        lz.get_global_kernel_registry().unregister("test_flaky_attention_b")


def test_static_fallbacks_and_breaker(inputs):
    flaky = Flaky()
    plain = Flaky(failing=False)
    d = (StaticDispatcherBuilder()
         .with_kernel(flaky, operation="rms_norm", default=True, kernel_id="flaky_rms")
         .with_kernel(plain, operation="rms_norm", kernel_id="plain_rms")
         .with_config(failure_threshold=2, log_fallbacks=False)
         .build())
    results = [d.dispatch("rms_norm", inputs) for _ in range(4)]
    assert [r.kernel_id for r in results] == ["plain_rms"] * 4
    assert all(r.fallback_used for r in results)
    assert flaky.calls == 2  # open after two failures: skipped since
    st = d.get_circuit_stats("flaky_rms")
    assert st.state is CircuitState.OPEN
    d.reset_circuit("flaky_rms")
    flaky.failing = False
    assert d.dispatch("rms_norm", inputs).kernel_id == "flaky_rms"


def test_circuit_stats_of_unknown_kernel():
    with pytest.raises(KernelNotFoundError, match=r"unknown kernel 'torch_sdpa_mth'; did you mean torch_sdpa_math"):
        get_global_dispatcher().get_circuit_stats("torch_sdpa_mth")
    st = get_global_dispatcher().get_circuit_stats("torch_sdpa_math")
    assert (st.state, st.state_transitions, st.failures, st.last_failure) == (CircuitState.CLOSED, 0, 0, None)


def test_breakers_disabled_keep_calling_the_failing_kernel(inputs):
    flaky, clock = Flaky(), FakeClock()
    d = private(flaky, clock, circuit_breaker_enabled=False)
    for _ in range(6):
        assert d.dispatch("rms_norm", inputs).kernel_id == "plain_rms"
    assert flaky.calls == 6
    assert d.get_circuit_stats("flaky_rms").state is CircuitState.CLOSED
