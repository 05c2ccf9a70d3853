"""The concurrency soak (scripts/soak.py) with CI-sized numbers: 100,000 calls, zero errors, every result right.

8 threads x 12,500 calls over varied shapes through ``lz.*``, ``dispatch()`` and a hot-reload
dispatcher, while chaos threads flip process-wide policies, rewrite the watched YAML file (with a
rejected invalid version every fifth write), invalidate plans and write measurements into a real
SQLite performance database. The chaos interval is 0.2 s here (the script's default, 0.05 s, makes
about two thirds of the calls re-select and takes about 65 s on the 2-core dev machine). The report is
printed (``pytest -s`` shows it) and checked; docs/reliability.md quotes both runs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lz_soak_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lz_soak_script"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_soak_100k_calls(soak: ModuleType, tmp_path: Path) -> None:
    rt = get_runtime()
    rules_before = rt.policy.policy.rules
    report = soak.run_soak(8, 12_500, seed=1, workdir=str(tmp_path), interval_s=0.2)
    print("\n" + report.table())
    assert report.first_errors == [] and report.errors == 0 and report.wrong == 0
    assert report.calls == 100_000 and report.ok
    assert set(report.calls_by_path) == {"lz", "dispatch", "hot"} and report.scoped_calls == 10_000
    # the chaos really happened while the workers ran
    assert report.reloads >= 3 and report.failed_reloads >= 1
    assert report.policy_flips >= 5 and report.invalidations >= 5 and report.all_invalidations > report.invalidations
    assert report.perf_db_writes > 0 and report.tuned_buckets == 4 and report.misses > 0
    # memory stays bounded: a small peak, and no growth to speak of over the second half of the calls
    assert 0 < report.peak_memory_mb < 64
    assert report.memory_growth_mb < 8
    # and the global runtime is left as it was found
    assert rt.policy.policy.rules == rules_before
    assert "soak_rms_norm" not in rt.kernels and "soak_silu" not in rt.kernels
    assert rt.measurement_source is None  # the soak's perf DB is detached


def test_soak_catches_a_wrong_kernel(soak: ModuleType, tmp_path: Path) -> None:
    """The checker can fail: a kernel returning slightly wrong values is caught (on the warm-up already)."""
    def off_by_a_bit(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        return torch.rms_norm(x, x.shape[-1:], weight, eps) * 1.001

    lz.register_kernel(KernelSpec("user_off_rms", "rms_norm", "user", off_by_a_bit, priority=1000))
    try:
        with pytest.raises(AssertionError, match=r"soak warm-up: wrong result for rms_norm n=1 h=64"):
            soak.run_soak(2, 10, workdir=str(tmp_path), interval_s=0.2, trace_memory=False)
    finally:
        get_runtime().kernels.unregister("user_off_rms")
    assert "soak_rms_norm" not in get_runtime().kernels


def test_soak_command_line(soak: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert soak.main(["--threads", "2", "--calls", "150", "--no-tracemalloc", "--interval", "0.1", "--json"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["calls"] == 300 and out["errors"] == 0 and out["wrong"] == 0
    assert out["peak_memory_mb"] == 0.0  # not traced
