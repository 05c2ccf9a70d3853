"""Measurements shipped with layerzero: kernel times taken on known cards, for machines that measured nothing.

Without measurements selection ranks by priority, and a priority cannot know that Liger's fused SwiGLU wins
1.3x on an H200 at 8k tokens yet loses 2-8x at 128 (a Triton launch from Python costs about 20 us of host
time). So layerzero ships, per card, the times its own tuner measured there (``shipped/<card>.json``): on a
plan-cache miss, when this machine's performance database has no row for the call's bucket, the runtime's
measurement source (:class:`~layerzero.tuning.source.PerfDBSource`) answers from the table of the card it
runs on, matched by device name. What this machine measures (``layerzero tune``, online tuning) always
wins over the shipped rows of the same bucket; ``DispatchConfig.shipped_measurements=False``
(``LAYERZERO_SHIPPED_MEASUREMENTS=0``) turns them off.

A bucket the table has no row for borrows the nearest measured bucket of the same operation and dtype whose
other fields are equal, when its token or sequence counts are within 4x and its hidden size within 2x
(each numeric field compared in powers of two); farther away, nothing is borrowed and priorities decide.
The trace names what was used: ``measured_source`` reads ``shipped NVIDIA H200 (torch=2.11.0;...)`` for an
exact bucket and adds ``nearest n=8192;hidden=2048;grad=1`` for a borrowed one.

The tables are package data, read with ``json`` and checked field by field (a malformed row is skipped);
nothing in them is executed. ``scripts/export_shipped.py`` writes one from a performance database.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerzero import forksafe
from layerzero.selection.engine import Measurement
from layerzero.tuning.records import ID_RE, MAX_SAMPLES, MAX_TEXT, MAX_US

__all__ = ["ShippedTable", "table_for", "tables", "reload", "load_table", "lookup", "export_table", "SHIPPED_DIR",
           "FORMAT", "MIN_SAMPLES"]

log = logging.getLogger("layerzero")

SHIPPED_DIR = Path(__file__).with_name("shipped")
FORMAT = "layerzero-shipped-measurements/1"
_MAX_ROWS = 200_000
MIN_SAMPLES = 3  # fewer timed calls than this is an estimate, not a measurement (export_table leaves it out)
_VARYING = {"n": 2.0, "b": 2.0, "sq": 2.0, "sk": 2.0, "hidden": 1.0}  # field -> largest |log2 ratio| borrowed


@dataclass(frozen=True)
class ShippedTable:
    """One card's shipped measurements: ``rows[(operation, dtype)][bucket][kernel_id]``."""

    device_name: str
    measured_with: str
    rows: dict[tuple[str, str], dict[str, dict[str, Measurement]]] = field(default_factory=dict)
    parsed: dict[tuple[str, str], list[tuple[str, dict[str, str]]]] = field(default_factory=dict)
    nearest: dict[tuple[str, str, str], str | None] = field(default_factory=dict)  # memo of borrowed buckets

    @property
    def source(self) -> str:
        return f"shipped {self.device_name} ({self.measured_with})"

    def has(self, operation: str, dtype: str) -> bool:
        return (operation, dtype) in self.rows


def _fields(bucket: str) -> dict[str, str]:
    out = {}
    for part in bucket.split(";"):
        name, _, value = part.partition("=")
        out[name] = value
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def _distance(want: dict[str, str], have: dict[str, str]) -> float | None:
    """How far ``have`` lies from ``want`` (sum of |log2 ratio| of the varying fields), None when too far."""
    if want.keys() != have.keys():
        return None
    total = 0.0
    for name, value in want.items():
        other = have[name]
        if value == other:
            continue
        limit = _VARYING.get(name)
        a, b = _number(value), _number(other)
        if limit is None or a is None or b is None:
            return None
        gap = abs(math.log2(a / b))
        if gap > limit:
            return None
        total += gap
    return total


def _measurement(row: Any) -> Measurement | None:
    """The row's measurement, each field of its JSON type (a number is not a bool or a string, ``failed`` is a
    bool: ``"false"`` would read as True), or None: the row is skipped."""
    median, spread = row.get("median_us"), row.get("spread_us", 0.0)
    samples, failed = row.get("samples", 1), row.get("failed", False)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (median, spread)):
        return None
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES \
            or not isinstance(failed, bool):
        return None
    if not (math.isfinite(median) and math.isfinite(spread) and 0 < median < MAX_US and 0 <= spread < MAX_US):
        return None
    return Measurement(float(median), float(spread), samples, "shipped", failed)


