"""The documentation pages whose examples the tests execute, and how a page's code blocks are read.

Every ```python block of README.md and of docs/**/*.md runs in the test suite. A page whose examples need
more than "they run" (printed output compared with the page, one namespace shared with the test, a GPU) is
executed by a test of its own, named in ``OWNERS``; ``tests/test_docs.py`` runs the blocks of every other
page in a fresh interpreter and checks that each owner reads the page it is named for.

Conventions, the same on every page: blocks run top to bottom, a block whose first line is
``# requires: cuda`` runs only where CUDA is available, and ```text blocks show what the block before
printed (some owners compare them exactly).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

CUDA_MARK = "# requires: cuda"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)

# page (relative to the repository root) -> the test that executes its python blocks
OWNERS = {
    "README.md": "test_readme.py::test_front_page_examples_run",
    "docs/architecture.md": "test_readme.py::test_architecture_examples_run",
    "docs/backends.md": "test_backends_docs.py::test_doc_examples_run_in_order",
    "docs/core.md": "test_explain.py::test_core_doc_examples_run",
    "docs/dispatch.md": "test_dispatch_docs.py::test_doc_python_blocks_run_in_order",
    "docs/integrations.md": "test_integration_transformers.py::test_readme_examples_run",
    "docs/observability.md": "test_telemetry_docs.py::test_observability_examples_run",
    "docs/policy.md": "test_policy.py::test_policy_doc_examples_run",
    "docs/reliability.md": "test_faults.py::test_reliability_readme_examples_run_and_print_what_they_show",
    "docs/tuning.md": "test_backends_docs.py::test_doc_examples_run_in_order",
}


def page(name: str) -> Path:
    """A page of docs/ by its name there (``"core.md"``)."""
    path = DOCS / name
    if not path.is_file():
        raise FileNotFoundError(f"no documentation page {path}")
    return path


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    """The page's ```python blocks, in order."""
    return _BLOCK.findall(path.read_text(encoding="utf-8"))


def needs_cuda(block: str) -> bool:
    return block.startswith(CUDA_MARK)


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()
