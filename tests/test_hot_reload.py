"""HOT_RELOAD dispatch: edits on disk reach dispatch, broken edits are rejected, in-flight calls, 8 threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from layerzero.dispatch import DispatchConfig, DispatchMode, create_hot_reload_dispatcher, create_orchestrator
from layerzero.dispatch.hot_reload import WATCHDOG_AVAILABLE, HotReloadDispatcher, ReloadStats
from layerzero.errors import ConfigError
from layerzero.policy.config_schema import CompiledConfig
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec

EPS = 1e-6
WATCHERS = [pytest.param(False, id="polling"),
            pytest.param(True, id="watchdog", marks=pytest.mark.skipif(not WATCHDOG_AVAILABLE,
                                                                       reason="watchdog is not installed"))]


def rows(n: int = 4, hidden: int = 32, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, hidden, generator=g), "weight": torch.randn(hidden, generator=g) + 1.5, "eps": EPS}


def rms_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait (bounded) for the watcher thread; the bound is a hang guard, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def replace_file(path: Path, text: str) -> None:
    """Write next to the file and rename over it (what deployment tools do)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Kernels:
    """Own registries with three rms_norm kernels; ``custom_c`` has the highest priority (the default)."""

    def __init__(self) -> None:
        self.kernels = KernelRegistry()
        self.backends = BackendRegistry()
        self.gate: dict[str, threading.Event] = {}
        self.entered = threading.Event()
        for name, priority in (("custom_a", 50), ("custom_b", 40), ("custom_c", 90)):
            self.kernels.register(KernelSpec(name, "rms_norm", "custom", self._impl(name), priority=priority))

    def _impl(self, name: str) -> Any:
        def impl(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
            gate = self.gate.get(name)
            if gate is not None:            # block this kernel mid-call until released
                self.entered.set()
                gate.wait(10)
            return F.rms_norm(x, x.shape[-1:], weight, eps)
        return impl

    def dispatcher(self, path: Path, **kw: Any) -> HotReloadDispatcher:
        kw.setdefault("watch_interval_seconds", 0.05)
        kw.setdefault("debounce_seconds", 0.02)
        return create_hot_reload_dispatcher(config_path=path, kernel_registry=self.kernels,
                                            backend_registry=self.backends, **kw)


# v1 and v2 each pick one kernel and deny the other; a mix of their rules would select custom_c.
V1 = ('version: "1.0"\ndispatch_rules:\n  - {operation: rms_norm, kernel: custom_a, priority: 10}\n'
      'kernel_denies: [custom_b]\n')
V2 = ('version: "1.0"\ndispatch_rules:\n  - {operation: rms_norm, kernel: custom_b, priority: 10}\n'
      'kernel_denies: [custom_a]\n')
BROKEN = 'version: "1.0"\ndispatch_rules:\n  - {operation: rms_norm, kernel: 123, priority: 2000}\n'


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Kernels, Path, list[HotReloadDispatcher]]]:
    path = tmp_path / "kernels.yaml"
    path.write_text(V1)
    made: list[HotReloadDispatcher] = []
    yield Kernels(), path, made
    for d in made:
        d.close()


@pytest.mark.parametrize("use_watchdog", WATCHERS)
def test_an_edit_on_disk_is_put_in_force(setup: Any, use_watchdog: bool) -> None:
    k, path, made = setup
    d = k.dispatcher(path, use_watchdog=use_watchdog)
    made.append(d)
    assert d.mode is DispatchMode.HOT_RELOAD
    assert d.watcher == ("watchdog" if use_watchdog else "polling")
    data = rows()
    r = d.dispatch("rms_norm", data)
    assert (r.kernel_id, r.mode) == ("custom_a", "hot_reload")
    torch.testing.assert_close(r.output.double(), rms_ref(data["x"], data["weight"]), atol=1e-5, rtol=1e-5)
    assert d.dispatch("rms_norm", data).cached
    path.write_text(V2)                                          # an in-place edit
    wait_for(lambda: d.stats.total_reloads == 1, "the reload")
    r = d.dispatch("rms_norm", data)
    assert (r.kernel_id, r.cached) == ("custom_b", False)
    replace_file(path, V1)                                       # an atomic rename over the file
    wait_for(lambda: d.stats.total_reloads == 2, "the second reload")
    assert d.dispatch("rms_norm", data).kernel_id == "custom_a"
    s = d.stats
    assert isinstance(s, ReloadStats)
    assert (s.total_reloads, s.failed_reloads, s.last_error, s.config_version) == (2, 0, None, 3)
    assert s.last_reload_time_ms > 0 and s.last_reload_timestamp > 0


