"""``layerzero metrics`` through the installed entry point: print once, or serve a real /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from layerzero.cli import main
from layerzero.telemetry.families import FAMILIES

LZ = str(Path(sys.executable).parent / "layerzero")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, LAYERZERO_PERF_DB=str(tmp_path_factory.mktemp("db") / "perf.db"))


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(env, busy_port):
    commands = {"warm_json": ["metrics", "--once", "--warmup", "--json"],
                "busy": ["metrics", "--port", str(busy_port)]}
    procs = {name: subprocess.Popen([LZ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, args in commands.items()}
    return {name: (*p.communicate(timeout=180), p.returncode) for name, p in procs.items()}


def test_metrics_once_prints_every_family(capsys):
    assert main(["metrics", "--once"]) == 0
    stdout = capsys.readouterr().out
    names = {f.name for f in text_string_to_metric_families(stdout)}
    for name in FAMILIES:
        assert name.removesuffix("_total") in names, name


def test_metrics_once_after_warmup_json_has_counts(runs):
    stdout, stderr, rc = runs["warm_json"]
    assert rc == 0, stderr
    metrics = json.loads(stdout)["metrics"]
    ops = {row["labels"]["operation"]: row["value"] for row in metrics["layerzero_dispatch_total"] if row["value"]}
    assert ops == {"attention.causal": 1, "rms_norm": 1}  # lz.readiness_check() runs each once
    assert metrics["layerzero_cache_misses_total"] == [{"labels": {}, "value": 2}]
    assert metrics["layerzero_cache_hits_total"] == [{"labels": {}, "value": 0}]


def test_metrics_port_in_use_exits_1(runs, busy_port):
    _, stderr, rc = runs["busy"]
    assert rc == 1
    assert f"cannot serve metrics on 127.0.0.1:{busy_port}" in stderr


def test_metrics_serves_a_scrapable_endpoint(env):
    proc = subprocess.Popen([LZ, "metrics", "--port", "0", "--warmup", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["addr"] == "127.0.0.1" and first["port"] > 0 and first["ready"] is True
        with urllib.request.urlopen(first["url"], timeout=30) as resp:
            text = resp.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("layerzero_cache_misses_total", ())] == 2
        assert samples[("layerzero_telemetry_enabled", ())] == 1
        assert any(name == "layerzero_dispatch_total" and v == 1 for (name, _), v in samples.items())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_metrics_port_and_once_together_is_a_usage_error(capsys):
    assert main(["metrics", "--port", "9", "--once"]) == 2
    assert "choose one of --port N (serve) and --once (print)" in capsys.readouterr().err


def test_metrics_duration_stops_the_server(capsys):
    assert main(["metrics", "--port", "0", "--duration", "0.3"]) == 0
    assert "serving layerzero metrics at http://127.0.0.1:" in capsys.readouterr().out
