"""The performance database: schema, round trips, robustness against bad files, and use in selection."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.errors import PerfDBError
from layerzero.runtime import get_runtime
from layerzero.spec import ReasonCode
from layerzero.tuning.buckets import bucket_of
from layerzero.tuning.fingerprint import hardware_fingerprint, library_versions
from layerzero.tuning.perfdb import APPLICATION_ID, MAX_ROWS, SCHEMA_VERSION, PerfDB, Record, default_path
from layerzero.tuning.source import PerfDBSource, libraries_for

HW = "hw0123456789abcdef01"


def rec(kernel_id: str = "torch_rms_norm", median: float = 10.0, spread: float = 0.1, *, bucket: str = "n=64;hidden=512;grad=0",
        failed: bool = False, libraries: str = "torch=1", operation: str = "rms_norm", dtype: str = "float32",
        hardware: str = HW) -> Record:
    return Record(hardware, libraries, kernel_id, operation, dtype, bucket, median, spread, 20, failed,
                  "boom" if failed else None, "tune")


@pytest.fixture
def db(tmp_path: Path) -> PerfDB:
    d = PerfDB(tmp_path / "perf.db", refresh_s=0.0)
    yield d
    d.close()



def _pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


# -- schema and round trips ------------------------------------------------------------------------

def test_new_database_is_versioned_wal_and_ours(db: PerfDB) -> None:
    assert db.count() == 0
    assert _pragma(db.path, "user_version") == SCHEMA_VERSION
    assert _pragma(db.path, "application_id") == APPLICATION_ID
    assert str(_pragma(db.path, "journal_mode")).lower() == "wal"


def test_record_and_lookup_round_trip(db: PerfDB) -> None:
    n = db.record([rec("torch_rms_norm", 12.5, 0.25), rec("torch_rms_norm_composed", 20.0, 1.0, failed=True)])
    assert n == 2
    got = db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")
    assert set(got) == {"torch_rms_norm", "torch_rms_norm_composed"}
    libs, m = got["torch_rms_norm"]
    assert libs == "torch=1" and m.median_us == 12.5 and m.spread_us == 0.25 and m.samples == 20 and not m.failed
    assert got["torch_rms_norm_composed"][1].failed
    assert db.lookup(HW, "rms_norm", "bfloat16", "n=64;hidden=512;grad=0") == {}
    rows = db.rows(operation="rms_norm")
    assert [r["kernel_id"] for r in rows] == ["torch_rms_norm", "torch_rms_norm_composed"]
    assert rows[1]["failed"] is True and rows[1]["error"] == "boom"


def test_upsert_replaces_the_same_key(db: PerfDB) -> None:
    db.record([rec(median=10.0)])
    db.record([rec(median=7.0)])
    assert db.count() == 1
    assert db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")["torch_rms_norm"][1].median_us == 7.0


def test_sql_metacharacters_are_data_not_sql(db: PerfDB) -> None:
    evil = "n=1'; DROP TABLE measurements; --"
    db.record([rec(bucket=evil)])
    assert db.lookup(HW, "rms_norm", "float32", evil)["torch_rms_norm"][1].median_us == 10.0
    assert db.count() == 1


def test_malformed_records_are_refused(db: PerfDB) -> None:
    with pytest.raises(PerfDBError, match="kernel_id 'Bad-Id' is not a snake_case id"):
        db.record([rec("Bad-Id")])
    with pytest.raises(PerfDBError, match="median_us must be a finite number"):
        db.record([rec(median=math.nan)])
    assert db.count() == 0


def test_lookups_are_cached_and_writes_invalidate_the_cache(db: PerfDB) -> None:
    db.record([rec(median=10.0)])
    first = db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")
    db._read = lambda *args: pytest.fail("a cached lookup queried the database")  # type: ignore[method-assign]
    assert db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0") == first
    del db._read
    db.record([rec(median=5.0)])
    again = db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")
    assert again is not first and again["torch_rms_norm"][1].median_us == 5.0


def test_writes_from_another_connection_are_seen(db: PerfDB) -> None:
    db.record([rec(median=10.0)])
    assert db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")["torch_rms_norm"][1].median_us == 10.0
    seen = []
    db.add_listener(lambda: seen.append(1))
    other = PerfDB(db.path)
    other.record([rec(median=3.0)])
    other.close()
    assert db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")["torch_rms_norm"][1].median_us == 3.0
    assert seen, "a change made by another process must notify listeners (to drop cached plans)"


def test_paths_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAYERZERO_PERF_DB", str(tmp_path / "env.db"))
    assert default_path() == tmp_path / "env.db"
    assert PerfDB().path == tmp_path / "env.db"
    assert PerfDB(tmp_path / "explicit.db").path == tmp_path / "explicit.db"
    monkeypatch.delenv("LAYERZERO_PERF_DB")
    from platformdirs import user_cache_dir

    assert default_path() == Path(user_cache_dir("layerzero")) / "perf.db"


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    PerfDB(path).count()  # create it
    script = textwrap.dedent(f"""
        import sys
        from layerzero.tuning.perfdb import PerfDB, Record
        db = PerfDB({str(path)!r})
        who = sys.argv[1]
        for i in range(40):
            db.record([Record("hw", "torch=1", "kernel_" + who, "rms_norm", "float32", f"n={{i}}", 1.0 + i, 0.1, 5)])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, w]) for w in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert PerfDB(path).count() == 80


