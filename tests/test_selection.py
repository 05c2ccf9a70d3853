"""Selection on fake devices: winners, full traces, rejection reasons, tie-breaks, measured ranking,
user kernels, the errors when nothing fits, and the plan caches against naive models.

Everything here runs on a CPU-only machine: contexts state a CUDA device and its compute capability,
and the engine never looks at the hardware.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerzero as lz
from layerzero.backends import torch as torch_backend
from layerzero.errors import KernelNotSupportedError, NoKernelError
from layerzero.registry import BackendRegistry, KernelRegistry, get_global_kernel_registry
from layerzero.selection import MVCCPlanCache, PlanCache, SelectionContext, SelectionEngine
from layerzero.selection.engine import Measurement
from layerzero.spec import KernelSpec, ReasonCode

TORCH_ATTENTION_IDS = {k for k in torch_backend.TORCH_KERNEL_IDS if k.startswith(("torch_sdpa", "torch_attention"))}


@pytest.fixture
def registries() -> tuple[KernelRegistry, BackendRegistry]:
    """Private registries holding the torch backend, so tests can add kernels without touching globals."""
    kernels, backends = KernelRegistry(), BackendRegistry()
    torch_backend.register(kernels, backends)
    return kernels, backends


@pytest.fixture
def engine(registries: tuple[KernelRegistry, BackendRegistry]) -> SelectionEngine:
    return SelectionEngine(*registries)


def gpu(cc: tuple[int, int], **kw: object) -> SelectionContext:
    """A fake CUDA attention context (float16, b4 h16 s512 d128 unless overridden)."""
    base: dict[str, object] = dict(device="cuda", compute_capability=cc, dtype=torch.float16, batch_size=4,
                                   seq_len=512, num_heads=16, head_dim=128, layout="BHSD")
    base.update(kw)
    return SelectionContext(**base)  # type: ignore[arg-type]


def codes(sel: object, kernel_id: str) -> list[str]:
    return [r.code for r in sel.rejections.get(kernel_id, [])]  # type: ignore[attr-defined]


def messages(sel: object, kernel_id: str) -> list[str]:
    return [str(r) for r in sel.rejections.get(kernel_id, [])]  # type: ignore[attr-defined]


def noop(*args: object) -> None:
    return None


# -- winners and traces ----------------------------------------------------------------------------

@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
def test_fake_ampere_and_hopper_accept_the_fused_kernels(engine: SelectionEngine, cc: tuple[int, int]) -> None:
    sel = engine.select("attention.causal", gpu(cc, is_causal=True))
    assert sel.selected.kernel_id == "torch_sdpa"  # PyTorch's own choice has the top priority
    accepted = [s.kernel_id for s in sel.ranked]
    assert accepted == ["torch_sdpa", "torch_sdpa_gqa", "torch_sdpa_flash", "torch_sdpa_efficient",
                        "torch_sdpa_cudnn", "torch_sdpa_math", "torch_attention_eager"]
    assert {d.kernel_id for d in sel.trace} == TORCH_ATTENTION_IDS  # the trace covers every candidate
    assert codes(sel, "torch_sdpa_flash_cpu") == [ReasonCode.PLATFORM_MISMATCH]


def test_trace_covers_every_candidate_for_every_operation(engine: SelectionEngine,
                                                          registries: tuple[KernelRegistry, BackendRegistry]) -> None:
    for operation in lz.ops.OPERATIONS:
        ctx = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, hidden_size=1024,
                               num_tokens=8, batch_size=2, seq_len=64, num_heads=8, head_dim=64)
        sel = engine.select(operation, ctx, raise_on_empty=False)
        expected = {s.kernel_id for s in registries[0].for_operation(operation)}
        assert expected, operation
        assert {d.kernel_id for d in sel.trace} == expected
        for d in sel.trace:  # accepted kernels carry a rank and score, rejected ones a reason
            assert d.accepted == (not d.reasons)
            assert (d.rank is not None) == d.accepted


def test_turing_rejects_flash_and_cudnn_with_the_capability(engine: SelectionEngine) -> None:
    sel = engine.select("attention.full", gpu((7, 5)))
    for kid in ("torch_sdpa_flash", "torch_sdpa_cudnn"):
        assert codes(sel, kid) == [ReasonCode.SM_TOO_OLD]
        assert messages(sel, kid) == ["needs compute capability >= 8.0, this GPU has 7.5"]
    assert "torch_sdpa_efficient" in [s.kernel_id for s in sel.ranked]


def test_head_dim_320_is_too_large_for_flash_and_cudnn(engine: SelectionEngine) -> None:
    sel = engine.select("attention.full", gpu((9, 0), head_dim=320))
    assert ReasonCode.HEAD_DIM_TOO_LARGE in codes(sel, "torch_sdpa_flash")
    assert "head_dim=320 > 256 supported" in messages(sel, "torch_sdpa_flash")
    assert "head_dim=320 > 128 supported" in messages(sel, "torch_sdpa_cudnn")
    assert "torch_sdpa_efficient" in [s.kernel_id for s in sel.ranked]  # no upper limit there


def test_dtypes_follow_the_gpu_generation(engine: SelectionEngine) -> None:
    sel = engine.select("attention.full", gpu((8, 0), dtype=torch.float32))
    assert codes(sel, "torch_sdpa_flash") == [ReasonCode.DTYPE_UNSUPPORTED]
    assert messages(sel, "torch_sdpa_flash") == ["dtype=float32 (supported: bfloat16, float16)"]
    assert "torch_sdpa_efficient" in [s.kernel_id for s in sel.ranked]
    # memory-efficient attention has bfloat16 only from sm80 (can_use_mem_efficient_attention)
    old = engine.select("attention.full", gpu((7, 5), dtype=torch.bfloat16))
    assert codes(old, "torch_sdpa_efficient") == [ReasonCode.DTYPE_UNSUPPORTED]
    assert "needs compute capability >= 8.0" in messages(old, "torch_sdpa_efficient")[0]


def test_memory_efficient_alignment_depends_on_dtype(engine: SelectionEngine) -> None:
    fp32 = engine.select("attention.full", gpu((8, 0), dtype=torch.float32, head_dim=36))
    assert "torch_sdpa_efficient" in [s.kernel_id for s in fp32.ranked]  # float32 needs a multiple of 4
    fp16 = engine.select("attention.full", gpu((8, 0), head_dim=36))
    assert codes(fp16, "torch_sdpa_efficient") == [ReasonCode.HEAD_DIM_ALIGNMENT, ReasonCode.HEAD_DIM_ALIGNMENT]
    assert codes(fp16, "torch_sdpa_flash") == [ReasonCode.HEAD_DIM_ALIGNMENT]


def test_causal_alignment_rejects_flash_only_when_lengths_differ(engine: SelectionEngine) -> None:
    cross = engine.select("attention.causal", gpu((9, 0), seq_len_q=128, seq_len_k=256, is_causal=True))
    assert codes(cross, "torch_sdpa_flash") == [ReasonCode.CAUSAL_ALIGNMENT]
    assert "seq_len_q=128 != seq_len_k=256" in messages(cross, "torch_sdpa_flash")[0]
    # cuDNN's set_causal_mask and the efficient kernel's CausalFromTopLeft agree with SDPA
    assert {"torch_sdpa_cudnn", "torch_sdpa_efficient"} <= {s.kernel_id for s in cross.ranked}
    square = engine.select("attention.causal", gpu((9, 0), is_causal=True))
    assert "torch_sdpa_flash" in [s.kernel_id for s in square.ranked]
    not_causal = engine.select("attention.cross", gpu((9, 0), seq_len_q=128, seq_len_k=256))
    assert "torch_sdpa_flash" in [s.kernel_id for s in not_causal.ranked]


def test_flash_training_limits_on_sm86(engine: SelectionEngine) -> None:
    train = engine.select("attention.full", gpu((8, 6), head_dim=200, requires_grad=True))
    assert codes(train, "torch_sdpa_flash") == [ReasonCode.HEAD_DIM_TOO_LARGE]
    assert "8.6" in messages(train, "torch_sdpa_flash")[0]
    infer = engine.select("attention.full", gpu((8, 6), head_dim=200))
    assert "torch_sdpa_flash" in [s.kernel_id for s in infer.ranked]
    hopper = engine.select("attention.full", gpu((9, 0), head_dim=200, requires_grad=True))
    assert "torch_sdpa_flash" in [s.kernel_id for s in hopper.ranked]


def test_cudnn_specific_limits(engine: SelectionEngine) -> None:
    decode = engine.select("attention.decode", gpu((9, 0), seq_len_q=1, seq_len_k=1))
    assert codes(decode, "torch_sdpa_cudnn") == [ReasonCode.SEQ_LEN_UNSUPPORTED]
    det = engine.select("attention.full", gpu((9, 0), deterministic=True))
    assert codes(det, "torch_sdpa_cudnn") == [ReasonCode.NOT_DETERMINISTIC]
    assert "torch_sdpa_flash" in [s.kernel_id for s in det.ranked]  # deterministic backward on request
    drop = engine.select("attention.full", gpu((9, 0), dropout_p=0.1))
    assert codes(drop, "torch_sdpa_cudnn") == [ReasonCode.DROPOUT_UNSUPPORTED]


def test_gpus_newer_than_the_build_supports_are_rejected(engine: SelectionEngine) -> None:
    sel = engine.select("attention.full", gpu((13, 0)))
    assert codes(sel, "torch_sdpa_flash") == [ReasonCode.SM_TOO_NEW]


def test_grouped_query_attention(engine: SelectionEngine) -> None:
    sel = engine.select("attention.causal", gpu((9, 0), num_kv_heads=4, is_causal=True))
    assert codes(sel, "torch_sdpa") == [ReasonCode.GQA_UNSUPPORTED]
    ranked = [s.kernel_id for s in sel.ranked]
    assert "torch_sdpa_gqa" in ranked and "torch_sdpa_math" in ranked
    assert ("torch_sdpa_flash" in ranked) == (torch_backend.TORCH_VERSION >= (2, 5))
    mqa = engine.select("attention.full", gpu((9, 0), num_kv_heads=1))
    assert codes(mqa, "torch_sdpa_efficient") == [ReasonCode.MQA_UNSUPPORTED]


def test_missing_backend_library_is_a_reason_not_an_import_error(
        registries: tuple[KernelRegistry, BackendRegistry], engine: SelectionEngine) -> None:
    kernels, backends = registries
    backends.register("fakelib", module="layerzero_fakelib_not_installed", pip="pip install fakelib")
    kernels.register(KernelSpec("fakelib_attention", "attention", "fakelib", noop, priority=999))
    sel = engine.select("attention.causal", gpu((9, 0), is_causal=True))
    assert sel.selected.kernel_id == "torch_sdpa"
    assert codes(sel, "fakelib_attention") == [ReasonCode.BACKEND_UNAVAILABLE]
    msg = messages(sel, "fakelib_attention")[0]
    assert "'layerzero_fakelib_not_installed' is not installed" in msg and "pip install fakelib" in msg


def test_kernel_without_backward_is_rejected_when_grad_is_required(
        registries: tuple[KernelRegistry, BackendRegistry], engine: SelectionEngine) -> None:
    registries[0].register(KernelSpec("custom_attention_fwd", "attention", "custom", noop, priority=999,
                                      supports_autograd=False))
    assert engine.select("attention.full", gpu((9, 0))).selected.kernel_id == "custom_attention_fwd"
    train = engine.select("attention.full", gpu((9, 0), requires_grad=True))
    assert train.selected.kernel_id == "torch_sdpa"
    assert codes(train, "custom_attention_fwd") == [ReasonCode.GRAD_UNSUPPORTED]


_DEVICES = st.sampled_from([("cpu", None), ("cuda", (7, 5)), ("cuda", (8, 0)), ("cuda", (9, 0)), ("cuda", None)])


@settings(max_examples=60, deadline=None)
@given(device=_DEVICES, dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       head_dim=st.sampled_from([32, 64, 80, 128, 256, 320]), seq_q=st.integers(1, 70000),
       seq_k=st.integers(1, 70000), kv_heads=st.sampled_from([1, 4, 16]), causal=st.booleans(),
       grad=st.booleans(), window=st.sampled_from([None, 128]), dropout=st.sampled_from([0.0, 0.1]))
def test_the_trace_is_every_spec_checked_from_scratch(device: tuple[str, tuple[int, int] | None], dtype: torch.dtype,
                                                      head_dim: int, seq_q: int, seq_k: int, kv_heads: int,
                                                      causal: bool, grad: bool, window: int | None,
                                                      dropout: float) -> None:
    """The engine remembers each kernel's device reasons per (device, dtype): its reasons are still those of
    the availability probe, ``spec.check`` and the breaker, in that order, for every candidate, on a second
    call too."""
    kernels, backends = KernelRegistry(), BackendRegistry()
    torch_backend.register(kernels, backends)
    engine = SelectionEngine(kernels, backends)
    platform, cc = device
    ctx = SelectionContext(device=platform, compute_capability=cc, dtype=dtype, batch_size=2, seq_len_q=seq_q,
                           seq_len_k=seq_k, num_heads=16, num_kv_heads=kv_heads, head_dim=head_dim,
                           is_causal=causal, requires_grad=grad, window=window, dropout_p=dropout)
    is_open = {"torch_sdpa_math"}.__contains__
    for _ in range(2):
        sel = engine.select("attention", ctx, breaker_open=is_open, raise_on_empty=False)
        for spec in kernels.for_operation("attention"):
            unavailable = backends.unavailable_reason(spec.backend)
            want = ([unavailable] if unavailable else []) + spec.check(ctx) + (
                [ReasonCode.CIRCUIT_OPEN] if is_open(spec.kernel_id) else [])
            got = sel.decision(spec.kernel_id).reasons  # type: ignore[union-attr]
            assert [r.code for r in got] == [getattr(r, "code", r) for r in want]
            assert [str(r) for r in got][:len(want) - is_open(spec.kernel_id)] == \
                [str(r) for r in want][:len(want) - is_open(spec.kernel_id)]


def test_the_remembered_device_reasons_follow_both_registries(
        registries: tuple[KernelRegistry, BackendRegistry], engine: SelectionEngine) -> None:
    """A kernel registered, a backend marked unhealthy or healthy again: the next selection on the same device
    and dtype sees it."""
    kernels, backends = registries
    ctx = gpu((9, 0), is_causal=True)
    assert engine.select("attention.causal", ctx).selected.kernel_id == "torch_sdpa"
    kernels.register(KernelSpec("custom_attention", "attention", "custom", noop, priority=999))
    assert engine.select("attention.causal", ctx).selected.kernel_id == "custom_attention"
    backends.register("custom")
    backends.mark_unhealthy("custom", "failed its self-test")
    sel = engine.select("attention.causal", ctx)
    assert sel.selected.kernel_id == "torch_sdpa"
    assert messages(sel, "custom_attention") == ["custom is marked unhealthy: failed its self-test"]
    backends.mark_healthy("custom")
    assert engine.select("attention.causal", ctx).selected.kernel_id == "custom_attention"
    kernels.unregister("custom_attention")
    assert engine.select("attention.causal", ctx).decision("custom_attention") is None


# -- determinism ---------------------------------------------------------------------------------

def _tie_registry() -> KernelRegistry:
    kernels = KernelRegistry()
    for kid in ("custom_zeta", "custom_alpha", "custom_mid"):  # registration order is not id order
        kernels.register(KernelSpec(kid, "rms_norm", "custom", noop, priority=50))
    return kernels


def test_equal_priorities_break_ties_by_kernel_id() -> None:
    engine = SelectionEngine(_tie_registry(), BackendRegistry())
    sel = engine.select("rms_norm", SelectionContext(dtype=torch.float32, hidden_size=64))
    assert [s.kernel_id for s in sel.ranked] == ["custom_alpha", "custom_mid", "custom_zeta"]


def test_the_same_answer_in_a_fresh_process() -> None:
    script = textwrap.dedent("""
        import torch
        from layerzero.registry import BackendRegistry, KernelRegistry
        from layerzero.selection import SelectionContext, SelectionEngine
        from layerzero.spec import KernelSpec
        from layerzero.backends import torch as torch_backend
        kernels, backends = KernelRegistry(), BackendRegistry()
        torch_backend.register(kernels, backends)
        for kid in ("custom_zeta", "custom_alpha", "custom_mid"):
            kernels.register(KernelSpec(kid, "rms_norm", "custom", print, priority=50))
        engine = SelectionEngine(kernels, backends)
        ctx = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.float16, batch_size=4,
                               seq_len=512, num_heads=16, head_dim=128, is_causal=True)
        print(",".join(s.kernel_id for s in engine.select("attention.causal", ctx).ranked))
        print(",".join(s.kernel_id for s in engine.select("rms_norm", SelectionContext(hidden_size=64)).ranked))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    kernels, backends = KernelRegistry(), BackendRegistry()
    torch_backend.register(kernels, backends)
    for kid in ("custom_zeta", "custom_alpha", "custom_mid"):
        kernels.register(KernelSpec(kid, "rms_norm", "custom", print, priority=50))
    engine = SelectionEngine(kernels, backends)
    here = [",".join(s.kernel_id for s in engine.select("attention.causal", gpu((9, 0), is_causal=True)).ranked),
            ",".join(s.kernel_id for s in engine.select("rms_norm", SelectionContext(hidden_size=64)).ranked)]
    assert done.stdout.split() == here