@pytest.mark.parametrize("use_watchdog", WATCHERS)
def test_a_broken_edit_is_rejected_and_the_old_rules_stay(setup: Any, use_watchdog: bool) -> None:
    k, path, made = setup
    errors: list[Exception] = []
    d = k.dispatcher(path, use_watchdog=use_watchdog)
    made.append(d)
    d.on_error(errors.append)
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_a"
    path.write_text(BROKEN)
    wait_for(lambda: d.stats.failed_reloads == 1 and len(errors) == 1, "the rejected reload and its callback")
    s = d.stats
    assert (s.total_reloads, s.config_version) == (0, 1)
    assert s.last_error == (f"{path}: invalid config (2 errors):\n"
                            "  dispatch_rules[0].kernel: must be a string, got 123\n"
                            "  dispatch_rules[0].priority: must be between 0 and 1000, got 2000")
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_a"          # the running config stays
    assert d.dispatch("rms_norm", rows()).cached                            # and so do its cached plans
    path.write_text(V2)
    wait_for(lambda: d.stats.total_reloads == 1, "the reload of the fixed file")
    assert d.stats.last_error is None
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"
    assert get_runtime().telemetry.failed_reloads >= 0   # the global runtime is not this dispatcher's
    assert d.runtime.telemetry.failed_reloads == 1 and d.runtime.telemetry.reloads == 1


def test_manual_reload_callbacks_and_strict_mode(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path, start_watching=False)
    made.append(d)
    assert d.watcher == "stopped"
    seen: list[CompiledConfig] = []
    d.on_reload(seen.append)
    d.on_reload(lambda cfg: 1 / 0)                               # a failing callback does not undo the reload
    path.write_text(V2)
    assert d.reload() is True
    assert [c.rules[0].kernel for c in seen] == ["custom_b"]
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"
    assert d.reload() is True                                     # unchanged file: in force, nothing dropped
    assert (d.stats.total_reloads, d.stats.config_version) == (2, 2)
    assert d.dispatch("rms_norm", rows()).cached
    path.write_text(BROKEN)
    assert d.reload() is False
    with pytest.raises(ConfigError, match=r"dispatch_rules\[0\].kernel: must be a string, got 123"):
        d.reload(strict=True)
    assert d.stats.failed_reloads == 2
    path.unlink()
    assert d.reload() is False
    assert "file not found" in (d.stats.last_error or "")
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"


def test_touching_without_a_change_reloads_nothing(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path, use_watchdog=False)
    made.append(d)
    reloads: list[CompiledConfig] = []
    d.on_reload(reloads.append)
    path.write_text(V1)                                          # same bytes, new mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    path.write_text(V2)                                          # then a real change: the only reload
    wait_for(lambda: len(reloads) == 1, "the reload callback")
    assert [c.rules[0].kernel for c in reloads] == ["custom_b"]
    assert d.stats.total_reloads == 1
    assert d.stats.failed_reloads == 0


def test_a_deleted_file_keeps_the_config_and_a_new_one_is_loaded(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path, use_watchdog=False)
    made.append(d)
    path.unlink()
    wait_for(lambda: d.stats.failed_reloads == 1, "the missing-file report")
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_a"
    path.write_text(V2)
    wait_for(lambda: d.stats.total_reloads == 1, "the reload of the new file")
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"
    assert d.stats.failed_reloads == 1                            # the missing file was reported once


