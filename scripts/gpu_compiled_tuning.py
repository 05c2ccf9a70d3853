"""Compiled-mode tuning on a GPU: Inductor's code for the native op against Liger's kernels inside the pinned
dispatched op, at the ~1B Llama model bench's shapes, with the same buckets tuned eager for comparison.

    python scripts/gpu_compiled_tuning.py --db /tmp/lz_compiled.db --json benchmarks/results

Prints one row per bucket (eager: each kernel called directly; compiled: as a torch.compile graph runs it)
and writes ``compiled_tuning_<card>.json``. The database it fills can then serve a compiled model bench
(``LAYERZERO_PERF_DB=/tmp/lz_compiled.db``): under compile an opaque kernel is chosen only where its
compiled-mode measurement is ahead of Inductor's beyond both spreads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# (operation, rows, width, grad): the model bench's batch 4 x 1024 tokens (train, prefill) and decode b1/b8
SHAPES = [
    ("rms_norm", 4096, 2048, False), ("rms_norm", 4096, 2048, True), ("rms_norm", 8, 2048, False),
    ("swiglu", 4096, 8192, False), ("swiglu", 4096, 8192, True), ("swiglu", 8, 8192, False),
    ("cross_entropy", 4096, 32000, True),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="/tmp/lz_compiled.db")
    ap.add_argument("--json", default=None, help="directory for compiled_tuning_<card>.json")
    ap.add_argument("--ops", default=None, help="comma-separated subset of operations")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run at 1/64 of the rows)")
    args = ap.parse_args()
    from layerzero.context import SelectionContext
    from layerzero.tuning import grids
    from layerzero.tuning.perfdb import PerfDB
    from layerzero.tuning.tuner import Tuner

    cuda = args.device == "cuda"
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    wanted = set(args.ops.split(",")) if args.ops else None
    db = PerfDB(args.db)
    rows_out = []
    t0 = time.perf_counter()
    for op, rows, width, grad in SHAPES:
        if wanted and op not in wanted:
            continue
        if not cuda:
            rows, width = max(1, rows // 64), max(64, width // 64)
        ctx = SelectionContext(device=args.device, dtype=torch.bfloat16 if cuda else torch.float32, num_tokens=rows,
                               batch_size=rows, hidden_size=width, requires_grad=grad)
        entry = {"operation": op, "rows": rows, "width": width, "grad": grad}
        for mode, contexts in (("eager", [ctx]), ("compiled", grids.compiled_contexts(op, [ctx]))):
            bucket = Tuner(db, quick=False).tune({op: contexts}).buckets[0]
            entry[mode] = {"bucket": bucket.bucket, "selected": bucket.selected,
                           "kernels": {r.kernel_id: {"status": r.status, "median_us": r.median_us,
                                                     "spread_us": r.spread_us, "method": r.method,
                                                     "error": r.error} for r in bucket.results}}
            line = ", ".join(f"{k} {v['median_us']:.1f}+/-{v['spread_us'] or 0:.1f}" if v["median_us"] else
                             f"{k} {v['status']}" for k, v in entry[mode]["kernels"].items())
            print(f"{op:14s} rows={rows:<5d} width={width:<6d} grad={int(grad)} {mode:8s} -> "
                  f"{bucket.selected}: {line}", flush=True)
        rows_out.append(entry)
    print(f"{len(rows_out)} shapes in {time.perf_counter() - t0:.0f} s; database {args.db}")
    if args.json:
        path = Path(args.json) / f"compiled_tuning_{card.replace(' ', '_')}.json"
        path.write_text(json.dumps({"card": card, "torch": torch.__version__, "dtype": "bfloat16",
                                    "shapes": rows_out}, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
