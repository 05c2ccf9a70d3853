"""Fault injection: broken kernels, registered as real user kernels, are fenced off by their breakers.

Every fault is a real kernel registered with top priority through ``lz.register_kernel`` (nothing of
layerzero is mocked): it computes the right answer with PyTorch and then breaks it in one way -- it
raises, returns the wrong shape or dtype, or (caught in verify mode) returns NaN or wrong values. For
each fault, through ``lz.*`` and through ``dispatch()``, the tests check that

* every call still returns a correct result (against a float64 reference written out here);
* the breaker opens (at ``failure_threshold`` for a kernel that raises; at once for an invalid
  result, which the cached fast path could not see) and the kernel is no longer called;
* the failure is counted (telemetry, circuit stats) and logged once per event, never per call;
* selection leaves the kernel out while it is quarantined; once the recovery timeout has passed the
  next call probes it: a failing probe quarantines it again, a passing one brings it back.

Time is a fake clock on the runtime's breaker board: no sleeps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from doc_pages import page
from log_lines import LogLines
import layerzero as lz
from layerzero.dispatch import CircuitState, DispatchConfig, create_dynamic_dispatcher, dispatch, get_global_dispatcher
from layerzero.errors import AllKernelsFailedError, KernelExecutionError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import Runtime, get_runtime
from layerzero.spec import KernelSpec, ReasonCode

THRESHOLD = 3
TIMEOUT = 10.0
EPS = 1e-6
KINDS = ("raises", "wrong_shape", "wrong_dtype", "nan", "wrong_values")
VERIFY_KINDS = ("nan", "wrong_values")  # only verify mode can see these


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- float64 references, written out -------------------------------------------------------------------------

def rms_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def causal_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = (q64 @ k64.transpose(-2, -1)) / q.shape[-1] ** 0.5
    sq, sk = q.shape[2], k.shape[2]
    keep = torch.ones(sq, sk, dtype=torch.bool).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v64


def assert_correct(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# -- the operation families under test ------------------------------------------------------------------------

class Family:
    """How to build inputs, call, and check one operation family, through lz.* and through dispatch()."""

    def __init__(self, name: str, operation: str, spec_operation: str, good: Callable[..., torch.Tensor],
                 make: Callable[[torch.Generator, int], tuple[torch.Tensor, ...]],
                 ref: Callable[..., torch.Tensor], via_lz: Callable[..., torch.Tensor],
                 inputs: Callable[..., dict[str, Any]]) -> None:
        self.name, self.operation, self.spec_operation = name, operation, spec_operation
        self.good, self.make, self.ref, self.via_lz, self.inputs = good, make, ref, via_lz, inputs

    def context(self, size: int = 0) -> lz.SelectionContext:
        ts = self.make(torch.Generator().manual_seed(0), size)
        if self.name == "attention":
            return lz.SelectionContext.from_attention(*ts, is_causal=True)
        return lz.SelectionContext.from_rows(ts[0])


FAMILIES = {
    "rms_norm": Family(
        "rms_norm", "rms_norm", "rms_norm",
        good=lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps),
        make=lambda g, size: (torch.randn(6 + size, 32, generator=g), torch.rand(32, generator=g) + 0.5),
        ref=rms_ref,
        via_lz=lambda x, w: lz.rms_norm(x, w, eps=EPS),
        inputs=lambda x, w: {"x": x, "weight": w, "eps": EPS}),
    "attention": Family(
        "attention", "attention.causal", "attention",
        good=lambda q, k, v, mask, is_causal, dropout_p, scale, window: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale),
        make=lambda g, size: tuple(torch.randn(2, 4, 16 + size, 32, generator=g) for _ in range(3)),
        ref=causal_ref,
        via_lz=lambda q, k, v: lz.attention(q, k, v, is_causal=True),
        inputs=lambda q, k, v: {"query": q, "key": k, "value": v}),
}


class FaultyKernel:
    """A real kernel: the right answer from PyTorch, then broken in one way while ``broken`` is set."""

    def __init__(self, family: Family, kind: str, tag: str = "") -> None:
        self.family, self.kind = family, kind
        self.broken = True
        self.calls = 0
        self.kernel_id = f"faulty_{family.name}_{kind}{'_' + tag if tag else ''}"

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        out = self.family.good(*args)
        if not self.broken:
            return out
        if self.kind == "raises":
            raise RuntimeError("injected fault: CUDA error: an illegal memory access was encountered")
        if self.kind == "wrong_shape":
            return out[..., :-1]
        if self.kind == "wrong_dtype":
            return out.double()
        if self.kind == "nan":
            out = out.clone()
            out.view(-1)[3] = float("nan")
            return out
        return out * 1.5 + 0.25  # wrong_values

    def spec(self) -> KernelSpec:
        return KernelSpec(self.kernel_id, self.family.spec_operation, "faulty", self, priority=1000,
                          description=f"fault injection: {self.kind}")


@pytest.fixture
def clock(runtime: Runtime) -> Iterator[FakeClock]:
    """The global runtime's breakers on a fake clock (lz.* and dispatch() share them)."""
    fake = FakeClock()
    board = runtime.breakers
    saved = board.clock, {kid: b.clock for kid, b in board.all().items()}
    board.clock = fake
    for b in board.all().values():
        b.clock = fake
    yield fake
    board.clock = saved[0]
    for kid, b in board.all().items():
        b.clock = saved[1].get(kid, saved[0])


