"""The exported metric families: names, types, units, labels, and how each is read.

Prometheus (``telemetry/prometheus.py``) and OpenTelemetry
(``telemetry/otel.py``) both render :func:`read_families`, so the two report
the same counts by construction. Everything is read from a runtime's
:class:`~layerzero.telemetry.core.Telemetry`, breakers and plan cache at
scrape time; nothing here runs on the call path.

Names are stable: renaming one breaks dashboards, so add, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerzero.telemetry.core import LATENCY_BUCKETS_US

if TYPE_CHECKING:
    from layerzero.runtime import Runtime

__all__ = ["Family", "FAMILIES", "CIRCUIT_STATE_VALUES", "LATENCY_BUCKETS_S", "Histogram", "read_families"]

# layerzero_circuit_state values (severity order, so max() over kernels is the worst state).
CIRCUIT_STATE_VALUES: dict[str, int] = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}

LATENCY_BUCKETS_S: tuple[float, ...] = tuple(b / 1e6 for b in LATENCY_BUCKETS_US)


@dataclass(frozen=True)
class Histogram:
    """One histogram series: per-bucket (non-cumulative) counts, the last one for +Inf, and the sum."""

    buckets: tuple[int, ...]
    sum: float
    count: int


@dataclass(frozen=True)
class Family:
    """One metric family as both exporters name it.

    ``prom`` is the Prometheus sample name (counters end in ``_total``);
    ``otel`` the OpenTelemetry instrument name; ``kind`` is ``counter``,
    ``gauge`` or ``histogram``.
    """

    prom: str
    otel: str
    kind: str
    unit: str
    labels: tuple[str, ...]
    help: str
    samples: list[tuple[tuple[str, ...], Any]] = field(default_factory=list, compare=False)


_SPECS: tuple[tuple[str, str, str, str, tuple[str, ...], str], ...] = (
    ("layerzero_dispatch_total", "layerzero.dispatch.calls", "counter", "{call}", ("operation", "kernel"),
     "Kernel invocations by operation and kernel (cached fast path included; a fallback attempt counts too)."),
    ("layerzero_selections_total", "layerzero.selections", "counter", "{selection}", ("operation", "kernel"),
     "Kernel selections (plan-cache misses) by operation and selected kernel."),
    ("layerzero_fallback_total", "layerzero.fallbacks", "counter", "{fallback}",
     ("operation", "from_kernel", "to_kernel"), "Calls moved from a failing kernel to the next one of its plan."),
    ("layerzero_kernel_failures_total", "layerzero.kernel.failures", "counter", "{failure}", ("kernel",),
     "Kernel invocations that raised or returned an invalid result."),
    ("layerzero_kernel_errors_total", "layerzero.kernel.errors", "counter", "{error}", ("error",),
     "Kernel failures by exception type."),
    ("layerzero_cache_hits_total", "layerzero.cache.hits", "counter", "{hit}", (),
     "Calls served by a cached plan."),
    ("layerzero_cache_misses_total", "layerzero.cache.misses", "counter", "{miss}", (),
     "Calls that needed kernel selection."),
    ("layerzero_cache_evictions_total", "layerzero.cache.evictions", "counter", "{eviction}", (),
     "Plans evicted from the plan cache (LRU capacity or TTL)."),
    ("layerzero_cache_invalidations_total", "layerzero.cache.invalidations", "counter", "{invalidation}", (),
     "Whole plan-cache invalidations (registry, policy, config or perf-data change)."),
    ("layerzero_cache_size", "layerzero.cache.size", "gauge", "{plan}", (), "Plans in the plan cache."),
    ("layerzero_cache_capacity", "layerzero.cache.capacity", "gauge", "{plan}", (), "Plan-cache capacity."),
    ("layerzero_circuit_state", "layerzero.circuit.state", "gauge", "1", ("kernel",),
     "Circuit breaker state per kernel: 0 closed, 1 half-open, 2 open."),
    ("layerzero_breaker_transitions_total", "layerzero.circuit.transitions", "counter", "{transition}",
     ("kernel", "from", "to"), "Circuit breaker state transitions."),
    ("layerzero_config_reloads_total", "layerzero.config.reloads", "counter", "{reload}", ("result",),
     "Config reloads by result (success or failure; a failed reload keeps the running config)."),
    ("layerzero_tuning_runs_total", "layerzero.tuning.runs", "counter", "{run}", (),
     "Tuning runs and online tuning decisions."),
    ("layerzero_policy_changes_total", "layerzero.policy.changes", "counter", "{change}", (),
     "Changes of the process-wide policy."),
    ("layerzero_telemetry_enabled", "layerzero.telemetry.enabled", "gauge", "1", (),
     "1 when the runtime counts calls (DispatchConfig.enable_telemetry), else 0."),
    ("layerzero_kernel_latency_seconds", "layerzero.kernel.latency", "histogram", "s", ("operation", "kernel"),
     "Kernel execution time (recorded only with DispatchConfig.latency_histogram=True)."),
)

FAMILIES: tuple[str, ...] = tuple(s[0] for s in _SPECS)


def read_families(rt: Runtime) -> list[Family]:
    """Every family with its samples, read from ``rt`` now."""
    t = rt.telemetry
    out: dict[str, Family] = {s[0]: Family(*s) for s in _SPECS}

    def add(name: str, labels: tuple[str, ...], value: Any) -> None:
        out[name].samples.append((labels, value))

    latency = []
    for s in t.kernel_operations():
        add("layerzero_dispatch_total", (s.operation, s.kernel_id), s.calls)
        if s.latency_count:
            latency.append(((s.operation, s.kernel_id),
                            Histogram(tuple(s.latency_buckets), s.latency_sum_us / 1e6, s.latency_count)))
    for kid, total in t.kernels.items():
        add("layerzero_kernel_failures_total", (kid,), total.failures)
    for (op, kid), n in sorted(list(t.selections.items())):
        add("layerzero_selections_total", (op, kid), n)
    for (op, a, b), n in sorted(list(t.fallback_pairs.items())):
        add("layerzero_fallback_total", (op, a, b), n)
    for err, n in sorted(list(t.errors.items())):
        add("layerzero_kernel_errors_total", (err,), n)
    cs = t.cache_stats
    add("layerzero_cache_hits_total", (), cs.hits)
    add("layerzero_cache_misses_total", (), cs.misses)
    add("layerzero_cache_evictions_total", (), cs.evictions)
    add("layerzero_cache_invalidations_total", (), cs.invalidations)
    add("layerzero_cache_size", (), cs.size)
    add("layerzero_cache_capacity", (), cs.capacity)
    breakers = rt.breakers.all()
    for kid in sorted({s.kernel_id for s in rt.kernels} | set(breakers)):
        b = breakers.get(kid)
        add("layerzero_circuit_state", (kid,), CIRCUIT_STATE_VALUES[b.state.name] if b is not None else 0)
    for (kid, a, b), n in sorted(list(t.breaker_transitions.items())):
        add("layerzero_breaker_transitions_total", (kid, a, b), n)
    add("layerzero_config_reloads_total", ("success",), t.reloads)
    add("layerzero_config_reloads_total", ("failure",), t.failed_reloads)
    add("layerzero_tuning_runs_total", (), t.tuning_runs)
    add("layerzero_policy_changes_total", (), t.policy_changes)
    add("layerzero_telemetry_enabled", (), 1 if t.enabled else 0)
    for labels, h in latency:
        add("layerzero_kernel_latency_seconds", labels, h)
    return list(out.values())
