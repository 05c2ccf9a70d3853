"""The dispatchers' cached hot path for attention inputs given by name (q/k/v, query/key/value).

After one call of an input-name set went the full way (inputs dict -> canonical arguments -> keys), later
calls read q, k and v by name and build the same cache keys as ``lz.attention``: the shape-free family
plan first (shared with ``lz.*``), then the exact-shape plan. These tests check that this path gives the
same answers as the full one: outputs, ``DispatchResult`` fields, telemetry, fallbacks, breakers, scoped
policies, own caches (MVCC, TTL), timing mode, and bad inputs.
"""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.dispatch import (
    DispatchConfig,
    StaticDispatcherBuilder,
    create_dynamic_dispatcher,
    dispatch,
    get_global_dispatcher,
)
from layerzero.dispatch.generic import AttentionInputs, attention_inputs
from layerzero.dispatch.result import DispatchResult
from layerzero.errors import InvalidInputError
from layerzero.inspection import cache_keys
from layerzero.ops.attention import ATTENTION, attention_reference
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

ATOL = 1e-5


def rnd(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype) + 0.5


def misses(rt) -> int:
    return rt.telemetry.cache_stats.misses


def keys(operation: str, q, k, v, causal: bool = False):
    return cache_keys(operation, (q, k, v, None, causal, 0.0, None, None))


def check(r: DispatchResult, q, k, v, *, causal: bool = False) -> None:
    torch.testing.assert_close(r.output.double(), attention_reference(q, k, v, is_causal=causal), atol=ATOL,
                               rtol=ATOL)


@pytest.mark.parametrize("names", [("q", "k", "v"), ("query", "key", "value"), ("query", "k", "value")])
@pytest.mark.parametrize("via", ["global", "dynamic"])
def test_dispatch_serves_new_shapes_from_the_family_plan_without_selection(runtime, names, via) -> None:
    d = get_global_dispatcher() if via == "global" else create_dynamic_dispatcher()
    q, k, v = rnd(1, 8, 1, 64), rnd(1, 8, 128, 64), rnd(1, 8, 128, 64)
    first = d.dispatch("attention.full", dict(zip(names, (q, k, v))))
    assert not first.cached
    check(first, q, k, v)
    family, _ = keys("attention.full", q, k, v)
    plan = runtime.plans.data[family]  # dispatch() made the shape-free plan, as lz.attention does
    assert plan.family == family and plan.kernel_id == first.kernel_id == "torch_sdpa"
    before, calls = misses(runtime), plan.stats.calls
    for b, h, sq, sk, dh in ((2, 4, 7, 33, 32), (1, 8, 128, 128, 64), (3, 2, 1, 500, 128), (1, 8, 1, 64, 64)):
        q, k, v = rnd(b, h, sq, dh), rnd(b, h, sk, dh), rnd(b, h, sk, dh)
        for _ in range(2):  # the first call of the name set may take the full path, the second the hot one
            r = d.dispatch("attention.full", dict(zip(names, (q, k, v))))
            check(r, q, k, v)
            assert (r.kernel_id, r.cached, r.fallback_used, r.attempts, r.mode, r.operation) == (
                "torch_sdpa", True, False, 1, "dynamic", "attention.full")
            assert r.timing.recorded and r.timing.total_us * 1000 >= r.timing.kernel_invoke_ns > 0  # the default
    assert misses(runtime) == before  # no selection for any new shape
    assert plan.stats.calls == calls + 8  # counted on the family plan's kernel
    assert runtime.telemetry.cache_stats.hits >= 8
    assert "torch_sdpa" in repr(r) and "cached=True" in repr(r)


def test_lz_and_dispatch_share_the_family_plan(runtime) -> None:
    q = rnd(1, 2, 3, 16)
    lz.attention(q, q, q, is_causal=True)
    before = misses(runtime)
    q2, k2 = rnd(2, 2, 5, 16), rnd(2, 2, 9, 16)
    for _ in range(2):
        r = dispatch("attention.causal", {"query": q2, "key": k2, "value": k2})
        check(r, q2, k2, k2, causal=True)
        assert r.cached and r.kernel_id == "torch_sdpa"
    assert misses(runtime) == before