def test_in_flight_calls_finish_on_the_config_they_started_with(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path, start_watching=False)
    made.append(d)
    d.dispatch("rms_norm", rows())                                # cache the v1 plan (custom_a)
    k.gate["custom_a"] = release = threading.Event()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(d.dispatch("rms_norm", rows())))
    t.start()
    assert k.entered.wait(10)                                     # the call is inside custom_a now
    path.write_text(V2)
    assert d.reload() is True                                     # the reload does not wait for it
    after = d.dispatch("rms_norm", rows(seed=1))
    assert after.kernel_id == "custom_b"
    release.set()
    t.join(10)
    assert result[0].kernel_id == "custom_a"
    data = rows()
    torch.testing.assert_close(result[0].output.double(), rms_ref(data["x"], data["weight"]), atol=1e-5, rtol=1e-5)


def test_close_stops_the_watcher_and_dispatch_keeps_working(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path)
    made.append(d)
    assert d.watcher in ("watchdog", "polling")
    d.close()
    d.close()                                                     # idempotent
    assert d.watcher == "stopped"
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_a"
    d.watch()
    path.write_text(V2)
    wait_for(lambda: d.stats.total_reloads == 1, "the reload after watch()")


def test_validate_on_reload_false_accepts_unknown_kernels_as_warnings(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path, start_watching=False, validate_on_reload=False)
    made.append(d)
    path.write_text('version: "1.0"\nkernel_denies: [acme_kernel]\nkernel_locks: {rms_norm: custom_b}\n')
    with pytest.warns(Warning, match=r"unknown kernel 'acme_kernel'"):
        assert d.reload() is True
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"
    path.write_text(BROKEN)                                       # the schema is still checked
    assert d.reload() is False


def test_creation_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.yaml: file not found"):
        create_hot_reload_dispatcher(config_path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    with pytest.raises(ConfigError, match=r"dispatch_rules\[0\].priority: must be between 0 and 1000, got 2000"):
        create_hot_reload_dispatcher(config_path=bad)
    good = tmp_path / "good.yaml"
    good.write_text('version: "1.0"\n')
    with pytest.raises(ConfigError, match=r"watch_interval_seconds must be a positive number, got 0"):
        create_hot_reload_dispatcher(config_path=good, watch_interval_seconds=0)
    for name in ("watch_interval_seconds", "debounce_seconds"):  # the watcher thread would die in wait(inf)
        with pytest.raises(ConfigError, match=name + r" must be at most threading.TIMEOUT_MAX .*got inf"):
            create_hot_reload_dispatcher(config_path=good, **{name: float("inf")})
    with pytest.raises(ConfigError, match=r"watch_interval_seconds: must be at most threading.TIMEOUT_MAX"):
        DispatchConfig(watch_interval_seconds=1e300)
    with pytest.raises(ConfigError, match=r"config_path must be a path, got dict"):
        create_hot_reload_dispatcher(config_path={"version": "1.0"})  # type: ignore[arg-type]


def test_orchestrator_hot_reload_mode(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm_composed}\n')
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.HOT_RELOAD, config_path=str(path),
                                           watch_interval_seconds=0.05))
    try:
        assert o.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm_composed"
        target = o.route("rms_norm")
        assert isinstance(target, HotReloadDispatcher)
        path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n')
        wait_for(lambda: target.stats.total_reloads == 1, "the reload")
        assert o.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm"
    finally:
        o.set_config_dispatcher(None)


# -- the integration test: a real file edited while 8 threads dispatch ---------------------------------------------

