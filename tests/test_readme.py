"""The README: assembled from docs/readme/*.md, its own examples run, every public name appears in it,
and the Quick start is exactly what .ci/run runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import layerzero as lz
import layerzero.dispatch as dispatch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_is_built_from_the_sections():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_readme.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert len(commands) == 2
    assert "layerzero bench" in commands[0] and "torch==2.13.0" in commands[0]
    assert "pytest" in commands[1] and "torch==2.13.0" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_header_and_architecture_examples_run(tmp_path):
    for name in ("_header", "architecture"):
        code = "\n".join(_blocks(ROOT / "docs" / "readme" / f"{name}.md"))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        if name == "architecture":
            assert proc.stdout.splitlines()[:3] == ["yes", "baked plan table", "1"]


def test_every_public_name_is_in_the_readme():
    missing = [n for n in lz.__all__ if not n.startswith("_") and n not in README]
    missing += [f"dispatch.{n}" for n in dispatch.__all__ if n not in README]
    assert not missing, f"public names missing from the README: {missing}"
