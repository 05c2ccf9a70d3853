#!/usr/bin/env python3
"""Rewrite the "Module map" section of docs/architecture.md: every module of src/layerzero, its line count
and the first line of its docstring (tests/test_architecture.py checks the list is complete)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "layerzero"
PAGE = ROOT / "docs" / "architecture.md"


def rows() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text()
        doc = (ast.get_docstring(ast.parse(text)) or "").strip().split("\n")[0].replace("|", "\\|")
        out.append(f"| `{name}` | {len(text.splitlines())} | {doc} |")
    return out


def main() -> None:
    head = ["## Module map", "", "Every module of `src/layerzero`, with the first line of its docstring "
            "(`python scripts/module_map.py` rewrites this section; `tests/test_architecture.py` checks that the "
            "list is complete).", "", "| module | lines | what it is |", "|---|---|---|"]
    page = PAGE.read_text()
    before = page.split("## Module map", 1)[0].rstrip("\n")
    PAGE.write_text(before + "\n\n" + "\n".join(head + rows()) + "\n")


if __name__ == "__main__":
    main()
