"""Circuit breakers: one per kernel, shared by every dispatcher and by ``lz.*``.

CLOSED -> OPEN after ``failure_threshold`` failures (at once, through
:meth:`CircuitBreaker.trip`, for a kernel that returned an invalid result), each within
``recovery_timeout_seconds`` of the one before (successes on the cached hot
path are not counted, so the count is windowed rather than reset) -> HALF_OPEN
once ``recovery_timeout_seconds`` have passed (the next call probes the
kernel) -> CLOSED after ``success_threshold`` probe successes, or back to
OPEN on a probe failure.

The hot path reads one attribute, ``breaker.blocked``, which is False only
while the breaker is CLOSED; everything else goes through :meth:`allow`.
The clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from layerzero import forksafe
from layerzero.errors import first_line
from layerzero.telemetry.logs import log_event

__all__ = ["CircuitState", "CircuitBreakerConfig", "CircuitBreaker", "CircuitStats", "BreakerBoard"]

log = logging.getLogger("layerzero")


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Thresholds for one breaker."""

    failure_threshold: int = 5
    recovery_timeout_seconds: float = 30.0
    success_threshold: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"CircuitBreakerConfig.failure_threshold: must be >= 1, got {self.failure_threshold}")
        if self.recovery_timeout_seconds <= 0:
            raise ValueError("CircuitBreakerConfig.recovery_timeout_seconds: must be > 0, "
                             f"got {self.recovery_timeout_seconds}")
        if self.success_threshold < 1:
            raise ValueError(f"CircuitBreakerConfig.success_threshold: must be >= 1, got {self.success_threshold}")


@dataclass(frozen=True)
class CircuitStats:
    """A snapshot of one breaker (``dispatcher.get_circuit_stats(kernel_id)``)."""

    kernel_id: str
    state: CircuitState
    state_transitions: int
    failures: int
    successes: int
    consecutive_failures: int
    last_failure: str | None
    last_failure_time: float | None
    opened_at: float | None
    transitions: tuple[tuple[str, str, float], ...] = field(default=())


