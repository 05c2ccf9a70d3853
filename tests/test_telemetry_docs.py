"""The Python examples of docs/observability.md run as written (in a fresh process, in order)."""

from __future__ import annotations

import subprocess
import sys

from doc_pages import page, python_blocks

DOC = page("observability.md")


def test_observability_examples_run(tmp_path):
    blocks = python_blocks(DOC)
    assert len(blocks) >= 5
    script = tmp_path / "observability_examples.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"LAYERZERO_PERF_DB": str(tmp_path / "perf.db"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the outputs the page shows in its comments
    assert "['layerzero_dispatch_total{kernel=\"torch_rms_norm\",operation=\"rms_norm\"} 100.0']" in out
    assert "plan-cache hit rate: 99.0%" in out
    assert "['layerzero.select']" in out
    assert "\n11\n" in out
    assert "event=policy_change" in proc.stderr and "rules=1" in proc.stderr
