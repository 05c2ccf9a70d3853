"""Every ```python block of docs/tuning.md and docs/backends.md runs as written.

Each page's blocks run in order in a fresh interpreter (written to a file, never exec'd in the test
process), so a block that attaches a performance database or changes the config cannot leak into other
tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_pages import page, python_blocks


def _blocks(name: str) -> list[str]:
    return python_blocks(page(name))


def test_each_doc_has_examples() -> None:
    assert len(_blocks("tuning.md")) >= 3 and len(_blocks("backends.md")) >= 1


@pytest.mark.parametrize("name", ["tuning.md", "backends.md"])
def test_doc_examples_run_in_order(tmp_path: Path, name: str) -> None:
    """The blocks of one page run top to bottom in one fresh interpreter; a marker names the failing one."""
    parts = []
    for i, code in enumerate(_blocks(name)):
        parts.append(f"print('--- block {i}', flush=True)\n{code}")
    script = tmp_path / "examples.py"
    script.write_text("\n".join(parts))
    env_db = tmp_path / "never-used.db"  # the examples must name their own database
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LAYERZERO_PERF_DB": str(env_db)})
    last = [line for line in proc.stdout.splitlines() if line.startswith("--- block")][-1:]
    assert proc.returncode == 0, f"{name} {last}: failed:\n{proc.stderr[-3000:]}"
    assert last == [f"--- block {len(_blocks(name)) - 1}"]
    assert not env_db.exists()


def test_the_kernel_table_lists_every_library_kernel() -> None:
    """Each registered kernel outside PyTorch's own has a row in docs/backends.md's table."""
    import re

    import layerzero as lz

    listed = set(re.findall(r"^\| `(\w+)` \|", page("backends.md").read_text(), re.MULTILINE))
    registered = {s.kernel_id for s in lz.list_kernels() if s.backend != "torch"}
    assert registered - listed == set()
    assert listed - registered == set()