@pytest.fixture
def configured(runtime: Runtime) -> Iterator[Callable[..., None]]:
    """Apply a DispatchConfig to the global runtime for one test, restoring the old one afterwards."""
    old = runtime.config

    def apply(**changes: Any) -> None:
        runtime.configure(old.replace(**changes))

    yield apply
    runtime.configure(old)


@pytest.fixture
def install(runtime: Runtime) -> Iterator[Callable[[FaultyKernel], FaultyKernel]]:
    added: list[str] = []

    def add(fault: FaultyKernel) -> FaultyKernel:
        lz.register_kernel(fault.spec())
        added.append(fault.kernel_id)
        return fault

    yield add
    for kid in added:
        runtime.kernels.unregister(kid)
        runtime.breakers.get(kid).reset()


def call(family: Family, path: str, gen: torch.Generator, size: int = 0) -> tuple[torch.Tensor, str | None]:
    """One call on fresh random inputs; returns (output, kernel that produced it when dispatch() says)."""
    args = family.make(gen, size)
    if path == "lz":
        out = family.via_lz(*args)
        used = None
    else:
        result = dispatch(family.operation, family.inputs(*args))
        out, used = result.output, result.kernel_id
    assert_correct(out, family.ref(*args))
    return out, used


def layerzero_lines(caplog: pytest.LogCaptureFixture, event: str, kernel: str) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "layerzero"]
    key = "from_kernel" if event == "fallback" else "kernel"
    return [line for line in lines if line.startswith(f"event={event} ") and f"{key}={kernel} " in line + " "]


def ranked_ids(runtime: Runtime, family: Family) -> list[str]:
    return [k.kernel_id for k in runtime.select(family.operation, family.context()).ranked]


