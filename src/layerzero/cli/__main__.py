"""``python -m layerzero.cli``: the ``layerzero`` command."""

from __future__ import annotations

import sys

from layerzero.cli import main

sys.exit(main())
