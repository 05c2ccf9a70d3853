"""``import layerzero`` in a fresh interpreter prints nothing (no NumPy or other warning)."""

from __future__ import annotations

import subprocess
import sys


def test_plain_import_is_silent() -> None:
    done = subprocess.run([sys.executable, "-W", "default", "-c", "import layerzero"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""
