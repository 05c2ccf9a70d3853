"""layerzero.distributed: rank 0's decisions on every rank, and divergence detection.

The multi-process tests spawn real processes that talk over the gloo backend
on the loopback interface (127.0.0.1, a free port). Each worker writes what it
saw to a JSON file; the test asserts on every rank's file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import layerzero as lz
import layerzero.tuning as lz_tuning
from layerzero import distributed as lzd
from layerzero.context import SelectionContext
from layerzero.errors import SelectionDivergenceError
from layerzero.inspection import cache_key
from layerzero.runtime import get_runtime
from layerzero.selection.engine import Measurement
from layerzero.spec import KernelSpec


# -- helpers shared by the workers ----------------------------------------------------------------------

def _inputs(seq: int = 16, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    t = {
        "q": torch.randn(1, 4, seq, 32, generator=g), "k": torch.randn(1, 4, seq, 32, generator=g),
        "v": torch.randn(1, 4, seq, 32, generator=g),
        "x": torch.randn(8, 64, generator=g), "w": torch.rand(64, generator=g) + 0.5,
    }
    return {n: v.to(device=device, dtype=dtype) for n, v in t.items()}


def _workload(seq: int = 16, device: str = "cpu", dtype: torch.dtype = torch.float32
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run attention and rms_norm; return the outputs and the kernel of each cached plan (what ran)."""
    t = _inputs(seq, device, dtype)
    out = {"attention.causal": lz.attention(t["q"], t["k"], t["v"], is_causal=True),
           "rms_norm": lz.rms_norm(t["x"], t["w"])}
    args = {"attention.causal": (t["q"], t["k"], t["v"], None, True, 0.0, None, None),
            "rms_norm": (t["x"], t["w"], 1e-6)}
    plans = get_runtime().plans.data
    return out, {op: plans[cache_key(op, a)].kernel_id for op, a in args.items()}


def _outputs_match_everywhere(out: dict[str, torch.Tensor]) -> bool:
    import torch.distributed as dist

    same = True
    for t in out.values():
        got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(got, t.contiguous())
        same = same and all(torch.equal(got[0], g) for g in got)
    return same


def _fake_perf(operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]) -> dict[str, Measurement]:
    """A measurement source that says the slow reference kernels are the fastest."""
    fast = {"attention": "torch_sdpa_math", "rms_norm": "torch_rms_norm_composed"}.get(operation.split(".")[0])
    return {s.kernel_id: Measurement(1.0 if s.kernel_id == fast else 500.0, 0.1, 10, "fake perf db")
            for s in specs}


