"""`layerzero bench --model`: the quick CPU run covers every variant and workload, layerzero agrees with sdpa
token for token and loss for loss in float32, the JSON has the documented structure, and refusals name their
reasons.

Timings are not asserted (a shared 2-core machine); that every entry was timed in every round is.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from layerzero.bench.model import ModelBenchOptions, run_model_bench
from layerzero.bench.model_report import render_model_markdown
from layerzero.bench.model_variants import MODELS, Variant, check_layerzero_attention
from layerzero.errors import UnsupportedModelError

LZ = str(Path(sys.executable).with_name("layerzero"))
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


@pytest.fixture(scope="module")
def quick_report():
    return run_model_bench(ModelBenchOptions(model="llama", quick=True, rounds=2))


def test_quick_cpu_run_times_every_variant_and_workload(quick_report):
    data = json.loads(json.dumps(quick_report.to_dict(), default=str))
    assert data["kind"] == "model_bench" and data["rounds_run"] == {"eager": 2}
    assert data["config"]["variants"][:3] == ["sdpa", "layerzero", "layerzero+patch"]
    assert data["config"]["model_config"]["num_hidden_layers"] == 2 and data["config"]["card"] == "cpu"
    seen = {(r["workload"], r["variant"], r["mode"]) for r in data["results"]}
    assert seen == {(w, v, "eager") for w in ("prefill", "decode_b1", "decode_b8", "train")
                    for v in ("sdpa", "layerzero", "layerzero+patch")}
    for r in data["results"]:
        assert r["error"] is None, r
        assert len(r["times_ms"]) == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        assert r["ratio"] == pytest.approx(r["median_ms"] / next(
            s["median_ms"] for s in data["results"]
            if s["variant"] == "sdpa" and s["workload"] == r["workload"] and s["mode"] == r["mode"]))
        assert r["peak_mb"] is None  # not measured on the CPU
    assert data["notes"]["layerzero+patch"].startswith("patch(): ")


def test_layerzero_agrees_with_sdpa_in_float32(quick_report):
    for r in quick_report.results:
        if r.workload == "train":
            assert r.loss is not None and r.loss_diff is not None and r.loss_diff < 1e-5, r
        else:
            assert r.agreement == 1.0, r


@pytest.mark.skipif(HAS_LIGER, reason="liger-kernel is installed: its rows are not skipped")
def test_liger_rows_are_skipped_with_the_reason(quick_report):
    assert set(quick_report.skipped) == {"liger", "liger+layerzero"}
    assert all("liger-kernel is not installed" in why for why in quick_report.skipped.values())
    text = render_model_markdown(quick_report.to_dict())
    assert "- skipped `liger`: liger-kernel is not installed (pip install liger-kernel)" in text


def test_the_table_has_a_row_per_entry(quick_report):
    text = render_model_markdown(quick_report.to_dict())
    assert "| Workload | Mode | Variant | Median (ms) | Min-max (ms) | vs sdpa | Peak extra (MB) |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(quick_report.results) == 12
    assert all(row.count("|") == 11 for row in rows)


def test_gemma2_runs_against_eager_and_agrees():
    """Gemma 2's attention softcapping reaches lz.attention: the model runs, against transformers' eager
    attention (sdpa refuses softcapping), token for token."""
    check_layerzero_attention("gemma2")
    report = run_model_bench(ModelBenchOptions(model="gemma2", quick=True, rounds=1, workloads=("prefill", "train")))
    assert {r.variant for r in report.results} >= {"eager", "layerzero", "layerzero+patch"}
    for r in report.results:
        assert r.error is None, r
        if r.workload == "train":
            assert r.loss_diff is not None and r.loss_diff < 1e-4, r
        else:
            assert r.agreement == 1.0, r


def test_unknown_workload_is_refused_with_the_list():
    with pytest.raises(ValueError, match="prefill, train, decode_b1, decode_b8"):
        ModelBenchOptions(workloads=("prefill", "sampling")).validate()
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, gemma2"):
        ModelBenchOptions(model="mamba").validate()


def test_variant_globals_are_in_place_only_during_its_calls():
    module = types.ModuleType("fake_modeling")
    original, replacement = object(), object()
    module.apply_rotary_pos_emb = original
    variant = Variant("liger", model=None, globals_patch={"apply_rotary_pos_emb": replacement},  # type: ignore[arg-type]
                      module=module)
    with variant.active():
        assert module.apply_rotary_pos_emb is replacement
    assert module.apply_rotary_pos_emb is original


def test_cli_unknown_model_lists_the_names():
    proc = subprocess.run([LZ, "bench", "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert all(f"'{name}'" in proc.stderr for name in MODELS), proc.stderr


def test_cli_model_bench_writes_json_into_a_directory(tmp_path):
    proc = subprocess.run([LZ, "bench", "--model", "qwen2", "--quick", "--rounds", "1", "--workloads", "prefill,train",
                           "--json", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "model_bench_cpu.json").read_text())
    assert data["config"]["model"] == "qwen2" and data["config"]["workloads"] == ["prefill", "train"]
    assert {r["workload"] for r in data["results"]} == {"prefill", "train"}
    assert "| prefill | eager | layerzero |" in proc.stdout


def test_vocab_and_seq_options_reach_the_model_and_the_shapes():
    """``--vocab`` / ``--seq`` (the Liger comparison's config: vocabulary 128256, 2048 tokens) resize the model
    and the workloads; a sequence past the config's positions raises them to fit."""
    report = run_model_bench(ModelBenchOptions(model="llama", quick=True, rounds=1, workloads=("train",),
                                               vocab=300, seq=300, liger=False))
    c = report.config
    assert c["model_config"]["vocab_size"] == 300
    assert c["shapes"]["seq"] == 300 and c["model_config"]["max_position_embeddings"] >= 300
    assert {r.workload for r in report.results} == {"train"}