# -- measured times ---------------------------------------------------------------------------------

def _measured_engine(times: Mapping[str, Measurement]) -> tuple[SelectionEngine, list[tuple[str, ...]]]:
    kernels = KernelRegistry()
    kernels.register(KernelSpec("custom_slow_favourite", "rms_norm", "custom", noop, priority=90))
    kernels.register(KernelSpec("custom_fast", "rms_norm", "custom", noop, priority=10))
    kernels.register(KernelSpec("custom_other", "rms_norm", "custom", noop, priority=50))
    seen: list[tuple[str, ...]] = []

    def lookup(operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]) -> Mapping[str, Measurement]:
        seen.append(tuple(s.kernel_id for s in specs))
        return {k: m for k, m in times.items() if k in {s.kernel_id for s in specs}}

    return SelectionEngine(kernels, BackendRegistry(), measurements=lookup), seen


CTX = SelectionContext(dtype=torch.float32, hidden_size=4096, num_tokens=8)


def test_faster_beyond_the_spread_wins() -> None:
    engine, seen = _measured_engine({"custom_slow_favourite": Measurement(10.0, 0.2, 20),
                               "custom_fast": Measurement(5.0, 0.2, 20),
                               "custom_other": Measurement(20.0, 0.2, 20)})
    sel = engine.select("rms_norm", CTX)
    assert [s.kernel_id for s in sel.ranked] == ["custom_fast", "custom_slow_favourite", "custom_other"]
    d = sel.decision("custom_fast")
    assert d is not None and d.measured_us == 5.0 and d.measured_source == "perf-db"
    assert seen == [("custom_slow_favourite", "custom_fast", "custom_other")]  # every eligible kernel, once


