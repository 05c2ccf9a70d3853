"""What a dispatch returns and what a dispatcher reports.

:class:`DispatchResult` carries the output, the kernel that produced it,
whether a fallback was needed, and a :class:`DispatchTiming` (all zeros, and
no clock read, when ``DispatchConfig.record_timing`` is off).
:class:`DispatchTelemetry` is the snapshot ``dispatcher.get_telemetry()``
returns: plan-cache statistics, per-kernel counters and selections per
operation, read from the runtime's shared :class:`~layerzero.telemetry.core.Telemetry`.
:class:`DispatchStats` is ``dispatcher.stats`` (reload counters; the
hot-reload dispatcher fills them in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from layerzero.telemetry.core import CacheStats

__all__ = ["DispatchTiming", "DispatchResult", "DispatchTelemetry", "KernelCounters", "DispatchStats",
           "NOT_TIMED", "stamp"]


class _Stamps(NamedTuple):
    t0: int = 0  # dispatch() entered
    t1: int = 0  # inputs mapped, keys built
    t2: int = 0  # plan found
    t3: int = 0  # kernel called
    t4: int = 0  # kernel returned
    t5: int = 0  # caller's layout restored


class DispatchTiming(_Stamps):
    """Where one dispatch spent its time (``record_timing=True``, the default; zeros otherwise).

    ``context_build_ns``: mapping the inputs to kernel arguments and building the
    cache key (plus the :class:`SelectionContext` on a cache miss);
    ``cache_lookup_ns``: the plan-cache read (on the cached hot path, which builds no context, the key and the
    read together: its ``context_build_ns`` is 0); ``selection_us``: everything before
    the kernel call (the two above, plus validation and selection on a miss);
    ``kernel_invoke_ns``: the kernel call, fallbacks included; ``execution_us``:
    the kernel call plus restoring the caller's layout; ``total_us``: the whole
    ``dispatch()`` call.

    A dispatch stores its six clock readings only (:attr:`DispatchResult.stamps`); this view is made when
    ``result.timing`` is read and its fields are computed then, so timing costs the cached path a few clock
    reads, one small object and no arithmetic.
    """

    __slots__ = ()

    @property
    def recorded(self) -> bool:
        return self.t5 != 0

    @property
    def selection_us(self) -> float:
        return (self.t3 - self.t0) / 1000.0

    @property
    def execution_us(self) -> float:
        return (self.t5 - self.t3) / 1000.0

    @property
    def total_us(self) -> float:
        return (self.t5 - self.t0) / 1000.0

    @property
    def context_build_ns(self) -> int:
        return self.t1 - self.t0

    @property
    def cache_lookup_ns(self) -> int:
        return self.t2 - self.t1

    @property
    def kernel_invoke_ns(self) -> int:
        return self.t4 - self.t3

    def __repr__(self) -> str:
        if not self.recorded:
            return "DispatchTiming(not recorded)"
        return (f"DispatchTiming(selection_us={self.selection_us:.2f}, execution_us={self.execution_us:.2f}, "
                f"total_us={self.total_us:.2f}, context_build_ns={self.context_build_ns}, "
                f"cache_lookup_ns={self.cache_lookup_ns}, kernel_invoke_ns={self.kernel_invoke_ns})")


NOT_TIMED = DispatchTiming()
#: ``stamp(DispatchTiming, (t0, t1, t2, t3, t4, t5))``: a timing from clock readings, without a Python frame.
stamp = tuple.__new__


class DispatchResult:
    """The answer of ``dispatch()``.

    Attributes:
        output: what the kernel returned (in the caller's layout).
        kernel_id: the kernel that produced ``output``.
        operation: the operation dispatched.
        fallback_used: True when ``kernel_id`` is not the plan's first choice.
        attempts: kernels tried or skipped (open breaker) for this call, the successful one included.
        timing: a :class:`DispatchTiming` (a view of ``stamps``, made when read).
        stamps: the six clock readings ``(t0, ..., t5)`` as the dispatch stored them: a tuple, or from the
            compiled hot path a ``layerzero._accel.Stamps`` (its three readings as C integers) that reads,
            compares, hashes and pickles as that tuple; :data:`NOT_TIMED` when timing is off.
        cached: True when the plan came from the plan cache (no selection ran).
        mode: the dispatch mode that served the call (``"static"``, ``"dynamic"``, ``"config"``, ...).
    """

    # The dispatchers' cached hot paths make results with ``DispatchResult.__new__`` and assign every slot
    # themselves (an ``__init__`` call is a noticeable share of a dispatch): a new field must be set there too.
    # They store the clock readings as a tuple (the compiled path: a Stamps, one allocation instead of four):
    # making the DispatchTiming costs as much again, and only a caller who reads ``timing`` needs it.

    __slots__ = ("output", "kernel_id", "operation", "fallback_used", "attempts", "stamps", "cached", "mode")

    def __init__(self, output: Any, kernel_id: str, operation: str, fallback_used: bool = False, attempts: int = 1,
                 timing: DispatchTiming = NOT_TIMED, cached: bool = True, mode: str = "dynamic") -> None:
        self.output = output
        self.kernel_id = kernel_id
        self.operation = operation
        self.fallback_used = fallback_used
        self.attempts = attempts
        self.stamps = timing
        self.cached = cached
        self.mode = mode

    @property
    def timing(self) -> DispatchTiming:
        """Where this dispatch spent its time (a :class:`DispatchTiming` over :attr:`stamps`)."""
        s = self.stamps
        return s if s.__class__ is DispatchTiming else stamp(DispatchTiming, s)

    @timing.setter
    def timing(self, value: DispatchTiming) -> None:
        self.stamps = value

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
