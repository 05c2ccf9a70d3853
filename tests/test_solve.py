"""Baked plan tables (lz.solve / lz.compile / PlanTable) and lz.warmup."""

from __future__ import annotations

import json

import pytest
import torch

import layerzero as lz
from layerzero.inspection import cache_key
from layerzero.solve import uninstall_plan_table

SHAPES = {
    "rms_norm": [{"hidden_size": 64, "num_tokens": 8}, {"hidden_size": 128, "num_tokens": 3}],
    "attention.causal": [{"batch_size": 2, "seq_len": 16, "num_heads": 4, "num_kv_heads": 4, "head_dim": 32}],
}


@pytest.fixture(autouse=True)
def _no_table():
    yield
    uninstall_plan_table()


def test_solve_save_load_install_runs_without_selection(tmp_path, runtime):
    table = lz.solve(SHAPES, dtype="float32", path=tmp_path / "plans.json")
    assert len(table) == 3
    assert lz.compile is lz.solve
    loaded = lz.PlanTable.load(tmp_path / "plans.json")
    assert loaded.entries == table.entries
    assert loaded.install() is True

    selections = []
    real_select = runtime.select
    runtime.select = lambda *a, **k: selections.append(a) or real_select(*a, **k)  # type: ignore[method-assign]
    try:
        x, w = torch.randn(8, 64), torch.rand(64) + 0.5
        out = lz.rms_norm(x, w)
        # 5 rows land in the same power-of-two bucket (8) as the baked 8-row shape
        x5 = torch.randn(5, 64)
        lz.rms_norm(x5, w)
    finally:
        runtime.select = real_select  # type: ignore[method-assign]
    assert selections == []
    plan = runtime.plans.data[cache_key("rms_norm", (x, w, 1e-6))]
    assert plan.locked_by == "baked plan table"
    assert plan.kernels[0].kernel_id == table.lookup("rms_norm", plan.context)[0]
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_unbaked_bucket_falls_back_to_selection(runtime):
    lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32").install()
    x, w = torch.randn(4, 256), torch.rand(256)
    lz.rms_norm(x, w)
    plan = runtime.plans.data[cache_key("rms_norm", (x, w, 1e-6))]
    assert plan.locked_by is None


def test_policy_lock_wins_over_baked_table(runtime):
    lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32").install()
    x, w = torch.randn(8, 64), torch.rand(64)
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
        lz.rms_norm(x, w)


def test_mismatched_table_refused_or_ignored(tmp_path):
    table = lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32")
    data = table.to_dict()
    data["environment"]["hardware"]["device_name"] = "NVIDIA H100 80GB HBM3"
    data["environment"]["torch"] = "1.0.0"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    other = lz.PlanTable.load(path)
    with pytest.raises(lz.errors.PlanMismatchError, match="device_name: table made for 'NVIDIA H100 80GB HBM3'"):
        other.install()
    assert other.install(on_mismatch="dynamic") is False
    assert lz.get_runtime().baked is None


def test_invalid_table_lists_every_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": 7, "environment": [], "entries": [{"operation": "rms_norm"}, 3]}))
    with pytest.raises(lz.ConfigError) as info:
        lz.PlanTable.load(path)
    text = str(info.value)
    assert "format: must be 1, got 7" in text
    assert "environment: must be an object" in text
    assert "entries[0]" in text and "entries[1]: must be an object" in text
    path.write_text("{not json")
    with pytest.raises(lz.ConfigError, match="not valid JSON"):
        lz.PlanTable.load(path)


def test_solve_rejects_bad_shapes():
    with pytest.raises(lz.InvalidInputError, match="bad shape"):
        lz.solve({"rms_norm": [{"no_such_field": 1}]})
    with pytest.raises(lz.InvalidInputError, match="unknown operation"):
        lz.solve({"matmul": [{}]})


def test_warmup_populates_the_cache(runtime):
    shape = {"batch_size": 1, "seq_len": 8, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"}
    assert lz.warmup("attention.causal", [shape], progress=False) == 1
    q = torch.randn(1, 2, 8, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    assert lz.explain(q, k, v, operation="attention.causal").cached
    misses = runtime.telemetry.misses
    lz.attention(q, k, v, is_causal=True)
    assert runtime.telemetry.misses == misses