def test_exact_shape_plans_when_shape_free_plans_are_off(runtime) -> None:
    runtime.configure(runtime.config.replace(shape_free_plans=False))
    q = rnd(1, 2, 3, 16)
    for _ in range(3):
        r = dispatch("attention.full", {"q": q, "k": q, "v": q})
        check(r, q, q, q)
    assert r.cached
    assert all(p.family is None for p in runtime.plans.data.values())
    before = misses(runtime)
    q2 = rnd(1, 2, 4, 16)
    assert not dispatch("attention.full", {"q": q2, "k": q2, "v": q2}).cached  # a new shape selects
    assert dispatch("attention.full", {"q": q2, "k": q2, "v": q2}).cached
    assert misses(runtime) == before + 1


def test_gqa_call_on_a_family_plan_reports_the_kernel_that_ran(runtime) -> None:
    q = rnd(1, 8, 4, 32)
    dispatch("attention.full", {"q": q, "k": q, "v": q})
    dispatch("attention.full", {"q": q, "k": q, "v": q})
    family, _ = keys("attention.full", q, q, q)
    assert runtime.plans.data[family].kernel_id == "torch_sdpa"
    qg, kg, vg = rnd(1, 8, 4, 32), rnd(1, 2, 6, 32), rnd(1, 2, 6, 32)  # F.sdpa without enable_gqa raises
    r = dispatch("attention.full", {"q": qg, "k": kg, "v": vg})
    check(r, qg, kg, vg)
    # torch_sdpa_gqa covers torch_sdpa: the family was widened to it, not dropped
    assert runtime.plans.data[family].kernel_id == "torch_sdpa_gqa" and not runtime.family_dropped(family)
    assert r.kernel_id == "torch_sdpa_gqa"
    assert runtime.breakers.get("torch_sdpa").stats().failures == 0  # not the kernel's fault
    for args in ((qg, kg, vg), (q, q, q)):
        again = dispatch("attention.full", dict(zip("qkv", args)))
        check(again, *args)
        assert again.cached and again.kernel_id == "torch_sdpa_gqa"


def test_gqa_call_with_its_exact_plan_cached_names_that_plan(runtime) -> None:
    qg, kg, vg = rnd(1, 8, 4, 32), rnd(1, 2, 6, 32), rnd(1, 2, 6, 32)
    lz.attention(qg, kg, vg)  # an exact-shape plan for the GQA shape (no family plan: its kernel is not sdpa)
    exact = runtime.plans.data[keys("attention.full", qg, kg, vg)[1]]
    q = rnd(1, 8, 4, 32)
    dispatch("attention.full", {"q": q, "k": q, "v": q})
    family, _ = keys("attention.full", q, q, q)
    if family not in runtime.plans.data:
        pytest.skip("the GQA kernel's family plan serves the call family here")
    r = dispatch("attention.full", {"q": qg, "k": kg, "v": vg})  # family plan raises, the exact plan runs
    check(r, qg, kg, vg)
    assert r.cached and r.kernel_id == exact.kernel_id != "torch_sdpa"


def test_open_breaker_on_the_family_kernel_routes_dispatch_through_another_kernel(runtime) -> None:
    q = rnd(1, 2, 3, 16)
    dispatch("attention.full", {"q": q, "k": q, "v": q})
    dispatch("attention.full", {"q": q, "k": q, "v": q})
    runtime.breakers.get("torch_sdpa").trip(RuntimeError("test"))
    q2, k2 = rnd(2, 2, 5, 16), rnd(2, 2, 7, 16)
    for _ in range(2):
        r = dispatch("attention.full", {"q": q2, "k": k2, "v": k2})
        check(r, q2, k2, k2)
        assert r.kernel_id != "torch_sdpa"
    r = dispatch("attention.full", {"q": q, "k": q, "v": q})  # the first shape's own plan falls back
    check(r, q, q, q)
    assert r.kernel_id != "torch_sdpa"


