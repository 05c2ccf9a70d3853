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


def test_an_environment_variable_that_cannot_be_read_keeps_its_default_and_doctor_says_so(tmp_path):
    """A typo in LAYERZERO_* made ``import layerzero`` raise, so every command, doctor and --help included,
    printed a traceback. The global runtime keeps that setting's default (a warning says so); the others apply."""
    env = dict(os.environ, COLUMNS="200", LAYERZERO_PERF_DB=str(tmp_path / "perf.db"), LAYERZERO_CACHE_SIZE="abc",
               LAYERZERO_DISPATCH_MODE="bogus", LAYERZERO_CACHE_TTL="nan", LAYERZERO_TELEMETRY="0")
    code = "import layerzero as lz; c = lz.get_runtime().config; print(c.cache_size, c.enable_telemetry)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["10000", "False"]  # the defaults where unreadable, the readable one applied
    assert "LAYERZERO_CACHE_SIZE='abc'" in run.stderr and "the default is used" in run.stderr
    assert "<string>:1: RuntimeWarning: layerzero:" in run.stderr  # the warning names the user's import line
    assert subprocess.run([LZ, "--help"], capture_output=True, text=True, env=env, timeout=120).returncode == 0
    doctor = subprocess.run([LZ, "doctor", "--json"], capture_output=True, text=True, env=env, timeout=180)
    warnings = json.loads(doctor.stdout)["warnings"]
    assert sum(w.startswith("environment: LAYERZERO_") for w in warnings) == 3, warnings
