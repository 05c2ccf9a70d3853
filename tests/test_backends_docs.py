"""Every ```python block of docs/readme/tuning.md and docs/readme/backends.md runs as written.

Each block runs in its own fresh interpreter (written to a file, never exec'd in the test process), so a
block that attaches a performance database or changes the config cannot leak into other tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "readme"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(name: str) -> list[str]:
    return _BLOCK.findall((DOCS / name).read_text())


CASES = [pytest.param(name, i, code, id=f"{name}-{i}") for name in ("tuning.md", "backends.md")
         for i, code in enumerate(_blocks(name))]


def test_each_doc_has_examples() -> None:
    assert len(_blocks("tuning.md")) >= 3 and len(_blocks("backends.md")) >= 1


@pytest.mark.parametrize(("name", "index", "code"), CASES)
def test_doc_example_runs(tmp_path: Path, name: str, index: int, code: str) -> None:
    script = tmp_path / f"example_{index}.py"
    script.write_text(code)
    env_db = tmp_path / "never-used.db"  # the examples must name their own database
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "LAYERZERO_PERF_DB": str(env_db)})
    assert proc.returncode == 0, f"{name} block {index} failed:\n{proc.stderr[-3000:]}"
    assert not env_db.exists()