def test_a_failing_kernel_on_the_hot_path_falls_back_and_is_reported(runtime) -> None:
    calls = {"n": 0}

    def flaky(q, k, v, mask, is_causal, dropout_p, scale, window):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("illegal memory access")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    kr = KernelRegistry()
    kr.register(KernelSpec("flaky_sdpa", "attention", "custom", flaky, priority=90))
    kr.register(KernelSpec("math_sdpa", "attention", "custom",
                           lambda q, k, v, *rest: attention_reference(q, k, v).to(q.dtype), priority=10))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(failure_threshold=3))
    q = rnd(1, 2, 3, 16)
    assert d.dispatch("attention.full", {"q": q, "k": q, "v": q}).kernel_id == "flaky_sdpa"
    assert d.dispatch("attention.full", {"q": q, "k": q, "v": q}).kernel_id == "flaky_sdpa"
    r = d.dispatch("attention.full", {"q": q, "k": q, "v": q})  # raises on the hot path
    check(r, q, q, q)
    assert (r.kernel_id, r.fallback_used, r.attempts, r.cached) == ("math_sdpa", True, 2, True)
    assert d.get_circuit_stats("flaky_sdpa").failures == 1


def test_scoped_policy_on_the_hot_path(runtime) -> None:
    q, q2 = rnd(1, 2, 3, 16), rnd(2, 2, 6, 16)
    for _ in range(2):
        assert dispatch("attention.full", {"q": q, "k": q, "v": q}).kernel_id == "torch_sdpa"
    with lz.lock("attention.full", "torch_sdpa_math"):  # not shape-free: the scope keeps one plan per shape
        for t in (q, q2):
            r = dispatch("attention.full", {"q": t, "k": t, "v": t})
            assert (r.kernel_id, r.cached) == ("torch_sdpa_math", False)
            r = dispatch("attention.full", {"q": t, "k": t, "v": t})
            check(r, t, t, t)
            assert (r.kernel_id, r.cached) == ("torch_sdpa_math", True)
    with lz.lock("attention.full", "torch_sdpa"):  # unconditional lock on a shape-free kernel: a family plan
        assert not dispatch("attention.full", {"q": q, "k": q, "v": q}).cached
        before = misses(runtime)
        q3 = rnd(3, 2, 7, 16)
        r = dispatch("attention.full", {"q": q3, "k": q3, "v": q3})
        check(r, q3, q3, q3)
        assert (r.kernel_id, r.cached) == ("torch_sdpa", True)
        assert misses(runtime) == before
    r = dispatch("attention.full", {"q": q2, "k": q2, "v": q2})
    check(r, q2, q2, q2)
    assert (r.kernel_id, r.cached) == ("torch_sdpa", True)


@pytest.mark.parametrize("mvcc", [False, True])
def test_own_and_ttl_caches_on_the_hot_path(mvcc) -> None:
    class Clock:
        t = 100.0

        def __call__(self) -> float:
            return self.t

    clock = Clock()
    kr = KernelRegistry()
    kr.register(KernelSpec("plain_sdpa", "attention", "custom",
                           lambda q, k, v, *rest: torch.nn.functional.scaled_dot_product_attention(q, k, v)))
    d = create_dynamic_dispatcher(kr, BackendRegistry(), DispatchConfig(cache_ttl_seconds=5.0), use_mvcc_cache=mvcc,
                                  clock=clock)
    q = rnd(1, 2, 3, 16)
    assert not d.dispatch("attention.full", {"q": q, "k": q, "v": q}).cached
    for _ in range(2):
        assert d.dispatch("attention.full", {"q": q, "k": q, "v": q}).cached
    clock.t += 6.0  # past the TTL
    r = d.dispatch("attention.full", {"q": q, "k": q, "v": q})
    check(r, q, q, q)
    assert not r.cached
    assert d.dispatch("attention.full", {"q": q, "k": q, "v": q}).cached


def test_timing_follows_the_config_on_the_hot_path(runtime) -> None:
    """record_timing is on by default (the hot path stamps the clock), off in the low-latency config."""
    q = rnd(1, 2, 3, 16)
    for _ in range(3):
        r = dispatch("attention.full", {"q": q, "k": q, "v": q})
        check(r, q, q, q)
        assert r.timing.recorded and r.timing.total_us > 0
    assert r.cached and r.timing.total_us * 1000 >= r.timing.kernel_invoke_ns > 0
    runtime.configure(runtime.config.replace(record_timing=False))  # a new plan cache: a miss, then hits
    results = [dispatch("attention.full", {"q": q, "k": q, "v": q}) for _ in range(3)]
    assert [r.cached for r in results] == [False, True, True]
    assert not any(r.timing.recorded or r.timing.total_us for r in results)


