"""Shipped measurements: per-card kernel times that rank kernels where this machine measured nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.runtime import get_runtime
from layerzero.runtime.config import DispatchConfig
from layerzero.tuning import shipped
from layerzero.tuning import source as source_mod
from layerzero.tuning.buckets import bucket_of
from layerzero.tuning.fingerprint import HardwareFingerprint, hardware_fingerprint
from layerzero.tuning.perfdb import PerfDB, Record
from layerzero.tuning.source import PerfDBSource, libraries_for

CARD = "NVIDIA Test Card 80GB"


def _row(bucket: str, kernel_id: str, median: float, **extra: object) -> dict[str, object]:
    return {"operation": "rms_norm", "dtype": "bfloat16", "bucket": bucket, "kernel_id": kernel_id,
            "median_us": median, "spread_us": 0.5, "samples": 20, **extra}


def _write(directory: Path, rows: list[object], **head: object) -> Path:
    doc = {"format": shipped.FORMAT, "device_name": CARD, "measured_with": "torch=2.11.0", "rows": rows, **head}
    path = directory / "test_card.json"
    path.write_text(json.dumps(doc))
    return path


ROWS = [_row("n=8192;hidden=2048;grad=1", "torch_rms_norm", 40.0),
        _row("n=8192;hidden=2048;grad=1", "torch_rms_norm_composed", 20.0),
        _row("n=128;hidden=2048;grad=1", "torch_rms_norm", 5.0),
        _row("n=128;hidden=2048;grad=1", "torch_rms_norm_composed", 9.0)]


@pytest.fixture
def card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A shipped table for a fake card, and CUDA contexts that fingerprint as that card."""
    _write(tmp_path, ROWS)
    shipped.reload(tmp_path)
    real = hardware_fingerprint

    def fingerprint(device: object = None) -> HardwareFingerprint:
        if str(device).startswith("cuda"):
            return HardwareFingerprint("cuda", CARD, "9.0", "580.1", "13.0", "cpu")
        return real(device)  # type: ignore[arg-type]

    monkeypatch.setattr(source_mod, "hardware_fingerprint", fingerprint)
    rt = get_runtime()
    saved_source, saved_config = rt.measurement_source, rt.config
    rt.measurement_source = PerfDBSource(rt, None)
    rt.invalidate("test")
    yield tmp_path
    rt.measurement_source = saved_source
    rt.configure(saved_config)
    shipped.reload()
    rt.invalidate("test")


def _ctx(n: int, hidden: int = 2048, grad: bool = True) -> lz.SelectionContext:
    return lz.SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, num_tokens=n,
                               batch_size=n, hidden_size=hidden, requires_grad=grad)


def _ranked(ctx: lz.SelectionContext) -> list[str]:
    return [k.kernel_id for k in get_runtime().select("rms_norm", ctx).ranked]


def test_malformed_files_and_rows_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = [_row("n=1;hidden=8;grad=0", "k1", float("nan")), _row("n=1;hidden=8;grad=0", "k2", -1.0),
           _row("n=1;hidden=8;grad=0", "k3", "fast"), "not a row", {"operation": "rms_norm"},
           _row("n=1;hidden=8;grad=0", "x" * 600, 1.0), _row("n=1;hidden=8;grad=0", "good", 3.0),
           # each field of its JSON type: "false" read as failed=True, true as 1.0 us; no negative samples, no
           # kernel id that is not one
           {**_row("n=1;hidden=8;grad=0", "k4", 2.0), "failed": "false"}, _row("n=1;hidden=8;grad=0", "k5", True),
           {**_row("n=1;hidden=8;grad=0", "k6", 2.0), "samples": -3}, _row("n=1;hidden=8;grad=0", "BAD ID!!", 2.0)]
    table = shipped.load_table(_write(tmp_path, bad))
    assert table is not None
    assert list(table.rows[("rms_norm", "bfloat16")]["n=1;hidden=8;grad=0"]) == ["good"]
    path = _write(tmp_path, ROWS, format="something-else/9")
    assert shipped.load_table(path) is None and "not a layerzero-shipped-measurements/1 file" in caplog.text
    path.write_text("{not json")
    assert shipped.load_table(path) is None


def test_exact_and_nearest_buckets_and_nothing_beyond_the_limits(tmp_path: Path) -> None:
    table = shipped.load_table(_write(tmp_path, ROWS))
    assert table is not None
    ids = {"torch_rms_norm", "torch_rms_norm_composed"}
    exact = shipped.lookup(table, "rms_norm", "bfloat16", "n=8192;hidden=2048;grad=1", ids)
    assert exact["torch_rms_norm_composed"].median_us == 20.0
    assert exact["torch_rms_norm"].source == f"shipped {CARD} (torch=2.11.0)"
    near = shipped.lookup(table, "rms_norm", "bfloat16", "n=16384;hidden=2048;grad=1", ids)  # 2x the tokens
    assert near["torch_rms_norm_composed"].median_us == 20.0 and "nearest n=8192;hidden=2048;grad=1" in \
        near["torch_rms_norm"].source
    assert shipped.lookup(table, "rms_norm", "bfloat16", "n=512;hidden=2048;grad=1", ids)["torch_rms_norm"] \
        .median_us == 5.0  # 4x from 128, 16x from 8192
    assert shipped.lookup(table, "rms_norm", "bfloat16", "n=65536;hidden=2048;grad=1", ids) == {}  # 8x: too far
    assert shipped.lookup(table, "rms_norm", "bfloat16", "n=8192;hidden=8192;grad=1", ids) == {}  # hidden 4x
    assert shipped.lookup(table, "rms_norm", "bfloat16", "n=8192;hidden=2048;grad=0", ids) == {}  # grad differs
    assert shipped.lookup(table, "rms_norm", "float16", "n=8192;hidden=2048;grad=1", ids) == {}
    assert list(shipped.lookup(table, "rms_norm", "bfloat16", "n=8192;hidden=2048;grad=1", {"torch_rms_norm"})) \
        == ["torch_rms_norm"]