def _divergence(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except SelectionDivergenceError as exc:
        return {"raised": True, "message": str(exc), "differences": exc.differences}
    return {"raised": False}


# -- scenarios (run in every spawned process) -------------------------------------------------------

def _scenario_two(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """Rank 1 has different measurements; later rank 0 has a kernel rank 1 lacks."""
    rt = get_runtime()
    lz_tuning.detach_perf_db()
    if rank == 1:
        rt.measurement_source = _fake_perf
    res: dict[str, Any] = {}
    _, res["kernels_before"] = _workload()
    res["check_before"] = _divergence(lzd.check_consistency)
    report = lzd.synchronize()
    res["report"] = {"decisions": report.decisions, "policy_mismatch": report.policy_mismatch, "ok": report.ok,
                     "perf_buckets": report.perf_buckets, "text": str(report)}
    out, res["kernels_after"] = _workload()
    res["same_outputs"] = _outputs_match_everywhere(out)
    res["explain_locked_by"] = lz.explain(*(_inputs()[n] for n in "qkv"), operation="attention.causal").locked_by
    res["check_after"] = lzd.check_consistency().contexts
    # Same shape bucket (seq 15 rounds up to 16): rank 0's shared perf data decides on rank 1 too.
    _, res["kernels_same_bucket"] = _workload(seq=15)
    # A kernel only rank 0 has: rank 1 cannot follow, and every rank hears about it.
    if rank == 0:
        rt.kernels.register(KernelSpec("dist_test_rms_norm", "rms_norm", "torch", lambda x, w, eps: x * 1.0,
                                       priority=999))
    x = torch.randn(3, 40) + 1
    lz.rms_norm(x, torch.ones(40))
    res["strict"] = _divergence(lzd.synchronize)
    res["lenient_problems"] = {str(k): v for k, v in lzd.synchronize(strict=False).problems.items()}
    # A kernel whose breaker is open on rank 1 only: rank 1 cannot follow rank 0; the failed strict sync takes
    # its locks back on every rank, and rank 1's calls keep working through their fallback.
    if rank == 0:
        rt.kernels.unregister("dist_test_rms_norm")
    lzd.synchronize(strict=False)  # every rank can follow rank 0 again
    y = torch.randn(5, 48) + 1
    if rank == 1:
        rt.breakers.get("torch_rms_norm").trip("test: broken on this rank")
    lz.rms_norm(y, torch.ones(48))
    res["sync_locks_before_strict"] = sorted(
        r.operation for r in rt.policy.api_rules if r.origin == lzd.SYNC_ORIGIN)
    res["breaker_strict"] = _divergence(lzd.synchronize)
    res["sync_locks_after_failed_strict"] = sorted(
        r.operation for r in rt.policy.api_rules if r.origin == lzd.SYNC_ORIGIN)
    res["rms_after_failed_strict"] = bool(torch.allclose(
        lz.rms_norm(y, torch.ones(48)), torch.nn.functional.rms_norm(y, (48,), torch.ones(48), 1e-6)))
    return res


def _record(path: Path, rows: dict[str, float]) -> None:
    """Give this rank its own perf DB with measured times for the workload's attention bucket."""
    from layerzero.tuning.buckets import bucket_of
    from layerzero.tuning.fingerprint import hardware_fingerprint
    from layerzero.tuning.perfdb import Record
    from layerzero.tuning.source import libraries_for

    db = lz_tuning.use_perf_db(path)
    t = _inputs()
    bucket = bucket_of("attention.causal", SelectionContext.from_attention(t["q"], t["k"], t["v"], is_causal=True))
    libs = libraries_for(get_runtime(), "torch")
    db.record([Record(hardware_fingerprint("cpu").digest, libs, kid, "attention.causal", "float32", bucket, us,
                      us / 100, 20) for kid, us in rows.items()])


def _scenario_four(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """Rank 2 has its own lock, rank 3 its own perf DB, rank 1 a shape nobody else dispatched."""
    rt = get_runtime()
    if rank == 0:  # measured data that agrees with the priorities: torch_sdpa fastest
        _record(tmp / "rank0.db", {"torch_sdpa": 5.0, "torch_sdpa_flash_cpu": 50.0})
    elif rank == 3:  # a perf DB that says the reference kernel is fastest
        _record(tmp / "rank3.db", {"torch_sdpa_math": 1.0})
    else:
        lz_tuning.detach_perf_db()
    if rank == 2:
        lz.lock("rms_norm", "torch_rms_norm_composed")
    res: dict[str, Any] = {}
    _, res["kernels_before"] = _workload()
    if rank == 1:
        lz.rms_norm(torch.randn(5, 48), torch.rand(48))
    res["check_before"] = _divergence(lzd.check_consistency)
    report = lzd.synchronize(check=True)
    res["report"] = {"policy_mismatch": report.policy_mismatch, "ok": report.ok, "n": len(report.decisions),
                     "checked": report.checked is not None and report.checked.contexts, "text": str(report),
                     "perf_buckets": report.perf_buckets}
    out, res["kernels_after"] = _workload()
    res["same_outputs"] = _outputs_match_everywhere(out)
    # Rank 0's measured times are what every rank's selection sees for that bucket now.
    t = _inputs()
    trace = lz.explain(t["q"], t["k"], t["v"], operation="attention.causal").trace
    res["measured"] = {d.kernel_id: d.measured_us for d in trace if d.measured_us is not None}
    # After synchronize the user's own lock is still there, behind rank 0's choices.
    res["own_lock_kept"] = any(r.origin == "lz.lock()" for r in rt.policy.policy.rules)
    return res


def _scenario_nccl(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """On GPUs over NCCL: rank 1 has different measurements, then everyone adopts rank 0's choices."""
    lz_tuning.detach_perf_db()
    if rank == 1:
        get_runtime().measurement_source = _fake_perf
    res: dict[str, Any] = {}
    _, res["kernels_before"] = _workload(device="cuda", dtype=torch.bfloat16)
    res["check_before"] = _divergence(lzd.check_consistency)
    res["report_ok"] = lzd.synchronize(check=True).ok
    out, res["kernels_after"] = _workload(device="cuda", dtype=torch.bfloat16)
    res["same_outputs"] = _outputs_match_everywhere(out)
    return res


_SCENARIOS = {"two": _scenario_two, "four": _scenario_four, "nccl": _scenario_nccl}


def _worker(rank: int, world: int, port: int, scenario: str, outdir: str) -> None:
    out = Path(outdir)
    try:
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        torch.set_num_threads(1)
        import torch.distributed as dist

        backend = "gloo"
        if scenario == "nccl":
            torch.cuda.set_device(rank)
            backend = "nccl"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            result = _SCENARIOS[scenario](rank, world, out)
        finally:
            dist.destroy_process_group()
        (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, world: int, tmp_path: Path, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=(world, _free_port(), scenario, str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed scenario {scenario!r} did not finish in {timeout_s} s")
    except Exception:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.error")))
        raise AssertionError(f"a rank failed:\n{errors}") from None
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


# -- tests ---------------------------------------------------------------------------------------------

def test_two_ranks_divergent_measurements_then_synchronized(tmp_path: Path) -> None:
    results = _spawn("two", 2, tmp_path)
    r0, r1 = results
    # Before: rank 1's measurements pick the reference kernels.
    assert r0["kernels_before"] == {"attention.causal": "torch_sdpa", "rms_norm": "torch_rms_norm"}
    assert r1["kernels_before"] == {"attention.causal": "torch_sdpa_math", "rms_norm": "torch_rms_norm_composed"}
    for r in results:  # every rank raises, naming the ranks, operations and kernels
        check = r["check_before"]
        assert check["raised"]
        assert "2 of 2 dispatched contexts" in check["message"]
        assert "rank 0 -> torch_sdpa; rank 1 -> torch_sdpa_math" in check["message"]
        assert "rank 0 -> torch_rms_norm; rank 1 -> torch_rms_norm_composed" in check["message"]
        assert {d["operation"] for d in check["differences"]} == {"attention.causal", "rms_norm"}
    assert r0["check_before"]["message"] == r1["check_before"]["message"]
    # After: rank 1 runs rank 0's kernels, bit-for-bit the same outputs, and the check passes.
    for r in results:
        assert r["report"]["ok"]
        assert {d["kernel"] for d in r["report"]["decisions"]} == {"torch_sdpa", "torch_rms_norm"}
        assert r["kernels_after"] == r0["kernels_before"]
        assert r["same_outputs"]
        assert r["check_after"] == 2
        assert "synchronized from rank 0" in r["explain_locked_by"]
        # Rank 0's perf data (none for that bucket) stands for the whole bucket on rank 1 too.
        assert r["kernels_same_bucket"] == r0["kernels_before"]
    assert r1["report"]["perf_buckets"] == 0
    # A kernel only rank 0 has: every rank raises, naming rank 1 and the kernel.
    for r in results:
        assert r["strict"]["raised"]
        assert "rank 1:" in r["strict"]["message"]
        assert "dist_test_rms_norm is not registered here" in r["strict"]["message"]
        assert list(r["lenient_problems"]) == ["1"]
    # a rank whose breaker is open cannot follow; the failed strict sync takes its locks back everywhere
    for r in results:
        assert r["breaker_strict"]["raised"]
        assert "its circuit breaker is open on this rank" in r["breaker_strict"]["message"]
        assert r["sync_locks_after_failed_strict"] == r["sync_locks_before_strict"]
    assert r1["rms_after_failed_strict"]


def test_four_ranks_with_a_different_lock_and_a_different_perf_db(tmp_path: Path) -> None:
    results = _spawn("four", 4, tmp_path)
    assert results[0]["kernels_before"] == {"attention.causal": "torch_sdpa", "rms_norm": "torch_rms_norm"}
    assert results[2]["kernels_before"]["rms_norm"] == "torch_rms_norm_composed"   # its own lock
    assert results[3]["kernels_before"]["attention.causal"] == "torch_sdpa_math"  # its own perf DB
    for r in results:
        msg = r["check_before"]["message"]
        assert r["check_before"]["raised"]
        assert "ranks 0, 1, 2 -> torch_sdpa; rank 3 -> torch_sdpa_math" in msg
        assert "ranks 0, 1, 3 -> torch_rms_norm; rank 2 -> torch_rms_norm_composed" in msg
        assert "policy digests differ" in msg
        # rank 1's extra shape was decided by rank 0 and checked everywhere
        assert r["report"]["n"] == 3 and r["report"]["checked"] == 3
        assert r["report"]["policy_mismatch"] == [2]
        assert r["report"]["ok"]
        assert r["kernels_after"] == results[0]["kernels_before"]
        assert r["same_outputs"]
        assert r["report"]["perf_buckets"] == 1
        assert r["measured"] == {"torch_sdpa": 5.0, "torch_sdpa_flash_cpu": 50.0}  # rank 3's own data is set aside
    assert results[2]["own_lock_kept"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl(tmp_path: Path) -> None:
    r0, r1 = _spawn("nccl", 2, tmp_path, timeout_s=300)
    assert r1["kernels_before"]["attention.causal"] == "torch_sdpa_math"  # its fake measurements
    assert r0["kernels_before"]["attention.causal"] != "torch_sdpa_math"
    for r in (r0, r1):
        assert r["check_before"]["raised"] and "rank 1 -> torch_sdpa_math" in r["check_before"]["message"]
        assert r["report_ok"]
        assert r["kernels_after"] == r0["kernels_before"]
        assert r["same_outputs"]


def test_group_of_one_without_torch_distributed() -> None:
    lzd.track(always=True)  # without a process group the automatic log records nothing
    x, w = torch.randn(4, 24), torch.rand(24) + 0.5
    lz.rms_norm(x, w)
    report = lzd.synchronize()
    assert report.world_size == 1 and report.ok and report.policy_mismatch == []
    assert any(d["operation"] == "rms_norm" and d["kernel"] == "torch_rms_norm" for d in report.decisions)
    assert lzd.check_consistency().world_size == 1
    lz.unlock("rms_norm")  # the synchronized locks are ordinary lock rules: unlock removes them
    assert not any(r.origin == lzd.SYNC_ORIGIN and r.operation == "rms_norm" for r in get_runtime().policy.policy.rules)


def test_synchronized_choice_is_a_lock_that_explain_shows() -> None:
    lzd.track(always=True)
    x, w = torch.randn(6, 40), torch.rand(40) + 0.5
    lz.rms_norm(x, w)
    lzd.synchronize()
    exp = lz.explain(x, w, operation="rms_norm")
    assert exp.selected_kernel == "torch_rms_norm"
    assert exp.locked_by is not None and "synchronized from rank 0" in exp.locked_by
    # A lock added after synchronize() comes first, like any newer lock (check_consistency would catch
    # the divergence on a real group); synchronizing again adopts rank 0's new choice.
    lz.lock("rms_norm", "torch_rms_norm_composed")
    assert lz.explain(x, w, operation="rms_norm").selected_kernel == "torch_rms_norm_composed"
    report = lzd.synchronize()
    assert [d["kernel"] for d in report.decisions if d["operation"] == "rms_norm"][-1] == "torch_rms_norm_composed"
    y = torch.randn(3, 40)  # a shape never dispatched is not synchronized: the local lock decides it
    assert lz.explain(y, w, operation="rms_norm").locked_by == "lock rms_norm -> torch_rms_norm_composed (lz.lock())"


def test_wire_round_trip_ignores_device_index_and_tp_rank() -> None:
    ctx = SelectionContext(device="cuda:3", compute_capability=(9, 0), dtype="bfloat16", batch_size=2, seq_len=128,
                           num_heads=8, num_kv_heads=2, head_dim=64, is_causal=True, tp_size=4, tp_rank=3)
    other = ctx.replace(device="cuda:0", compute_capability=(9, 0), tp_rank=0)
    assert lzd.wire(ctx) == lzd.wire(other)
    back = lzd.context_from_wire(lzd.wire(ctx))
    assert back.replace(device="cuda:3", compute_capability=(9, 0), tp_rank=3) == ctx


def test_automatic_log_records_only_inside_a_process_group() -> None:
    log = lzd.track()
    assert not log.always
    lz.rms_norm(torch.randn(3, 20), torch.rand(20))
    assert len(log) == 0  # no process group: no context kept (memory stays with the plan cache)


def test_decision_log_records_each_selected_context_once() -> None:
    log = lzd.decision_log()
    log.clear()
    x, w = torch.randn(2, 20), torch.rand(20)
    for _ in range(3):
        lz.rms_norm(x, w)
    entries = [e for e in log.entries() if e[0] == "rms_norm"]
    assert len(entries) == 1 and entries[0][1].hidden_size == 20
    assert lzd.track() is log  # one log per runtime


def test_auto_check_runs_check_consistency_at_synchronize() -> None:
    lzd.track(always=True)
    lz.rms_norm(torch.randn(3, 16), torch.rand(16))
    assert lzd.synchronize().checked is None
    previous = lzd.auto_check(True)
    try:
        report = lzd.synchronize()
        assert report.checked is not None and report.checked.contexts >= 1
    finally:
        lzd.auto_check(previous)


def test_shared_measurements_answer_for_shared_buckets_only() -> None:
    rt = get_runtime()
    specs = rt.kernels.for_operation("rms_norm")
    mine = {s.kernel_id: Measurement(7.0) for s in specs}

    def inner(operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]) -> dict[str, Measurement]:
        return dict(mine)

    shared_ctx = SelectionContext(dtype="float32", hidden_size=64, num_tokens=8, batch_size=8)
    other_ctx = shared_ctx.replace(hidden_size=128)
    key = lzd._perf_key("rms_norm", shared_ctx)
    overlay = lzd.SharedMeasurements(inner, {key: {"torch_rms_norm": (3.0, 0.1, 5, "rank 0 perf db", False)}}, 0)
    assert overlay("rms_norm", shared_ctx, specs) == {"torch_rms_norm": Measurement(3.0, 0.1, 5, "rank 0 perf db")}
    # the same bucket (7 rows round up to 8) is rank 0's too; another hidden size is this rank's own data
    assert overlay("rms_norm", shared_ctx.replace(num_tokens=7), specs).keys() == {"torch_rms_norm"}
    assert overlay("rms_norm", other_ctx, specs) == mine
