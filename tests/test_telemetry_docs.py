"""The Python examples of docs/readme/observability.md run as written (in a fresh process, in order)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "readme" / "observability.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_observability_examples_run(tmp_path):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
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
