"""HOT_RELOAD mode: a config-driven dispatcher that follows edits to its file without a restart.

A background thread watches the file: through ``watchdog`` when it is
installed (events on the file's directory, so editors that save by renaming
are seen), and by polling ``stat()`` every ``watch_interval_seconds``
otherwise (and as a safety net alongside watchdog). Changes are debounced
(``debounce_seconds`` after the last event), the bytes are hashed (a touch
without a change reloads nothing), then parsed, validated and compiled off
the hot path. Only a valid config is swapped in, atomically: cached plans are
dropped, calls already running finish on the config they started with, and
every later call sees the new one. An invalid file keeps the running config;
the failure is counted and reported (``stats.failed_reloads``,
``stats.last_error``, a warning log line, ``on_error`` callbacks).

Example::

    with create_hot_reload_dispatcher(config_path="kernels.yaml", watch_interval_seconds=0.5) as d:
        d.on_reload(lambda cfg: print("now in force:", cfg.digest))
        d.dispatch("rms_norm", {"x": x, "weight": w})
        print(d.stats.total_reloads, d.stats.last_reload_time_ms)

For the cleanest reloads write the new file next to the old one and rename it
over (``os.replace``): a reader then never sees a half-written file. A
half-written file is rejected like any invalid one, and the write that
completes it triggers the next reload.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerzero import forksafe
from layerzero.config_file.load import parse_text, read_file_bounded
from layerzero.config_file.problems import raise_problems
from layerzero.config_file.schema import CompiledConfig, validate_config
from layerzero.runtime.config import DispatchConfig, DispatchMode, wait_problem
from layerzero.dispatch.config_driven import ConfigDrivenDispatcher, resolve_config_path
from layerzero.dispatch.runtimes import runtime_for
from layerzero.dispatch.result import DispatchStats
from layerzero.errors import ConfigError
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import Runtime

__all__ = ["HotReloadDispatcher", "ReloadStats", "create_hot_reload_dispatcher", "WATCHDOG_AVAILABLE"]

log = logging.getLogger("layerzero")

try:  # optional: `pip install layerzero[watch]`
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    WATCHDOG_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where watchdog is absent
    WATCHDOG_AVAILABLE = False


@dataclass(frozen=True)
class ReloadStats(DispatchStats):
    """``dispatcher.stats`` of a hot-reload dispatcher.

    Attributes (besides ``total_reloads``, ``failed_reloads``, ``last_reload_time_ms``, ``last_error``):
        config_version: 1 for the config loaded at start, +1 per reload that changed the rules.
        config_digest: digest of the config in force.
        last_reload_timestamp: wall-clock time (``time.time()``) of the last successful reload, 0.0 if none.
        watcher: ``"watchdog"``, ``"polling"`` or ``"stopped"``.
    """

    config_version: int = 1
    config_digest: str = ""
    last_reload_timestamp: float = 0.0
    watcher: str = "stopped"


# -- reading and compiling one version of the file ---------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    return read_file_bounded(path, str(path), ConfigError)  # bounded; a FIFO or device fails instead of blocking


def _compile_bytes(raw: bytes, path: Path, registry: KernelRegistry, unknown_kernels: str) -> CompiledConfig:
    label = str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise ConfigError(f"{label}: file is empty")
    data = parse_text(text, label, error=ConfigError, as_json=path.suffix.lower() == ".json")
    compiled, problems = validate_config(data, label, kernel_registry=registry, unknown_kernels=unknown_kernels)
    raise_problems(problems, label, "config", ConfigError)
    if compiled is None:  # raise_problems raised already
        raise ConfigError(f"{label}: invalid config")
    return compiled


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What polling compares: modification time, size and inode (a rename-over changes the inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


_UNREADABLE = "<unreadable>"


# -- the watcher ---------------------------------------------------------------------------------------------------

class _Watcher:
    """Watchdog events or stat() polling, debounced, calling ``on_change()`` from its own thread.

    It holds only a weak reference to the dispatcher's callback, so an unclosed dispatcher can still be
    garbage collected (its watcher then stops).
    """

    def __init__(self, path: Path, interval: float, debounce: float, on_change: Callable[[], None],
                 use_watchdog: bool, last_seen: tuple[int, int, int] | None) -> None:
        self.path = path
        self.interval = interval
        self.debounce = debounce
        self._callback = weakref.WeakMethod(on_change)  # type: ignore[arg-type]
        self._wake = threading.Condition()
        self._due: float | None = None
        self._stop = threading.Event()
        self.sig = last_seen  # the file as it was when last read: a change since then is seen at once
        self.observer = self._start_observer() if use_watchdog and WATCHDOG_AVAILABLE else None
        self.thread = threading.Thread(target=self._loop, name=f"layerzero-hot-reload:{path.name}", daemon=True)
        self.thread.start()

    @property
    def kind(self) -> str:
        if not self.thread.is_alive():
            return "stopped"
        return "watchdog" if self.observer is not None else "polling"

    def signature(self) -> tuple[int, int, int] | None:
        return _signature(self.path)

    def poke(self) -> None:
        """A change was seen: (re)start the debounce window."""
        with self._wake:
            self._due = time.monotonic() + self.debounce
            self._wake.notify()

    def _start_observer(self) -> Any:
        target = str(self.path.resolve())
        poke = self.poke

        class _Handler(FileSystemEventHandler):  # type: ignore[misc]
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = {os.fsdecode(event.src_path)}
                dest = getattr(event, "dest_path", "")
                if dest:
                    paths.add(os.fsdecode(dest))
                if target in paths or any(os.path.realpath(p) == target for p in paths):
                    poke()

        try:
            observer = Observer()
            observer.schedule(_Handler(), str(self.path.resolve().parent), recursive=False)
            observer.daemon = True
            observer.start()
            return observer
        except Exception as exc:  # no inotify watches left, unsupported filesystem, ...: poll instead
            log.warning("hot reload: watchdog cannot watch %s (%s: %s); polling every %.3gs instead",
                        self.path, type(exc).__name__, exc, self.interval)
            return None

    def _loop(self) -> None:
        try:
            self._watch()
        finally:  # the observer is stopped here, in this thread, when a finalizer only signalled (signal_stop)
            self._stop_observer(join=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                due = self._due
                timeout = self.interval if due is None else max(due - time.monotonic(), 0.0)
                if timeout > 0:
                    self._wake.wait(timeout)
                if self._stop.is_set():
                    return
                due = self._due
                ready = due is not None and time.monotonic() >= due
                if ready:
                    self._due = None
            if ready:
                self.sig = self.signature()
                callback = self._callback()
                if callback is None:  # the dispatcher is gone
                    return
                try:
                    callback()
                except Exception:  # never let the watcher thread die
                    log.exception("hot reload of %s failed unexpectedly", self.path)
                del callback
                continue
            sig = self.signature()  # the polling path, and watchdog's safety net
            if sig != self.sig:
                self.sig = sig
                self.poke()

    def stop(self) -> None:
        """Stop the threads and wait for them (up to 5 s each)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._stop_observer(join=True)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def signal_stop(self) -> None:
        """Ask the threads to stop without taking a lock or waiting: what a finalizer may do. The garbage
        collector runs finalizers in whatever thread collects, watchdog's own among them, which may hold the
        observer's lock: stopping the observer there deadlocked the collection, no later one ran, and unclosed
        dispatchers piled up with their threads. The watcher's loop stops the observer when it ends."""
        self._stop.set()
        if self._wake.acquire(blocking=False):
            try:
                self._wake.notify_all()
            finally:
                self._wake.release()

    def _stop_observer(self, join: bool) -> None:
        observer, self.observer = self.observer, None
        if observer is not None:
            try:
                observer.stop()
                if join and observer is not threading.current_thread():
                    observer.join(timeout=5)
            except Exception:
                log.exception("hot reload: stopping the file watcher failed")


