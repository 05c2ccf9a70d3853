"""DYNAMIC dispatch: input names, operation meaning, layouts, caching (LRU, TTL, MVCC), invalidation, threads."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import layerzero as lz
from layerzero.dispatch import DispatchConfig, create_dynamic_dispatcher, dispatch, get_global_dispatcher
from layerzero.errors import InvalidInputError, NoKernelError
from layerzero.ops.attention import attention_reference
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def qkv(b=2, h=4, s=16, d=32, *, seed=0, layout="BHSD"):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, s, d) if layout == "BHSD" else (b, s, h, d)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


def ref_attention(q, k, v, causal):
    return attention_reference(q, k, v, is_causal=causal)


def rms_ref(x, w, eps=1e-6):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("names", [("query", "key", "value"), ("q", "k", "v")])
def test_attention_input_names_and_causal_from_operation(names):
    q, k, v = qkv()
    r = dispatch("attention.causal", dict(zip(names, (q, k, v))))
    torch.testing.assert_close(r.output.double(), ref_attention(q, k, v, True), atol=1e-5, rtol=1e-5)
    full = dispatch("attention.full", dict(zip(names, (q, k, v))))
    torch.testing.assert_close(full.output.double(), ref_attention(q, k, v, False), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(r.output, full.output)
    assert r.kernel_id in {s.kernel_id for s in lz.list_kernels("attention")}


def test_all_zero_tensors_are_not_tested_for_truth():
    # ``inputs.get("query") or inputs.get("q")`` would raise "Boolean value of Tensor ... is ambiguous".
    q = torch.zeros(1, 2, 4, 8)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    r = dispatch("attention.causal", {"query": q, "key": k, "value": v})
    torch.testing.assert_close(r.output.double(), ref_attention(q, k, v, True), atol=1e-6, rtol=1e-6)


def test_bshd_layout_round_trips():
    q, k, v = qkv(layout="BSHD", seed=3)
    r = dispatch("attention.causal", {"q": q, "k": k, "v": v}, layout="BSHD")
    assert r.output.shape == q.shape
    want = ref_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True).transpose(1, 2)
    torch.testing.assert_close(r.output.double(), want, atol=1e-5, rtol=1e-5)
    via_inputs = dispatch("attention.causal", {"q": q, "k": k, "v": v, "layout": "BSHD"})
    torch.testing.assert_close(via_inputs.output, r.output)


def test_norm_inputs_and_kwargs():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 64, generator=g), torch.rand(64, generator=g) + 0.5
    for inputs in ({"x": x, "weight": w}, {"input": x, "weight": w}, {"hidden_states": x, "w": w}):
        r = dispatch("rms_norm", inputs)
        torch.testing.assert_close(r.output.double(), rms_ref(x, w), atol=1e-5, rtol=1e-5)
    r = dispatch("rms_norm", {"x": x}, weight=w, eps=1e-3)
    torch.testing.assert_close(r.output.double(), rms_ref(x, w, 1e-3), atol=1e-5, rtol=1e-5)
    b = torch.randn(64, generator=g)
    ln = dispatch("layer_norm", {"x": x, "weight": w, "bias": b})
    want = torch.nn.functional.layer_norm(x.double(), (64,), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(ln.output.double(), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_layerzero_errors_naming_the_operation():
    q, k, v = qkv()
    with pytest.raises(InvalidInputError, match=r"attention.causal: inputs need one of 'key', 'k'"):
        dispatch("attention.causal", {"q": q, "v": v})
    with pytest.raises(InvalidInputError, match=r"inputs must be a dict of tensors"):
        dispatch("rms_norm", [q])
    with pytest.raises(InvalidInputError, match=r"q and k head dims differ: 32 vs 16.*Tensor\(shape=\(2, 4, 16, 32\)"):
        dispatch("attention.causal", {"q": q, "k": k[..., :16], "v": v})
    with pytest.raises(InvalidInputError, match=r"rms_norm: x must be a torch.Tensor, got list"):
        dispatch("rms_norm", {"x": [1.0, 2.0]})
    with pytest.raises(InvalidInputError, match=r"layout must be 'BHSD' or 'BSHD'"):
        dispatch("attention.causal", {"q": q, "k": k, "v": v}, layout="SBHD")


def test_user_operation_without_family_dispatches_with_keyword_arguments():
    kr = KernelRegistry()
    seen = []

    def scaled_add(a, b, alpha=1.0):
        seen.append(alpha)
        return a + alpha * b

    kr.register(KernelSpec("custom_scaled_add", "my.scaled_add", "custom", scaled_add))
    d = create_dynamic_dispatcher(kr, BackendRegistry())
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    r = d.dispatch("my.scaled_add", {"a": a, "b": b}, alpha=0.5)
    torch.testing.assert_close(r.output, a + 0.5 * b)
    assert r.kernel_id == "custom_scaled_add" and not r.cached
    assert d.dispatch("my.scaled_add", {"a": a, "b": b}, alpha=0.5).cached
    assert seen == [0.5, 0.5]
    with pytest.raises(NoKernelError, match=r"no kernel is registered for 'my.other'"):
        d.dispatch("my.other", {"a": a})


def test_dispatch_and_lz_share_the_plan_cache():
    q, k, v = qkv(seed=5)
    assert not dispatch("attention.causal", {"q": q, "k": k, "v": v}).cached
    misses = get_runtime().telemetry.misses
    lz.attention(q, k, v, is_causal=True)  # same key as the dispatch: a hit
    assert get_runtime().telemetry.misses == misses
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    lz.rms_norm(x, w)
    assert dispatch("rms_norm", {"x": x, "weight": w}).cached


def test_explicit_context_is_used_for_selection_and_cached_per_object():
    q, k, v = qkv(seed=7)
    ctx = lz.SelectionContext(batch_size=2, seq_len=16, num_heads=4, head_dim=32, dtype=torch.float32,
                              device="cpu", is_causal=True)
    d = get_global_dispatcher()
    first = d.dispatch("attention.causal", {"q": q, "k": k, "v": v}, context=ctx)
    again = d.dispatch("attention.causal", {"q": q, "k": k, "v": v}, context=ctx)
    assert (first.cached, again.cached) == (False, True)
    torch.testing.assert_close(again.output.double(), ref_attention(q, k, v, True), atol=1e-5, rtol=1e-5)
    other = lz.SelectionContext(batch_size=2, seq_len=16, num_heads=4, head_dim=32, dtype=torch.float32,
                                device="cpu", is_causal=True)
    assert not d.dispatch("attention.causal", {"q": q, "k": k, "v": v}, context=other).cached
    with pytest.raises(InvalidInputError, match=r"context must be a SelectionContext, got dict"):
        d.dispatch("attention.causal", {"q": q, "k": k, "v": v}, context={"batch_size": 2})


@pytest.mark.parametrize("mvcc", [False, True])
def test_a_given_context_steers_selection_but_never_the_arguments(mvcc):
    """The seed's "reuse one SelectionContext for several operations": a context that leaves out the causal flag or
    the hidden size must not change what the kernel computes (its specialization reads the inputs, not the
    context), on the first call and on every cached one, and no breaker may count the calls."""
    d = create_dynamic_dispatcher(use_mvcc_cache=mvcc)
    q, k, v = qkv(b=1, h=4, s=16, d=32, seed=21)
    x, w = torch.randn(3, 96), torch.rand(96) + 0.5
    ctx = lz.SelectionContext(batch_size=1, seq_len=16, dtype=torch.float32, device="cpu")  # no is_causal
    for _ in range(8):
        r = d.dispatch("attention.causal", {"q": q, "k": k, "v": v}, context=ctx)
        torch.testing.assert_close(r.output.double(), ref_attention(q, k, v, True), atol=1e-5, rtol=1e-5)
        r = d.dispatch("attention.full", {"q": q, "k": k, "v": v}, context=ctx)
        torch.testing.assert_close(r.output.double(), ref_attention(q, k, v, False), atol=1e-5, rtol=1e-5)
        n = d.dispatch("rms_norm", {"x": x, "weight": w}, context=ctx)  # the context has no hidden size
        torch.testing.assert_close(n.output.double(), rms_ref(x, w), atol=1e-5, rtol=1e-5)
        assert (n.kernel_id, n.fallback_used) == ("torch_rms_norm", False)
    assert n.cached
    assert d.get_circuit_stats("torch_rms_norm").failures == 0
    assert d.get_circuit_stats("torch_rms_norm").state.name == "CLOSED"


def test_a_context_no_selected_kernel_can_run_the_inputs_with_is_named():
    kr = KernelRegistry()
    kr.register(KernelSpec("half_only_rms", "rms_norm", "custom", lambda x, w, eps: rms_ref(x, w, eps).to(x.dtype),
                           dtypes=frozenset({torch.float16})))
    d = create_dynamic_dispatcher(kr, BackendRegistry())
    ctx = lz.SelectionContext(dtype=torch.float16, hidden_size=16)
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    with pytest.raises(InvalidInputError, match=r"context does not describe the inputs.*half_only_rms: .*float32"):
        d.dispatch("rms_norm", {"x": x, "weight": w}, context=ctx)
    assert d.get_circuit_stats("half_only_rms").failures == 0


def _private(config: DispatchConfig, clock: FakeClock, **kw):
    kr = KernelRegistry()
    kr.register(KernelSpec("slow_rms", "rms_norm", "custom", lambda x, w, eps: rms_ref(x, w, eps).to(x.dtype),
                           priority=10))
    return kr, create_dynamic_dispatcher(kr, BackendRegistry(), config, clock=clock, **kw)


@pytest.mark.parametrize("mvcc", [False, True])
def test_ttl_expiry(mvcc):
    clock = FakeClock()
    _, d = _private(DispatchConfig(cache_ttl_seconds=5.0), clock, use_mvcc_cache=mvcc)
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    assert not d.dispatch("rms_norm", {"x": x, "weight": w}).cached
    clock.t += 4.0
    assert d.dispatch("rms_norm", {"x": x, "weight": w}).cached
    clock.t += 1.5  # 5.5 s after the plan was stored
    r = d.dispatch("rms_norm", {"x": x, "weight": w})
    assert not r.cached
    torch.testing.assert_close(r.output.double(), rms_ref(x, w), atol=1e-6, rtol=1e-6)
    assert d.get_telemetry().cache_stats.evictions >= 1


@pytest.mark.parametrize("mvcc", [False, True])
def test_lru_capacity_and_cache_stats(mvcc):
    _, d = _private(DispatchConfig(cache_size=4), FakeClock(), use_mvcc_cache=mvcc, shards=1)
    w = torch.rand(8) + 0.5
    for n in range(1, 7):  # six shapes into four slots
        d.dispatch("rms_norm", {"x": torch.randn(n, 8), "weight": w})
    stats = d.get_telemetry().cache_stats
    assert (stats.size, stats.capacity, stats.misses) == (4, 4, 6)
    assert stats.evictions == 2
    assert d.dispatch("rms_norm", {"x": torch.randn(6, 8), "weight": w}).cached
    assert not d.dispatch("rms_norm", {"x": torch.randn(1, 8), "weight": w}).cached  # evicted first


@pytest.mark.parametrize("mvcc", [False, True])
def test_registry_change_invalidates_plans(mvcc):
    kr, d = _private(DispatchConfig(), FakeClock(), use_mvcc_cache=mvcc)
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    d.dispatch("rms_norm", {"x": x, "weight": w})
    assert d.dispatch("rms_norm", {"x": x, "weight": w}).kernel_id == "slow_rms"
    kr.register(KernelSpec("fast_rms", "rms_norm", "custom",
                           lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps), priority=90))
    r = d.dispatch("rms_norm", {"x": x, "weight": w})
    assert (r.kernel_id, r.cached) == ("fast_rms", False)
    kr.unregister("fast_rms")
    assert d.dispatch("rms_norm", {"x": x, "weight": w}).kernel_id == "slow_rms"


def test_global_registry_change_invalidates_the_global_dispatcher():
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    assert dispatch("rms_norm", {"x": x, "weight": w}).kernel_id != "test_top_rms"
    spec = KernelSpec("test_top_rms", "rms_norm", "custom",
                      lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps), priority=999)
    lz.register_kernel(spec)
    try:
        r = dispatch("rms_norm", {"x": x, "weight": w})
        assert (r.kernel_id, r.cached) == ("test_top_rms", False)
        assert lz.which("rms_norm", x, w) == "test_top_rms"
    finally:
        lz.get_global_kernel_registry().unregister("test_top_rms")
    assert dispatch("rms_norm", {"x": x, "weight": w}).kernel_id != "test_top_rms"


def test_mvcc_invalidation_is_a_version_bump():
    _, d = _private(DispatchConfig(), FakeClock(), use_mvcc_cache=True)
    cache = d.plan_cache
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    d.dispatch("rms_norm", {"x": x, "weight": w})
    before = cache.version
    d.invalidate()
    assert cache.version == before + 1 and len(cache) == 0
    assert not d.dispatch("rms_norm", {"x": x, "weight": w}).cached


def test_policy_change_reaches_the_dispatcher():
    q, k, v = qkv(seed=11)
    dispatch("attention.causal", {"q": q, "k": k, "v": v})
    with lz.lock("attention.causal", "torch_sdpa_math"):
        r = dispatch("attention.causal", {"q": q, "k": k, "v": v})
        assert r.kernel_id == "torch_sdpa_math"
        assert dispatch("attention.causal", {"q": q, "k": k, "v": v}).cached
    assert dispatch("attention.causal", {"q": q, "k": k, "v": v}).kernel_id != "torch_sdpa_math"
    lz.lock("attention.causal", "torch_sdpa_math")
    try:
        assert dispatch("attention.causal", {"q": q, "k": k, "v": v}).kernel_id == "torch_sdpa_math"
    finally:
        lz.unlock("attention.causal")


@pytest.mark.parametrize("mvcc", [False, True])
def test_eight_threads_dispatch_at_once(mvcc):
    d = create_dynamic_dispatcher(use_mvcc_cache=mvcc) if mvcc else get_global_dispatcher()
    cases = []
    for i in range(4):
        q, k, v = qkv(b=1, h=2, s=4 + 2 * i, d=16, seed=20 + i)
        cases.append(("attention.causal", {"query": q, "key": k, "value": v}, ref_attention(q, k, v, True)))
        x, w = torch.randn(2 + i, 32), torch.rand(32) + 0.5
        cases.append(("rms_norm", {"x": x, "weight": w}, rms_ref(x, w)))
    errors: list[BaseException] = []
    start = threading.Barrier(9)

    def worker(tid: int) -> None:
        try:
            start.wait()
            for n in range(60):
                op, inputs, want = cases[(tid + n) % len(cases)]
                out = d.dispatch(op, inputs).output
                if not torch.allclose(out.double(), want, atol=1e-5, rtol=1e-5):
                    raise AssertionError(f"thread {tid} call {n}: wrong result for {op}")
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    start.wait()
    for _ in range(5):  # invalidate while they run
        d.invalidate()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert all(not t.is_alive() for t in threads)


def test_disabled_cache_selects_every_time():
    _, d = _private(DispatchConfig(enable_cache=False), FakeClock())
    x, w = torch.randn(3, 16), torch.rand(16) + 0.5
    assert [d.dispatch("rms_norm", {"x": x, "weight": w}).cached for _ in range(3)] == [False] * 3
    assert d.get_telemetry().cache_stats.misses == 3


def test_config_on_global_registries_stays_the_dispatchers_own():
    """A dispatcher's config never reconfigures lz.*: it gets a runtime derived from the global one (same
    registries and policy, its own config, cache, breakers and telemetry)."""
    before = get_runtime().config
    cfg = DispatchConfig(cache_size=123, cache_ttl_seconds=600.0, circuit_breaker_enabled=False)
    d = create_dynamic_dispatcher(config=cfg)
    assert get_runtime().config is before and d.runtime.config is cfg and d.runtime.parent is get_runtime()
    assert d.get_telemetry().cache_stats.capacity == 123
    x = torch.randn(2, 8)
    assert d.dispatch("rms_norm", {"x": x}).kernel_id == lz.which("rms_norm", x)
    lz.lock("rms_norm", "torch_rms_norm_composed")  # the policy is shared: the dispatcher follows it
    try:
        assert d.dispatch("rms_norm", {"x": x}).kernel_id == "torch_rms_norm_composed"
    finally:
        lz.unlock("rms_norm")
    assert d.dispatch("rms_norm", {"x": x}).kernel_id == lz.which("rms_norm", x)
    with pytest.raises(InvalidInputError, match=r"clock= needs a dispatcher on its own registries"):
        create_dynamic_dispatcher(clock=FakeClock())


def test_empty_private_registry_is_not_replaced_by_the_global_one():
    d = create_dynamic_dispatcher(KernelRegistry(), BackendRegistry())
    with pytest.raises(NoKernelError, match=r"no kernel is registered for 'rms_norm'"):
        d.dispatch("rms_norm", {"x": torch.randn(2, 4)})
    assert math.isfinite(d.get_telemetry().cache_stats.hit_rate)


def _same_args(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or (not isinstance(x, torch.Tensor) and type(x) is type(y) and x == y)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("operation,inputs", [
    ("attention.causal", {"query": 1, "key": 2, "value": 3}),
    ("attention.full", {"q": 1, "k": 2, "v": 3}),
    ("attention.cross", {"q": 1, "k": 2, "v": 3, "attn_mask": 4}),
    ("attention.full", {"q": 1, "k": 2, "v": 3, "is_causal": True}),
    ("attention.full", {"q": 1, "k": 2, "v": 3, "scale": 0.5, "dropout_p": 0.1}),
    ("rms_norm", {"x": 1, "weight": 2}),
    ("rms_norm", {"input": 1, "eps": 1e-3}),
    ("layer_norm", {"x": 1, "weight": 2, "bias": 3}),
    ("rope", {"x": 1, "cos": 2, "sin": 3, "interleaved": True}),
    ("swiglu", {"gate": 1, "up": 2}),
    ("gelu", {"x": 1, "approximate": "tanh"}),
    ("silu", {"input": 1}),
    ("sample.top_k", {"logits": 1, "top_k": 5, "temperature": 0.7}),
])
def test_fast_input_mapping_equals_the_ops_own(operation, inputs):
    from layerzero.dispatch.generic import map_inputs, op_for_dispatch

    op = op_for_dispatch(operation)
    tensors = {n: (torch.randn(2, 2, 4, 8) if isinstance(v, int) and not isinstance(v, bool) and n != "top_k" else v)
               for n, v in inputs.items()}
    want = op.args_from_inputs(operation, tensors, {})
    for _ in range(3):  # first sight, then the memoized mapping
        got, transposed = map_inputs(op, operation, tensors, {})
        assert not transposed and _same_args(got, want), (got, want)
    fresh = {n: (torch.randn(3, 2, 4, 8) if isinstance(v, torch.Tensor) else v) for n, v in tensors.items()}
    assert _same_args(map_inputs(op, operation, fresh, {})[0], op.args_from_inputs(operation, fresh, {}))
    with_none = {**fresh, next(iter(fresh)): None}
    with pytest.raises(InvalidInputError):
        map_inputs(op, operation, with_none, {})


def test_mapping_memo_is_not_used_for_value_dependent_ops():
    from layerzero.dispatch.generic import map_inputs
    from layerzero.ops.base import OpDef

    class Picky(OpDef):
        family = "picky"

        def args_from_inputs(self, operation, inputs, kwargs):  # type: ignore[no-untyped-def]
            x = inputs["x"]
            return (x, "tensor" if isinstance(x, torch.Tensor) else "other")

    op = Picky()
    t = torch.randn(2)
    for _ in range(3):
        args, _ = map_inputs(op, "picky", {"x": t}, {})
        assert args[0] is t and args[1] == "tensor"
    assert map_inputs(op, "picky", {"x": 3}, {})[0] == (3, "other")


def test_dropped_dispatchers_take_their_listeners_off_the_shared_registries() -> None:
    """A dispatcher with a config of its own derives a runtime, which listens to the global kernel and backend
    registries and policy; the listeners stayed after the dispatcher was gone (6,000 dispatchers: 6,000 closures
    on each, and every policy change walked them all)."""
    import gc

    from layerzero.dispatch import DispatchConfig, create_dynamic_dispatcher
    from layerzero.runtime import get_runtime

    rt = get_runtime()
    gc.collect()  # earlier tests' dispatchers in reference cycles would leave during this test's collection
    before = (len(rt.kernels._listeners), len(rt.backends._listeners), len(rt.policy._listeners))
    x, w = torch.randn(2, 16), torch.ones(16)
    for _ in range(50):
        d = create_dynamic_dispatcher(config=DispatchConfig(cache_size=123))
        d.dispatch("rms_norm", {"x": x, "weight": w})
        del d
    gc.collect()
    assert (len(rt.kernels._listeners), len(rt.backends._listeners), len(rt.policy._listeners)) == before


def test_equal_configs_hash_alike() -> None:
    """DispatchConfig is frozen but was unhashable (its static_kernel_map is a dict): it could not key a dict
    or an lru_cache."""
    a = DispatchConfig(static_kernel_map={"rms_norm": "torch_rms_norm"}, record_timing=False)
    b = DispatchConfig(record_timing=False, static_kernel_map={"rms_norm": "torch_rms_norm"})
    assert a == b and hash(a) == hash(b) and {a: "x"}[b] == "x"
    assert a.replace(record_timing=True) != a and len({a, b, DispatchConfig()}) == 2