# -- the main scenario: every fault, both paths ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["lz", "dispatch"])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_fault_is_fenced_off_counted_logged_and_probed(kind: str, family_name: str, path: str, runtime: Runtime,
                                                       clock: FakeClock, configured: Callable[..., None],
                                                       install: Callable[[FaultyKernel], FaultyKernel],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    family = FAMILIES[family_name]
    configured(failure_threshold=THRESHOLD, recovery_timeout_seconds=TIMEOUT, log_fallbacks=True,
               verify_first_calls=2 if kind in VERIFY_KINDS else 0)
    fault = install(FaultyKernel(family, kind, path))
    kid, op = fault.kernel_id, family.operation
    gen = torch.Generator().manual_seed(hash((kind, family_name, path)) % 2**31)
    tel = runtime.telemetry
    failures_before = tel.kernel(kid, op).failures
    errors_before = sum(tel.errors.values())
    assert ranked_ids(runtime, family)[0] == kid  # top priority: it is the first choice until it fails
    trips = THRESHOLD if kind == "raises" else 1  # an invalid result opens the breaker at once

    with caplog.at_level(logging.WARNING, logger="layerzero"):
        for i in range(trips):
            _, used = call(family, path, gen)  # a correct result every time
            assert used in (None, *(s.kernel_id for s in runtime.kernels.for_operation(op) if s.kernel_id != kid))
            assert fault.calls == i + 1
        breaker = runtime.breakers.get(kid)
        assert breaker.state is CircuitState.OPEN
        # one log line per event: one per failure, one for the breaker opening
        assert len(layerzero_lines(caplog, "fallback", kid)) == trips
        opened = layerzero_lines(caplog, "breaker_transition", kid)
        assert len(opened) == 1 and "from_state=CLOSED to_state=OPEN" in opened[0]

        # fenced off: later calls never reach it, and log nothing
        caplog.clear()
        for _ in range(25):
            _, used = call(family, path, gen)
            assert used != kid
        assert fault.calls == trips
        assert not [r for r in caplog.records if r.name == "layerzero"]

    # counted
    assert tel.kernel(kid, op).failures - failures_before == trips
    assert sum(tel.errors.values()) - errors_before == trips
    assert tel.breaker_transitions[(kid, "CLOSED", "OPEN")] >= 1
    stats = get_global_dispatcher().get_circuit_stats(kid)
    assert stats.state is CircuitState.OPEN and stats.failures == trips
    expected = "RuntimeError: injected fault" if kind == "raises" else f"KernelExecutionError: kernel {kid}"
    assert stats.last_failure.startswith(expected)

    # quarantined: selection leaves it out and says why
    sel = runtime.select(op, family.context())
    assert kid not in [k.kernel_id for k in sel.ranked]
    assert ReasonCode.CIRCUIT_OPEN in [r.code for r in sel.rejections[kid]]

    # after the recovery timeout a new shape selects it again as the probe; the probe fails -> quarantined again
    clock.t += TIMEOUT + 1
    call(family, path, gen, size=1)
    assert fault.calls == trips + 1
    assert runtime.breakers.get(kid).state is CircuitState.OPEN
    assert kid not in ranked_ids(runtime, family)

    # repaired: the next probe passes, the breaker closes, and selection returns it first again
    fault.broken = False
    clock.t += TIMEOUT + 1
    _, used = call(family, path, gen, size=2)
    assert used in (None, kid)
    assert fault.calls == trips + 2
    assert runtime.breakers.get(kid).state is CircuitState.CLOSED
    assert ranked_ids(runtime, family)[0] == kid
    calls = fault.calls
    for _ in range(3):
        _, used = call(family, path, gen, size=2)
        assert used in (None, kid)
    assert fault.calls >= calls + 3


@pytest.mark.parametrize("path", ["lz", "dispatch"])
def test_cached_plan_routes_around_an_open_breaker_and_probes_it(path: str, runtime: Runtime, clock: FakeClock,
                                                                 configured: Callable[..., None],
                                                                 install: Callable[[FaultyKernel], FaultyKernel]
                                                                 ) -> None:
    """The plan cached while the kernel was healthy keeps it first: the breaker gate routes around it while
    open, and the same cached plan runs the recovery probe once the timeout has passed."""
    family = FAMILIES["rms_norm"]
    configured(failure_threshold=THRESHOLD, recovery_timeout_seconds=TIMEOUT)
    fault = install(FaultyKernel(family, "raises", f"cached_{path}"))
    fault.broken = False
    gen = torch.Generator().manual_seed(11)
    call(family, path, gen)  # healthy: cached with the faulty kernel first
    fault.broken = True
    for _ in range(THRESHOLD):
        call(family, path, gen)
    assert runtime.breakers.get(fault.kernel_id).state is CircuitState.OPEN
    n = fault.calls
    for _ in range(10):
        call(family, path, gen)
    assert fault.calls == n
    clock.t += TIMEOUT + 1
    call(family, path, gen)  # same shape: the cached plan probes
    assert fault.calls == n + 1 and runtime.breakers.get(fault.kernel_id).state is CircuitState.OPEN
    fault.broken = False
    clock.t += TIMEOUT + 1
    call(family, path, gen)
    assert runtime.breakers.get(fault.kernel_id).state is CircuitState.CLOSED
    for _ in range(5):
        call(family, path, gen)
    assert fault.calls == n + 7


# -- verify mode ---------------------------------------------------------------------------------------------