# -- bad files: detected, moved aside, rebuilt; never a failed call --------------------------------

def _aside(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".corrupt-")
                  and not p.name.endswith(("-wal", "-shm")))


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, b"\x00" * 4096],
                         ids=["text", "zeros-header"])
def test_garbage_file_is_moved_aside_and_rebuilt(tmp_path: Path, content: bytes,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "perf.db"
    path.write_bytes(content)
    db = PerfDB(path)
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert db.lookup(HW, "rms_norm", "float32", "b") == {}
    assert "is unusable" in caplog.text and "moved it to" in caplog.text
    moved = _aside(path)
    assert len(moved) == 1 and moved[0].read_bytes() == content
    db.record([rec()])
    assert db.count() == 1 and db.recoveries == 1


def test_foreign_sqlite_database_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "perf.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    conn.execute("INSERT INTO customers VALUES (1, 'x')")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert PerfDB(path).count() == 0
    assert "not a layerzero performance database" in caplog.text
    moved = _aside(path)
    assert len(moved) == 1
    assert sqlite3.connect(moved[0]).execute("SELECT name FROM customers").fetchone() == ("x",)


def test_newer_schema_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "perf.db"
    PerfDB(path).record([rec()])
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    db = PerfDB(path)
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0") == {}
    assert f"newer layerzero (schema version {SCHEMA_VERSION + 1} > {SCHEMA_VERSION})" in caplog.text
    assert _pragma(path, "user_version") == SCHEMA_VERSION and len(_aside(path)) == 1


def test_file_corrupted_while_open_is_recovered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "perf.db"
    db = PerfDB(path, refresh_s=0.0)
    db.record([rec(bucket=f"n={i}") for i in range(300)])
    db.close()
    raw = bytearray(path.read_bytes())
    for off in range(1024, len(raw), 512):  # trash every page after the first
        raw[off:off + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert db.lookup(HW, "rms_norm", "float32", "n=7") == {}
        db.record([rec()])
    assert db.count() == 1 and len(_aside(path)) == 1


def test_bad_rows_are_skipped_and_reads_are_bounded(db: PerfDB, caplog: pytest.LogCaptureFixture) -> None:
    """Malformed rows are skipped, and said so once (a bad row for the best kernel quietly let a slower one win)."""
    db.record([rec("torch_rms_norm", 4.0)])
    conn = sqlite3.connect(db.path)
    insert = "INSERT INTO measurements VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
    base = (HW, "torch=1")
    conn.executemany(insert, [
        (*base, "Evil Kernel", "rms_norm", "float32", "n=64;hidden=512;grad=0", 1.0, 0.0, 3, 0, None, "tune", 0.0),
        (*base, "k_inf", "rms_norm", "float32", "n=64;hidden=512;grad=0", float("inf"), 0.0, 3, 0, None, "tune", 0.0),
        (*base, "k_text", "rms_norm", "float32", "n=64;hidden=512;grad=0", "fast", 0.0, 3, 0, None, "tune", 0.0),
        (*base, "k_neg", "rms_norm", "float32", "n=64;hidden=512;grad=0", 1.0, -5.0, 3, 0, None, "tune", 0.0),
        (*base, "k_flag", "rms_norm", "float32", "n=64;hidden=512;grad=0", 1.0, 0.0, 3, 7, None, "tune", 0.0),
        (HW, "x" * 100_000, "k_long", "rms_norm", "float32", "n=64;hidden=512;grad=0", 1.0, 0.0, 3, 0, None, "tune",
         0.0),
    ])
    conn.executemany(insert, [(*base, f"k_{i:05d}", "rms_norm", "float32", "many", 1.0, 0.0, 1, 0, None, "tune", 0.0)
                              for i in range(MAX_ROWS + 100)])
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        got = db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")
        assert set(got) == {"torch_rms_norm"}
        assert len(db.lookup(HW, "rms_norm", "float32", "many")) == MAX_ROWS
    assert caplog.text.count("holds a malformed row") == 1 and "rows are skipped" in caplog.text


def test_unwritable_location_never_fails_a_lookup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    db = PerfDB(blocker / "sub" / "perf.db")  # a directory under a regular file cannot exist
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert db.lookup(HW, "rms_norm", "float32", "b") == {}
    assert "using kernel priorities" in caplog.text
    with pytest.raises(PerfDBError, match="cannot create the directory"):
        db.record([rec()])


def _connect_as(monkeypatch: pytest.MonkeyPatch, setup: str) -> None:
    """PerfDB's connections opened read-only (``setup="ro"``) or with a page limit (``"full"``): the real SQLite
    errors of a read-only file and of a full disk, without another user or a small filesystem."""
    real = sqlite3.connect

    def connect(path: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        if setup == "ro":
            return real(f"file:{path}?mode=ro", *args, uri=True, **kwargs)  # type: ignore[arg-type]
        conn = real(path, *args, **kwargs)  # type: ignore[arg-type]
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        return conn

    monkeypatch.setattr("layerzero.tuning.perfdb.sqlite3.connect", connect)


@pytest.mark.parametrize("setup,error", [("ro", "readonly database"), ("full", "database or disk is full")])
def test_a_read_only_or_full_database_is_never_moved_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           setup: str, error: str) -> None:
    """"attempt to write a readonly database" and "database or disk is full" were taken for corruption: the
    file was moved aside and replaced by an empty one (a read-only fleet database hidden by any process with
    online tuning; on a full disk, no database left). The write fails with that message; the file, its rows and
    reads stay."""
    path = tmp_path / "perf.db"
    first = PerfDB(path)
    first.record([rec("torch_rms_norm", 10.0)])
    first.close()
    _connect_as(monkeypatch, setup)
    db = PerfDB(path, refresh_s=0.0)
    assert set(db.lookup(HW, "rms_norm", "float32", "n=64;hidden=512;grad=0")) == {"torch_rms_norm"}
    many = [rec(f"k{i}", 1.0 + i, bucket=f"b{i}" + "x" * 300) for i in range(200)]
    with pytest.raises(PerfDBError, match=f"could not write to performance database .*{error}"):
        db.record(many)
    db.close()
    monkeypatch.undo()
    assert _aside(path) == [] and PerfDB(path).count() == 1


def test_a_locked_or_unusable_database_stalls_no_selection_twice(tmp_path: Path) -> None:
    """A database that cannot be used is retried at most every RETRY_S: each first call of an operation used
    to wait for the lock (busy timeout) again."""
    import time

    from layerzero.tuning.perfdb import RETRY_S

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    db = PerfDB(blocker / "perf.db")
    assert db.lookup(HW, "rms_norm", "float32", "b") == {}
    t = time.monotonic()
    for op in ("rms_norm", "layer_norm", "gelu", "silu"):
        assert db.lookup(HW, op, "float32", "b") == {}
    assert time.monotonic() - t < 0.5 < RETRY_S


def test_when_every_kernel_failed_its_tuning_run_none_is_excluded(attached: PerfDB) -> None:
    """Rows marking every candidate failed (a tuning run that broke, a database edited by hand) made the op
    raise NoKernelError for the whole bucket; selection now goes by priority and says why."""
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    _store(attached, x, {"torch_rms_norm": (5.0, 1.0, True), "torch_rms_norm_composed": (5.0, 1.0, True)})
    assert lz.which("rms_norm", x, w) == "torch_rms_norm"
    assert "as every candidate's did" in str(lz.explain(x, w, operation="rms_norm"))
    torch.testing.assert_close(lz.rms_norm(x, w), torch.rms_norm(x, (512,), w, 1e-6))
    _store(attached, x, {"torch_rms_norm": (5.0, 1.0, True), "torch_rms_norm_composed": (9.0, 1.0, False)})
    assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"  # one failed: that one is excluded


# -- fingerprints and buckets ----------------------------------------------------------------------

def test_fingerprint_and_library_keys() -> None:
    fp = hardware_fingerprint("cpu")
    assert fp.platform == "cpu" and fp.cpu_model and len(fp.digest) == 20
    assert hardware_fingerprint("cpu") is fp
    assert library_versions("torch") == f"torch={torch.__version__}"
    assert library_versions("liger", "0.8.5").startswith(f"torch={torch.__version__};liger=0.8.5;triton=")


def test_buckets_round_batch_and_sequence_keep_model_dims() -> None:
    a = lz.SelectionContext(dtype="bfloat16", batch_size=3, seq_len=1000, num_heads=32, num_kv_heads=8, head_dim=128,
                            is_causal=True)
    b = a.replace(batch_size=4, seq_len_q=1024, seq_len_k=1024)
    assert bucket_of("attention.causal", a) == bucket_of("attention.causal", b) == (
        "b=4;sq=1024;sk=1024;h=32;hkv=8;d=128;dv=128;causal=1;mask=none;win=-;drop=0;grad=0")
    assert bucket_of("attention.causal", a.replace(head_dim=64)) != bucket_of("attention.causal", a)
    r = lz.SelectionContext(num_tokens=3000, hidden_size=4096)
    assert bucket_of("rms_norm", r) == "n=4096;hidden=4096;grad=0"
    assert bucket_of("rms_norm", r.replace(hidden_size=4000)) != bucket_of("rms_norm", r)


# -- in selection --------------------------------------------------------------------------------

def _store(db: PerfDB, x: torch.Tensor, times: dict[str, tuple[float, float, bool]]) -> None:
    rt = get_runtime()
    ctx = lz.SelectionContext.from_rows(x)
    hw = hardware_fingerprint(x.device).digest
    db.record([Record(hw, libraries_for(rt, rt.kernels.get(k).backend), k, "rms_norm", "float32",
                      bucket_of("rms_norm", ctx), med, spread, 9, failed) for k, (med, spread, failed) in times.items()])


def test_measurements_reorder_selection_and_explain_shows_them(attached: PerfDB) -> None:
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    assert lz.which("rms_norm", x, w) == "torch_rms_norm"
    _store(attached, x, {"torch_rms_norm": (50.0, 1.0, False), "torch_rms_norm_composed": (20.0, 1.0, False)})
    assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
    text = str(lz.explain(x, w, operation="rms_norm"))
    assert "measured 20.00 us +/- 1.00 (perf-db tune, n=9)" in text
    assert "measured 50.00 us +/- 1.00" in text
    torch.testing.assert_close(lz.rms_norm(x, w), torch.rms_norm(x, (512,), w, 1e-6))


def test_a_db_write_invalidates_cached_plans(attached: PerfDB) -> None:
    rt = get_runtime()
    x, w = torch.randn(32, 256), torch.rand(256) + 0.5
    lz.rms_norm(x, w)
    assert len(rt.plans) >= 1
    version = rt.version
    _store(attached, x, {"torch_rms_norm": (9.0, 0.1, False)})
    assert rt.version > version and len(rt.plans) == 0


def test_within_spread_the_priority_keeps_its_place(attached: PerfDB) -> None:
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    _store(attached, x, {"torch_rms_norm": (21.0, 1.5, False), "torch_rms_norm_composed": (20.0, 1.5, False)})
    assert lz.which("rms_norm", x, w) == "torch_rms_norm"


def test_failed_kernels_are_never_selected(attached: PerfDB) -> None:
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    _store(attached, x, {"torch_rms_norm": (1.0, 0.0, True), "torch_rms_norm_composed": (20.0, 1.0, False)})
    exp = lz.explain(x, w, operation="rms_norm")
    assert exp.selected_kernel == "torch_rms_norm_composed"
    assert exp.rejection_reasons["torch_rms_norm"][0].code == ReasonCode.MEASURED_FAILED


def test_rows_for_other_library_versions_are_ignored(attached: PerfDB) -> None:
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    ctx = lz.SelectionContext.from_rows(x)
    hw = hardware_fingerprint("cpu").digest
    attached.record([Record(hw, "torch=0.0.1", "torch_rms_norm_composed", "rms_norm", "float32",
                            bucket_of("rms_norm", ctx), 1.0, 0.0, 9)])
    assert lz.which("rms_norm", x, w) == "torch_rms_norm"


def test_a_corrupt_attached_database_never_fails_a_call(attached: PerfDB) -> None:
    x, w = torch.randn(16, 128), torch.rand(128) + 0.5
    attached.close()
    attached.path.write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        Path(str(attached.path) + suffix).unlink(missing_ok=True)
    get_runtime().invalidate("test")
    torch.testing.assert_close(lz.rms_norm(x, w), torch.rms_norm(x, (128,), w, 1e-6))
    assert attached.recoveries == 1


def test_default_source_opens_only_once_the_file_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rt = get_runtime()
    monkeypatch.delenv("LAYERZERO_PERF_DB", raising=False)
    monkeypatch.setattr("layerzero.tuning.perfdb.default_path", lambda configured=None: tmp_path / "nope" / "perf.db")
    src = PerfDBSource(rt)
    ctx = lz.SelectionContext(dtype="float32", num_tokens=4, hidden_size=8)
    assert src("rms_norm", ctx, tuple(rt.kernels.for_operation("rms_norm"))) == {}
    assert not (tmp_path / "nope").exists()
    assert isinstance(rt.measurement_source, PerfDBSource) or rt.measurement_source is not None


def test_get_perf_db_returns_the_attached_database(attached: PerfDB) -> None:
    assert lz.tuning.get_perf_db() is attached
    assert os.fspath(attached.path).endswith("attached.db")


def test_the_config_names_the_database_the_runtime_reads(tmp_path: Path) -> None:
    """``DispatchConfig.perf_db_path`` (also from ``LAYERZERO_PERF_DB``) moves the default source to that file."""
    from layerzero.runtime.config import DispatchConfig
    from layerzero.tuning.fingerprint import hardware_fingerprint

    rt = get_runtime()
    assert DispatchConfig.from_env({"LAYERZERO_PERF_DB": str(tmp_path / "env.db")}).perf_db_path == str(
        tmp_path / "env.db")
    with pytest.raises(ValueError, match="perf_db_path"):
        DispatchConfig(perf_db_path="")
    src = PerfDBSource(rt)
    rt.measurement_source = src
    ctx = lz.SelectionContext(dtype="float32", num_tokens=4, hidden_size=8)
    hw = hardware_fingerprint(ctx.device).digest
    for name, us in (("a.db", 5.0), ("b.db", 7.0)):
        db = PerfDB(tmp_path / name)
        db.record([rec("torch_rms_norm", us, bucket=bucket_of("rms_norm", ctx), hardware=hw,
                       libraries=libraries_for(rt, "torch"))])
        db.close()
    specs = tuple(rt.kernels.for_operation("rms_norm"))
    rt.configure(rt.config.replace(perf_db_path=str(tmp_path / "a.db")))
    assert src("rms_norm", ctx, specs)["torch_rms_norm"].median_us == 5.0
    rt.configure(rt.config.replace(perf_db_path=str(tmp_path / "b.db")))
    assert src("rms_norm", ctx, specs)["torch_rms_norm"].median_us == 7.0
    assert src.db is not None and src.db.path == tmp_path / "b.db"


def test_rows_of_another_library_version_do_not_hide_this_ones(attached: PerfDB) -> None:
    """A kernel measured before and after a torch upgrade has a row per version; lookup used to keep the first
    by sort order ("torch=2.11.0" before "torch=2.13.0+cpu"), and selection then dropped it as stale: the
    current measurements were never read and selection went back to priorities."""
    rt, db = get_runtime(), attached
    hw, now = hardware_fingerprint("cpu").digest, libraries_for(rt, "torch")
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    bucket = bucket_of("rms_norm", lz.SelectionContext.from_rows(x))
    db.record([rec("torch_rms_norm", 100.0, bucket=bucket, libraries=now, hardware=hw),
               rec("torch_rms_norm_composed", 50.0, bucket=bucket, libraries=now, hardware=hw)])
    assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
    db.record([rec("torch_rms_norm", 100.0, bucket=bucket, libraries="torch=0.0.1", hardware=hw),
               rec("torch_rms_norm_composed", 50.0, bucket=bucket, libraries="torch=0.0.1", hardware=hw)])
    assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
    got = db.lookup(hw, "rms_norm", "float32", bucket, {"torch_rms_norm": now})
    assert got["torch_rms_norm"][0] == now
