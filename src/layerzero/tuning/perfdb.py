"""The performance database: measured kernel times in one SQLite file.

Where it lives: an explicit path, else ``$LAYERZERO_PERF_DB``, else
``perf.db`` under ``platformdirs.user_cache_dir("layerzero")``.

Several processes may read and write it at once: the file is in WAL mode,
every connection waits up to ``busy_timeout_s`` for a lock, and writes go in
one ``BEGIN IMMEDIATE`` transaction per batch. All SQL is parameterized.

One row per (hardware digest, library versions, kernel, operation, dtype,
bucket) holds the median time, the spread (half the interquartile range, so
``median +/- spread`` covers the middle half of the samples), the sample
count, and whether the kernel failed its correctness check.

The file is untrusted input. It is opened with checks: the SQLite header,
``PRAGMA application_id`` (ours is ``0x4C5A5044``, "LZPD"), ``PRAGMA
user_version`` (the schema version), the expected columns and ``PRAGMA
quick_check``. A corrupt, foreign or newer-schema file is moved aside to
``<name>.corrupt-<timestamp>`` with a logged warning and a fresh database is
built in its place; an error met later while reading or writing does the
same. Rows read back are bounded (at most :data:`MAX_ROWS` per bucket; strings
cut by SQLite to a few hundred characters before Python sees them, so a row
holding a 10 MB string costs nothing; finite non-negative numbers, times of at
most :data:`MAX_US`) and malformed rows are skipped. Lookups
never raise: the worst case is "no measurements", and selection falls back to
priorities.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from layerzero import forksafe
from layerzero.environment import env_text
from layerzero.errors import PerfDBError
from layerzero.selection.engine import Measurement
from layerzero.tuning.records import ID_RE, MAX_SAMPLES, MAX_TEXT, MAX_US, Record

__all__ = ["PerfDB", "Record", "default_path", "SCHEMA_VERSION", "APPLICATION_ID", "ENV_VAR", "MAX_ROWS", "MAX_US"]

log = logging.getLogger("layerzero")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C5A5044  # "LZPD"
ENV_VAR = "LAYERZERO_PERF_DB"
MAX_ROWS = 512          # rows read back for one bucket
_MEMO_LIMIT = 8192      # in-memory lookup cache entries before it is cleared
READ_BUSY_MS = 200      # how long a read (a selection waiting on it) waits for another process's write lock
RETRY_S = 2.0           # after the database could not be used, lookups go without it this long
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS measurements (
        hardware  TEXT NOT NULL,
        libraries TEXT NOT NULL,
        kernel_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        dtype     TEXT NOT NULL,
        bucket    TEXT NOT NULL,
        median_us REAL NOT NULL,
        spread_us REAL NOT NULL,
        samples   INTEGER NOT NULL,
        failed    INTEGER NOT NULL,
        error     TEXT,
        source    TEXT NOT NULL,
        updated   REAL NOT NULL,
        PRIMARY KEY (hardware, operation, dtype, bucket, kernel_id, libraries)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS hardware (
        digest      TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        updated     REAL NOT NULL
    ) WITHOUT ROWID""",
)
_COLUMNS = frozenset({"hardware", "libraries", "kernel_id", "operation", "dtype", "bucket", "median_us",
                      "spread_us", "samples", "failed", "error", "source", "updated"})
# Text columns come back cut to one character more than any accepted value, so an oversized one is seen
# (and the row skipped) without ever loading it whole.
_LOOKUP = (f"SELECT substr(kernel_id, 1, 129), substr(libraries, 1, {MAX_TEXT + 1}), median_us, spread_us, samples, "
           "failed, substr(source, 1, 33) FROM measurements "
           "WHERE hardware = ? AND operation = ? AND dtype = ? AND bucket = ? ORDER BY kernel_id, libraries LIMIT ?")
_ANY_ROW = "SELECT 1 FROM measurements WHERE hardware = ? AND operation = ? AND dtype = ? LIMIT 1"
_UPSERT = ("INSERT OR REPLACE INTO measurements (hardware, libraries, kernel_id, operation, dtype, bucket, "
           "median_us, spread_us, samples, failed, error, source, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")


def default_path(configured: str | os.PathLike[str] | None = None) -> Path:
    """``configured`` (``DispatchConfig.perf_db_path``) if given, else ``$LAYERZERO_PERF_DB`` if set, else
    ``perf.db`` in the user cache directory."""
    if configured is not None and str(configured) != "":
        return Path(configured).expanduser()
    env = env_text(ENV_VAR)
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        base = user_cache_dir("layerzero")
    except ImportError:  # platformdirs is a dependency, but a bare GPU box may lack it
        base = os.path.join(os.path.expanduser("~"), ".cache", "layerzero")
    return Path(base) / "perf.db"