def test_bad_inputs_after_the_hot_path_was_used_are_reported_as_such(runtime) -> None:
    q = rnd(1, 2, 3, 16)
    for _ in range(2):
        dispatch("attention.full", {"q": q, "k": q, "v": q})
    with pytest.raises(InvalidInputError, match="inputs need one of"):
        dispatch("attention.full", {"q": None, "k": q, "v": q})
    with pytest.raises(InvalidInputError, match="k must be a torch.Tensor"):
        dispatch("attention.full", {"q": q, "k": [1, 2], "v": q})
    with pytest.raises(InvalidInputError, match="share a dtype"):
        dispatch("attention.full", {"q": q, "k": q.double(), "v": q})
    with pytest.raises(InvalidInputError, match="k and v must agree"):
        dispatch("attention.full", {"q": q, "k": rnd(1, 2, 8, 16), "v": torch.randn(1, 2, 8, 16)[:, :, :5]})
    r = dispatch("attention.full", {"q": q, "k": q, "v": q})
    check(r, q, q, q)
    assert r.cached


def test_other_input_sets_of_the_same_operation_still_map_in_full(runtime) -> None:
    q, k, v = rnd(1, 2, 3, 16), rnd(1, 2, 5, 16), rnd(1, 2, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    for _ in range(2):
        dispatch("attention.full", {"q": q, "k": k, "v": v})
        r = dispatch("attention.full", {"q": q, "k": k, "v": v, "attn_mask": mask})
        torch.testing.assert_close(r.output.double(), attention_reference(q, k, v, attn_mask=mask), atol=ATOL,
                                   rtol=ATOL)
        r = dispatch("attention.full", {"q": q, "k": k, "value": v})  # same count, other names
        check(r, q, k, v)
        r = dispatch("attention.full", {"q": q, "k": k, "v": v}, scale=0.25)
        torch.testing.assert_close(r.output.double(), attention_reference(q, k, v, scale=0.25), atol=ATOL,
                                   rtol=ATOL)
        qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        r = dispatch("attention.full", {"q": qb, "k": kb, "v": vb, "layout": "BSHD"})
        torch.testing.assert_close(r.output.transpose(1, 2).double(), attention_reference(q, k, v), atol=ATOL,
                                   rtol=ATOL)


def test_attention_inputs_only_for_plain_qkv_name_sets() -> None:
    q = rnd(1, 2, 3, 16)
    from layerzero.dispatch.generic import map_inputs

    def learned(inputs: dict, operation: str = "attention.full") -> AttentionInputs | None:
        map_inputs(ATTENTION, operation, inputs, {})  # the first sight learns the template
        return attention_inputs(ATTENTION, operation, inputs)

    entry = learned({"value": q, "key": q, "query": q})
    assert entry is not None and entry.tensors({"value": 1, "key": 2, "query": 3}) == (3, 2, 1)
    assert entry.direct_ok and entry.is_causal is False
    causal = learned({"q": q, "k": q, "v": q}, "attention.causal")
    assert causal is not None and causal.is_causal is True
    assert learned({"q": q, "k": q, "v": q, "attn_mask": None}) is None  # four names
    assert learned({"q": q, "k": q, "v": q, "is_causal": True}) is None
    assert attention_inputs(ATTENTION, "attention.full", {"q": q, "key": q, "k": q}) is None  # no value
    assert attention_inputs(ATTENTION, "attention.full", {"q": q, "k": q, "v": q, "scale": 0.5}) is None


def test_static_dispatch_hot_path_matches_the_full_path() -> None:
    calls = {"n": 0}

    def flaky(q, k, v, mask, is_causal, dropout_p, scale, window):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("illegal memory access")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)

    static = (StaticDispatcherBuilder().with_kernel(flaky, operation="attention.causal", default=True)
              .with_kernel("torch_sdpa_math", operation="attention.causal").build())
    q, k, v = rnd(1, 2, 3, 16), rnd(1, 2, 5, 16), rnd(1, 2, 5, 16)
    for _ in range(2):
        r = static.dispatch("attention.causal", {"query": q, "key": k, "value": v})
        check(r, q, k, v, causal=True)
        assert (r.kernel_id, r.mode, r.cached, r.fallback_used, r.attempts) == ("flaky", "static", True, False, 1)
    r = static.dispatch("attention.causal", {"query": q, "key": k, "value": v})  # raises on the hot path
    check(r, q, k, v, causal=True)
    assert (r.kernel_id, r.fallback_used, r.attempts) == ("torch_sdpa_math", True, 2)
    with pytest.raises(InvalidInputError):
        static.dispatch("attention.causal", {"query": None, "key": k, "value": v})
    r = static.dispatch("attention.causal", {"q": q, "k": k, "v": v})
    check(r, q, k, v, causal=True)
    assert r.kernel_id == "flaky"


