"""Measured selection: the performance database, the tuner and online tuning.

    import layerzero as lz
    db = lz.tuning.use_perf_db("/tmp/perf.db")          # attach a database (default: user cache dir)
    report = lz.tuning.tune(["rms_norm"], grid="quick", device="cpu")
    print(report.table())
    print(lz.explain(x, w, operation="rms_norm"))       # shows measured times per candidate

Modules: ``perfdb`` (the SQLite file), ``fingerprint`` (hardware and library
versions a row is valid for), ``buckets`` (which shapes share a row),
``timing`` (do_bench / perf_counter), ``tuner`` (check, time, store),
``grids`` (the shape grids of ``layerzero tune``), ``online`` (measure new
buckets on first sight), ``source`` (the runtime's measurement source).

Importing this package gives the global runtime the default database (opened
only once its file exists) and the online-tuning hook (which acts only when
``DispatchConfig.online_tuning`` is on). Neither creates files or imports
SQLite until it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from layerzero.runtime import get_runtime
from layerzero.tuning.online import OnlineTuner, enable_online_tuning
from layerzero.tuning.source import PerfDBSource, detach_perf_db, get_perf_db, install_default_source, use_perf_db

if TYPE_CHECKING:
    from layerzero.tuning.perfdb import PerfDB, Record
    from layerzero.tuning.tuner import TuneReport, Tuner

__all__ = ["use_perf_db", "get_perf_db", "detach_perf_db", "tune", "PerfDB", "Record", "Tuner", "TuneReport",
           "PerfDBSource", "OnlineTuner", "enable_online_tuning"]


def tune(operations: Sequence[str] = ("attention.causal", "rms_norm"), *, grid: str = "quick",
         shapes: Sequence[str] | None = None, device: str | None = None, dtypes: Sequence[Any] | None = None,
         budget_s: float | None = None, db: PerfDB | str | None = None, progress: Any = None,
         compiled: bool = False) -> TuneReport:
    """Measure every eligible kernel of ``operations`` on a shape grid and store the results.

    Args:
        operations: operation names (``"attention.causal"``, ``"attention.full"``, ``"rms_norm"``, ...).
        grid: ``"quick"`` or ``"default"`` (see :mod:`layerzero.tuning.grids`); ignored when ``shapes`` is given.
        shapes: explicit shapes such as ``"b=8,s=2048,h=32,kv=8,d=128"`` or ``"rows=4096,hidden=4096"``.
        device: ``"cuda"`` or ``"cpu"`` (default: cuda when available).
        dtypes: dtypes or names (default: bf16 and fp16 on CUDA, float32 on CPU).
        budget_s: stop measuring after this many seconds.
        db: a :class:`PerfDB` or a path; default: the database selection uses (attached if needed).
        progress: ``progress(done, total, label)`` callback.
        compiled: measure compiled-mode buckets (row-wise operations): each kernel as a ``torch.compile``
            graph runs it, Inductor's code for the native op against opaque kernels; stored apart from
            eager measurements (see :func:`layerzero.tuning.grids.compiled_contexts`).

    Example:
        >>> report = lz.tuning.tune(["rms_norm"], shapes=["rows=256,hidden=1024"], device="cpu")
        >>> report.buckets[0].selected
        'torch_rms_norm'
    """
    import torch

    from layerzero.context import dtype_from_name
    from layerzero.tuning import grids
    from layerzero.tuning.perfdb import PerfDB
    from layerzero.tuning.tuner import Tuner

    rt = get_runtime()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dts = tuple(dtype_from_name(d) for d in dtypes) if dtypes else None
    plan = {}
    for operation in operations:
        if shapes:
            default = (torch.bfloat16, torch.float16) if torch.device(dev).type == "cuda" else (torch.float32,)
            plan[operation] = grids.contexts_for_shapes(operation, list(shapes), device=dev, dtypes=dts or default)
        else:
            plan[operation] = grids.grid(operation, grid, device=dev, dtypes=dts)
        if compiled:
            plan[operation] = grids.compiled_contexts(operation, plan[operation])
    if db is None:
        database = get_perf_db(runtime=rt)
    elif isinstance(db, PerfDB):
        database = db
    else:
        database = use_perf_db(db, runtime=rt)
    return Tuner(database, runtime=rt, budget_s=budget_s, progress=progress).tune(plan)


def __getattr__(name: str) -> Any:
    if name in ("PerfDB", "Record"):
        from layerzero.tuning import perfdb

        return getattr(perfdb, name)
    if name in ("Tuner", "TuneReport"):
        from layerzero.tuning import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'layerzero.tuning' has no attribute {name!r}")


install_default_source(get_runtime())
enable_online_tuning(get_runtime())