def test_within_the_spread_priority_decides() -> None:
    engine, _ = _measured_engine({"custom_slow_favourite": Measurement(10.0, 0.5, 20),
                               "custom_fast": Measurement(9.8, 0.5, 20)})
    ranked = [s.kernel_id for s in engine.select("rms_norm", CTX).ranked]
    assert ranked[:2] == ["custom_slow_favourite", "custom_fast"]


def test_failed_measurements_reject_the_kernel() -> None:
    engine, _ = _measured_engine({"custom_fast": Measurement(1.0, 0.1, 5, source="tuner", failed=True)})
    sel = engine.select("rms_norm", CTX)
    assert "custom_fast" not in [s.kernel_id for s in sel.ranked]
    assert codes(sel, "custom_fast") == [ReasonCode.MEASURED_FAILED]
    assert "tuner" in messages(sel, "custom_fast")[0]
    assert sel.selected.kernel_id == "custom_slow_favourite"


def test_measurements_can_be_switched_off_per_call() -> None:
    engine, _ = _measured_engine({"custom_fast": Measurement(1.0, 0.1, 5)})
    sel = engine.select("rms_norm", CTX, use_measurements=False)
    assert sel.selected.kernel_id == "custom_slow_favourite"


# -- user kernels in the global registry ------------------------------------------------------------