def test_static_is_causal_entry_is_exact_and_follows_the_runtime(runtime) -> None:
    """``is_causal=True`` alone has an entry of its own (no options dict to key): only an exact bool is kept there
    (``is_causal=1`` is mapped in full every time), with other options it is one option among them, and a
    runtime change drops it with the others."""
    seen = []

    def kernel(q, k, v, mask, is_causal, dropout_p, scale, window):
        seen.append((is_causal, scale))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)

    static = StaticDispatcherBuilder().with_kernel(kernel, operation="attention.full", default=True).build()
    q, k, v = rnd(1, 2, 3, 16), rnd(1, 2, 5, 16), rnd(1, 2, 5, 16)
    inputs = {"q": q, "k": k, "v": v}
    for _ in range(3):
        check(static.dispatch("attention.full", inputs, is_causal=True), q, k, v, causal=True)
    assert static._hot_causal and (("attention.full", True)) in static._hot_causal
    entries = dict(static._hot_causal)
    check(static.dispatch("attention.full", inputs, is_causal=1), q, k, v, causal=True)  # mapped in full, as before
    assert static._hot_causal == entries and all(c.__class__ is bool for _, c in static._hot_causal)
    r = static.dispatch("attention.full", inputs, scale=0.5, is_causal=True)
    torch.testing.assert_close(r.output, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                          scale=0.5))
    assert seen[-1] == (True, 0.5)
    lz.register_kernel(KernelSpec("custom_noop_for_sync", "rms_norm", "custom", lambda x, w, e: x, priority=1))
    try:  # the runtime's version moves: the next call rebinds, and the entry is made again
        check(static.dispatch("attention.full", inputs, is_causal=True), q, k, v, causal=True)
        assert list(static._hot_causal) == [("attention.full", True)]
    finally:
        runtime.kernels.unregister("custom_noop_for_sync")


def test_orchestrator_hot_path_follows_route_changes(runtime) -> None:
    from layerzero.dispatch import DispatchMode, DynamicDispatcher, create_orchestrator

    g = get_global_dispatcher()
    q = rnd(1, 2, 3, 16)
    inputs = {"q": q, "k": q, "v": q}
    for _ in range(3):
        r = g.dispatch("attention.full", inputs)
        assert (r.mode, r.kernel_id) == ("dynamic", "torch_sdpa")
    assert g._fast["attention.full"] is not None  # the orchestrator serves the cached route itself
    # a static entry for the operation (the runtime's config changes): the next call routes there
    create_orchestrator(DispatchConfig(mode=DispatchMode.AUTO, static_kernel_map={"attention.full": "torch_sdpa_math"}))
    for _ in range(2):
        r = g.dispatch("attention.full", inputs)
        check(r, q, q, q)
        assert (r.mode, r.kernel_id) == ("static", "torch_sdpa_math")
    runtime.configure(runtime.config.replace(mode=DispatchMode.DYNAMIC, static_kernel_map={}))
    for _ in range(2):
        assert g.dispatch("attention.full", inputs).mode == "dynamic"

    class StandInConfigDispatcher(DynamicDispatcher):  # stands in for the config-file dispatcher
        mode = DispatchMode.CONFIG

    runtime.configure(runtime.config.replace(mode=DispatchMode.AUTO))
    g.dispatch("attention.full", inputs)
    g.set_config_dispatcher(StandInConfigDispatcher(runtime))
    try:
        for _ in range(2):
            assert g.dispatch("attention.full", inputs).mode == "config"
    finally:
        g.set_config_dispatcher(None)
    assert g.dispatch("attention.full", inputs).mode == "dynamic"


