"""One measurement as the performance database stores it (:class:`Record`), and the bounds every stored or read
value keeps (an id's form, text lengths, a time's range)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Record", "ID_RE", "MAX_TEXT", "MAX_SAMPLES", "MAX_US"]

MAX_TEXT = 512          # longest string column accepted when reading
MAX_SAMPLES = 10**9
MAX_US = 1e12           # longest plausible time (about 11.6 days); larger values are not trusted
ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,127}$")  # a kernel id


@dataclass(frozen=True)
class Record:
    """One measurement to store (``layerzero.tuning.perfdb``'s docstring describes the key)."""

    hardware: str
    libraries: str
    kernel_id: str
    operation: str
    dtype: str
    bucket: str
    median_us: float
    spread_us: float
    samples: int
    failed: bool = False
    error: str | None = None
    source: str = "tune"

    def problems(self) -> list[str]:
        out = []
        if not ID_RE.match(self.kernel_id):
            out.append(f"kernel_id {self.kernel_id!r} is not a snake_case id")
        for name in ("hardware", "libraries", "operation", "dtype", "bucket", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
                out.append(f"{name} must be a non-empty string of at most {MAX_TEXT} characters")
        for name in ("median_us", "spread_us"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= MAX_US:
                out.append(f"{name} must be a finite number >= 0 and at most {MAX_US:g}, got {value!r}")
        if not isinstance(self.samples, int) or not 0 <= self.samples <= MAX_SAMPLES:
            out.append(f"samples must be an int in 0..{MAX_SAMPLES}, got {self.samples!r}")
        return out