def test_edits_while_eight_threads_dispatch_never_mix_configs(setup: Any) -> None:
    k, path, made = setup
    d = k.dispatcher(path, watch_interval_seconds=0.02, debounce_seconds=0.01)
    made.append(d)
    expected = {1: "custom_a"}                      # config_version -> the kernel that config selects
    stop = threading.Event()
    records: list[list[tuple[int, str, int]]] = [[] for _ in range(8)]
    failures: list[BaseException] = []
    inputs = [rows(n=2 + i % 3, seed=i) for i in range(8)]     # a few shapes, so plans are rebuilt
    refs = [rms_ref(x["x"], x["weight"]) for x in inputs]

    def worker(i: int) -> None:
        try:
            n = 0
            while not stop.is_set() or n < 20:
                before = d.stats.config_version
                r = d.dispatch("rms_norm", inputs[(i + n) % 8])
                after = d.stats.config_version
                records[i].append((before, r.kernel_id, after))
                if n % 25 == 0:
                    torch.testing.assert_close(r.output.double(), refs[(i + n) % 8], atol=1e-5, rtol=1e-5)
                n += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    edits = [V2, BROKEN, V1, V2, BROKEN, V1]
    for text in edits:
        time.sleep(0.05)
        reloads, failed = d.stats.total_reloads, d.stats.failed_reloads
        replace_file(path, text)
        if text is BROKEN:
            wait_for(lambda f=failed: d.stats.failed_reloads == f + 1, "the rejected edit")
        else:
            wait_for(lambda r=reloads: d.stats.total_reloads == r + 1, "the edit")
            expected[d.stats.config_version] = "custom_a" if text is V1 else "custom_b"
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures[:3]
    calls = [rec for per in records for rec in per]
    assert len(calls) >= 8 * 20
    kernels = {kid for _, kid, _ in calls}
    assert "custom_c" not in kernels                               # custom_c would mean a mix of two configs
    assert kernels == {"custom_a", "custom_b"}
    for before, kid, after in calls:                               # each call saw a config in force during it
        assert kid in {expected[v] for v in range(before, after + 1)}, (before, kid, after)
    s = d.stats
    assert (s.total_reloads, s.failed_reloads, s.config_version) == (4, 2, 5)
    assert d.dispatch("rms_norm", inputs[0]).kernel_id == "custom_a"          # the last good edit is in force


def test_unclosed_watching_dispatchers_are_all_freed(tmp_path: Path) -> None:
    """Dropped without close(): the garbage collector frees them and their threads stop. Their finalizer used
    to stop watchdog's observer; run by a collection inside watchdog's own thread (which held the observer's
    lock) it deadlocked that collection, no later collection ran (gc.collect() returned 0), and in a loop
    dispatchers piled up with their threads (5-28 of 30 here, 730 threads and 3.4 GB in a loop of 220)."""
    import gc
    import weakref

    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\n')
    before = threading.active_count()
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    refs = []
    for _ in range(30):
        d = create_hot_reload_dispatcher(config_path=path, watch_interval_seconds=0.05)
        d.dispatch("rms_norm", {"x": x, "weight": w})
        refs.append(weakref.ref(d))
        del d
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        gc.collect()
        if not any(r() is not None for r in refs) and threading.active_count() <= before:
            break
        time.sleep(0.2)
    assert sum(r() is not None for r in refs) == 0
    assert threading.active_count() <= before, [t.name for t in threading.enumerate()]


def test_an_on_error_callback_may_reload(tmp_path: Path) -> None:
    """on_error ran while reload() held its (non-reentrant) lock: a callback restoring the last good file and
    calling reload() deadlocked its thread (the watcher's, for good), and a slow callback blocked every reload."""
    path = tmp_path / "k.yaml"
    good = 'version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n'
    path.write_text(good)
    hot = create_hot_reload_dispatcher(config_path=path, start_watching=False)
    results: list[bool] = []

    def restore(err: Exception) -> None:
        path.write_text(good)
        results.append(hot.reload())

    hot.on_error(restore)
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: 7}\n')
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(hot.reload()), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and done == [False] and results == [True]
    assert hot.stats.failed_reloads == 1 and hot.stats.last_error is None
    hot.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_keeps_reloading(tmp_path: Path) -> None:
    """A child of fork() (a preloaded server forking workers) has no watcher thread: it served the old config
    for good, edits unseen. The child starts its own watcher, with a fresh reload lock."""
    path = tmp_path / "k.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n')
    hot = create_hot_reload_dispatcher(config_path=path, watch_interval_seconds=0.05, debounce_seconds=0.0,
                                       use_watchdog=False)
    x, w = torch.randn(4, 16), torch.rand(16) + 0.5
    assert hot.dispatch("rms_norm", {"x": x, "weight": w}).kernel_id == "torch_rms_norm"
    pid = os.fork()
    if pid == 0:  # the child: edit the file, see the edit served
        ok = False
        try:
            path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm_composed}\n')
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not ok:
                ok = hot.dispatch("rms_norm", {"x": x, "weight": w}).kernel_id == "torch_rms_norm_composed"
                time.sleep(0.05)
        finally:
            os._exit(0 if ok and hot.watcher != "stopped" else 1)
    _, status = os.waitpid(pid, 0)
    hot.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
