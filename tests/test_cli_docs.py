"""Every ``$ layerzero ...`` sample in docs/cli.md runs, exits as documented and prints what it shows first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doc_pages import page

DOC = page("cli.md")
BIN = str(Path(sys.executable).parent)


def samples() -> list[tuple[str, int, str]]:
    """(command, expected exit code, first line of the shown output) for each console sample."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        lines = block.splitlines()
        command = lines[0].removeprefix("$ ")
        code = 0
        m = re.search(r"#\s*exit (\d+)\s*$", command)
        if m:
            code = int(m.group(1))
            command = command[: m.start()].rstrip()
        out.append((command, code, lines[1].rstrip() if len(lines) > 1 else ""))
    return out


SAMPLES = samples()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ, COLUMNS="110", PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               LAYERZERO_PERF_DB=str(tmp_path_factory.mktemp("db") / "perf.db"))
    procs = [subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for cmd, _, _ in SAMPLES]
    return [(*p.communicate(timeout=300), p.returncode) for p in procs]


def test_the_page_has_a_sample_of_each_command():
    commands = {cmd.split()[1] for cmd, _, _ in SAMPLES}
    assert {"doctor", "list", "explain", "metrics"} <= commands


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=[s[0][:60] for s in SAMPLES])
def test_sample_runs_as_documented(results, index):
    command, code, first = SAMPLES[index]
    output, _, rc = results[index]
    assert rc == code, output
    assert first in [line.rstrip() for line in output.splitlines()], (first, output[:2000])
