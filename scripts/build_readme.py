"""Assemble README.md from docs/readme/*.md (the sections' examples are executed by the test suite).

Usage: python scripts/build_readme.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["_header", "core", "dispatch", "policy", "tuning", "backends", "observability", "cli", "integrations",
            "benchmarks", "reliability", "architecture", "development"]


def build() -> str:
    parts = []
    for name in SECTIONS:
        path = ROOT / "docs" / "readme" / f"{name}.md"
        if path.exists():
            parts.append(path.read_text().strip() + "\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = build()
    readme = ROOT / "README.md"
    if "--check" in argv:
        if readme.read_text() != text:
            print("README.md is out of date: run python scripts/build_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