# -- the dispatcher --------------------------------------------------------------------------------------------------

#: Dispatchers whose file is watched, for :func:`_restart_watchers` after a fork.
_WATCHING: weakref.WeakSet[HotReloadDispatcher] = weakref.WeakSet()


def _restart_watchers() -> None:
    for dispatcher in list(_WATCHING):
        dispatcher._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_watchers)


class HotReloadDispatcher(ConfigDrivenDispatcher):
    """A :class:`ConfigDrivenDispatcher` that reloads its file when it changes (see the module docstring).

    Args:
        runtime: the runtime to run on.
        path: the YAML or JSON file; it is read and validated now (a ``ConfigError`` if invalid).
        watch_interval_seconds: polling period (and watchdog safety-net period).
        validate_on_reload: check that named kernels exist on reload (otherwise unknown kernels are
            warnings); the schema is always checked, since an invalid file cannot be compiled.
        debounce_seconds: wait this long after the last change before reloading (editors write in steps).
        start_watching: start the watcher thread now (``watch()`` starts it later).
        use_watchdog: use watchdog when installed (``False``: always poll).
        unknown_kernels: ``"error"`` or ``"warn"`` for kernel ids the registry does not know.
    """

    mode = DispatchMode.HOT_RELOAD

    def __init__(self, runtime: Runtime, path: str | os.PathLike[str], *, watch_interval_seconds: float = 1.0,
                 validate_on_reload: bool = True, debounce_seconds: float = 0.05, start_watching: bool = True,
                 use_watchdog: bool = True, unknown_kernels: str = "error", use_mvcc_cache: bool = False,
                 shards: int = 16) -> None:
        for name, value, zero_ok in (("watch_interval_seconds", watch_interval_seconds, False),
                                     ("debounce_seconds", debounce_seconds, True)):
            problem = wait_problem(value, zero_ok=zero_ok)
            if problem is not None:
                raise ConfigError(f"{name} {problem}, got {value!r}")
        path = Path(path)
        self._read_sig = _signature(path)
        raw = _read_bytes(path)
        compiled = _compile_bytes(raw, path, runtime.kernels, unknown_kernels)
        super().__init__(runtime, compiled, use_mvcc_cache=use_mvcc_cache, shards=shards)
        self.path = path
        self.watch_interval_seconds = float(watch_interval_seconds)
        self.validate_on_reload = bool(validate_on_reload)
        self.debounce_seconds = float(debounce_seconds)
        self.unknown_kernels = unknown_kernels
        self._use_watchdog = bool(use_watchdog)
        self._reload_lock = forksafe.lock(self, "_reload_lock")  # one reload at a time
        self._watcher: _Watcher | None = None
        self._on_reload: list[Callable[[CompiledConfig], None]] = []
        self._on_error: list[Callable[[Exception], None]] = []
        self._good_hash = hashlib.sha256(raw).hexdigest()
        self._bad_hash: str | None = None  # bytes last rejected ("<unreadable>" for a missing file)
        self._total = 0
        self._failed = 0
        self._last_ms = 0.0
        self._last_error: str | None = None
        self._last_at = 0.0
        self._version_no = 1
        if start_watching:
            self.watch()

    # -- stats and callbacks --------------------------------------------------------------------------
    @property
    def stats(self) -> ReloadStats:
        """``total_reloads``, ``failed_reloads``, ``last_reload_time_ms``, ``last_error``, ``config_version``, ..."""
        return ReloadStats(self.mode.value, self._total, self._failed, self._last_ms, self._last_error,
                           self._version_no, self._compiled.digest, self._last_at, self.watcher)

    @property
    def watcher(self) -> str:
        """``"watchdog"``, ``"polling"`` or ``"stopped"``."""
        return self._watcher.kind if self._watcher is not None else "stopped"

    def on_reload(self, callback: Callable[[CompiledConfig], None]) -> None:
        """Call ``callback(compiled)`` after each successful reload (from the reloading thread)."""
        self._on_reload.append(callback)

    def on_error(self, callback: Callable[[Exception], None]) -> None:
        """Call ``callback(error)`` after each rejected reload (from the reloading thread, outside the reload lock:
        it may call :meth:`reload`, to put the last good file back for one)."""
        self._on_error.append(callback)

    # -- reloading ------------------------------------------------------------------------------------
    def reload(self, *, strict: bool = False) -> bool:
        """Read, validate and (when valid) put the file in force now.

        Returns:
            True when the file's config is in force afterwards (changed or not); False when the file
            was rejected (the running config stays; ``stats.failed_reloads`` / ``stats.last_error`` say why).

        Raises:
            ConfigError: only with ``strict=True``, for a rejected file.
        """
        with self._reload_lock:
            t0 = time.perf_counter()
            digest = _UNREADABLE
            self._read_sig = _signature(self.path)
            try:
                raw = _read_bytes(self.path)
                digest = hashlib.sha256(raw).hexdigest()
                unknown = self.unknown_kernels if self.validate_on_reload else "warn"
                compiled = _compile_bytes(raw, self.path, self.runtime.kernels, unknown)
            except ConfigError as err:
                self._bad_hash = digest
                self._rejected(err, (time.perf_counter() - t0) * 1000.0)
                rejected: ConfigError | None = err
            else:
                rejected = None
                changed = self._swap(compiled)
                ms = (time.perf_counter() - t0) * 1000.0
                self._good_hash, self._bad_hash = digest, None
                self._total += 1
                self._last_ms = ms
                self._last_error = None
                self._last_at = time.time()
                if changed:
                    self._version_no += 1
        # the callbacks run outside the lock: one may call reload() (restore the last good file and reload)
        if rejected is not None:
            for cb in list(self._on_error):
                try:
                    cb(rejected)
                except Exception:
                    log.exception("hot reload: on_error callback failed")
            if strict:
                raise rejected
            return False
        self.runtime.telemetry.record_reload(True, source=str(self.path), duration_ms=round(ms, 3),
                                             digest=compiled.digest, changed=changed)
        for cb in list(self._on_reload):
            try:
                cb(compiled)
            except Exception:  # a callback must not undo a good reload
                log.exception("hot reload: on_reload callback failed")
        return True

    def _rejected(self, err: ConfigError, ms: float) -> None:
        self._failed += 1
        self._last_error = str(err)
        self._last_ms = ms
        # One warning line (the telemetry's config_reload event) names every error; the config stays.
        self.runtime.telemetry.record_reload(False, source=str(self.path), duration_ms=round(ms, 3),
                                             error="; ".join(err.errors) if err.errors else str(err),
                                             errors=len(err.errors), kept=self._compiled.digest)

    def _changed_on_disk(self) -> None:
        """The watcher saw a change: reload unless the bytes are the ones in force (or already rejected)."""
        try:
            digest = hashlib.sha256(_read_bytes(self.path)).hexdigest()
        except ConfigError:
            digest = _UNREADABLE  # missing / unreadable: reload() reports it, once per state
        if digest == self._good_hash and self._last_error is None:
            return
        if digest == self._bad_hash:
            return
        self.reload()

    # -- watching -------------------------------------------------------------------------------------
    def watch(self) -> None:
        """Start watching the file (idempotent; a child process forked while this watches watches again)."""
        if self._watcher is not None and self._watcher.thread.is_alive():
            return
        self._watcher = _Watcher(self.path, self.watch_interval_seconds, self.debounce_seconds,
                                 self._changed_on_disk, self._use_watchdog, self._read_sig)
        _WATCHING.add(self)

    def _after_fork_in_child(self) -> None:
        """The child of a fork has only the forking thread: no watcher runs, and a lock another thread held at the
        fork stays held. Fresh lock, fresh watcher (a preloaded server forking its workers keeps hot reload)."""
        self._reload_lock = forksafe.lock(self, "_reload_lock")
        if self._watcher is not None:
            self._watcher = None
            self.watch()

    def close(self) -> None:
        """Stop watching (idempotent). The dispatcher keeps working on the config in force, through the Python
        dispatch method (its compiled form, which holds the dispatcher, goes: a closed dispatcher is freed with its
        last reference, no garbage collection needed)."""
        self._release(join=True)

    stop_watching = close

    def _release(self, join: bool) -> None:
        _WATCHING.discard(self)
        watcher, self._watcher = self._watcher, None
        self.__dict__.pop("dispatch", None)
        if watcher is None:
            return
        if join:
            watcher.stop()
        else:
            watcher.signal_stop()

    def __del__(self) -> None:
        try:
            self._release(join=False)  # signal the threads; they end on their own (_Watcher.signal_stop)
        except Exception:
            pass


