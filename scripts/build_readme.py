"""Build README.md, the front page, from docs/index.md (the docs site's home page): the same text, with links
to other pages of docs/ made relative to the repository root (``core.md#errors`` -> ``docs/core.md#errors``).

Usage: python scripts/build_readme.py [--check]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PAGE_LINK = re.compile(r"\]\((?![a-z]+:|#|/)([^)]+\.md(?:#[^)]*)?)\)")


def build() -> str:
    return _PAGE_LINK.sub(r"](docs/\1)", (ROOT / "docs" / "index.md").read_text())


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