class CircuitBreaker:
    """A per-kernel breaker. Thread-safe; ``blocked`` is the lock-free hot-path flag."""

    __slots__ = ("kernel_id", "config", "clock", "blocked", "state", "_lock", "failures", "successes",
                 "consecutive_failures", "_half_open_successes", "last_failure", "last_failure_time",
                 "opened_at", "state_transitions", "_transitions", "_listeners", "_probing", "__weakref__")

    def __init__(self, kernel_id: str, config: CircuitBreakerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kernel_id = kernel_id
        self.config = config or CircuitBreakerConfig()
        self.clock = clock
        self.blocked = False
        self.state = CircuitState.CLOSED
        self._lock = forksafe.lock(self)
        self.failures = 0
        self.successes = 0
        self.consecutive_failures = 0
        self._half_open_successes = 0
        self.last_failure: str | None = None
        self.last_failure_time: float | None = None
        self.opened_at: float | None = None
        self.state_transitions = 0
        self._transitions: list[tuple[str, str, float]] = []
        self._listeners: list[Callable[[CircuitBreaker, CircuitState, CircuitState], None]] = []
        self._probing = False

    def add_listener(self, fn: Callable[[CircuitBreaker, CircuitState, CircuitState], None]) -> None:
        self._listeners.append(fn)

    def allow(self) -> bool:
        """May the kernel be called now? Moves OPEN -> HALF_OPEN when the timeout has passed."""
        if not self.blocked:
            return True
        with self._lock:
            if self.state is CircuitState.OPEN:
                if self.opened_at is not None and self.clock() - self.opened_at >= self.config.recovery_timeout_seconds:
                    self._move(CircuitState.HALF_OPEN)
                    self._probing = True
                    return True
                return False
            if self.state is CircuitState.HALF_OPEN:
                # One probe at a time; other callers fall back meanwhile.
                if self._probing:
                    return False
                self._probing = True
                return True
            return True

    def is_open(self) -> bool:
        """True while calls must skip this kernel (OPEN and not yet due for a probe)."""
        if not self.blocked:
            return False
        with self._lock:
            if self.state is CircuitState.OPEN and self.opened_at is not None:
                return self.clock() - self.opened_at < self.config.recovery_timeout_seconds
            return False

    def record_success(self) -> None:
        if not self.blocked:
            self.consecutive_failures = 0
            return
        with self._lock:
            self.successes += 1
            self.consecutive_failures = 0
            if self.state is CircuitState.HALF_OPEN:
                self._probing = False
                self._half_open_successes += 1
                if self._half_open_successes >= self.config.success_threshold:
                    self._move(CircuitState.CLOSED)

    def record_failure(self, error: BaseException | str | None = None) -> None:
        with self._lock:
            now = self.clock()
            if self.last_failure_time is not None and now - self.last_failure_time > self.config.recovery_timeout_seconds:
                self.consecutive_failures = 0  # the earlier failures are too old to count together
            self.failures += 1
            self.consecutive_failures += 1
            self.last_failure = _describe(error)
            self.last_failure_time = now
            if self.state is CircuitState.HALF_OPEN:
                self._probing = False
                self._move(CircuitState.OPEN)
            elif self.state is CircuitState.CLOSED and self.consecutive_failures >= self.config.failure_threshold:
                self._move(CircuitState.OPEN)

    def release(self) -> None:
        """End a probe that said nothing about the kernel (the call's input was at fault, or memory ran out):
        nothing is counted, and the next call may probe again."""
        if self.blocked:
            with self._lock:
                self._probing = False

    def trip(self, error: BaseException | str | None = None) -> None:
        """Count a failure and open now, whatever the threshold.

        For a kernel whose result was invalid (wrong shape or dtype, NaN or wrong values in verify
        mode): the cached fast path does not check results, so such a kernel must leave it at once,
        while a kernel that raises is caught on every call and may stay until the threshold.
        """
        with self._lock:
            now = self.clock()
            self.failures += 1
            self.consecutive_failures += 1
            self.last_failure = _describe(error)
            self.last_failure_time = now
            self._probing = False
            if self.state is not CircuitState.OPEN:
                self._move(CircuitState.OPEN)

    def reset(self) -> None:
        """Force CLOSED (operator action)."""
        with self._lock:
            if self.state is not CircuitState.CLOSED:
                self._move(CircuitState.CLOSED)
            self.consecutive_failures = 0

    def stats(self) -> CircuitStats:
        with self._lock:
            return CircuitStats(self.kernel_id, self.state, self.state_transitions, self.failures, self.successes,
                                self.consecutive_failures, self.last_failure, self.last_failure_time, self.opened_at,
                                tuple(self._transitions))

    def _move(self, new: CircuitState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        self.state_transitions += 1
        now = self.clock()
        self._transitions.append((old.name, new.name, now))
        del self._transitions[:-32]
        if new is CircuitState.OPEN:
            self.opened_at = now
        if new is CircuitState.CLOSED:
            self._half_open_successes = 0
            self.consecutive_failures = 0
        if new is CircuitState.HALF_OPEN:
            self._half_open_successes = 0
        self.blocked = new is not CircuitState.CLOSED
        log_event("breaker_transition", logging.INFO if new is CircuitState.CLOSED else logging.WARNING,
                  kernel=self.kernel_id, from_state=old.name, to_state=new.name, failures=self.failures,
                  last_error=self.last_failure)
        for fn in list(self._listeners):
            try:
                fn(self, old, new)
            except Exception:  # a listener must never break the call path
                log.exception("circuit breaker listener failed")


def _describe(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    text = first_line(error)
    return f"{type(error).__name__}: {text[:300]}"


class BreakerBoard:
    """All breakers of one runtime, created on first use with the runtime's thresholds."""

    def __init__(self, config: CircuitBreakerConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or CircuitBreakerConfig()
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = forksafe.lock(self)
        self._listeners: list[Callable[[CircuitBreaker, CircuitState, CircuitState], None]] = []

    def get(self, kernel_id: str) -> CircuitBreaker:
        b = self._breakers.get(kernel_id)
        if b is None:
            with self._lock:
                b = self._breakers.get(kernel_id)
                if b is None:
                    b = CircuitBreaker(kernel_id, self.config, self.clock)
                    for fn in self._listeners:
                        b.add_listener(fn)
                    self._breakers[kernel_id] = b
        return b

    def add_listener(self, fn: Callable[[CircuitBreaker, CircuitState, CircuitState], None]) -> None:
        with self._lock:
            self._listeners.append(fn)
            for b in self._breakers.values():
                b.add_listener(fn)

    def is_open(self, kernel_id: str) -> bool:
        b = self._breakers.get(kernel_id)
        return b is not None and b.is_open()

    def reconfigure(self, config: CircuitBreakerConfig) -> None:
        with self._lock:
            self.config = config
            for b in self._breakers.values():
                b.config = config

    def forget(self, kernel_ids: set[str]) -> None:
        """Drop the breakers of ``kernel_ids`` (kernels no longer registered)."""
        with self._lock:
            for kid in kernel_ids:
                self._breakers.pop(kid, None)

    def clear(self) -> None:
        """Forget every breaker (fresh ones, CLOSED, with no counts, are made on next use)."""
        with self._lock:
            self._breakers.clear()

    def all(self) -> dict[str, CircuitBreaker]:
        return dict(self._breakers)