def create_hot_reload_dispatcher(config_path: str | os.PathLike[str] | None = None, *,
                                 watch_interval_seconds: float | None = None, validate_on_reload: bool | None = None,
                                 debounce_seconds: float = 0.05, start_watching: bool = True,
                                 use_watchdog: bool = True, kernel_registry: KernelRegistry | None = None,
                                 backend_registry: BackendRegistry | None = None,
                                 config: DispatchConfig | None = None, unknown_kernels: str = "error",
                                 use_mvcc_cache: bool = False, shards: int = 16,
                                 clock: Callable[[], float] | None = None) -> HotReloadDispatcher:
    """A HOT_RELOAD dispatcher watching ``config_path``.

    Args:
        config_path: the YAML or JSON file (default ``config.config_path`` or ``LAYERZERO_CONFIG``).
        watch_interval_seconds: polling period (default ``config.watch_interval_seconds``, else 1.0).
        validate_on_reload: check named kernels on reload (default ``config.validate_on_reload``, else True).
        debounce_seconds: quiet time after the last change before reloading.
        start_watching: start the watcher now (else call ``watch()``; ``reload()`` works either way).
        use_watchdog: use watchdog when installed (False: poll).
        kernel_registry / backend_registry / config: as for :func:`create_config_dispatcher`.

    Raises:
        ConfigError: the file is missing or invalid at start (a running dispatcher never raises for reloads).

    Example:
        >>> d = create_hot_reload_dispatcher(config_path="kernels.yaml", watch_interval_seconds=1.0)
        >>> d.stats.total_reloads, d.stats.failed_reloads, d.stats.last_reload_time_ms
    """
    source = resolve_config_path(config_path, config)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"hot reload watches a file: config_path must be a path, got {type(source).__name__}")
    interval = watch_interval_seconds if watch_interval_seconds is not None else (
        config.watch_interval_seconds if config is not None else 1.0)
    validate = validate_on_reload if validate_on_reload is not None else (
        config.validate_on_reload if config is not None else True)
    runtime = runtime_for(kernel_registry, backend_registry, config, clock=clock)
    return HotReloadDispatcher(runtime, source, watch_interval_seconds=interval, validate_on_reload=validate,
                               debounce_seconds=debounce_seconds, start_watching=start_watching,
                               use_watchdog=use_watchdog, unknown_kernels=unknown_kernels,
                               use_mvcc_cache=use_mvcc_cache, shards=shards)
