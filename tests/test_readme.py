"""The front page: README.md is built from docs/index.md, stays a front page (at most 10 KB), its examples
run and print what it shows, its links point at real pages, its benchmark headline is current, and the Quick
start is exactly what .ci/run runs."""

from __future__ import annotations

import re
import subprocess
import sys

import layerzero as lz
import layerzero.dispatch as dispatch
from doc_pages import README, ROOT, page, python_blocks

TEXT = README.read_text()


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_readme_is_built_from_the_site_home():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_readme.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_is_a_front_page():
    assert len(README.read_bytes()) <= 10_000


def test_readme_links_point_at_real_pages():
    targets = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", TEXT)
    assert targets
    assert [t for t in targets if not (ROOT / t).is_file()] == []


def test_benchmark_pages_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_benchmarks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "<!-- benchmark-headline -->\n- **Measured selection on an NVIDIA" in TEXT


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    quick = TEXT.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert len(commands) == 2
    assert "layerzero bench" in commands[0] and "torch==2.13.0" in commands[0]
    assert "pytest" in commands[1] and "torch==2.13.0" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_front_page_examples_run(tmp_path):
    """The blocks in order in a fresh process; the explain example prints the text block after it."""
    proc = _run("\n".join(python_blocks(README)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = re.search(r"## Why that kernel.*?```text\n(.*?)```", TEXT, re.S).group(1)
    assert proc.stdout.endswith(shown)


def test_architecture_examples_run(tmp_path):
    proc = _run("\n".join(python_blocks(page("architecture.md"))), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[:3] == ["yes", "baked plan table", "1"]


def test_every_public_name_is_in_the_public_names_table():
    text = page("architecture.md").read_text()
    table = text.split("## Public names at a glance", 1)[1]
    missing = [n for n in lz.__all__ if not n.startswith("_") and f"`{n}`" not in table]
    missing += [f"dispatch.{n}" for n in dispatch.__all__ if f"`{n}`" not in table]
    assert not missing, f"public names missing from docs/architecture.md's table: {missing}"
