"""`layerzero bench`: the report has the seed's format and every budget line; the CLI runs end to end.

Timings are not asserted (shared, noisy machines); the structure, the cache-hit column, the identity of
static resolve and the memory measurement are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerzero.bench.report import render_markdown
from layerzero.bench.runner import BenchOptions, run_bench

LZ = str(Path(sys.executable).with_name("layerzero"))


def test_run_bench_small_report_structure():
    opts = BenchOptions(iterations=30, quick=True, include_import=False, memory_plans=2000, memory_calls=20_000)
    report = run_bench(opts)
    ops = {r.operation for r in report.results}
    assert ops == {"attention.causal", "attention.decode", "rms_norm"}
    for r in report.results:
        assert r.p50_us > 0 and r.p99_us >= r.p50_us and r.p999_us >= r.p99_us
        assert r.cache_hit == 1.0, r  # warm-up selected the plan; every timed call hits
        assert r.kernel.startswith("torch_")
    paths = [o.path for o in report.overhead]
    for expected in ("lz.attention(q, k, v) cached", "lz.rms_norm(x, w) cached", "static resolve(op)(...)",
                     "static dispatch(op, inputs)", "dynamic dispatch(op, inputs) cached", "plan-cache lookup",
                     "breaker check + telemetry record", "2,000 cached plans", "20,000 cached calls"):
        assert expected in paths
    ragged = [o for o in report.overhead if o.path.startswith(("lz.attention_varlen", "lz.attention_paged"))]
    assert [o.direct for o in ragged] == ["SDPA per sequence (loop)", "gather pages + dense SDPA"]
    assert all(o.info and o.value and o.value > 0 and o.note.startswith("kernel: torch_") for o in ragged), ragged
    resolve = next(o for o in report.overhead if o.path.startswith("static resolve"))
    assert resolve.note == "resolve returns the kernel itself"
    memory = next(o for o in report.overhead if o.path == "2,000 cached plans")
    assert memory.value is not None and 0 < memory.value < 17.0 * 2000 / 50_000 * 3
    text = render_markdown(report)
    assert "| Operation | Batch | Seq Len | p50 (us) | p99 (us) | p99.9 (us) | Cache Hit |" in text
    assert "```yaml" in text and "hardware:" in text and "software:" in text and "config:" in text
    assert ("PASS" in text) or ("MISS" in text)
    json.dumps(report.to_dict(), default=str)
    # the seed's "Benchmark Results Format": its keys, in its order (ours after them)
    assert list(report.system["hardware"])[:6] == ["cpu", "cpu_cores", "ram", "gpu", "gpu_count", "nvlink"]
    assert report.system["hardware"]["gpu_count"] > 0 or report.system["hardware"]["nvlink"] is False
    assert list(report.workload)[:6] == ["operation", "batch_sizes", "seq_lengths", "dtype", "iterations", "warmup"]
    assert report.workload["operation"] == ["attention.causal", "attention.decode", "rms_norm"]
    assert report.workload["batch_sizes"] == sorted({r.batch for r in report.results})
    assert report.workload["seq_lengths"] == sorted({r.seq_len for r in report.results})
    one = run_bench(BenchOptions(iterations=10, quick=True, ops=("rms_norm",), include_import=False,
                                 include_memory=False, include_ragged=False))
    assert one.workload["operation"] == "rms_norm"


def test_bench_cli_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([LZ, "bench", "--iterations", "20", "--ops", "rms_norm", "--no-memory", "--no-import",
                           "--strict", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr  # 1 = a budget line missed on this noisy machine
    assert "| Operation | Batch | Seq Len |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["results"] and data["overhead"]
    assert data["all_passed"] == (proc.returncode == 0)


def test_bench_cli_refuses_an_operation_it_does_not_time() -> None:
    """Exit 2 naming it (docs/cli.md: a usage error), not an empty results table and exit 0."""
    proc = subprocess.run([LZ, "bench", "--quick", "--ops", "rms_norm,bogus.op"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "'bogus.op': the bench times attention.causal, attention.decode, rms_norm" in proc.stderr


def test_the_import_probe_lets_python_cache_bytecode(monkeypatch) -> None:
    """The import line times ``import layerzero`` as a user's second interpreter sees it: an environment with
    ``PYTHONDONTWRITEBYTECODE=1`` (CI images, some shells) would otherwise time compiling every module of a fresh
    checkout, every run (torch's modules were compiled by pip). The probes run for real here."""
    from layerzero.bench import runner

    seen: list[dict[str, str]] = []
    real = subprocess.run

    def spy(*args, **kwargs):
        seen.append(kwargs["env"])
        return real(*args, **kwargs)

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(runner.subprocess, "run", spy)
    rows = runner.run_import(BenchOptions(quick=True), lambda msg: None)
    assert len(seen) == 3 and all("PYTHONDONTWRITEBYTECODE" not in env for env in seen)
    assert rows[0].path == "import layerzero" and "ms on top of" in rows[0].note


@pytest.mark.parametrize("args, message", [
    (["bench", "--dtype", "int8"], "'int8' is not one of 'float32', 'float16', 'bfloat16'"),
    (["bench", "--quick", "--json", "/nonexistent/dir/x.json"], "'/nonexistent/dir' does not exist"),
    (["bench", "--quick", "--json", __file__ + "/x.json"], f"'{__file__}' is a file, not a folder"),
    (["bench", "--iterations", "0"], "0 is not in the range x>=1"),
    (["bench", "--model", "llama", "--budget-s", "nan"], "nan is not a number of seconds"),
    (["bench", "--model", "llama", "--budget-s", "-5"], "-5.0 is not in the range x>0.0"),
    (["metrics", "--port", "0", "--duration", "-1"], "is not in the range"),
    (["metrics", "--port", "0", "--duration", "nan"], "nan is not a number of seconds"),
    (["metrics", "--duration", "1"], "--duration stops a server: it needs --port N"),
])
def test_bad_bench_and_metrics_options_are_usage_errors(args, message, capsys) -> None:
    """Exit 2 naming the option, before any work (a bad --json folder used to fail after the whole run, with a
    traceback; --dtype int8 with one)."""
    from layerzero.cli import main

    assert main(args) == 2
    assert message in capsys.readouterr().err
