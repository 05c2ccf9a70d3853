"""The in-process telemetry registry every dispatcher and ``lz.*`` share.

Counting is plain attribute arithmetic on small slotted objects, cheap enough
to stay on in production; exporters (Prometheus, OpenTelemetry) read these
objects when they are scraped, so the hot path never talks to an exporter.
With telemetry disabled the runtime builds plan runners that touch none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from layerzero import forksafe
from layerzero.telemetry.logs import log_event

__all__ = ["Telemetry", "KernelStats", "CacheStats", "LATENCY_BUCKETS_US"]

# Histogram bucket upper bounds in microseconds (the last bucket is +Inf).
LATENCY_BUCKETS_US: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 100000)


class KernelStats:
    """Counters for one kernel serving one operation. ``calls`` counts every invocation, fast path included.

    ``Telemetry.kernels`` aggregates these per kernel over its operations.
    """

    __slots__ = ("kernel_id", "operation", "calls", "failures", "fallbacks", "latency_buckets", "latency_sum_us",
                 "latency_count")

    def __init__(self, kernel_id: str, operation: str = "") -> None:
        self.kernel_id = kernel_id
        self.operation = operation
        self.calls = 0
        self.failures = 0
        self.fallbacks = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_US) + 1)
        self.latency_sum_us = 0.0
        self.latency_count = 0

    def observe_us(self, us: float) -> None:
        i = 0
        for bound in LATENCY_BUCKETS_US:
            if us <= bound:
                break
            i += 1
        self.latency_buckets[i] += 1
        self.latency_sum_us += us
        self.latency_count += 1

    def to_dict(self) -> dict[str, Any]:
        return {"kernel_id": self.kernel_id, "operation": self.operation, "calls": self.calls,
                "failures": self.failures, "fallbacks": self.fallbacks,
                "latency_count": self.latency_count, "latency_sum_us": self.latency_sum_us}


@dataclass(frozen=True)
class CacheStats:
    """Plan-cache counters (``telemetry.cache_stats``)."""

    hits: int
    misses: int
    size: int
    capacity: int
    evictions: int
    invalidations: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


#: The operation names one kernel's counters keep apart (then ``OTHER``); selections keep four times as many.
MAX_OPERATIONS = 256
OTHER = "(other)"


class Telemetry:
    """Counters shared by one runtime. Read through :meth:`snapshot` or the properties."""

    def __init__(self) -> None:
        self.enabled = True
        self._lock = forksafe.lock(self)
        # kernel id -> operation -> counters; the hot path holds one KernelStats and bumps it.
        self._kernel_ops: dict[str, dict[str, KernelStats]] = {}
        self.selections: dict[tuple[str, str], int] = {}
        self.fallback_pairs: dict[tuple[str, str, str], int] = {}
        self.misses = 0
        self.cache_evictions = 0
        self.cache_invalidations = 0
        self.breaker_transitions: dict[tuple[str, str, str], int] = {}
        self.reloads = 0
        self.failed_reloads = 0
        self.tuning_runs = 0
        self.policy_changes = 0
        self.handoffs = 0  # kernel calls that handed the call on without failing (record_handoff)
        self._retired_calls = 0  # the calls of kernels forgotten since (forget_kernels): totals stay monotone
        self._retired_fallbacks = 0
        self.errors: dict[str, int] = {}
        self._cache_size: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def kernel(self, kernel_id: str, operation: str = "") -> KernelStats:
        """The counters of ``kernel_id`` serving ``operation`` (created on first use; past
        :data:`MAX_OPERATIONS` operation names for one kernel, the rest count under ``OTHER``: a custom operation's
        sub-names may be unbounded, ``my.op.<request tag>``)."""
        ops = self._kernel_ops.get(kernel_id)
        s = ops.get(operation) if ops is not None else None
        if s is None:
            with self._lock:
                ops = self._kernel_ops.setdefault(kernel_id, {})
                if operation not in ops and len(ops) >= MAX_OPERATIONS:
                    operation = OTHER
                s = ops.get(operation)
                if s is None:
                    s = KernelStats(kernel_id, operation)
                    ops[operation] = s
        return s

    def kernel_operations(self) -> list[KernelStats]:
        """Every per-(kernel, operation) counter, sorted by kernel then operation."""
        return [s for _, ops in sorted(list(self._kernel_ops.items())) for _, s in sorted(list(ops.items()))]

    @property
    def kernels(self) -> dict[str, KernelStats]:
        """Per-kernel totals over every operation the kernel served (a fresh read-only view)."""
        out: dict[str, KernelStats] = {}
        for kid, ops in sorted(list(self._kernel_ops.items())):
            parts = list(ops.values())
            total = KernelStats(kid, ",".join(sorted(s.operation for s in parts if s.operation)))
            for s in parts:
                total.calls += s.calls
                total.failures += s.failures
                total.fallbacks += s.fallbacks
                total.latency_sum_us += s.latency_sum_us
                total.latency_count += s.latency_count
                total.latency_buckets = [a + b for a, b in zip(total.latency_buckets, s.latency_buckets, strict=True)]
            out[kid] = total
        return out

    # -- events (slow path only) ---------------------------------------------
    def record_selection(self, operation: str, kernel_id: str) -> None:
        if not self.enabled:
            return
        key = (operation, kernel_id)
        with self._lock:
            if key not in self.selections and len(self.selections) >= MAX_OPERATIONS * 4:
                key = (OTHER, kernel_id)
            self.selections[key] = self.selections.get(key, 0) + 1
        self._emit("selection", {"operation": operation, "kernel": kernel_id})

    def record_miss(self) -> None:
        if self.enabled:
            self.misses += 1

    def record_fallback(self, operation: str, from_kernel: str, to_kernel: str) -> None:
        if not self.enabled:
            return
        key = (operation, from_kernel, to_kernel)
        with self._lock:
            self.fallback_pairs[key] = self.fallback_pairs.get(key, 0) + 1
        self._emit("fallback", {"operation": operation, "from_kernel": from_kernel, "to_kernel": to_kernel})

    def record_failure(self, operation: str, kernel_id: str, error: BaseException) -> None:
        if not self.enabled:
            return
        s = self.kernel(kernel_id, operation)
        s.failures += 1
        s.fallbacks += 1
        name = type(error).__name__
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1
        self._emit("failure", {"operation": operation, "kernel": kernel_id, "error": name})

    def record_breaker(self, kernel_id: str, old: str, new: str) -> None:
        if not self.enabled:
            return
        key = (kernel_id, old, new)
        with self._lock:
            self.breaker_transitions[key] = self.breaker_transitions.get(key, 0) + 1
        self._emit("breaker", {"kernel": kernel_id, "from": old, "to": new})

    def record_handoff(self, operation: str, kernel_id: str) -> None:
        """``kernel_id`` ran and handed the call on without failing (it declined it, or the call was outside what
        it declares): one more kernel call within the same user call, as a fallback is."""
        if self.enabled:
            self.handoffs += 1

    def record_eviction(self, n: int = 1) -> None:
        if self.enabled:
            self.cache_evictions += n

    def record_invalidation(self) -> None:
        if self.enabled:
            self.cache_invalidations += 1

    def record_reload(self, ok: bool, **fields: Any) -> None:
        """Count a config reload (when enabled) and log its one line (``fields``: source, duration_ms, error,
        ...)."""
        log_event("config_reload", logging.INFO if ok else logging.WARNING,
                  result="success" if ok else "failure", **fields)
        if not self.enabled:
            return
        if ok:
            self.reloads += 1
        else:
            self.failed_reloads += 1
        self._emit("reload", {"ok": ok, **fields})

    def record_tuning_run(self, **fields: Any) -> None:
        """Count a tuning run or decision (when enabled) and log its one line (``fields``: operation, bucket,
        winner, ...)."""
        log_event("tuning", **fields)
        if self.enabled:
            self.tuning_runs += 1
            self._emit("tuning", dict(fields))

    def record_policy_change(self) -> None:
        if self.enabled:
            self.policy_changes += 1

    # -- reading ------------------------------------------------------------------
    def bind_cache(self, size_fn: Callable[[], tuple[int, int]]) -> None:
        """Let the telemetry report the plan cache's (size, capacity)."""
        self._cache_size = size_fn

    @property
    def total_calls(self) -> int:
        """Kernel invocations, fallback attempts included."""
        return sum(s.calls for s in self.kernel_operations()) + self._retired_calls

    def forget_kernels(self, kernel_ids: set[str]) -> None:
        """Drop the per-kernel counters, selection counts, fallback pairs and breaker transitions of ``kernel_ids``
        (kernels no longer registered); their calls and fallbacks still count in the totals."""
        with self._lock:
            for kid in kernel_ids:
                ops = self._kernel_ops.pop(kid, None)
                if ops:
                    self._retired_calls += sum(s.calls for s in ops.values())
            self.selections = {k: n for k, n in self.selections.items() if k[1] not in kernel_ids}
            gone = [k for k in self.fallback_pairs if k[1] in kernel_ids or k[2] in kernel_ids]
            self._retired_fallbacks += sum(self.fallback_pairs.pop(k) for k in gone)
            self.breaker_transitions = {k: n for k, n in self.breaker_transitions.items() if k[0] not in kernel_ids}

    @property
    def total_fallbacks(self) -> int:
        return sum(list(self.fallback_pairs.values())) + self._retired_fallbacks

    @property
    def cache_stats(self) -> CacheStats:
        size, capacity = self._cache_size()
        # Each fallback is one extra kernel invocation within the same user call.
        hits = max(self.total_calls - self.total_fallbacks - self.handoffs - self.misses, 0)
        return CacheStats(hits, self.misses, size, capacity, self.cache_evictions, self.cache_invalidations)

    def add_listener(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        """``fn(event, attributes)`` for slow-path events (OpenTelemetry uses this)."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _emit(self, event: str, attrs: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, attrs)
            except Exception:  # exporters must never break dispatch
                pass

    def reset(self) -> None:
        with self._lock:
            for s in [s for ops in self._kernel_ops.values() for s in ops.values()]:
                s.calls = s.failures = s.fallbacks = 0
                s.latency_buckets = [0] * (len(LATENCY_BUCKETS_US) + 1)
                s.latency_sum_us = 0.0
                s.latency_count = 0
            self.selections.clear()
            self.fallback_pairs.clear()
            self.breaker_transitions.clear()
            self.errors.clear()
            self.misses = self.cache_evictions = self.cache_invalidations = 0
            self.reloads = self.failed_reloads = self.tuning_runs = self.policy_changes = self.handoffs = 0
            self._retired_calls = self._retired_fallbacks = 0

    def snapshot(self) -> dict[str, Any]:
        cs = self.cache_stats
        return {
            "enabled": self.enabled,
            "kernels": {k: s.to_dict() for k, s in self.kernels.items()},
            "dispatch": [s.to_dict() for s in self.kernel_operations()],
            "selections": [{"operation": o, "kernel": k, "count": n} for (o, k), n in sorted(self.selections.items())],
            "fallbacks": [{"operation": o, "from_kernel": f, "to_kernel": t, "count": n}
                          for (o, f, t), n in sorted(self.fallback_pairs.items())],
            "cache": {"hits": cs.hits, "misses": cs.misses, "size": cs.size, "capacity": cs.capacity,
                      "evictions": cs.evictions, "invalidations": cs.invalidations, "hit_rate": cs.hit_rate},
            "breaker_transitions": [{"kernel": k, "from": a, "to": b, "count": n}
                                    for (k, a, b), n in sorted(self.breaker_transitions.items())],
            "reloads": self.reloads, "failed_reloads": self.failed_reloads,
            "tuning_runs": self.tuning_runs, "policy_changes": self.policy_changes,
            "errors": dict(self.errors),
        }
