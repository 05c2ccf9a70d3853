"""Shape-free plans: one plan serving every shape of a call family, keyed without shapes.

The lz.* hot path first looks up the family key (operation, dtype, device and the keyed flags); only
when no shape-free plan exists does it build the exact-shape key. These tests check when a family gets
such a plan, that calls of new shapes through it are correct and never select, and that a shape its
kernel cannot run sends the family back to exact-shape plans with a correct result.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
import torch

import layerzero as lz
from layerzero.runtime.config import DispatchConfig
from layerzero.errors import InvalidInputError
from layerzero.inspection import cache_keys
from layerzero.ops.attention import attention_reference
from layerzero.policy.scope import LIVE
from layerzero.spec import KernelSpec
from layerzero.tuning.fingerprint import hardware_fingerprint
from layerzero.tuning.perfdb import Record
from layerzero.tuning.source import libraries_for

ATOL = 1e-5


def rnd(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype) + 0.5


def misses(rt) -> int:
    return rt.telemetry.cache_stats.misses


def family_of(operation: str, args: tuple) -> object:
    return cache_keys(operation, args)[0]


def test_attention_family_serves_new_shapes_without_selection(runtime) -> None:
    q, k, v = rnd(1, 8, 1, 64), rnd(1, 8, 128, 64), rnd(1, 8, 128, 64)
    lz.attention(q, k, v)
    fam = family_of("attention.full", (q, k, v, None, False, 0.0, None, None))
    plan = runtime.plans.data[fam]
    assert plan.family == fam and plan.kernel_id == "torch_sdpa"
    before = misses(runtime)
    for b, h, sq, sk, d in ((2, 4, 7, 33, 32), (1, 8, 128, 128, 64), (3, 2, 1, 500, 128)):
        q, k, v = rnd(b, h, sq, d), rnd(b, h, sk, d), rnd(b, h, sk, d)
        out = lz.attention(q, k, v)
        torch.testing.assert_close(out.double(), attention_reference(q, k, v), atol=ATOL, rtol=ATOL)
    assert misses(runtime) == before  # no selection for any of the new shapes
    assert plan.stats.calls >= 3


def test_causal_and_bshd_calls_use_their_own_family(runtime) -> None:
    q, k, v = rnd(2, 16, 4, 32), rnd(2, 16, 4, 32), rnd(2, 16, 4, 32)  # BSHD
    out = lz.attention(q, k, v, is_causal=True, layout="BSHD")
    ref = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=ATOL, rtol=ATOL)
    fam = family_of("attention.causal", (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0,
                                         None, None))
    assert runtime.plans.data[fam].fn.__name__ == "torch_sdpa_causal"
    q2 = rnd(1, 9, 4, 32)
    out = lz.attention(q2, q2, q2, is_causal=True, layout="BSHD")
    ref = attention_reference(*(t.transpose(1, 2) for t in (q2, q2, q2)), is_causal=True)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=ATOL, rtol=ATOL)


def test_scale_reaches_the_kernel_through_a_shape_free_plan() -> None:
    q, k, v = rnd(1, 2, 3, 16), rnd(1, 2, 5, 16), rnd(1, 2, 5, 16)
    lz.attention(q, k, v)
    q, k, v = rnd(1, 2, 4, 16), rnd(1, 2, 6, 16), rnd(1, 2, 6, 16)
    out = lz.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, scale=0.3), atol=ATOL, rtol=ATOL)


def test_a_gqa_call_widens_an_mha_family_plan_to_the_kernel_that_covers_it(runtime, caplog) -> None:
    """An MHA call opened the family (torch_sdpa); its first GQA call makes torch_sdpa raise. torch_sdpa_gqa
    covers torch_sdpa, so the family selects again with that call and gets a torch_sdpa_gqa plan that
    serves both kinds of call."""
    q = rnd(1, 8, 4, 32)
    lz.attention(q, q, q)
    fam = family_of("attention.full", (q, q, q, None, False, 0.0, None, None))
    assert runtime.plans.data[fam].kernel_id == "torch_sdpa"
    qg, kg, vg = rnd(1, 8, 4, 32), rnd(1, 2, 6, 32), rnd(1, 2, 6, 32)  # F.sdpa without enable_gqa raises
    with caplog.at_level(logging.INFO, logger="layerzero"):
        out = lz.attention(qg, kg, vg)
    torch.testing.assert_close(out.double(), attention_reference(qg, kg, vg), atol=ATOL, rtol=ATOL)
    assert any("event=shape_free_plan_dropped" in r.getMessage() and "kernel=torch_sdpa " in r.getMessage()
               and "select again" in r.getMessage() for r in caplog.records)
    assert runtime.plans.data[fam].kernel_id == "torch_sdpa_gqa" and not runtime.family_dropped(fam)
    assert runtime.breakers.get("torch_sdpa").stats().failures == 0  # not the kernel's fault
    before = misses(runtime)
    for qq, kk, vv in ((rnd(2, 8, 3, 32),) * 3, (rnd(1, 4, 5, 32), rnd(1, 1, 7, 32), rnd(1, 1, 7, 32))):
        torch.testing.assert_close(lz.attention(qq, kk, vv).double(), attention_reference(qq, kk, vv), atol=ATOL,
                                   rtol=ATOL)
    assert misses(runtime) == before  # MHA and MQA calls of new shapes: the widened plan, no selection


def test_a_failing_family_plan_no_kernel_covers_sends_the_family_to_exact_shape_plans(runtime, caplog) -> None:
    x, w = rnd(4, 32), rnd(32)
    lz.rms_norm(x, w)
    fam = family_of("rms_norm", (x, w, 1e-6))
    assert runtime.plans.data[fam].kernel_id == "torch_rms_norm"
    x2, w2 = rnd(3, 48), rnd(48)  # the plan bound normalized_shape (32,): torch.rms_norm raises
    with caplog.at_level(logging.INFO, logger="layerzero"):
        out = lz.rms_norm(x2, w2)
    torch.testing.assert_close(out, torch.rms_norm(x2, (48,), w2, 1e-6))
    assert runtime.family_dropped(fam) and fam not in runtime.plans.data  # nothing covers torch_rms_norm
    assert any("action=\"exact-shape plans for this call family\"" in r.getMessage() for r in caplog.records)
    before = misses(runtime)
    lz.rms_norm(rnd(5, 64), rnd(64))
    assert misses(runtime) == before + 1 and fam not in runtime.plans.data
    assert "a shape of this family needed another kernel" in str(lz.explain(x2, w2, operation="rms_norm"))
    runtime.invalidate("test")  # a new epoch forgets the demotion
    lz.rms_norm(x, w)
    assert fam in runtime.plans.data


@pytest.mark.parametrize("causal", [False, True])
def test_a_gqa_first_family_serves_gqa_mqa_and_mha_shapes_from_one_plan(runtime, causal: bool) -> None:
    """torch_sdpa_gqa covers torch_sdpa (enable_gqa=True with equal heads is plain SDPA): the GQA call that
    opens a family gets a shape-free plan, and MQA and MHA calls of the family run through it correctly."""
    q, k, v = rnd(1, 8, 4, 32), rnd(1, 2, 4, 32), rnd(1, 2, 4, 32)
    lz.attention(q, k, v, is_causal=causal)
    exp = lz.explain(q, k, v, is_causal=causal, operation="attention.causal" if causal else "attention.full")
    assert exp.selected_kernel == "torch_sdpa_gqa" and exp.shape_free == "yes"
    fam = family_of("attention.causal" if causal else "attention.full", (q, k, v, None, causal, 0.0, None, None))
    plan = runtime.plans.data[fam]
    assert plan.kernel_id == "torch_sdpa_gqa" and plan.direct is not None
    before = misses(runtime)
    for b, hq, hkv, sq, d in ((2, 8, 4, 5, 32), (1, 8, 1, 3, 16), (3, 4, 4, 7, 64), (1, 6, 2, 1, 32)):
        q, k, v = rnd(b, hq, sq, d), rnd(b, hkv, sq + 2, d), rnd(b, hkv, sq + 2, d)
        out = lz.attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(out.double(), attention_reference(q, k, v, is_causal=causal), atol=ATOL, rtol=ATOL)
        out = lz.attention(q, k, v, is_causal=causal, scale=0.2)  # the adapter form, with a scale
        torch.testing.assert_close(out.double(), attention_reference(q, k, v, is_causal=causal, scale=0.2),
                                   atol=ATOL, rtol=ATOL)
    assert misses(runtime) == before and not runtime.family_dropped(fam)
    with pytest.raises(InvalidInputError, match=r"query heads \(8\) must be divisible by key/value heads \(3\)"):
        lz.attention(rnd(1, 8, 4, 32), rnd(1, 3, 4, 32), rnd(1, 3, 4, 32), is_causal=causal)
    assert runtime.plans.data.get(fam) is plan  # a bad call is the caller's problem, not the family's


def test_measurements_ranking_a_covered_kernel_first_keep_the_gqa_family_plan(runtime, tmp_path) -> None:
    from layerzero.context import SelectionContext
    from layerzero.tuning.buckets import bucket_of

    db = lz.tuning.use_perf_db(tmp_path / "perf.db")
    hw = hardware_fingerprint(torch.device("cpu")).digest
    libs = libraries_for(runtime, "torch")

    def store(hq: int, hkv: int, times: dict[str, float]) -> None:
        ctx = SelectionContext(device="cpu", dtype=torch.float32, batch_size=4, seq_len=256, num_heads=hq,
                               num_kv_heads=hkv, head_dim=64)
        bucket = bucket_of("attention.full", ctx)
        db.record([Record(hw, libs, kid, "attention.full", "float32", bucket, us, 0.1, 10) for kid, us in times.items()])

    try:
        store(8, 8, {"torch_sdpa": 10.0, "torch_sdpa_gqa": 10.0, "torch_sdpa_flash_cpu": 14.0})  # MHA bucket
        store(8, 2, {"torch_sdpa_gqa": 10.0, "torch_sdpa_flash_cpu": 14.0})  # GQA bucket
        q, k, v = rnd(1, 8, 4, 32), rnd(1, 2, 4, 32), rnd(1, 2, 4, 32)
        lz.attention(q, k, v)
        assert lz.explain(q, k, v, operation="attention.full").shape_free == "yes"
        store(16, 16, {"torch_sdpa": 20.0, "torch_sdpa_gqa": 20.0, "torch_sdpa_flash_cpu": 5.0})  # another winner
        lz.attention(q, k, v)
        reason = lz.explain(q, k, v, operation="attention.full").shape_free
        assert reason.startswith("measured times rank torch_sdpa_flash_cpu first for bucket")
    finally:
        lz.tuning.detach_perf_db()
        db.close()


def test_bad_input_on_a_shape_free_plan_raises_ours_and_keeps_the_plan(runtime) -> None:
    q = rnd(1, 2, 4, 16)
    lz.attention(q, q, q)
    fam = family_of("attention.full", (q, q, q, None, False, 0.0, None, None))
    with pytest.raises(InvalidInputError, match="share a dtype"):
        lz.attention(rnd(1, 2, 3, 16), rnd(1, 2, 3, 16, dtype=torch.float64), rnd(1, 2, 3, 16))
    with pytest.raises(InvalidInputError, match="head dims differ"):
        lz.attention(rnd(1, 2, 3, 16), rnd(1, 2, 3, 8), rnd(1, 2, 3, 8))
    # v with k's heads but a shorter sequence: PyTorch's CPU flash kernel would read past it
    with pytest.raises(InvalidInputError, match="k and v must agree"):
        lz.attention(rnd(1, 2, 3, 16), rnd(1, 2, 8, 16), torch.randn(1, 2, 8, 16)[:, :, :5])
    assert fam in runtime.plans.data and not runtime.family_dropped(fam)


def test_rms_norm_new_rows_share_a_plan_and_a_new_hidden_size_drops_it(runtime) -> None:
    w = rnd(64)
    lz.rms_norm(rnd(3, 64), w)
    fam = family_of("rms_norm", (rnd(1, 64), w, 1e-6))
    plan = runtime.plans.data[fam]
    assert plan.direct is torch.rms_norm and plan.const == (64,)
    before = misses(runtime)
    for rows in (1, 17, 300):
        x = rnd(rows, 64)
        ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)) * w.double()
        torch.testing.assert_close(lz.rms_norm(x, w).double(), ref, atol=1e-5, rtol=1e-5)
    assert misses(runtime) == before
    x, w2 = rnd(5, 32), rnd(32)  # the bound normalized_shape (64,) does not fit: torch raises
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)) * w2.double()
    torch.testing.assert_close(lz.rms_norm(x, w2).double(), ref, atol=1e-5, rtol=1e-5)
    assert runtime.family_dropped(fam) and fam not in runtime.plans.data


@pytest.mark.parametrize("call", ["layer_norm", "gelu", "silu"])
def test_other_ops_with_shape_free_torch_kernels(runtime, call: str) -> None:
    fn = getattr(lz, call)
    for rows in (2, 9):
        x = rnd(rows, 48)
        if call == "layer_norm":
            w, b = rnd(48), rnd(48)
            out, ref = fn(x, w, b), torch.nn.functional.layer_norm(x.double(), (48,), w.double(), b.double())
        elif call == "gelu":
            out, ref = fn(x), torch.nn.functional.gelu(x.double())
        else:
            out, ref = fn(x), torch.nn.functional.silu(x.double())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert any(getattr(p, "family", None) is not None for p in runtime.plans.data.values())


def test_config_switch_and_environment_variable(runtime) -> None:
    assert DispatchConfig.from_env({"LAYERZERO_SHAPE_FREE_PLANS": "0"}).shape_free_plans is False
    runtime.configure(runtime.config.replace(shape_free_plans=False))
    q = rnd(1, 2, 3, 16)
    lz.attention(q, q, q)
    assert all(p.family is None for p in runtime.plans.data.values())
    exp = lz.explain(q, q, q, operation="attention.full")
    assert exp.shape_free == "shape_free_plans is off" and "plan: one per shape (shape_free_plans is off)" in str(exp)


def test_conditional_policy_rules_keep_plans_per_shape(runtime) -> None:
    q = rnd(1, 2, 3, 16)
    with lz.lock("attention.full", "torch_sdpa_math", condition="seq_len_q > 1000"):
        lz.attention(q, q, q)
        assert all(p.family is None for p in runtime.scoped_plans(runtime.current_policy()).values())
        assert "conditional policy rule" in lz.explain(q, q, q, operation="attention.full").shape_free
    with lz.lock("attention.full", "torch_sdpa"):  # unconditional: the same for every shape
        lz.attention(q, q, q)
        assert lz.explain(q, q, q, operation="attention.full").shape_free == "yes"


def test_scopes_are_counted_while_any_context_holds_one() -> None:
    gc.collect()
    start = LIVE.scopes
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        assert LIVE.scopes == start + 1
        x, w = rnd(2, 8), rnd(8)
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
        lz.rms_norm(x, w)

    async def inherit() -> str:
        with lz.lock("rms_norm", "torch_rms_norm_composed"):
            task = asyncio.ensure_future(asyncio.sleep(0, result=None))  # copies the context inside the block
            inner = asyncio.get_running_loop().create_task(_which_later())
        await task
        return await inner  # runs after the block closed, still inside the scope it copied

    assert asyncio.run(inherit()) == "torch_rms_norm_composed"
    gc.collect()
    assert LIVE.scopes == start


async def _which_later() -> str:
    await asyncio.sleep(0)
    x, w = rnd(2, 8), rnd(8)
    lz.rms_norm(x, w)
    plans = [p for p in lz.get_runtime().plans.data.values() if p.operation == "rms_norm"]
    assert all(p.kernel_id != "torch_rms_norm_composed" for p in plans)  # the scope's plans are its own
    return lz.which("rms_norm", x, w)


def test_a_higher_priority_kernel_rejected_for_a_shape_reason_blocks_shape_free(runtime) -> None:
    calls = []

    def small_rms(x, weight, eps):  # type: ignore[no-untyped-def]
        calls.append(x.shape)
        return torch.rms_norm(x, x.shape[-1:], weight, eps)

    spec = KernelSpec("test_small_rms", "rms_norm", "custom", small_rms, priority=99, max_hidden_size=64)
    lz.register_kernel(spec)
    try:
        x, w = rnd(3, 128), rnd(128)  # too wide for the custom kernel: torch_rms_norm runs it
        lz.rms_norm(x, w)
        reason = lz.explain(x, w, operation="rms_norm").shape_free
        assert "test_small_rms was rejected for a shape-dependent reason (HIDDEN_TOO_LARGE)" in reason
        x2, w2 = rnd(3, 64), rnd(64)
        lz.rms_norm(x2, w2)  # a width the custom kernel takes: it must be selected, not a family plan
        assert calls and calls[-1] == x2.shape
    finally:
        get = lz.get_runtime().kernels
        get.unregister("test_small_rms")


def test_measurements_that_rank_another_kernel_first_keep_plans_per_shape(runtime, tmp_path) -> None:
    db = lz.tuning.use_perf_db(tmp_path / "perf.db")
    hw = hardware_fingerprint(torch.device("cpu")).digest
    libs = libraries_for(runtime, "torch")

    def store(bucket: str, rms_us: float, composed_us: float, libraries: str = libs) -> None:
        db.record([Record(hw, libraries, "torch_rms_norm", "rms_norm", "float32", bucket, rms_us, 0.1, 10),
                   Record(hw, libraries, "torch_rms_norm_composed", "rms_norm", "float32", bucket, composed_us, 0.1,
                          10)])

    try:
        x, w = rnd(4, 32), rnd(32)
        lz.rms_norm(x, w)
        assert lz.explain(x, w, operation="rms_norm").shape_free == "yes"
        store("n=4096;hidden=4096;grad=0", 5.0, 9.0)  # measured, and the priority choice is faster: still free
        assert db.has_rows(hw, "rms_norm", "float32") and not db.has_rows(hw, "rms_norm", "float16")
        lz.rms_norm(x, w)
        assert lz.explain(x, w, operation="rms_norm").shape_free == "yes"
        assert any(p.family is not None for p in runtime.plans.data.values())
        store("n=8;hidden=64;grad=0", 5.0, 4.0, libraries="torch=0.0-other")  # another torch version: ignored
        lz.rms_norm(x, w)
        assert lz.explain(x, w, operation="rms_norm").shape_free == "yes"
        store("n=16;hidden=8192;grad=0", 9.0, 5.0)  # another kernel wins a bucket of the family
        before = runtime.telemetry.cache_stats.misses
        lz.rms_norm(x, w)
        assert runtime.telemetry.cache_stats.misses == before + 1  # the write invalidated the plans
        reason = lz.explain(x, w, operation="rms_norm").shape_free
        assert reason == "measured times rank torch_rms_norm_composed first for bucket n=16;hidden=8192;grad=0"
        assert all(p.family is None for p in runtime.plans.data.values() if p.operation == "rms_norm")
    finally:
        lz.tuning.detach_perf_db()
        db.close()


def test_online_tuning_keeps_plans_per_shape(runtime, tmp_path) -> None:
    lz.tuning.use_perf_db(tmp_path / "online.db")
    lz.tuning.enable_online_tuning(runtime)
    runtime.configure(runtime.config.replace(online_tuning=True, online_tuning_budget_ms=1.0))
    x, w = rnd(2, 16), rnd(16)
    lz.rms_norm(x, w)
    assert all(p.family is None for p in runtime.plans.data.values())
    assert lz.explain(x, w, operation="rms_norm").shape_free == "online tuning measures each new shape bucket"
    lz.tuning.detach_perf_db()


def test_open_breaker_on_the_family_kernel_routes_calls_through_fallbacks(runtime) -> None:
    q = rnd(1, 2, 3, 16)
    lz.attention(q, q, q)
    runtime.breakers.get("torch_sdpa").trip(RuntimeError("test"))
    q2, k2 = rnd(2, 2, 5, 16), rnd(2, 2, 7, 16)
    out = lz.attention(q2, k2, k2)
    torch.testing.assert_close(out.double(), attention_reference(q2, k2, k2), atol=ATOL, rtol=ATOL)
    assert lz.get_runtime().last_run.value[0].kernel_id != "torch_sdpa"
