"""Extra ``lz.doctor()`` / ``layerzero doctor`` sections: what is in force and what is wrong right now.

:data:`SECTIONS` lists them in the order :func:`layerzero.doctor.doctor` runs
them (so ``layerzero doctor`` and Python callers see the same report). Each
section adds one key to ``report.extra``:

* ``perf_db``: the performance database's location and entry count
  (``layerzero.tuning``; nothing is created by looking);
* ``config``: the ``DispatchConfig`` in force, what differs from the
  defaults, the ``LAYERZERO_*`` variables set, the policy document loaded,
  and which hot path serves ``lz.attention`` (compiled, or pure Python and why);
* ``runtime``: telemetry on/off, plan-cache counts, open circuit breakers.

Problems that make calls fail or fall back (a breaker not closed, an
unhealthy backend, a backend installed but failing its probe) go to
``report.extra["problems"]``; ``layerzero doctor`` exits 1 when there are any.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from layerzero.accel import status as hot_path_status
from layerzero.accel import unavailable as hot_path_unavailable
from layerzero.environment import env_settings
from layerzero.runtime.config import DispatchConfig
from layerzero.runtime import get_runtime
from layerzero.runtime.core import ENV_PROBLEMS

__all__ = ["SECTIONS", "perf_db_section", "config_section", "runtime_section", "problems"]


def problems(report: Any) -> list[str]:
    """The problem list of ``report`` (created on first use)."""
    return report.extra.setdefault("problems", [])


def perf_db_section(report: Any) -> None:
    """``perf_db``: where the performance database is and how many measurements it holds (creates nothing)."""
    try:
        tuning = importlib.import_module("layerzero.tuning")
    except ImportError:
        report.extra["perf_db"] = {"available": False, "reason": "layerzero.tuning is not installed"}
        return
    info_fn = getattr(tuning, "perf_db_info", None)
    if callable(info_fn):
        report.extra["perf_db"] = {"available": True, **dict(info_fn())}
        return
    from layerzero.tuning.perfdb import PerfDB, default_path

    db = tuning.get_perf_db(create=False)
    path = db.path if db is not None else default_path(get_runtime().config.perf_db_path)
    exists = path.exists()
    probe = db if db is not None and db.read_only else PerfDB(path, read_only=True)  # nothing is built or moved
    problem = probe.problem() if exists else None
    entries = probe.count() if exists and problem is None else 0
    if probe is not db:
        probe.close()
    report.extra["perf_db"] = {"available": True, "path": str(path), "exists": exists, "entries": entries,
                               "in_use": db is not None and problem is None, "problem": problem}
    if not exists:
        report.warnings.append(f"no performance database at {path}: selection uses priorities "
                               "(run `layerzero tune` to measure this machine)")
    elif problem is not None:
        report.warnings.append(f"{problem}: selection uses kernel priorities")


def config_section(report: Any) -> None:
    """``config``: the DispatchConfig in force, its changes from the defaults, env vars, policy document."""
    rt = get_runtime()
    cfg = rt.config.to_dict()
    defaults = DispatchConfig().to_dict()
    changed = {k: v for k, v in cfg.items() if defaults.get(k) != v}
    env = env_settings()
    report.extra["config"] = {
        "dispatch_config": cfg,
        "changed_from_defaults": changed,
        "environment": env,
        "policy_document": rt.policy.document_source,
        "policy_digest": rt.policy.policy.digest,
        "hot_path": hot_path_status(),
    }
    for problem in ENV_PROBLEMS:
        report.warnings.append(f"environment: {problem}; the default is in force")
    if hot_path_unavailable():
        report.warnings.append(f"cached lz.attention, norm and dispatch calls run in Python ({hot_path_status()}): "
                               "about 0.7 µs more per call; reinstall layerzero where a C++ compiler is found")
    if not rt.config.enable_telemetry:
        report.warnings.append("telemetry is off (enable_telemetry=False): metrics read zero")
    if rt.config.latency_histogram:
        report.warnings.append("latency_histogram is on: every call runs on the slow path to be timed")
    if not rt.config.enable_fallback:
        report.warnings.append("fallback is off: a failing kernel fails the call")


def runtime_section(report: Any) -> None:
    """``runtime``: telemetry state, plan-cache counts and circuit breakers not closed."""
    rt = get_runtime()
    cs = rt.telemetry.cache_stats
    not_closed = {kid: b.state.name for kid, b in sorted(rt.breakers.all().items()) if b.state.name != "CLOSED"}
    report.extra["runtime"] = {
        "telemetry_enabled": rt.telemetry.enabled,
        "cache": {"hits": cs.hits, "misses": cs.misses, "size": cs.size, "capacity": cs.capacity,
                  "evictions": cs.evictions},
        "breakers_not_closed": not_closed,
    }
    for kid, state in not_closed.items():
        problems(report).append(f"circuit breaker for {kid} is {state}: calls skip it until it recovers")
    for b in report.backends:
        if not b.get("healthy", True):
            problems(report).append(f"backend {b['name']} is marked unhealthy: {b.get('health_reason')}")
        elif not b.get("available") and "not installed" not in str(b.get("reason")):  # installed, probe failed
            problems(report).append(f"backend {b['name']} is installed but unusable: {b.get('reason')}")
    ops = {k["operation"] for k in report.kernels}
    for op in sorted(ops):
        if not any(k["usable"] for k in report.kernels if k["operation"] == op):
            report.warnings.append(f"no kernel for {op} is usable on this machine")


# In report order; a section that raises becomes a warning of the report, never a failed doctor.
SECTIONS: tuple[Callable[[Any], None], ...] = (perf_db_section, config_section, runtime_section)
