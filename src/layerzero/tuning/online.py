"""Online tuning: measure a bucket the first time it is seen, then never again on the hot path.

Switched on by ``DispatchConfig(online_tuning=True)`` or
``LAYERZERO_ONLINE_TUNING=1``; the budget per new bucket is
``DispatchConfig.online_tuning_budget_ms`` (200 ms by default).

:class:`OnlineTuner` is a ``Runtime.on_miss`` hook: the runtime calls it on a
plan-cache miss, before selecting. The first miss of each (operation, device,
dtype, bucket) measures the eligible kernels that the performance database
has no current row for, highest priority first, with correctness checks and
short timing runs, until the budget is spent, and stores what it measured
(which drops cached plans, so selection then uses the new times). Every later
miss of that bucket returns after one set lookup, and cache hits never reach
the hook at all. Nothing is measured while ``torch.compile`` traces or a CUDA
graph is captured. The budget is checked between kernels: one kernel's first
call (a Triton JIT compile, say) can overrun it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.tuning.buckets import bucket_of

if TYPE_CHECKING:
    from layerzero.runtime import Runtime

__all__ = ["OnlineTuner", "enable_online_tuning"]

log = logging.getLogger("layerzero")

_MAX_SEEN = 1_000_000


class OnlineTuner:
    """``Runtime.on_miss`` hook that measures new buckets within the configured budget."""

    @property
    def needs_every_shape(self) -> bool:
        """While online tuning is on it must see the first call of every bucket, so the runtime makes
        no shape-free plans (:meth:`Runtime.shape_free_reason`)."""
        return self.runtime.config.online_tuning

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.buckets_tuned = 0
        self.kernels_measured = 0
        self._seen: set[tuple[object, ...]] = set()
        self._lock = forksafe.lock(self)
        self._local = threading.local()

    def __call__(self, operation: str, ctx: SelectionContext) -> None:
        rt = self.runtime
        if not rt.config.online_tuning or ctx.compiling or ctx.cuda_graph_capturing or ctx.dtype is None:
            return
        if getattr(self._local, "busy", False):
            return
        key = (operation, ctx.platform, ctx.device_index, ctx.dtype, bucket_of(operation, ctx))
        if key in self._seen:
            return
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) < _MAX_SEEN:
                self._seen.add(key)
        self._local.busy = True
        try:
            self._tune(operation, ctx)
        except Exception as exc:  # online tuning is advisory: the call goes on with priorities
            log.warning("online tuning of %s failed: %s: %s", operation, type(exc).__name__, exc)
        finally:
            self._local.busy = False

    def seen(self) -> int:
        return len(self._seen)

    def forget(self) -> None:
        """Measure every bucket again on its next miss (after installing a backend, say)."""
        with self._lock:
            self._seen.clear()

    def _tune(self, operation: str, ctx: SelectionContext) -> None:
        from layerzero.tuning.fingerprint import hardware_fingerprint
        from layerzero.tuning.source import get_perf_db, libraries_for
        from layerzero.tuning.tuner import Tuner

        rt = self.runtime
        deadline = time.perf_counter() + rt.config.online_tuning_budget_ms / 1000.0
        db = get_perf_db(runtime=rt)
        if db is None:
            return
        tuner = Tuner(db, runtime=rt, quick=True, source="online")
        eligible = tuner.eligible(operation, ctx)
        if len(eligible) < 2:
            return  # one candidate: nothing to choose between
        installed = {s.kernel_id: libraries_for(rt, s.backend) for s in eligible}
        stored = db.lookup(hardware_fingerprint(ctx.device).digest, operation, ctx.dtype_name or "",
                           bucket_of(operation, ctx), installed)
        todo = [s for s in eligible if s.kernel_id not in stored or stored[s.kernel_id][0] != installed[s.kernel_id]]
        if not todo:
            return
        result = tuner.tune_bucket(operation, ctx, specs=todo, deadline=deadline)
        self.buckets_tuned += 1
        self.kernels_measured += sum(r.status != "skipped" for r in result.results)
        # the tuner counted the run and logged its line (event=tuning source=online)


def enable_online_tuning(runtime: Runtime | None = None) -> OnlineTuner:
    """Install the online-tuning hook on ``runtime`` (idempotent; the config flag still decides if it runs)."""
    if runtime is None:
        from layerzero.runtime import get_runtime

        runtime = get_runtime()
    for hook in runtime.on_miss:
        if isinstance(hook, OnlineTuner):
            return hook
    hook = OnlineTuner(runtime)
    runtime.on_miss.append(hook)
    return hook
