"""``layerzero doctor`` through the installed entry point, and ``lz.doctor()`` / ``lz.readiness_check()``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.backends.torch import TORCH_KERNEL_IDS

LAYERZERO = Path(sys.executable).parent / "layerzero"
CUDA_ONLY = ("torch_sdpa_flash", "torch_sdpa_efficient", "torch_sdpa_cudnn")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    if not LAYERZERO.exists():
        pytest.fail(f"the layerzero entry point is not installed next to {sys.executable}")
    return subprocess.run([str(LAYERZERO), *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def doctor_text() -> subprocess.CompletedProcess[str]:
    return run_cli("doctor")


@pytest.fixture(scope="module")
def doctor_json() -> subprocess.CompletedProcess[str]:
    return run_cli("doctor", "--json")


def test_doctor_exits_zero_and_lists_devices_backends_and_kernels(
        doctor_text: subprocess.CompletedProcess[str]) -> None:
    assert doctor_text.returncode == 0, doctor_text.stderr
    out = doctor_text.stdout
    for section in ("devices:", "backends:", "kernels:", "policy in force:"):
        assert f"\n{section}\n" in out
    assert f"torch {torch.__version__}" in out
    assert "  cpu: " in out and "cores" in out
    kernel_lines = {line.split()[0]: line for line in out.split("\nkernels:\n")[1].splitlines()
                    if line.startswith("  ") and line.split()}
    for kid in TORCH_KERNEL_IDS:
        assert kid in kernel_lines, kid
    assert "usable here" in kernel_lines["torch_sdpa_math"]
    if not torch.cuda.is_available():
        assert "gpu: none (CUDA kernels are rejected with reasons)" in out
        for kid in CUDA_ONLY:
            assert "not usable: device is cpu, kernel runs on cuda" in kernel_lines[kid]


def test_doctor_json(doctor_json: subprocess.CompletedProcess[str]) -> None:
    assert doctor_json.returncode == 0, doctor_json.stderr
    data = json.loads(doctor_json.stdout)
    assert {"system", "backends", "kernels", "policy", "warnings"} <= set(data)
    assert data["system"]["software"]["pytorch"] == torch.__version__
    torch_backend = next(b for b in data["backends"] if b["name"] == "torch")
    assert torch_backend["available"] and torch_backend["version"]
    kernels = {k["kernel_id"]: k for k in data["kernels"]}
    assert set(TORCH_KERNEL_IDS) <= set(kernels)
    for k in kernels.values():
        assert isinstance(k["usable"], bool) and isinstance(k["reasons"], list)
        assert k["usable"] == (not k["reasons"]), k
    assert kernels["torch_rms_norm"]["usable"]
    if not torch.cuda.is_available():
        for kid in CUDA_ONLY:
            assert kernels[kid]["reasons"] == ["device is cpu, kernel runs on cuda"]
        gpus = data["system"]["hardware"]["gpus"]
        assert gpus == [] and data["system"]["hardware"]["gpu_count"] == 0


def test_doctor_names_a_missing_backend_and_its_install_command(tmp_path: Path) -> None:
    """A backend whose library is missing: doctor still exits 0 and says what to install (fresh process,
    so the global registries of this test session stay as they are)."""
    script = tmp_path / "doctor_fake_backend.py"
    script.write_text(textwrap.dedent("""
        import sys
        import layerzero as lz
        from layerzero.cli import main
        lz.get_global_backend_registry().register("fakelib", module="layerzero_fakelib_not_installed",
                                                  pip="pip install fakelib")
        lz.register_kernel(lz.KernelSpec("fakelib_rms_norm", "rms_norm", "fakelib", print, priority=99))
        sys.exit(main(["doctor"]))
    """), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    backend_line = next(line for line in out.splitlines() if line.startswith("  fakelib "))
    assert "missing: python package 'layerzero_fakelib_not_installed' is not installed -> pip install fakelib" \
        in backend_line
    kernel_line = next(line for line in out.splitlines() if line.startswith("  fakelib_rms_norm "))
    assert "not usable: fakelib is not available" in kernel_line and "pip install fakelib" in kernel_line
    assert "backends not installed: " in out and "fakelib" in out.split("backends not installed: ")[1]


def test_cli_help_lists_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    from layerzero.cli import main

    assert main(["--help"]) == 0
    assert "doctor" in capsys.readouterr().out


def test_doctor_in_process() -> None:
    report = lz.doctor()
    data = report.to_dict()
    json.dumps(data, default=str)
    text = str(report)
    assert text.startswith("layerzero doctor")
    assert {k["kernel_id"] for k in data["kernels"]} == {s.kernel_id for s in lz.list_kernels()}


def test_readiness_check_runs_each_operation_against_its_reference() -> None:
    result = lz.readiness_check(("attention.causal", "rms_norm", "layer_norm"), device="cpu")
    assert result["ready"], result
    for operation in ("attention.causal", "rms_norm", "layer_norm"):
        entry = result["operations"][operation]
        assert entry["ok"] and entry["error"] is None and entry["kernel"] in lz.get_global_kernel_registry()


def test_doctor_reads_the_performance_database_and_never_changes_it(tmp_path: Path) -> None:
    """docs/cli.md: doctor only reads the database. It used to open it as selection does: an empty file was
    built into a database, a newer layerzero's or a foreign SQLite file was moved aside, and a directory was
    reported as in use with 0 entries and no warning."""
    import hashlib
    import sqlite3

    from click.testing import CliRunner

    from layerzero.cli import cli
    from layerzero.runtime import get_runtime

    newer, foreign = tmp_path / "newer.db", tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    from layerzero.tuning.perfdb import PerfDB

    db = PerfDB(newer)
    db.count()
    db.close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    (tmp_path / "empty.db").write_bytes(b"")
    cases = {tmp_path / "empty.db": "an empty file", newer: "written by a newer layerzero",
             foreign: "not a layerzero performance database", tmp_path: "is not a file"}
    rt = get_runtime()
    source, config = rt.measurement_source, rt.config
    try:
        for path, problem in cases.items():
            before = sorted(p.name for p in tmp_path.iterdir())
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            rt.configure(config.replace(perf_db_path=str(path)))
            res = CliRunner().invoke(cli, ["doctor", "--json"])
            data = json.loads(res.output)
            assert problem in data["perf_db"]["problem"] and not data["perf_db"]["in_use"]
            assert any(problem in w for w in data["warnings"]), data["warnings"]
            assert sorted(p.name for p in tmp_path.iterdir()) == before
            assert digest is None or hashlib.sha256(path.read_bytes()).hexdigest() == digest
    finally:
        rt.configure(config)
        rt.measurement_source = source
        rt.invalidate("test")
