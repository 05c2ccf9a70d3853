"""What a dispatch returns and what a dispatcher reports.

:class:`DispatchResult` carries the output, the kernel that produced it,
whether a fallback was needed, and a :class:`DispatchTiming` (all zeros, and
no clock read, unless ``DispatchConfig.record_timing`` is on).
:class:`DispatchTelemetry` is the snapshot ``dispatcher.get_telemetry()``
returns: plan-cache statistics, per-kernel counters and selections per
operation, read from the runtime's shared :class:`~layerzero.telemetry.core.Telemetry`.
:class:`DispatchStats` is ``dispatcher.stats`` (reload counters; the
hot-reload dispatcher fills them in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerzero.telemetry.core import CacheStats

__all__ = ["DispatchTiming", "DispatchResult", "DispatchTelemetry", "KernelCounters", "DispatchStats",
           "NOT_TIMED"]


@dataclass(frozen=True, slots=True)
class DispatchTiming:
    """Where one dispatch spent its time (``record_timing=True``; zeros otherwise).

    ``context_build_ns``: mapping the inputs to kernel arguments and building the
    cache key (plus the :class:`SelectionContext` on a cache miss);
    ``cache_lookup_ns``: the plan-cache read; ``selection_us``: everything before
    the kernel call (the two above, plus validation and selection on a miss);
    ``kernel_invoke_ns``: the kernel call, fallbacks included; ``execution_us``:
    the kernel call plus restoring the caller's layout; ``total_us``: the whole
    ``dispatch()`` call.
    """

    selection_us: float = 0.0
    execution_us: float = 0.0
    total_us: float = 0.0
    context_build_ns: int = 0
    cache_lookup_ns: int = 0
    kernel_invoke_ns: int = 0
    recorded: bool = False


NOT_TIMED = DispatchTiming()


class DispatchResult:
    """The answer of ``dispatch()``.

    Attributes:
        output: what the kernel returned (in the caller's layout).
        kernel_id: the kernel that produced ``output``.
        operation: the operation dispatched.
        fallback_used: True when ``kernel_id`` is not the plan's first choice.
        attempts: kernels tried or skipped (open breaker) for this call, the successful one included.
        timing: a :class:`DispatchTiming`.
        cached: True when the plan came from the plan cache (no selection ran).
        mode: the dispatch mode that served the call (``"static"``, ``"dynamic"``, ``"config"``, ...).
    """

    # The dispatchers' cached hot paths make results with ``DispatchResult.__new__`` and assign every slot
    # themselves (an ``__init__`` call is a noticeable share of a dispatch): a new field must be set there too.

    __slots__ = ("output", "kernel_id", "operation", "fallback_used", "attempts", "timing", "cached", "mode")

    def __init__(self, output: Any, kernel_id: str, operation: str, fallback_used: bool = False, attempts: int = 1,
                 timing: DispatchTiming = NOT_TIMED, cached: bool = True, mode: str = "dynamic") -> None:
        self.output = output
        self.kernel_id = kernel_id
        self.operation = operation
        self.fallback_used = fallback_used
        self.attempts = attempts
        self.timing = timing
        self.cached = cached
        self.mode = mode

    def __repr__(self) -> str:
        return (f"DispatchResult(operation={self.operation!r}, kernel_id={self.kernel_id!r}, mode={self.mode!r}, "
                f"fallback_used={self.fallback_used}, attempts={self.attempts}, cached={self.cached})")


@dataclass(frozen=True, slots=True)
class KernelCounters:
    """Counters of one kernel at the time of the snapshot."""

    kernel_id: str
    operation: str
    calls: int
    failures: int
    fallbacks: int
    latency_count: int
    latency_sum_us: float

    @property
    def mean_latency_us(self) -> float | None:
        return self.latency_sum_us / self.latency_count if self.latency_count else None


@dataclass(frozen=True)
class DispatchTelemetry:
    """A snapshot of a dispatcher's telemetry (``dispatcher.get_telemetry()``).

    Dispatchers on the global registries share the global runtime's counters,
    so these include ``lz.*`` calls too.

    Attributes:
        enabled: ``DispatchConfig.enable_telemetry`` of the dispatcher's runtime.
        cache_stats: ``hits``, ``misses``, ``size``, ``capacity``, ``evictions``, ``invalidations``, ``hit_rate``.
        kernels: kernel id -> :class:`KernelCounters` (calls, failures, fallbacks, latency).
        selections: operation -> {kernel id: times selected}.
        fallbacks: ``(operation, from_kernel, to_kernel)`` -> count.
        breaker_transitions: ``(kernel_id, from_state, to_state)`` -> count.
    """

    enabled: bool
    cache_stats: CacheStats
    kernels: dict[str, KernelCounters] = field(default_factory=dict)
    selections: dict[str, dict[str, int]] = field(default_factory=dict)
    fallbacks: dict[tuple[str, str, str], int] = field(default_factory=dict)
    breaker_transitions: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def kernel(self, kernel_id: str) -> KernelCounters:
        """Counters for ``kernel_id`` (zeros if it was never called)."""
        found = self.kernels.get(kernel_id)
        return found if found is not None else KernelCounters(kernel_id, "", 0, 0, 0, 0, 0.0)

    @property
    def total_calls(self) -> int:
        return sum(k.calls for k in self.kernels.values())

    @property
    def total_failures(self) -> int:
        return sum(k.failures for k in self.kernels.values())


@dataclass(frozen=True)
class DispatchStats:
    """``dispatcher.stats``: reload counters (zero for dispatchers that never reload)."""

    mode: str
    total_reloads: int = 0
    failed_reloads: int = 0
    last_reload_time_ms: float = 0.0
    last_error: str | None = None