def test_user_kernel_by_call_takes_part_at_once_and_drops_cached_plans() -> None:
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    lz.rms_norm(x, w)
    assert lz.explain(x, w, operation="rms_norm").cached
    calls: list[int] = []

    def custom_fast_rms(x, weight, eps):  # type: ignore[no-untyped-def]
        calls.append(1)
        return torch.rms_norm(x, x.shape[-1:], weight, eps)

    spec = lz.register_kernel(KernelSpec("custom_fast_rms", "rms_norm", "custom", custom_fast_rms, priority=99))
    try:
        exp = lz.explain(x, w, operation="rms_norm")
        assert not exp.cached  # registering dropped the cached plan
        assert exp.selected_kernel == "custom_fast_rms"
        torch.testing.assert_close(lz.rms_norm(x, w), torch.rms_norm(x, (64,), w, 1e-6))
        assert calls == [1]
    finally:
        get_global_kernel_registry().unregister(spec.kernel_id)
    assert lz.which("rms_norm", x, w) == "torch_rms_norm"
    assert not lz.explain(x, w, operation="rms_norm").cached


def test_user_kernel_by_decorator() -> None:
    x = torch.randn(3, 32)
    lz.silu(x)

    @lz.register_kernel(operation="silu", backend="custom", priority=99)
    def custom_silu(x):  # type: ignore[no-untyped-def]
        return x * torch.sigmoid(x)

    try:
        assert "custom_silu" in get_global_kernel_registry()
        assert lz.which("silu", x) == "custom_silu"
        torch.testing.assert_close(lz.silu(x), torch.nn.functional.silu(x))
        assert custom_silu(x).shape == x.shape  # the decorator returns the function itself
    finally:
        get_global_kernel_registry().unregister("custom_silu")


