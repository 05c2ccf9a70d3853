"""Compiled-mode tuning and pinned opaque kernels under torch.compile (CPU, Inductor).

The tuner times a compiled-mode bucket as a compiled graph runs each kernel: Inductor's code for the
native op, an opaque kernel inside the dispatched op pinned to it. When such a measurement puts the opaque
kernel ahead beyond both spreads, the traced call is the dispatched op pinned to that kernel (forward and
the recomputing backward run it, not what eager selection would choose at run time)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import layerzero as lz
from layerzero.backends.torch.norms import torch_rms_norm
from layerzero.context import SelectionContext
from layerzero.integrations.compile import dispatched_rows
from layerzero.spec import KernelSpec
from layerzero.tuning import grids
from layerzero.tuning.perfdb import PerfDB
from layerzero.tuning.tuner import KernelResult, Tuner

CALLS: Counter[str] = Counter()
OPAQUE = "test_opaque_rms_norm"


def _opaque_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    CALLS["opaque"] += 1  # a stand-in for a Triton kernel Inductor cannot see
    return torch_rms_norm(x, weight, eps)


@pytest.fixture()
def opaque() -> Iterator[str]:
    rt = lz.get_runtime()
    rt.backends.register("testopaque", module="torch")
    # below torch's priority: eager selection would never choose it, so a call of it shows the pin
    rt.kernels.register(KernelSpec(OPAQUE, "rms_norm", "testopaque", _opaque_rms_norm, priority=10,
                                   platforms={"cpu"}, dtypes={torch.float32}))
    CALLS.clear()
    torch._dynamo.reset()
    try:
        yield OPAQUE
    finally:
        rt.kernels.unregister(OPAQUE)
        dispatched_rows.BROKEN.discard(OPAQUE)
        torch._dynamo.reset()


def _ctx(rows: int, grad: bool = False) -> SelectionContext:
    return SelectionContext(device="cpu", dtype=torch.float32, num_tokens=rows, batch_size=rows, hidden_size=128,
                            requires_grad=grad)


def test_compiled_tuning_times_inductor_code_and_the_pinned_opaque_op(opaque: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = PerfDB(tmp_path / "perf.db")
    plan = {"rms_norm": grids.compiled_contexts("rms_norm", [_ctx(64), _ctx(64, grad=True)])}
    report = Tuner(db, check=True, quick=True).tune(plan)
    assert [b.bucket for b in report.buckets] == ["n=64;hidden=128;grad=0;compiled=1",
                                                  "n=64;hidden=128;grad=1;compiled=1"]
    for b in report.buckets:
        by_id = {r.kernel_id: r for r in b.results}
        assert by_id["torch_rms_norm"].status == "ok", by_id
        assert "torch.compile: Inductor's code" in by_id["torch_rms_norm"].method
        assert by_id[opaque].status == "ok" and "torch.compile: opaque op" in by_id[opaque].method
    assert CALLS["opaque"] > 0  # the pinned op ran the opaque kernel (eager selection would run torch's)
    stored = {(r["bucket"], r["kernel_id"]) for r in db.rows()}
    assert ("n=64;hidden=128;grad=0;compiled=1", "torch_rms_norm") in stored
    assert not any(not bucket.endswith("compiled=1") for bucket, _ in stored)  # eager buckets untouched
    db.close()


def test_each_compiled_callable_is_its_own_code_object_so_no_bucket_meets_the_recompile_limit() -> None:
    from layerzero.integrations.compile.timed import compiled_callable

    spec = lz.get_runtime().kernels.get("torch_rms_norm")
    w = torch.rand(128) + 0.5
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for rows in (1, 3, 5):  # one static-shape graph each, where one shared callable would hit the limit
            x = torch.randn(rows, 128)
            torch.testing.assert_close(compiled_callable(spec, "rms_norm", _ctx(rows))(x, w, 1e-6),
                                       torch_rms_norm(x, w, 1e-6))
        shared = compiled_callable(spec, "rms_norm", _ctx(1))
        shared(torch.randn(1, 128), w, 1e-6)
        with pytest.raises(Exception, match="(?i)recompile"):
            shared(torch.randn(3, 128), w, 1e-6)
    torch._dynamo.reset()


def test_compiled_tuning_rejects_attention_with_the_reason() -> None:
    att = SelectionContext(device="cpu", dtype=torch.float32, batch_size=1, seq_len=16, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="compiled-mode tuning covers .*rms_norm.*not attention.causal"):
        grids.compiled_contexts("attention.causal", [att])


def _record(tuner: Tuner, ctx: SelectionContext, native_us: float, opaque_us: float) -> None:
    from layerzero.tuning.buckets import bucket_of

    results = [KernelResult("torch_rms_norm", "torch", "ok", native_us, 1.0, 10, "test"),
               KernelResult(OPAQUE, "testopaque", "ok", opaque_us, 1.0, 10, "test")]
    tuner._store("rms_norm", ctx, bucket_of("rms_norm", ctx), results)


def _norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return lz.rms_norm(x * 2.0, w, 1e-6) + 1.0


@pytest.mark.parametrize("ahead", [True, False])
def test_a_compiled_measurement_pins_the_opaque_kernel_in_the_graph(opaque: str, attached: PerfDB,
                                                                    ahead: bool) -> None:
    rows = 64
    tuner = Tuner(attached)
    for grad in (False, True):
        _record(tuner, _ctx(rows, grad).replace(compiling=True), 100.0, 20.0 if ahead else 99.0)
    x = torch.randn(rows, 128, requires_grad=True)
    w = torch.rand(128) + 0.5
    explanation = torch._dynamo.explain(_norm)(x.detach(), w)
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert explanation.graph_break_count == 0
    assert any("layerzero.rms_norm" in t for t in targets) == ahead, targets
    torch._dynamo.reset()
    compiled = torch.compile(_norm, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, w)
    torch.testing.assert_close(out, _norm(x.detach(), w))
    CALLS.clear()
    with torch.no_grad():
        compiled(x, w)
    assert CALLS["opaque"] == (1 if ahead else 0)
    CALLS.clear()
    y = compiled(x, w)  # training: the pinned op's backward recomputes through the same kernel
    (g,) = torch.autograd.grad(y.sum(), x)
    assert CALLS["opaque"] == (2 if ahead else 0)
    ref = x.detach().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_norm(ref, w).sum(), ref)
    torch.testing.assert_close(g, g_ref)


def test_a_pinned_kernel_that_raises_falls_back_to_dispatch_from_then_on(opaque: str, caplog) -> None:  # type: ignore[no-untyped-def]
    def broken(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        CALLS["broken"] += 1
        raise RuntimeError("simulated launch failure")

    rt = lz.get_runtime()
    rt.kernels.unregister(OPAQUE)
    rt.kernels.register(KernelSpec(OPAQUE, "rms_norm", "testopaque", broken, priority=10, platforms={"cpu"},
                                   dtypes={torch.float32}))
    x, w = torch.randn(8, 128), torch.rand(128) + 0.5
    op = torch.ops.layerzero.rms_norm
    with caplog.at_level("WARNING", logger="layerzero"):
        first = op(x, w, 1e-6, OPAQUE)
        second = op(x, w, 1e-6, OPAQUE)
    torch.testing.assert_close(first, torch_rms_norm(x, w, 1e-6))
    torch.testing.assert_close(second, first)
    assert CALLS["broken"] == 1  # tried once, then dispatch serves
    assert sum("simulated launch failure" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True])
def test_liger_pinned_under_compile_on_cuda(attached: PerfDB, grad: bool) -> None:
    rt = lz.get_runtime()
    if not rt.backends.is_available("liger"):
        pytest.skip(rt.backends.info("liger").reason)
    from layerzero.tuning.buckets import bucket_of

    rows, hidden = 256, 1024
    ctx = SelectionContext(device="cuda", dtype=torch.bfloat16, num_tokens=rows, batch_size=rows, hidden_size=hidden,
                           requires_grad=grad, compiling=True)
    Tuner(attached)._store("rms_norm", ctx, bucket_of("rms_norm", ctx), [
        KernelResult("torch_rms_norm", "torch", "ok", 100.0, 1.0, 10, "test"),
        KernelResult("torch_rms_norm_composed", "torch", "ok", 150.0, 1.0, 10, "test"),
        KernelResult("liger_rms_norm", "liger", "ok", 20.0, 1.0, 10, "test")])
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_norm)(x, w)
    nodes = [n for g in explanation.graphs for n in g.graph.nodes if "layerzero.rms_norm" in str(n.target)]
    assert nodes and "liger_rms_norm" in [str(a) for a in nodes[0].args], nodes
    torch._dynamo.reset()
    y = torch.compile(_norm, fullgraph=True)(x, w)
    ref = x.detach().requires_grad_(grad)
    want = _norm(ref, w)
    torch.testing.assert_close(y, want, atol=3e-2, rtol=3e-2)
    if grad:
        (g,) = torch.autograd.grad(y.float().sum(), x)
        (g_ref,) = torch.autograd.grad(want.float().sum(), ref)
        torch.testing.assert_close(g, g_ref, atol=3e-2, rtol=3e-2)


def test_cli_tune_compiled(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from layerzero.cli import main

    db = str(tmp_path / "cli.db")
    assert main(["tune", "--compiled", "--ops", "attention.causal", "--device", "cpu", "--db", db]) == 2
    assert "compiled-mode tuning covers" in capsys.readouterr().err
    torch._dynamo.reset()
    assert main(["tune", "--compiled", "--ops", "silu", "--shapes", "rows=32,hidden=64", "--device", "cpu",
                 "--db", db, "--json"]) == 0
    out = capsys.readouterr().out
    assert "hidden=64;grad=0;compiled=1" in out and "torch.compile: Inductor's code" in out
    torch._dynamo.reset()
