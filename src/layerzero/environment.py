"""Every environment variable layerzero reads, in one table, and the one place that reads them.

``ENV_VARS`` maps each variable that sets a :class:`~layerzero.runtime.config.DispatchConfig` field to
that field (``DispatchConfig.from_env`` applies them; the table in :mod:`layerzero.runtime.config`
shows examples); ``OTHER_ENV_VARS`` lists the rest with what reads them. No other module reads
``os.environ`` (``tests/test_architecture.py`` checks it).
"""

from __future__ import annotations

import os

from layerzero.errors import ConfigError

__all__ = ["ENV_VARS", "OTHER_ENV_VARS", "env_text", "env_flag", "env_settings"]

ENV_VARS: dict[str, str] = {
    "LAYERZERO_DISPATCH_MODE": "mode",
    "LAYERZERO_CACHE_SIZE": "cache_size",
    "LAYERZERO_CACHE_TTL": "cache_ttl_seconds",
    "LAYERZERO_ENABLE_CACHE": "enable_cache",
    "LAYERZERO_TELEMETRY": "enable_telemetry",
    "LAYERZERO_RECORD_TIMING": "record_timing",
    "LAYERZERO_LATENCY_HISTOGRAM": "latency_histogram",
    "LAYERZERO_LOG_FALLBACKS": "log_fallbacks",
    "LAYERZERO_CIRCUIT_BREAKER": "circuit_breaker_enabled",
    "LAYERZERO_FAILURE_THRESHOLD": "failure_threshold",
    "LAYERZERO_RECOVERY_TIMEOUT": "recovery_timeout_seconds",
    "LAYERZERO_ENABLE_FALLBACK": "enable_fallback",
    "LAYERZERO_MAX_FALLBACK_ATTEMPTS": "max_fallback_attempts",
    "LAYERZERO_CONFIG": "config_path",
    "LAYERZERO_WATCH_INTERVAL": "watch_interval_seconds",
    "LAYERZERO_ONLINE_TUNING": "online_tuning",
    "LAYERZERO_VERIFY": "verify_first_calls",
    "LAYERZERO_SHAPE_FREE_PLANS": "shape_free_plans",
    "LAYERZERO_PERF_DB": "perf_db_path",
    "LAYERZERO_SHIPPED_MEASUREMENTS": "shipped_measurements",
}

#: Variables outside DispatchConfig: variable -> what reads it.
OTHER_ENV_VARS: dict[str, str] = {
    "LAYERZERO_DIST_CHECK": "layerzero.distributed.auto_check (run check_consistency after every synchronize)",
    "LAYERZERO_PURE_PYTHON": "layerzero.accel (1: the Python entries serve every lz.* call; read at import)",
}


def env_text(var: str, environ: dict[str, str] | None = None) -> str | None:
    """The value of one of the variables in the tables above, stripped; None when unset or empty."""
    if var not in ENV_VARS and var not in OTHER_ENV_VARS:
        raise ConfigError(f"{var} is not a layerzero environment variable (see layerzero.environment)")
    raw = (os.environ if environ is None else environ).get(var)
    return raw.strip() if raw is not None and raw.strip() else None


def env_flag(var: str) -> bool:
    """Whether one of the variables above is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return (env_text(var) or "").lower() in ("1", "true", "yes", "on")


def env_settings() -> dict[str, str]:
    """Every layerzero variable set in this process, with its value (what ``layerzero doctor`` shows)."""
    return {var: text for var in (*ENV_VARS, *OTHER_ENV_VARS) if (text := env_text(var)) is not None}


