"""Write the measurements of one card from a performance database as a shipped table (package data).

    python scripts/export_shipped.py perf.db                      # every CUDA card in the file
    python scripts/export_shipped.py perf.db --out src/layerzero/tuning/shipped

One JSON file per card (``<device name>.json``, spaces as underscores), read by
:mod:`layerzero.tuning.shipped`. Rows measured under compile (``compiled=1`` buckets) are kept: the bucket says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerzero.tuning.perfdb import PerfDB
from layerzero.tuning.shipped import SHIPPED_DIR, export_table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", help="the performance database file")
    ap.add_argument("--out", default=str(SHIPPED_DIR), help="directory to write <card>.json into")
    a = ap.parse_args()
    db = PerfDB(a.db)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for digest, text in db.fingerprints().items():
        fp = json.loads(text)
        if fp.get("platform") != "cuda" or fp.get("device_name") in (None, "unknown"):
            continue
        rows = db.rows(hardware=digest, limit=1_000_000)
        libs = sorted({part for r in rows for part in str(r["libraries"]).split(";") if part})
        path = out / f"{fp['device_name'].replace(' ', '_')}.json"
        n = export_table(rows, fp["device_name"], ";".join(libs), path)
        print(f"{path}: {n} rows ({fp['device_name']}, {';'.join(libs)})")
        written += 1
    db.close()
    if not written:
        print("no CUDA rows in", a.db)
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