def test_selection_on_the_card_follows_the_shipped_times(card: Path) -> None:
    assert _ranked(_ctx(8192))[0] == "torch_rms_norm_composed"
    assert _ranked(_ctx(128))[0] == "torch_rms_norm"
    assert _ranked(_ctx(1 << 20))[0] == "torch_rms_norm"  # nothing close was measured: priorities
    sel = get_runtime().select("rms_norm", _ctx(8192))
    decision = sel.decision("torch_rms_norm_composed")
    assert decision is not None and decision.measured_us == 20.0
    assert decision.measured_source == f"shipped {CARD} (torch=2.11.0)"
    far = get_runtime().select("rms_norm", _ctx(16384)).decision("torch_rms_norm_composed")
    assert far is not None and far.measured_source is not None and "nearest n=8192" in far.measured_source
    # another card, or the CPU, has no table
    cpu = lz.SelectionContext(device="cpu", dtype=torch.bfloat16, num_tokens=8192, batch_size=8192, hidden_size=2048,
                              requires_grad=True)
    assert get_runtime().select("rms_norm", cpu).ranked[0].kernel_id == "torch_rms_norm"


def test_the_config_switch_turns_them_off(card: Path) -> None:
    rt = get_runtime()
    rt.configure(rt.config.replace(shipped_measurements=False))
    assert _ranked(_ctx(8192))[0] == "torch_rms_norm"
    assert DispatchConfig.from_env({"LAYERZERO_SHIPPED_MEASUREMENTS": "0"}).shipped_measurements is False


def test_this_machines_measurements_replace_the_shipped_ones(card: Path) -> None:
    rt = get_runtime()
    db = PerfDB(card / "perf.db", refresh_s=0.0)
    try:
        rt.measurement_source = PerfDBSource(rt, db)
        ctx = _ctx(8192)
        hw = source_mod.hardware_fingerprint("cuda").digest
        db.record([Record(hw, libraries_for(rt, "torch"), k, "rms_norm", "bfloat16", bucket_of("rms_norm", ctx),
                          med, 0.1, 9, False, None, "tune")
                   for k, med in (("torch_rms_norm", 10.0), ("torch_rms_norm_composed", 30.0))])
        assert _ranked(ctx)[0] == "torch_rms_norm"
        # a bucket this machine did not measure still uses the shipped table
        assert _ranked(_ctx(8192, grad=True).replace(num_tokens=16384, batch_size=16384))[0] \
            == "torch_rms_norm_composed"
        buckets = rt.measurement_source.buckets("rms_norm", ctx)
        assert buckets is not None
        assert buckets[bucket_of("rms_norm", ctx)]["torch_rms_norm"].median_us == 10.0
        assert buckets["n=128;hidden=2048;grad=1"]["torch_rms_norm"].source.startswith("shipped")
    finally:
        db.close()


def test_the_package_tables_load() -> None:
    found = shipped.reload()
    for name, table in found.items():
        assert table.rows, name
        for (operation, _dtype), buckets in table.rows.items():
            for kernel_ids in buckets.values():
                for kernel_id in kernel_ids:
                    assert get_runtime().kernels.find(kernel_id) is not None, (operation, kernel_id)


def test_export_writes_a_table_that_loads_back(tmp_path: Path) -> None:
    db = PerfDB(tmp_path / "perf.db", refresh_s=0.0)
    try:
        db.record([Record("hw1", "torch=2.11.0", k, "rms_norm", "bfloat16", "n=4096;hidden=4096;grad=1", med, 0.2, 9,
                          k.endswith("composed"), "boom" if k.endswith("composed") else None, "tune")
                   for k, med in (("torch_rms_norm", 12.5), ("torch_rms_norm_composed", 30.0))])
        # a one-sample time (a first-call estimate) is not shipped
        db.record([Record("hw1", "torch=2.11.0", "liger_rms_norm", "rms_norm", "bfloat16", "n=4096;hidden=4096;grad=1",
                          900.0, 0.0, 1, False, None, "online")])
        path = tmp_path / "card.json"
        assert shipped.export_table(db.rows(hardware="hw1"), CARD, "torch=2.11.0", path) == 2
    finally:
        db.close()
    table = shipped.load_table(path)
    assert table is not None and table.device_name == CARD
    found = table.rows[("rms_norm", "bfloat16")]["n=4096;hidden=4096;grad=1"]
    assert found["torch_rms_norm"].median_us == 12.5 and found["torch_rms_norm_composed"].failed
    assert "liger_rms_norm" not in found