def load_table(path: str | Path) -> ShippedTable | None:
    """Read one shipped table; None (with a logged warning) when the file is unreadable or not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("shipped measurements %s unreadable (%s); ignored", path.name, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("device_name"), str):
        log.warning("shipped measurements %s: not a %s file; ignored", path.name, FORMAT)
        return None
    table = ShippedTable(data["device_name"][:200], str(data.get("measured_with", ""))[:300])
    rows = data.get("rows")
    for row in rows[:_MAX_ROWS] if isinstance(rows, list) else ():
        if not isinstance(row, dict):
            continue
        names = [row.get(k) for k in ("operation", "dtype", "bucket", "kernel_id")]
        m = _measurement(row)
        if m is None or not all(isinstance(n, str) and 0 < len(n) <= MAX_TEXT for n in names) \
                or not ID_RE.match(names[3]):
            continue
        op, dtype, bucket, kernel_id = names
        table.rows.setdefault((op, dtype), {}).setdefault(bucket, {})[kernel_id] = m
    for key, buckets in table.rows.items():
        table.parsed[key] = [(b, _fields(b)) for b in sorted(buckets)]
    return table


_tables: dict[str, ShippedTable] | None = None
_lock = forksafe.module_lock()


def tables() -> dict[str, ShippedTable]:
    """Every shipped table, by device name (read once)."""
    if _tables is None:
        reload()
    return _tables or {}


def reload(directory: str | Path | None = None) -> dict[str, ShippedTable]:
    """Read the tables again, from ``directory`` (default: the package's own ``shipped/``)."""
    global _tables
    where = Path(directory) if directory is not None else SHIPPED_DIR
    found: dict[str, ShippedTable] = {}
    for path in sorted(where.glob("*.json")) if where.is_dir() else ():
        table = load_table(path)
        if table is not None:
            found[table.device_name] = table
    with _lock:
        _tables = found
    return found


def table_for(device_name: str) -> ShippedTable | None:
    """The shipped table of the card named ``device_name`` (``torch.cuda.get_device_name()``), if any."""
    return tables().get(device_name)


def _nearest(parsed: list[tuple[str, dict[str, str]]], bucket: str) -> str | None:
    want = _fields(bucket)
    best: tuple[float, str] | None = None
    for name, fields in parsed:
        d = _distance(want, fields)
        if d is not None and (best is None or d < best[0]):
            best = (d, name)
    return None if best is None else best[1]


def lookup(table: ShippedTable, operation: str, dtype: str, bucket: str,
           kernel_ids: frozenset[str] | set[str]) -> dict[str, Measurement]:
    """``{kernel_id: Measurement}`` for ``bucket`` from ``table`` (the nearest close bucket when it has none),
    only for ``kernel_ids``; ``{}`` when nothing close enough was measured."""
    buckets = table.rows.get((operation, dtype))
    if not buckets:
        return {}
    found, note = buckets.get(bucket), ""
    if found is None:
        key = (operation, dtype, bucket)
        if key not in table.nearest:
            if len(table.nearest) > 100_000:
                table.nearest.clear()
            table.nearest[key] = _nearest(table.parsed[(operation, dtype)], bucket)
        near = table.nearest[key]
        if near is None:
            return {}
        found, note = buckets[near], f"; nearest {near}"
    source = table.source + note
    return {k: Measurement(m.median_us, m.spread_us, m.samples, source, m.failed)
            for k, m in found.items() if k in kernel_ids}


def export_table(rows: list[dict[str, Any]], device_name: str, measured_with: str, path: str | Path) -> int:
    """Write ``rows`` (as :meth:`PerfDB.rows` returns them, one card's) as a shipped table; returns the count.

    Rows marked failed are kept (selection must not pick a kernel that failed its check there); a time taken
    from fewer than ``MIN_SAMPLES`` samples is left out: it is a first-call estimate, not a measurement (online
    tuning's short runs timed Liger's fused SwiGLU with its backward at 1.8x its real time on an H200), and the
    bucket then borrows from a measured neighbour or falls back to priorities."""
    out = [{"operation": r["operation"], "dtype": r["dtype"], "bucket": r["bucket"], "kernel_id": r["kernel_id"],
            "median_us": round(float(r["median_us"]), 3), "spread_us": round(float(r["spread_us"]), 3),
            "samples": int(r["samples"]), "failed": bool(r["failed"])} for r in rows
           if bool(r["failed"]) or int(r["samples"]) >= MIN_SAMPLES]
    doc = {"format": FORMAT, "device_name": device_name, "measured_with": measured_with, "rows": out}
    Path(path).write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    return len(out)