def test_verify_mode_is_opt_in(runtime: Runtime, configured: Callable[..., None],
                               install: Callable[[FaultyKernel], FaultyKernel]) -> None:
    """Without verify mode a kernel that returns NaN of the right shape and dtype is trusted: this is the
    silent corruption verify mode exists to catch (with it on, the main scenario above fences it off)."""
    configured(verify_first_calls=0)
    install(FaultyKernel(FAMILIES["rms_norm"], "nan"))
    x, w = torch.randn(6, 32), torch.rand(32) + 0.5
    assert torch.isnan(lz.rms_norm(x, w, eps=EPS)).any()


def test_verify_mode_config_and_environment(runtime: Runtime, configured: Callable[..., None]) -> None:
    assert DispatchConfig().verify_first_calls == 0
    assert DispatchConfig.from_env({"LAYERZERO_VERIFY": "3"}).verify_first_calls == 3
    with pytest.raises(ValueError, match=r"DispatchConfig.verify_first_calls: must be >= 0, got -1"):
        DispatchConfig(verify_first_calls=-1)
    with pytest.raises(ValueError, match=r"LAYERZERO_VERIFY='many' \(DispatchConfig.verify_first_calls\)"):
        DispatchConfig.from_env({"LAYERZERO_VERIFY": "many"})
    configured(verify_first_calls=4)
    assert runtime.verify_first_calls == 4
    with pytest.raises(lz.InvalidInputError, match="verify_first_calls must be an int >= 0, got -2"):
        runtime.verify_first_calls = -2


def test_verified_kernels_return_to_the_fast_path(runtime: Runtime, configured: Callable[..., None]) -> None:
    """A correct kernel is checked on its first N calls only; then its plan is back on the breaker gate."""
    configured(verify_first_calls=2)
    x, w = torch.randn(7, 48), torch.rand(48) + 0.5
    key = lz.inspection.cache_key("rms_norm", (x, w, EPS))
    for _ in range(2):
        assert_correct(lz.rms_norm(x, w, eps=EPS), rms_ref(x, w))
    lz.rms_norm(x, w, eps=EPS)  # the verification finished, plans were rebound: cached again
    plan = runtime.plans.data[key]
    assert plan.gate is runtime.breakers.get(plan.kernel_id)
    assert runtime.breakers.get(plan.kernel_id).state is CircuitState.CLOSED


def test_verify_mode_skips_random_results(runtime: Runtime, configured: Callable[..., None]) -> None:
    """Attention with dropout has no deterministic reference: verify mode gives no verdict rather than
    failing a correct kernel."""
    configured(verify_first_calls=3)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    for _ in range(4):
        out = lz.attention(q, k, v, dropout_p=0.5)
        assert out.shape == q.shape and not torch.isnan(out).any()
    assert all(b.state is CircuitState.CLOSED for b in runtime.breakers.all().values())


def test_verify_mode_blames_no_kernel_for_the_data(runtime: Runtime, configured: Callable[..., None]) -> None:
    """NaN or inf in the data, or scores past the dtype's range (``scale=1e308``): what comes out is the data's
    doing, not a kernel's. Verify mode used to compare it with a reference that turned every NaN into 0, and one
    such call opened the breaker of every good attention kernel."""
    configured(verify_first_calls=3)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    k_inf, x_nan = k.clone(), torch.randn(4, 16)
    k_inf[0, 0, 1, 0] = float("inf")
    x_nan[1, 3] = float("nan")
    for _ in range(3):
        for call in (lambda: lz.attention(q, k_inf, v), lambda: lz.attention(q, k, v, scale=1e308),
                     lambda: lz.attention(q, k_inf, v, is_causal=True), lambda: lz.rms_norm(x_nan, None)):
            try:
                call()
            except lz.LayerZeroError:
                pass
    assert not any(b.failures for b in runtime.breakers.all().values())
    assert lz.which("attention.full", q, k, v) == "torch_sdpa"
    torch.testing.assert_close(lz.attention(q, k, v, is_causal=True),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_verify_mode_blames_no_kernel_for_an_overflow_of_the_inputs_dtype(runtime: Runtime,
                                                                          configured: Callable[..., None]) -> None:
    """x * 1e30 in float32: the row's sum of squares overflows in every kernel (0 out) but not in the float64
    reference; verify mode used to blame both rms_norm kernels, open their breakers and fail every later
    rms_norm call for the recovery timeout. The same for a norm's variance, gate * up, gelu's cube and the
    logits of the linear cross-entropy."""
    configured(verify_first_calls=3)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 512, generator=g), torch.rand(512, generator=g) + 0.5
    hidden, weight, target = torch.randn(8, 64, generator=g), torch.randn(50, 64, generator=g), torch.randint(0, 50, (8,))
    for _ in range(3):
        for call in (lambda: lz.rms_norm(x * 1e30, w), lambda: lz.layer_norm(x * 1e30, w, None),
                     lambda: lz.swiglu(x * 1e20, x * 1e20), lambda: lz.gelu(x * 1e13, approximate="tanh"),
                     lambda: lz.linear_cross_entropy(hidden * 1e19, weight * 1e19, target)):
            try:
                call()
            except lz.LayerZeroError:
                pass
    assert not any(b.failures for b in runtime.breakers.all().values())
    torch.testing.assert_close(lz.rms_norm(x, w), torch.nn.functional.rms_norm(x, (512,), w, 1e-6))
    assert lz.which("rms_norm", torch.randn(32, 256), torch.ones(256)) == "torch_rms_norm"


