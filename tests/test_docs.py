"""The docs tree: every ```python block of README.md and docs/**/*.md is executed (by the page's own test
named in doc_pages.OWNERS, or here in a fresh interpreter), the mkdocs nav lists every page, and the site
builds with ``mkdocs build --strict`` (broken links and anchors fail it)."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from doc_pages import DOCS, OWNERS, ROOT, needs_cuda, pages, python_blocks, relative

UNOWNED = [p for p in pages() if python_blocks(p) and relative(p) not in OWNERS]


def test_each_owner_executes_its_page():
    for name, owner in OWNERS.items():
        assert python_blocks(ROOT / name), f"{name} has no python block: drop it from OWNERS"
        module, _, function = owner.partition("::")
        source = inspect.getsource(importlib.import_module(module.removesuffix(".py")))
        assert hasattr(importlib.import_module(module.removesuffix(".py")), function), owner
        assert f'"{Path(name).name}"' in source or name == "README.md", f"{owner} does not read {name}"


@pytest.mark.parametrize("path", UNOWNED, ids=[relative(p) for p in UNOWNED])
def test_page_examples_run_in_order(tmp_path: Path, path: Path) -> None:
    blocks = [b for b in python_blocks(path) if not needs_cuda(b) or torch.cuda.is_available()]
    script = tmp_path / "examples.py"
    script.write_text("\n".join(f"print('--- block {i}', flush=True)\n{b}" for i, b in enumerate(blocks)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "LAYERZERO_PERF_DB": str(tmp_path / "perf.db")})
    last = [line for line in proc.stdout.splitlines() if line.startswith("--- block")][-1:]
    assert proc.returncode == 0, f"{relative(path)} {last}:\n{proc.stderr[-3000:]}"


def _nav_pages(items) -> list[str]:
    out = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_nav_lists_every_page():
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
