"""Measured times for selection: the performance database as ``Runtime.measurement_source``.

The runtime asks its measurement source only on plan-cache misses, with the
operation, the context and the eligible kernel specs. :class:`PerfDBSource`
answers from the database's bucket for that context, keeping only rows whose
library versions match what is installed now, and the database caches
lookups in memory. Every write to the database invalidates the runtime's
cached plans, so the next call of each shape selects again with the new data.
Where the database has no row for a bucket, the measurements shipped for this
card answer (:mod:`layerzero.tuning.shipped`), unless
``DispatchConfig.shipped_measurements`` is off.

``use_perf_db(path)`` attaches a database to a runtime (the global one by
default); ``get_perf_db()`` returns the attached one. Unless told otherwise
the global runtime uses the default database, but only once that file exists
(``layerzero tune`` or online tuning creates it): importing layerzero never
creates files.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.selection.engine import Measurement
from layerzero.spec import KernelSpec
from layerzero.tuning.buckets import bucket_of
from layerzero.tuning.fingerprint import hardware_fingerprint, library_versions
from layerzero.tuning.shipped import ShippedTable, lookup, table_for

if TYPE_CHECKING:
    from layerzero.runtime import Runtime
    from layerzero.tuning.perfdb import PerfDB

__all__ = ["PerfDBSource", "use_perf_db", "get_perf_db", "detach_perf_db", "install_default_source",
           "libraries_for"]


def libraries_for(runtime: Runtime, backend: str) -> str:
    """The library-version key of ``backend`` as installed in this process."""
    try:
        version = runtime.backends.info(backend).version
    except Exception:  # an unknown backend has no version to key on
        version = None
    return library_versions(backend, version)


class PerfDBSource:
    """A ``Runtime.measurement_source`` reading a :class:`PerfDB`.

    Args:
        runtime: the runtime whose backend registry gives library versions and whose plans a write invalidates.
        db: the database; ``None`` means the default one, opened only once its file exists.
    """

    def __init__(self, runtime: Runtime, db: PerfDB | None = None) -> None:
        self.runtime = runtime
        self._db = db
        self._lazy = db is None
        self._next_probe = 0.0
        self._lock = forksafe.lock(self)
        if db is not None:
            db.add_listener(self._changed)

    @property
    def db(self) -> PerfDB | None:
        """The database if open (the default one opens on the first lookup after its file appears).

        The default one is ``DispatchConfig.perf_db_path`` of the runtime's config when set, else
        ``$LAYERZERO_PERF_DB``, else ``perf.db`` in the user cache directory; a config naming another
        file closes the open one and reads that."""
        if self._lazy:
            from layerzero.tuning.perfdb import default_path

            db = self._db
            if db is not None:
                want = self.runtime.config.perf_db_path
                if want is not None and default_path(want) != db.path:
                    with self._lock:
                        if self._db is db:
                            db.remove_listener(self._changed)
                            db.close()
                            self._db = None
                            self._next_probe = 0.0
            if self._db is None:
                now = time.monotonic()
                if now >= self._next_probe:
                    self._next_probe = now + 2.0
                    if default_path(self.runtime.config.perf_db_path).exists():  # never creates the file
                        self.open()
        return self._db

    def open(self) -> PerfDB:
        """Open (creating if needed) the database this source reads."""
        with self._lock:
            if self._db is None:
                from layerzero.tuning.perfdb import PerfDB, default_path

                self._db = PerfDB(default_path(self.runtime.config.perf_db_path) if self._lazy else None)
                self._db.add_listener(self._changed)
            return self._db

    def _changed(self) -> None:
        self.runtime.invalidate("performance data changed")

    def buckets(self, operation: str, ctx: SelectionContext) -> dict[str, dict[str, Measurement]] | None:
        """Every stored bucket of ``operation`` for ``ctx``'s hardware and dtype: ``{bucket: {kernel_id:
        Measurement}}``, rows of other library versions left out (as lookups leave them out). ``None``
        when the database cannot be read right now."""
        db = self.db
        if ctx.dtype is None:
            return {}
        shipped = self.shipped_table(ctx)
        out: dict[str, dict[str, Measurement]] = {}
        if shipped is not None:
            for bucket, found in shipped.rows.get((operation, ctx.dtype_name or ""), {}).items():
                out[bucket] = {k: Measurement(m.median_us, m.spread_us, m.samples, shipped.source, m.failed)
                               for k, m in found.items() if self.runtime.kernels.find(k) is not None}
        hw = hardware_fingerprint(ctx.device).digest
        if db is None or not db.has_rows(hw, operation, ctx.dtype_name or ""):
            return out
        rows = db.rows(operation=operation, hardware=hw, limit=100_000)
        local: dict[str, dict[str, Measurement]] = {}
        libs: dict[str, str] = {}
        for r in rows:
            if r["dtype"] != ctx.dtype_name:
                continue
            spec = self.runtime.kernels.find(r["kernel_id"])
            if spec is None:
                continue
            want = libs.get(spec.backend)
            if want is None:
                want = libs[spec.backend] = libraries_for(self.runtime, spec.backend)
            if r["libraries"] != want:
                continue
            local.setdefault(r["bucket"], {})[r["kernel_id"]] = Measurement(
                float(r["median_us"]), float(r["spread_us"]), int(r["samples"]), str(r["source"]), bool(r["failed"]))
        out.update(local)  # this machine's rows replace the shipped ones, bucket by bucket
        return out

    def shipped_table(self, ctx: SelectionContext) -> ShippedTable | None:
        """The shipped measurements of the card ``ctx`` runs on, when the config allows them."""
        if not self.runtime.config.shipped_measurements or ctx.device is None:
            return None
        device = str(ctx.device)
        if not device.startswith("cuda"):
            return None
        return table_for(hardware_fingerprint(device).device_name)

    def has_data(self, operation: str, ctx: SelectionContext) -> bool:
        """Whether any shape bucket of ``operation`` has measurements for ``ctx``'s hardware and dtype
        (:meth:`Runtime.shape_free_reason` asks: measured times may rank kernels differently per shape)."""
        if ctx.dtype is None:
            return False
        shipped = self.shipped_table(ctx)
        if shipped is not None and shipped.has(operation, ctx.dtype_name or ""):
            return True
        db = self.db
        return db is not None and db.has_rows(hardware_fingerprint(ctx.device).digest, operation,
                                              ctx.dtype_name or "")

    def __call__(self, operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]
                 ) -> dict[str, Measurement]:
        if ctx.dtype is None or not specs:
            return {}
        db = self.db
        bucket = bucket_of(operation, ctx)
        out: dict[str, Measurement] = {}
        if db is not None:
            installed = {spec.kernel_id: libraries_for(self.runtime, spec.backend) for spec in specs}
            stored = db.lookup(hardware_fingerprint(ctx.device).digest, operation, ctx.dtype_name or "", bucket,
                               installed)
            for spec in specs:
                row = stored.get(spec.kernel_id)
                if row is not None and row[0] == installed[spec.kernel_id]:
                    out[spec.kernel_id] = row[1]
        if out:
            return out
        shipped = self.shipped_table(ctx)
        if shipped is None:
            return out
        return lookup(shipped, operation, ctx.dtype_name or "", bucket, {s.kernel_id for s in specs})


def _runtime(runtime: Runtime | None) -> Runtime:
    if runtime is not None:
        return runtime
    from layerzero.runtime import get_runtime

    return get_runtime()


def use_perf_db(path: str | os.PathLike[str] | None = None, *, runtime: Runtime | None = None) -> PerfDB:
    """Use the performance database at ``path`` (default location when None) for selection.

    Cached plans are dropped so the next call of each shape selects with the stored times.

    Example:
        >>> db = lz.tuning.use_perf_db("/var/cache/lz/perf.db")
    """
    from layerzero.tuning.perfdb import PerfDB

    rt = _runtime(runtime)
    source = PerfDBSource(rt, PerfDB(path))
    _replace_source(rt, source, "performance database attached")
    return source.open()


def read_perf_db_only(*, runtime: Runtime | None = None) -> PerfDB | None:
    """Make selection read the default database read-only (``layerzero doctor``: it reports on the file and
    never builds, repairs or moves one); None when the file does not exist (the source stays: it opens none,
    and the shipped tables still apply)."""
    from layerzero.tuning.perfdb import PerfDB, default_path

    rt = _runtime(runtime)
    path = default_path(rt.config.perf_db_path)
    if not path.exists():
        return None
    db = PerfDB(path, read_only=True)
    _replace_source(rt, PerfDBSource(rt, db), "performance database read-only")
    return db


def get_perf_db(*, runtime: Runtime | None = None, create: bool = True) -> PerfDB | None:
    """The performance database selection uses; with ``create`` the default one is attached if none is."""
    rt = _runtime(runtime)
    src = rt.measurement_source
    if isinstance(src, PerfDBSource):
        db = src.db
        if db is None and create:
            db = src.open()
        return db
    return use_perf_db(runtime=rt) if create else None


def detach_perf_db(*, runtime: Runtime | None = None) -> None:
    """Stop using measured times (selection goes back to priorities)."""
    _replace_source(_runtime(runtime), None, "performance database detached")


def _replace_source(rt: Runtime, source: PerfDBSource | None, reason: str) -> None:
    """``rt``'s measurement source becomes ``source``: the old one's database stops invalidating ``rt``'s plans,
    and they are dropped (the next call of each shape selects with the new source's times)."""
    old = rt.measurement_source
    if isinstance(old, PerfDBSource) and old._db is not None:
        old._db.remove_listener(old._changed)
    rt.measurement_source = source
    rt.invalidate(reason)


def install_default_source(runtime: Runtime) -> None:
    """Give ``runtime`` the lazily opened default database unless it already has a measurement source."""
    if runtime.measurement_source is None:
        runtime.measurement_source = PerfDBSource(runtime)