def test_verify_mode_blames_no_kernel_for_a_result_beyond_the_outputs_dtype(runtime: Runtime,
                                                                             configured: Callable[..., None]) -> None:
    """Valid float16 inputs whose exact result is above 65504: every float16 kernel returns inf, as it must.
    Verify mode blamed each one ("off the float64 reference by up to 1.8e+308"), opened every rms_norm, rope
    and cross-entropy breaker at once, and float32 calls of those ops then failed for the recovery timeout."""
    configured(verify_first_calls=3)
    x, w = torch.randn(2, 8).half() * 3, torch.full((8,), 60000.0, dtype=torch.float16)
    logits = torch.full((2, 10), 60000.0).half()
    logits[:, 0] = -60000
    big, c = torch.full((1, 2, 4, 8), 60000.0).half(), torch.full((4, 8), 0.7071).half()
    for _ in range(3):
        for call in (lambda: lz.rms_norm(x, w), lambda: lz.cross_entropy(logits, torch.tensor([0, 1])),
                     lambda: lz.rope(big, c, c)):
            try:
                call()
            except lz.LayerZeroError:
                pass
    assert not any(b.failures for b in runtime.breakers.all().values())
    x32, w32 = torch.randn(4, 16), torch.rand(16) + 0.5
    torch.testing.assert_close(lz.rms_norm(x32, w32), torch.nn.functional.rms_norm(x32, (16,), w32, 1e-6))


# -- breakers off, fallback chains, isolated runtimes ------------------------------------------------------------

def test_without_breakers_an_invalid_result_never_reaches_the_caller(runtime: Runtime,
                                                                     configured: Callable[..., None],
                                                                     install: Callable[[FaultyKernel], FaultyKernel]
                                                                     ) -> None:
    """With breakers disabled nothing can fence the kernel off, so its plan checks every result instead."""
    configured(circuit_breaker_enabled=False)
    family = FAMILIES["rms_norm"]
    fault = install(FaultyKernel(family, "wrong_dtype"))
    gen = torch.Generator().manual_seed(3)
    for path in ("lz", "dispatch", "lz", "dispatch"):
        call(family, path, gen)
    assert fault.calls == 4  # tried every time (no breaker), never returned


def test_fallback_results_are_checked_after_a_fast_path_failure() -> None:
    """The cached first choice raises; the first fallback returns the wrong dtype (caught, since the
    recovery path checks results); the second fallback's correct result is returned."""
    clock = FakeClock()
    state = {"primary_broken": False}

    def primary(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if state["primary_broken"]:
            raise RuntimeError("device lost")
        return torch.rms_norm(x, x.shape[-1:], w, eps)

    kr = KernelRegistry()
    kr.register(KernelSpec("user_primary", "rms_norm", "user", primary, priority=90))
    kr.register(KernelSpec("user_wrong_dtype", "rms_norm", "user",
                           lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps).double(), priority=80))
    kr.register(KernelSpec("user_good", "rms_norm", "user",
                           lambda x, w, eps: rms_ref(x, w).float(), priority=70))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(failure_threshold=5, log_fallbacks=False),
                                  clock=clock)
    x, w = torch.randn(4, 16), torch.rand(16) + 0.5
    assert d.dispatch("rms_norm", {"x": x, "weight": w, "eps": EPS}).kernel_id == "user_primary"
    state["primary_broken"] = True
    r = d.dispatch("rms_norm", {"x": x, "weight": w, "eps": EPS})
    assert r.kernel_id == "user_good" and r.fallback_used
    assert_correct(r.output, rms_ref(x, w))
    assert d.get_circuit_stats("user_wrong_dtype").state is CircuitState.OPEN
    assert d.get_circuit_stats("user_primary").failures == 1