# -- nothing fits / a lock that cannot run --------------------------------------------------------

def test_no_kernel_error_lists_every_candidate_and_reason() -> None:
    ctx = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.int64, batch_size=1, seq_len=8,
                           num_heads=2, head_dim=16)
    expected = r"no kernel can run attention\.full\(device=cuda, sm=90, dtype=int64"
    with pytest.raises(NoKernelError, match=expected) as ei:
        lz.select("attention.full", ctx)
    err = ei.value
    assert isinstance(err, LookupError) and isinstance(err, lz.LayerZeroError)
    assert set(err.rejections) == {s.kernel_id for s in lz.list_kernels("attention.full")}
    text = str(err)
    for kid, reasons in err.rejections.items():
        assert reasons, kid
        assert f"  {kid}: " in text
        assert all(str(r) in text for r in reasons)


def test_lock_on_a_kernel_that_cannot_run_is_kernel_not_supported() -> None:
    ctx = SelectionContext(dtype=torch.float32, batch_size=1, seq_len=8, num_heads=2, head_dim=16, is_causal=True)
    with lz.lock("attention.causal", "torch_sdpa_flash"):
        expected = r"torch_sdpa_flash: device is cpu, kernel runs on cuda"
        with pytest.raises(KernelNotSupportedError, match=expected) as ei:
            lz.select("attention.causal", ctx)
        assert isinstance(ei.value, ValueError)
        assert ei.value.kernel_id == "torch_sdpa_flash"
        assert {r.code for r in ei.value.reasons} >= {ReasonCode.PLATFORM_MISMATCH, ReasonCode.DTYPE_UNSUPPORTED}
        q = torch.randn(1, 2, 8, 16)
        with pytest.raises(KernelNotSupportedError, match="locked by lock attention.causal -> torch_sdpa_flash"):
            lz.attention(q, q, q, is_causal=True)
    assert lz.attention(q, q, q, is_causal=True).shape == q.shape  # the scope is gone