class _Unusable(Exception):
    """The file is not a usable layerzero performance database (the message says why)."""


_NOT_THE_FILE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN",
                 "SQLITE_NOMEM", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_INTERRUPT", "SQLITE_PROTOCOL", "SQLITE_NOLFS")
_NOT_THE_FILE_TEXT = ("locked", "busy", "readonly", "read-only", "disk is full", "disk i/o error", "unable to open",
                      "out of memory")


def _not_the_files_fault(exc: BaseException) -> bool:
    """An error of the file's surroundings (another process's lock, permissions, a full disk, I/O, memory), not of
    its content: the file is left as it is (a read-only fleet database must not be moved aside and replaced)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_NOT_THE_FILE) or any(t in str(exc).lower() for t in _NOT_THE_FILE_TEXT)


class PerfDB:
    """Measured kernel times, shared by processes through one SQLite file.

    Args:
        path: the database file (default: :func:`default_path`).
        busy_timeout_s: how long a connection waits for another process's lock.
        refresh_s: how often (at most) a lookup checks whether another process wrote new data.
        read_only: only read (``layerzero doctor``): the file is opened read-only, never created, built,
            repaired or moved aside; an unusable one is reported (:meth:`problem`), and writes raise.

    Example:
        >>> db = PerfDB("/tmp/lz-perf.db")
        >>> db.lookup(hw, "rms_norm", "bfloat16", "n=4096;hidden=4096;grad=0")
        {'torch_rms_norm': ('torch=2.11.0', Measurement(median_us=12.1, ...))}
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, busy_timeout_s: float = 10.0,
                 refresh_s: float = 1.0, read_only: bool = False) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.read_only = read_only
        self.busy_timeout_s = float(busy_timeout_s)
        self.read_busy_ms = min(READ_BUSY_MS, int(self.busy_timeout_s * 1000))  # a read's wait for a lock
        self.refresh_s = float(refresh_s)
        self.recoveries = 0
        self.generation = 0
        self._lock = forksafe.lock(self, reentrant=True)
        self._conn: sqlite3.Connection | None = None
        self._memo: dict[tuple[str, str, str, str], Any] = {}  # lookup: kernel -> [(libraries, Measurement)]
        self._listeners: list[Callable[[], None]] = []
        self._data_version: int | None = None
        self._next_refresh = 0.0
        self._warned_unavailable = False
        self._warned_rows = False
        self._retry_at = 0.0  # monotonic time before which reads go without the database (it failed just now)

    def __repr__(self) -> str:
        return f"PerfDB({str(self.path)!r})"

    # -- listeners -------------------------------------------------------------------
    def add_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs after every change of the stored data (a write here or seen from another process)."""
        with self._lock:
            if fn not in self._listeners:
                self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception as exc:  # a listener must not break a write
                log.warning("performance database listener failed: %s: %s", type(exc).__name__, exc)

    # -- opening, checking, setting aside ------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
            self._data_version = self._read_data_version(self._conn)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        if self.read_only:
            return self._open_read_only()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PerfDBError(f"cannot create the directory of performance database {self.path}: {exc}") from exc
        last = "unknown error"
        for _ in range(3):
            conn: sqlite3.Connection | None = None
            try:
                self._check_header()
                conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                self._prepare(conn)
                conn.execute(f"PRAGMA busy_timeout = {self.read_busy_ms}")
                return conn
            except _Unusable as bad:
                last = str(bad)
                _close(conn)
                self._set_aside(last)
            except sqlite3.DatabaseError as exc:
                _close(conn)
                if _not_the_files_fault(exc):
                    raise PerfDBError(f"performance database {self.path} cannot be opened: {exc}") from exc
                last = f"{type(exc).__name__}: {exc}"
                self._set_aside(last)
        raise PerfDBError(f"performance database {self.path} could not be rebuilt: {last}")

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise PerfDBError(f"performance database {self.path} " + (
                "is not a file" if self.path.exists() else "does not exist"))
        conn: sqlite3.Connection | None = None
        try:
            self._check_header()
            # immutable: no lock and no -wal/-shm files beside it (a report leaves the folder as it was; rows
            # another process has not checkpointed yet are not seen)
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                   timeout=self.read_busy_ms / 1000, isolation_level=None, check_same_thread=False)
            self._prepare(conn)
            return conn
        except (_Unusable, sqlite3.DatabaseError) as exc:
            _close(conn)
            raise PerfDBError(f"performance database {self.path} is unusable: {exc}") from None

    def problem(self) -> str | None:
        """Why this database cannot be used now (not a file, unreadable, not ours, locked, ...), or None."""
        with self._lock:
            try:
                self._connection()
            except (PerfDBError, sqlite3.DatabaseError) as exc:
                return str(exc)
        return None

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PerfDBError(f"performance database {self.path} cannot be read: {exc}") from exc
        if head and head != _SQLITE_MAGIC:
            raise _Unusable("not an SQLite file (bad header)")

    def _prepare(self, conn: sqlite3.Connection) -> None:
        app, ver, tables = self._identity(conn)
        if app == 0 and ver == 0 and not tables and self.read_only:
            raise _Unusable("an empty file (no layerzero tables yet)")
        if app == 0 and ver == 0 and not tables:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                app, ver, tables = self._identity(conn)  # another process may have built it meanwhile
                if app == 0 and ver == 0 and not tables:
                    for stmt in _SCHEMA:
                        conn.execute(stmt)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            app, ver, tables = self._identity(conn)
        if app != APPLICATION_ID:
            raise _Unusable(f"not a layerzero performance database (application_id={app:#x}, tables: "
                            f"{', '.join(sorted(tables))[:200] or 'none'})")
        if ver > SCHEMA_VERSION:
            raise _Unusable(f"written by a newer layerzero (schema version {ver} > {SCHEMA_VERSION})")
        if ver < SCHEMA_VERSION:
            raise _Unusable(f"schema version {ver} is older than {SCHEMA_VERSION} and cannot be migrated")
        cols = {str(r[1]) for r in conn.execute("PRAGMA table_info(measurements)").fetchmany(64)}
        if not _COLUMNS <= cols:
            raise _Unusable(f"table 'measurements' lacks columns {sorted(_COLUMNS - cols)}")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()
        if not check or check[0] != "ok":
            raise _Unusable(f"integrity check failed: {str(check[0] if check else None)[:200]}")
        mode = None if self.read_only else conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode and str(mode[0]).lower() != "wal":
            log.debug("performance database %s is in journal mode %s (WAL unavailable)", self.path, mode[0])

    @staticmethod
    def _identity(conn: sqlite3.Connection) -> tuple[int, int, set[str]]:
        app = int(conn.execute("PRAGMA application_id").fetchone()[0])
        ver = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchmany(64)}
        return app, ver, tables

    def _set_aside(self, reason: str) -> Path | None:
        """Move an unusable file (and its WAL/SHM files) aside so a fresh one can be built (read-only: say why)."""
        if self.read_only:
            raise PerfDBError(f"performance database {self.path} is unusable ({reason}); opened read-only, it stays")
        with self._lock:
            _close(self._conn)
            self._conn = None
            self._memo.clear()
            if not self.path.exists():
                return None
            stamp = time.strftime("%Y%m%dT%H%M%S")
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            n = 1
            while target.exists():
                n += 1
                target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            try:
                os.replace(self.path, target)
                for suffix in ("-wal", "-shm", "-journal"):
                    side = Path(str(self.path) + suffix)
                    if side.exists():
                        os.replace(side, Path(str(target) + suffix))
            except OSError as exc:
                raise PerfDBError(f"performance database {self.path} is unusable ({reason}) and could not be "
                                  f"moved aside: {exc}") from exc
            self.recoveries += 1
            log.warning("performance database %s is unusable (%s); moved it to %s and starting a new one",
                        self.path, reason, target)
            return target

    def _recover(self, exc: BaseException) -> None:
        """An error while using an open database: set the file aside unless the error is only a busy lock."""
        self._set_aside(f"{type(exc).__name__}: {exc}")
        self._notify()

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, hardware: str, operation: str, dtype: str, bucket: str,
               libraries: Mapping[str, str] | None = None) -> dict[str, tuple[str, Measurement]]:
        """``{kernel_id: (libraries, Measurement)}`` for one bucket; ``{}`` when nothing is stored or usable.

        A kernel measured under several library versions (torch before and after an upgrade) has one row per
        version: the one ``libraries[kernel_id]`` names when given (the versions installed now), else the first.
        Cached in memory; never raises.
        """
        key = (hardware, operation, dtype, bucket)
        self._maybe_refresh()
        found = self._memo.get(key)
        if found is None:
            rows = self._read(_LOOKUP, (*key, MAX_ROWS))
            if rows is None:
                return {}
            found = {}
            for row in rows:
                parsed = _parse_row(row)
                if parsed is not None:
                    found.setdefault(parsed[0], []).append((parsed[1], parsed[2]))
                elif not self._warned_rows:  # another kernel may then win the bucket: say so, once
                    self._warned_rows = True
                    log.warning("performance database %s holds a malformed row (%s for %s, bucket %s: %r); such "
                                "rows are skipped", self.path, operation, dtype, bucket, row[:1])
            with self._lock:
                if len(self._memo) >= _MEMO_LIMIT:
                    self._memo.clear()
                self._memo[key] = found
        out: dict[str, tuple[str, Measurement]] = {}
        for kernel_id, versions in found.items():
            wanted = libraries.get(kernel_id) if libraries is not None else None
            out[kernel_id] = next((v for v in versions if v[0] == wanted), versions[0])
        return out

    def has_rows(self, hardware: str, operation: str, dtype: str) -> bool:
        """Whether any shape bucket of ``(hardware, operation, dtype)`` has a stored measurement.

        Cached like :meth:`lookup`; never raises. A database that cannot be read right now counts as
        having rows (the caller then assumes measurements may rank by shape).
        """
        key = (hardware, operation, dtype, "\0any")
        self._maybe_refresh()
        found = self._memo.get(key)
        if found is not None:
            return bool(found)
        rows = self._read(_ANY_ROW, (hardware, operation, dtype))
        if rows is None:
            return True
        with self._lock:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = {"": ("", Measurement(0.0))} if rows else {}
        return bool(rows)

    def _read(self, sql: str, params: tuple[Any, ...], limit: int = MAX_ROWS) -> list[tuple[Any, ...]] | None:
        """Run a query; ``None`` when the database cannot be used right now (logged once, never raised; reads
        then go without it for :data:`RETRY_S`, so a locked or unreadable file stalls no selection again)."""
        with self._lock:
            if time.monotonic() < self._retry_at:
                return None
            for _ in range(2):
                try:
                    return self._connection().execute(sql, params).fetchmany(limit)
                except (PerfDBError, sqlite3.DatabaseError) as exc:
                    if isinstance(exc, sqlite3.DatabaseError) and not _not_the_files_fault(exc):
                        try:
                            self._recover(exc)  # the file's content is broken: set aside, read a fresh one
                            continue
                        except PerfDBError as err:
                            exc = err
                    self._retry_at = time.monotonic() + RETRY_S
                    if not self._warned_unavailable:
                        self._warned_unavailable = True
                        why = exc if isinstance(exc, PerfDBError) else f"performance database {self.path}: {exc}"
                        log.warning("%s; using kernel priorities instead of measurements", why)
                    return None
        return None

    def _maybe_refresh(self) -> None:
        """Drop the in-memory cache when another process has committed since we last looked."""
        if self._conn is None:
            return
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_s
        changed = False
        with self._lock:
            if self._conn is None:
                return
            version = self._read_data_version(self._conn)
            if version is not None and version != self._data_version:
                self._data_version = version
                self._memo.clear()
                changed = True
        if changed:
            self._notify()

    @staticmethod
    def _read_data_version(conn: sqlite3.Connection) -> int | None:
        try:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])
        except (sqlite3.Error, TypeError, ValueError):
            return None

    def rows(self, *, operation: str | None = None, hardware: str | None = None, limit: int = 10000
             ) -> list[dict[str, Any]]:
        """Stored rows as dictionaries (for ``layerzero tune --show`` and tests), at most ``limit``."""
        cut = MAX_TEXT + 1
        sql = (f"SELECT substr(hardware, 1, {cut}), substr(libraries, 1, {cut}), substr(kernel_id, 1, {cut}), "
               f"substr(operation, 1, {cut}), substr(dtype, 1, {cut}), substr(bucket, 1, {cut}), median_us, "
               f"spread_us, samples, failed, substr(error, 1, {cut}), substr(source, 1, {cut}), updated "
               "FROM measurements WHERE (? IS NULL OR operation = ?) AND "
               "(? IS NULL OR hardware = ?) ORDER BY operation, dtype, bucket, kernel_id LIMIT ?")
        limit = max(0, min(int(limit), 1_000_000))
        got = self._read(sql, (operation, operation, hardware, hardware, limit), limit=limit) or []
        names = ("hardware", "libraries", "kernel_id", "operation", "dtype", "bucket", "median_us", "spread_us",
                 "samples", "failed", "error", "source", "updated")
        out = []
        for row in got:
            d = dict(zip(names, row, strict=False))
            if _parse_row((d["kernel_id"], d["libraries"], d["median_us"], d["spread_us"], d["samples"],
                           d["failed"], d["source"])) is None:
                continue
            texts = (d["hardware"], d["operation"], d["dtype"], d["bucket"])
            if not all(isinstance(t, str) and len(t) <= MAX_TEXT for t in texts) or not (
                    d["error"] is None or (isinstance(d["error"], str) and len(d["error"]) <= MAX_TEXT)):
                continue
            d["failed"] = bool(d["failed"])
            out.append(d)
        return out

    def count(self) -> int:
        got = self._read("SELECT count(*) FROM measurements", ())
        return int(got[0][0]) if got else 0

    def fingerprints(self) -> dict[str, str]:
        """``{digest: fingerprint JSON}`` of every hardware that has rows."""
        got = self._read("SELECT substr(digest, 1, 64), substr(fingerprint, 1, 4096) FROM hardware ORDER BY digest "
                         "LIMIT ?", (MAX_ROWS,)) or []
        return {str(d)[:64]: str(f)[:4096] for d, f in got}

    # -- writing -----------------------------------------------------------------------------
    def record(self, records: Iterable[Record], *, fingerprints: dict[str, str] | None = None) -> int:
        """Store measurements (one transaction) and notify listeners; returns how many were written.

        Raises:
            PerfDBError: a record is malformed, or the database stays busy or unwritable.
        """
        if self.read_only:
            raise PerfDBError(f"performance database {self.path} is opened read-only")
        batch = list(records)
        params = []
        now = time.time()
        for r in batch:
            bad = r.problems()
            if bad:
                raise PerfDBError(f"cannot store measurement of {r.kernel_id!r} for {r.operation}: {'; '.join(bad)}")
            error = None if r.error is None else str(r.error)[:MAX_TEXT]
            params.append((r.hardware, r.libraries, r.kernel_id, r.operation, r.dtype, r.bucket, float(r.median_us),
                           float(r.spread_us), int(r.samples), int(bool(r.failed)), error, r.source, now))
        if not params:
            return 0
        fps = [(d, j, now) for d, j in (fingerprints or {}).items()]
        with self._lock:
            for attempt in range(2):
                try:
                    conn = self._connection()
                    conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")  # a write waits
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        conn.executemany(_UPSERT, params)
                        if fps:
                            conn.executemany("INSERT OR REPLACE INTO hardware (digest, fingerprint, updated) "
                                             "VALUES (?, ?, ?)", fps)
                        conn.execute("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
                    finally:
                        _read_timeout(conn, self.read_busy_ms)
                    break
                except sqlite3.DatabaseError as exc:
                    if _not_the_files_fault(exc) or attempt:  # read-only, full, locked: the file stays as it is
                        raise PerfDBError(f"could not write to performance database {self.path}: {exc}") from exc
                    self._recover(exc)
            self._memo.clear()
            self.generation += 1
        self._notify()
        return len(params)

    def clear(self) -> None:
        """Delete every stored measurement."""
        with self._lock:
            try:
                self._connection().execute("DELETE FROM measurements")
            except sqlite3.DatabaseError as exc:
                raise PerfDBError(f"could not clear performance database {self.path}: {exc}") from exc
            self._memo.clear()
            self.generation += 1
        self._notify()

    def close(self) -> None:
        with self._lock:
            _close(self._conn)
            self._conn = None
            self._memo.clear()


def _parse_row(row: tuple[Any, ...]) -> tuple[str, str, Measurement] | None:
    """Validate one stored row; ``None`` when anything about it is off (the file is untrusted)."""
    try:
        kernel_id, libraries, median, spread, samples, failed, source = row
    except (TypeError, ValueError):
        return None
    if not isinstance(kernel_id, str) or not ID_RE.match(kernel_id):
        return None
    if not isinstance(libraries, str) or len(libraries) > MAX_TEXT:
        return None
    if not isinstance(source, str) or len(source) > 32:
        return None
    if failed not in (0, 1):
        return None
    for v in (median, spread):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= MAX_US:
            return None
    if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= MAX_SAMPLES:
        return None
    if not failed and median <= 0:
        return None
    return kernel_id, libraries, Measurement(float(median), float(spread), int(samples),
                                             f"perf-db {source}, n={samples}", bool(failed))


def _read_timeout(conn: sqlite3.Connection, read_busy_ms: int) -> None:
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(read_busy_ms)}")
    except sqlite3.Error:
        pass


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error:
            pass


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