@pytest.mark.parametrize("via", ["dispatch", "runtime"])
def test_a_kernel_that_declines_a_call_is_skipped_and_never_blamed(via: str) -> None:
    """A limit only the call shows (a pool past 32-bit offsets): the next kernel serves it, the declining
    kernel's breaker stays closed with no failure, and it serves the next call it can take, cached path
    included."""
    from layerzero.errors import KernelDeclinedError

    calls = {"declined": 0}

    def picky(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if x.shape[0] > 8:
            calls["declined"] += 1
            raise KernelDeclinedError("picky_rms_norm: more than 8 rows", kernel_id="picky_rms_norm")
        return torch.rms_norm(x, x.shape[-1:], w, eps)

    kr = KernelRegistry()
    kr.register(KernelSpec("picky_rms_norm", "rms_norm", "user", picky, priority=90))
    kr.register(KernelSpec("user_good", "rms_norm", "user", lambda x, w, eps: rms_ref(x, w).float(), priority=70))
    config = DispatchConfig(failure_threshold=1, log_fallbacks=False)
    rt = Runtime(kr, BackendRegistry(), config, clock=FakeClock())
    from layerzero.dispatch import Dispatcher

    from layerzero.ops.norms import RMS_NORM, RMS_NORM_CONTRACT

    d = Dispatcher(rt)
    rms_norm = RMS_NORM.bind_contract(RMS_NORM_CONTRACT, rt)  # lz.rms_norm on this runtime
    w = torch.rand(16) + 0.5
    for rows in (4, 20, 20, 4, 30):
        x = torch.randn(rows, 16)
        if via == "dispatch":
            r = d.dispatch("rms_norm", {"x": x, "weight": w, "eps": EPS})
            out, kid = r.output, r.kernel_id
        else:
            out, kid = rms_norm(x, w, eps=EPS), None
        assert_correct(out, rms_ref(x, w))
        if kid is not None:
            assert kid == ("picky_rms_norm" if rows <= 8 else "user_good")
    stats = rt.breakers.get("picky_rms_norm").stats()
    assert calls["declined"] == 3 and stats.state is CircuitState.CLOSED and stats.failures == 0
    assert rt.telemetry.kernel("picky_rms_norm", "rms_norm").failures == 0


def test_every_kernel_broken_is_one_error_listing_every_attempt() -> None:
    kr = KernelRegistry()
    family = FAMILIES["rms_norm"]
    for kind in ("raises", "wrong_shape"):
        kr.register(FaultyKernel(family, kind).spec())
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(log_fallbacks=False), clock=FakeClock())
    x, w = torch.randn(4, 16), torch.rand(16) + 0.5
    with pytest.raises(AllKernelsFailedError, match=r"every kernel failed for rms_norm \(inputs: x=Tensor\(shape="
                                                    r"\(4, 16\)") as info:
        d.dispatch("rms_norm", {"x": x, "weight": w})
    assert [kid for kid, _ in info.value.attempts] == ["faulty_rms_norm_raises", "faulty_rms_norm_wrong_shape"]
    assert "returned shape (4, 15), expected (4, 16)" in str(info.value)
    assert isinstance(info.value, KernelExecutionError) and isinstance(info.value, RuntimeError)