def test_lock_keeps_other_kernels_as_fallbacks() -> None:
    ctx = SelectionContext(dtype=torch.float32, batch_size=1, seq_len=8, num_heads=2, head_dim=16)
    with lz.lock("attention.*", "torch_sdpa_math"):
        sel = lz.select("attention.full", ctx)
    assert sel.selected.kernel_id == "torch_sdpa_math"
    assert sel.locked_by is not None and "torch_sdpa_math" in sel.locked_by
    assert len(sel.ranked) > 1  # the others stay behind it


# -- plan caches against naive models -------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


Op = tuple[str, int]
ops_strategy = st.lists(
    st.one_of(st.tuples(st.just("put"), st.integers(0, 11)), st.tuples(st.just("get"), st.integers(0, 11)),
              st.tuples(st.just("tick"), st.integers(1, 6)), st.tuples(st.just("invalidate"), st.just(0))),
    max_size=80)


def _lru_model_check(cache: PlanCache | MVCCPlanCache, ops: list[Op], per_shard: int | list[int],
                     shards: int = 1) -> None:
    """Exact LRU model (no TTL): one OrderedDict per shard (a single shard for PlanCache), of ``per_shard``
    entries (or ``per_shard[i]`` for shard i)."""
    caps = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    model: dict[int, OrderedDict[int, object]] = {}
    version = 0
    for kind, n in ops:
        shard = model.setdefault(hash(n) & (shards - 1), OrderedDict())
        if kind == "put":
            value = ("plan", n, version)
            cache.put(n, value)
            shard[n] = value
            shard.move_to_end(n)
            while len(shard) > caps[hash(n) & (shards - 1)]:
                shard.popitem(last=False)
        elif kind == "get":
            expected = shard.get(n)
            if expected is not None:
                shard.move_to_end(n)
            assert cache.get(n) == expected
        elif kind == "invalidate":
            cache.invalidate()
            model.clear()
            version += 1
        assert len(cache) == sum(len(s) for s in model.values())
        if isinstance(cache, PlanCache):
            assert cache.keys() == list(model.get(0, OrderedDict()))


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, capacity=st.integers(1, 6))
def test_plan_cache_is_an_lru(ops: list[Op], capacity: int) -> None:
    _lru_model_check(PlanCache(capacity), ops, capacity)


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, capacity=st.integers(1, 16))
def test_mvcc_plan_cache_is_an_lru_per_shard(ops: list[Op], capacity: int) -> None:
    """Each shard an LRU of its share of the capacity; the shares sum to it (the cache never holds more than
    ``capacity``: 16 shards of ceil(3 / 16) entries held 16 plans at ``cache_size=3``)."""
    cache = MVCCPlanCache(capacity, shards=4)
    shards = min(4, 1 << (capacity.bit_length() - 1))  # fewer shards than entries: halved until they fit
    assert cache.mask + 1 == shards
    caps = [capacity // shards + (i < capacity % shards) for i in range(shards)]
    assert sum(caps) == capacity
    _lru_model_check(cache, ops, caps, shards)
    for n in range(40):
        cache.put(("k", n), n)
        assert len(cache) <= capacity


@pytest.mark.parametrize("kind", ["plan", "mvcc"])
@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, ttl=st.integers(1, 10))
def test_ttl_with_an_injected_clock(kind: str, ops: list[Op], ttl: int) -> None:
    """Capacity never binds here: a get returns the last put value iff it is not older than the TTL."""
    clock = Clock()
    cache = PlanCache(1000, ttl, clock=clock) if kind == "plan" else MVCCPlanCache(1000, ttl, shards=2, clock=clock)
    born: dict[int, tuple[float, object]] = {}
    put_since: set[int] = set()  # keys put since the last invalidation
    for op, n in ops:
        if op == "put":
            value = ("plan", n, clock.now)
            cache.put(n, value)
            born[n] = (clock.now, value)
            put_since.add(n)
        elif op == "get":
            entry = born.get(n)
            fresh = entry is not None and clock.now - entry[0] <= ttl
            assert cache.get(n) == (entry[1] if fresh else None)
            if entry is not None and not fresh:
                del born[n]
        elif op == "tick":
            clock.now += n
        else:
            cache.invalidate()
            born.clear()
            put_since.clear()
        assert set(cache.keys()) <= put_since


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, ttl=st.integers(1, 10), capacity=st.integers(1, 4))
def test_ttl_and_capacity_together_never_return_stale_or_wrong_plans(ops: list[Op], ttl: int, capacity: int) -> None:
    clock = Clock()
    cache = PlanCache(capacity, ttl, clock=clock)
    last: dict[int, tuple[float, object]] = {}
    for op, n in ops:
        if op == "put":
            value = ("plan", n, clock.now)
            cache.put(n, value)
            last[n] = (clock.now, value)
        elif op == "get":
            got = cache.get(n)
            if got is not None:
                born, value = last[n]
                assert got == value and clock.now - born <= ttl
        elif op == "tick":
            clock.now += n
        else:
            cache.invalidate()
            last.clear()
        assert len(cache) <= capacity


def test_invalidation_is_visible_to_holders_of_the_new_dict_only() -> None:
    cache = PlanCache(10)
    cache.put("k", "old")
    held = cache.data  # a reader that grabbed the dict before the invalidation finishes on it
    cache.invalidate()
    assert cache.get("k") is None and held.get("k") == "old"
    assert cache.version == 1


def test_zero_capacity_disables_caching() -> None:
    for cache in (PlanCache(0), MVCCPlanCache(0)):
        cache.put("k", "v")
        assert cache.get("k") is None and len(cache) == 0


def test_mvcc_shards_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="shards: must be a power of two, got 3"):
        MVCCPlanCache(10, shards=3)
