"""``layerzero doctor`` through the installed entry point, and its exit code when something is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerzero as lz
from layerzero.cli import main

LZ = str(Path(sys.executable).parent / "layerzero")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "perf.db"
    env = dict(os.environ, COLUMNS="200", LAYERZERO_PERF_DB=str(db), LAYERZERO_CACHE_SIZE="123")
    procs = {name: subprocess.Popen([LZ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, args in {"json": ["doctor", "--json"]}.items()}
    out = {name: (*p.communicate(timeout=180), p.returncode) for name, p in procs.items()}
    return out, db


def test_doctor_json_sections(runs):
    out, db = runs
    stdout, stderr, rc = out["json"]
    assert rc == 0, stderr
    report = json.loads(stdout)
    for key in ("system", "backends", "kernels", "policy", "warnings", "perf_db", "config", "runtime"):
        assert key in report, key
    assert report["system"]["software"]["pytorch"]
    assert any(b["name"] == "torch" and b["available"] for b in report["backends"])
    missing = [b for b in report["backends"] if not b["available"] and b.get("pip")]
    for b in missing:  # every missing backend says how to get it
        assert "pip install" in b["pip"]
    assert {k["kernel_id"] for k in report["kernels"]} == {s.kernel_id for s in lz.list_kernels()}
    cfg = report["config"]
    assert cfg["dispatch_config"]["cache_size"] == 123
    assert cfg["changed_from_defaults"] == {"cache_size": 123, "perf_db_path": str(db)}
    assert cfg["environment"]["LAYERZERO_CACHE_SIZE"] == "123"
    perf = report["perf_db"]
    assert (perf["available"], perf["path"], perf["exists"], perf["entries"]) == (True, str(db), False, 0)
    assert not db.exists()  # looking does not create the database
    assert any("no performance database" in w for w in report["warnings"])
    assert report["runtime"]["breakers_not_closed"] == {}
    assert report.get("problems", []) == []


def test_doctor_text(runtime, capsys):
    old = runtime.config
    runtime.configure(old.replace(cache_size=123))
    try:
        assert main(["doctor"]) == 0
    finally:
        runtime.configure(old)
    stdout = capsys.readouterr().out
    for heading in ("devices:", "backends:", "kernels:", "policy in force:", "perf_db:", "config:", "runtime:"):
        assert f"\n{heading}" in stdout or stdout.startswith(heading), heading
    assert "changed_from_defaults:\n    cache_size: 123" in stdout


def test_doctor_exits_1_when_a_breaker_is_open(runtime, capsys):
    breaker = runtime.breakers.get("torch_rms_norm")
    for _ in range(runtime.config.failure_threshold):
        breaker.record_failure(RuntimeError("simulated"))
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"]["breakers_not_closed"] == {"torch_rms_norm": "OPEN"}
    assert any("circuit breaker for torch_rms_norm is OPEN" in p for p in report["problems"])


def test_doctor_reports_an_installed_but_broken_backend(runtime, capsys):
    runtime.backends.register("fakebackend", module="json", probe=lambda: "driver too old for this build")
    try:
        assert main(["doctor"]) == 1
        text = capsys.readouterr().out
        assert "problems:" in text and "backend fakebackend" in text and "driver too old" in text
    finally:
        runtime.backends._probes.pop("fakebackend", None)
        runtime.backends.refresh()