def test_isolated_runtime_with_its_own_clock() -> None:
    """``Runtime(clock=...)``: the same fencing on a runtime of its own registries."""
    clock = FakeClock()
    kr = KernelRegistry()
    family = FAMILIES["rms_norm"]
    fault = FaultyKernel(family, "wrong_dtype")
    kr.register(fault.spec())
    kr.register(KernelSpec("user_good", "rms_norm", "user", lambda x, w, eps: rms_ref(x, w).float(), priority=10))
    rt = Runtime(kr, BackendRegistry(), DispatchConfig(recovery_timeout_seconds=TIMEOUT, log_fallbacks=False),
                 clock=clock)
    assert rt is not get_runtime()
    from layerzero.dispatch import Dispatcher

    d = Dispatcher(rt)
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    for _ in range(3):
        assert d.dispatch("rms_norm", {"x": x, "weight": w, "eps": EPS}).kernel_id == "user_good"
    assert fault.calls == 1 and rt.breakers.get(fault.kernel_id).state is CircuitState.OPEN
    clock.t += TIMEOUT + 1
    fault.broken = False
    assert d.dispatch("rms_norm", {"x": x, "weight": w, "eps": EPS}).kernel_id == fault.kernel_id
    assert rt.breakers.get(fault.kernel_id).state is CircuitState.CLOSED


# -- docs/reliability.md: every python block runs, and prints what the doc shows ------------------------------------

README = page("reliability.md")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```$", text, flags=re.S | re.M)]


def test_reliability_readme_examples_run_and_print_what_they_show(runtime: Runtime) -> None:
    """Each python block's stdout equals the text block after it; a second text block after that shows
    the layerzero log lines the block wrote."""
    blocks = fenced_blocks(README.read_text())
    assert sum(lang == "python" for lang, _ in blocks) >= 2
    saved = runtime.config
    ns: dict[str, Any] = {"__name__": "reliability_doc"}
    logger = logging.getLogger("layerzero")
    try:
        for i, (lang, code) in enumerate(blocks):
            if lang != "python":
                continue
            out, lines = io.StringIO(), LogLines()
            logger.addHandler(lines)
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, f"{README.name}[block {i}]", "exec"), ns)  # noqa: S102 - our own doc
            finally:
                logger.removeHandler(lines)
            follow = [body for lang2, body in blocks[i + 1: i + 3] if lang2 == "text"]
            assert follow, f"python block {i} has no output block after it"
            assert out.getvalue() == follow[0]
            if len(follow) > 1 and blocks[i + 2][0] == "text":
                assert "\n".join(lines.lines) + "\n" == follow[1]
    finally:
        runtime.configure(saved)
        if "my_fast_rms_norm" in runtime.kernels:
            runtime.kernels.unregister("my_fast_rms_norm")
        runtime.breakers.get("my_fast_rms_norm").reset()


def test_reliability_readme_quotes_the_catalog_size() -> None:
    import test_bad_inputs

    assert f"lists {len(test_bad_inputs.ROWS)} classes of bad input" in README.read_text()


# -- GPU (marked; skipped without CUDA) -----------------------------------------------------------------------------

def _cuda_causal_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return causal_ref(q.cpu(), k.cpu(), v.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_strided_query_never_reaches_a_contiguous_only_kernel(dtype: torch.dtype) -> None:
    """The plan cached for contiguous inputs (flash / efficient / cuDNN need a stride-1 last dimension) is not
    reused for a q whose last dimension is strided: that call runs a plan selected for it."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 128, 64, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    torch.testing.assert_close(lz.attention(q, k, v, is_causal=True).cpu().double(), _cuda_causal_ref(q, k, v),
                               atol=2e-2, rtol=2e-2)
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    for _ in range(3):
        out = lz.attention(strided, k, v, is_causal=True)
        torch.testing.assert_close(out.cpu().double(), _cuda_causal_ref(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_faults_are_fenced_off(kind: str, runtime: Runtime, clock: FakeClock, configured: Callable[..., None],
                                   install: Callable[[FaultyKernel], FaultyKernel]) -> None:
    configured(failure_threshold=THRESHOLD, recovery_timeout_seconds=TIMEOUT,
               verify_first_calls=2 if kind in VERIFY_KINDS else 0)
    fault = install(FaultyKernel(FAMILIES["attention"], kind, "gpu"))
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(THRESHOLD + 5):
        q, k, v = (torch.randn(2, 8, 64, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
        out = lz.attention(q, k, v, is_causal=True)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.cpu().double(), _cuda_causal_ref(q, k, v), atol=2e-2, rtol=2e-2)
    assert runtime.breakers.get(fault.kernel_id).state is CircuitState.OPEN
    assert fault.calls == (THRESHOLD if kind == "raises" else 1)
