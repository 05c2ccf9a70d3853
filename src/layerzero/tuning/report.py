"""What a tuning run reports: each kernel's result per bucket (:class:`KernelResult`), each bucket's results and
the kernel selection now picks there (:class:`BucketResult`), and the run (:class:`TuneReport`, printed by
``layerzero tune``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerzero.context import SelectionContext
from layerzero.selection.engine import format_context

__all__ = ["KernelResult", "BucketResult", "TuneReport"]


@dataclass
class KernelResult:
    """One kernel measured (or failed, or skipped) for one bucket."""

    kernel_id: str
    backend: str
    status: str  # "ok" | "failed" | "skipped"
    median_us: float | None = None
    spread_us: float | None = None
    samples: int = 0
    method: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kernel_id": self.kernel_id, "backend": self.backend, "status": self.status,
                "median_us": self.median_us, "spread_us": self.spread_us, "samples": self.samples,
                "method": self.method, "error": self.error}


@dataclass
class BucketResult:
    """Every kernel's result for one (operation, context) and the kernel selection now picks there."""

    operation: str
    context: SelectionContext
    bucket: str
    results: list[KernelResult] = field(default_factory=list)
    selected: str | None = None
    elapsed_s: float = 0.0

    @property
    def dtype(self) -> str:
        return self.context.dtype_name or "?"

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "dtype": self.dtype, "bucket": self.bucket,
                "shape": format_context(self.operation, self.context), "selected": self.selected,
                "elapsed_s": round(self.elapsed_s, 4), "kernels": [r.to_dict() for r in self.results]}


@dataclass
class TuneReport:
    """What a tuning run measured and stored."""

    buckets: list[BucketResult]
    elapsed_s: float
    db_path: str | None
    device: str
    hardware: dict[str, Any]
    budget_s: float | None = None
    budget_exhausted: bool = False
    store_error: str | None = None  # why the measurements were not (all) stored; None: they were

    @property
    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "failed": 0, "skipped": 0}
        for b in self.buckets:
            for r in b.results:
                out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "hardware": self.hardware, "db": self.db_path,
                "elapsed_s": round(self.elapsed_s, 3), "budget_s": self.budget_s,
                "budget_exhausted": self.budget_exhausted, "counts": self.counts, "store_error": self.store_error,
                "buckets": [b.to_dict() for b in self.buckets]}

    def table(self) -> str:
        """A compact text report: one header per bucket, one line per kernel, the selected kernel marked ``*``."""
        lines: list[str] = []
        for b in self.buckets:
            lines.append(f"{b.operation} {b.dtype} [{b.bucket}] -> {b.selected or 'none'}")
            for r in b.results:
                mark = "*" if r.kernel_id == b.selected else " "
                if r.median_us is not None and r.status == "ok":
                    timing = f"{r.median_us:>11.2f} us +/- {r.spread_us or 0.0:<8.2f}"
                else:
                    timing = f"{'-':>11}    {'':<8}    "
                status = r.status if r.error is None else f"{r.status}: {r.error[:100]}"
                lines.append(f"  {mark} {r.kernel_id:<28} {timing} {status}")
        c = self.counts
        lines.append(f"{len(self.buckets)} buckets, {c['ok']} kernels timed, {c['failed']} failed, "
                     f"{c['skipped']} skipped in {self.elapsed_s:.1f} s"
                     + (" (budget exhausted)" if self.budget_exhausted else "")
                     + (f"; stored in {self.db_path}" if self.db_path and self.store_error is None else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