def test_orchestrator_with_an_mvcc_dynamic_dispatcher_routes_every_call(runtime) -> None:
    from layerzero.dispatch import create_orchestrator

    o = create_orchestrator(use_mvcc_cache=True)
    q = rnd(1, 2, 3, 16)
    results = [o.dispatch("attention.full", {"q": q, "k": q, "v": q}) for _ in range(3)]
    assert [r.cached for r in results] == [False, True, True]
    assert o._fast.get("attention.full") is None  # its plans are the dynamic dispatcher's own
    assert o.dynamic._fast["attention.full"] is not None
    check(results[-1], q, q, q)


def test_dtype_changes_and_a_family_dropped_elsewhere(runtime) -> None:
    d = create_dynamic_dispatcher()
    shapes = ((1, 2, 3, 16), (2, 2, 5, 16))
    for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):
        for shape in shapes:
            q = rnd(*shape, dtype=dtype)
            for _ in range(2):
                r = d.dispatch("attention.full", {"q": q, "k": q, "v": q})
                check(r, q, q, q)
                assert r.output.dtype == dtype and r.kernel_id == "torch_sdpa"
    before = misses(runtime)
    for dtype in (torch.float64, torch.float32):
        q = rnd(3, 2, 7, 16, dtype=dtype)
        r = d.dispatch("attention.full", {"q": q, "k": q, "v": q})
        check(r, q, q, q)
        assert r.cached and r.output.dtype == dtype
    assert misses(runtime) == before
    # lz.attention widens the family to torch_sdpa_gqa elsewhere. The dispatcher's memo may still hold the
    # torch_sdpa plan for MHA calls (correct for them); a GQA call it cannot take runs the family's new plan,
    # and the stale plan's failure does not drop the family.
    qg, kg, vg = rnd(1, 8, 4, 32), rnd(1, 2, 6, 32), rnd(1, 2, 6, 32)
    lz.attention(qg, kg, vg)
    family, _ = keys("attention.full", qg, qg, qg)
    widened = runtime.plans.data[family]
    assert widened.kernel_id == "torch_sdpa_gqa"
    check(d.dispatch("attention.full", {"q": q, "k": q, "v": q}), q, q, q)
    r = d.dispatch("attention.full", {"q": qg, "k": kg, "v": vg})
    check(r, qg, kg, vg)
    assert r.kernel_id == "torch_sdpa_gqa" and runtime.plans.data[family] is widened
    assert not runtime.family_dropped(family)
    # with torch_sdpa_gqa denied, widening finds nothing to serve the family: the second GQA failure drops it
    lz.configure({"version": "1.0", "denies": [{"kernels": ["torch_sdpa_gqa"]}]})
    try:
        for seq in (3, 5):
            q = rnd(1, 8, seq, 32)
            lz.attention(q, q, q)  # a new shape: a torch_sdpa family plan (again)
            torch.testing.assert_close(lz.attention(qg, kg, vg).double(), attention_reference(qg, kg, vg),
                                       atol=1e-5, rtol=1e-5)
        assert runtime.family_dropped(family) and family not in runtime.plans.data
        check(d.dispatch("attention.full", {"q": q, "k": q, "v": q}), q, q, q)
        r = d.dispatch("attention.full", {"q": qg, "k": kg, "v": vg})
        check(r, qg, kg, vg)
        assert r.kernel_id == runtime.plans.data[keys("attention.full", qg, kg, vg)[1]].kernel_id != "torch_sdpa_gqa"
    finally:
        lz.configure(None)


def test_a_registry_change_reaches_the_hot_path(runtime) -> None:
    q = rnd(1, 2, 3, 16)
    for _ in range(3):
        assert dispatch("attention.full", {"q": q, "k": q, "v": q}).kernel_id == "torch_sdpa"
    spec = KernelSpec("test_top_attention", "attention", "custom",
                      lambda q, k, v, *rest: torch.nn.functional.scaled_dot_product_attention(q, k, v), priority=999)
    lz.get_global_kernel_registry().register(spec)
    try:
        for _ in range(2):
            r = dispatch("attention.full", {"q": q, "k": q, "v": q})
            check(r, q, q, q)
            assert r.kernel_id == "test_top_attention"
    finally:
        lz.get_global_kernel_registry().unregister("test_top_attention")
    assert dispatch("attention.full", {"q": q, "k": q, "v": q}).kernel_id == "torch_sdpa"
