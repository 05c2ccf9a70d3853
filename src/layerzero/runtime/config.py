"""DispatchConfig and DispatchMode: how a dispatcher (and the shared runtime) behaves.

Every field is validated when the config is created, so a bad value fails at
start-up with the field's name rather than deep inside a call. Environment
variables override the defaults (see :meth:`DispatchConfig.from_env`):

=================================  ==========================  =================
variable                           field                       example
=================================  ==========================  =================
``LAYERZERO_DISPATCH_MODE``        ``mode``                    ``dynamic``
``LAYERZERO_CACHE_SIZE``           ``cache_size``              ``50000``
``LAYERZERO_CACHE_TTL``            ``cache_ttl_seconds``       ``3600``
``LAYERZERO_ENABLE_CACHE``         ``enable_cache``            ``0``
``LAYERZERO_TELEMETRY``            ``enable_telemetry``        ``0``
``LAYERZERO_RECORD_TIMING``        ``record_timing``           ``0``
``LAYERZERO_LATENCY_HISTOGRAM``    ``latency_histogram``       ``1``
``LAYERZERO_LOG_FALLBACKS``        ``log_fallbacks``           ``0``
``LAYERZERO_CIRCUIT_BREAKER``      ``circuit_breaker_enabled`` ``0``
``LAYERZERO_FAILURE_THRESHOLD``    ``failure_threshold``       ``10``
``LAYERZERO_RECOVERY_TIMEOUT``     ``recovery_timeout_seconds`` ``60``
``LAYERZERO_ENABLE_FALLBACK``      ``enable_fallback``         ``1``
``LAYERZERO_MAX_FALLBACK_ATTEMPTS`` ``max_fallback_attempts``  ``3``
``LAYERZERO_CONFIG``               ``config_path``             ``/etc/lz.yaml``
``LAYERZERO_WATCH_INTERVAL``       ``watch_interval_seconds``  ``1.0``
``LAYERZERO_ONLINE_TUNING``        ``online_tuning``           ``1``
``LAYERZERO_VERIFY``               ``verify_first_calls``      ``3``
``LAYERZERO_SHAPE_FREE_PLANS``     ``shape_free_plans``        ``0``
``LAYERZERO_PERF_DB``              ``perf_db_path``            ``/var/lz/perf.db``
``LAYERZERO_SHIPPED_MEASUREMENTS`` ``shipped_measurements``    ``0``
``LAYERZERO_DIST_CHECK``           (``layerzero.distributed``) ``1``
``LAYERZERO_PURE_PYTHON``          (``layerzero.accel``)       ``1``
=================================  ==========================  =================

These are all the variables layerzero reads, and this module reads them all (:func:`env_text`): the last
two are not ``DispatchConfig`` fields. ``LAYERZERO_DIST_CHECK`` switches on ``layerzero.distributed.auto_check``
at import; ``LAYERZERO_PURE_PYTHON`` keeps the compiled hot path (:mod:`layerzero.accel`) out, at import.

``record_timing`` (on by default) fills ``DispatchResult.timing`` for every
``dispatch()`` call: a few clock reads on the dispatcher's own path, nothing on
``lz.*``. The seed's low-latency configuration turns it off.
``latency_histogram`` (off by default) times every kernel call, ``lz.*`` included,
into the ``layerzero_kernel_latency_seconds`` histogram; it sends every call down
the slow path, so it is for diagnosis, not for serving.

``verify_first_calls=N`` turns on verify mode: each kernel's first N
successful outputs are compared with the operation's float64 reference, and a
kernel that returns NaN where the reference has none, or values off the
reference beyond its declared tolerance, counts as failed (its breaker counts
the failure and the call falls back). It costs a reference computation per
verified call, so it is off (0) by default.

``shape_free_plans`` (on by default) lets the ``lz.*`` hot path serve a call
family (operation, dtype, device and flags) from one plan without reading the
tensors' shapes, when selection provably picks the same kernel for every shape
of that family (see ``Runtime.shape_free_reason``). Off, every new shape is
selected and cached on its own.

``shipped_measurements`` (on by default) lets selection use the kernel times
layerzero ships for known cards (:mod:`layerzero.tuning.shipped`) where this
machine's performance database has none for a shape; off, such shapes rank by
priority.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from layerzero.environment import ENV_VARS, env_text
from layerzero.errors import ConfigError

__all__ = ["DispatchConfig", "DispatchMode", "ENV_VARS", "wait_problem"]


def wait_problem(value: Any, *, zero_ok: bool = False) -> str | None:
    """Why ``value`` is no time a watcher thread can wait (a number of seconds, > 0 or with ``zero_ok`` >= 0,
    at most ``threading.TIMEOUT_MAX``: ``Condition.wait(inf)`` raises OverflowError in the waiting thread), or
    None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if zero_ok else value > 0):
        return "must be a number >= 0" if zero_ok else "must be a positive number"
    if not value <= threading.TIMEOUT_MAX:
        return f"must be at most threading.TIMEOUT_MAX ({threading.TIMEOUT_MAX:g} seconds)"
    return None


class DispatchMode(enum.Enum):
    """How a dispatcher picks kernels.

    STATIC: a fixed operation -> kernel map, resolved once. DYNAMIC: selection
    per context, cached. CONFIG: rules from a config file. HOT_RELOAD: CONFIG
    that follows edits to the file. AUTO: STATIC for operations with a static
    entry, CONFIG when a config is loaded, DYNAMIC otherwise.
    """

    STATIC = "static"
    DYNAMIC = "dynamic"
    CONFIG = "config"
    HOT_RELOAD = "hot_reload"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: str | DispatchMode) -> DispatchMode:
        if isinstance(value, DispatchMode):
            return value
        key = str(value).strip().lower().replace("-", "_")
        for m in cls:
            if m.value == key or m.name.lower() == key:
                return m
        raise ConfigError(f"DispatchConfig.mode: unknown mode {value!r}; choose one of "
                          f"{', '.join(m.value for m in cls)}")



_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class DispatchConfig:
    """Validated dispatcher settings (see the module docstring for environment overrides).

    Example:
        >>> DispatchConfig(mode=DispatchMode.DYNAMIC, cache_size=50000, cache_ttl_seconds=3600.0)
        >>> DispatchConfig(cache_size=-1)
        Traceback (most recent call last):
        layerzero.errors.ConfigError: DispatchConfig.cache_size: must be >= 0, got -1
    """

    mode: DispatchMode = DispatchMode.DYNAMIC
    enable_cache: bool = True
    cache_size: int = 10000
    cache_ttl_seconds: float | None = None
    static_kernel_map: dict[str, str] = field(default_factory=dict)
    enable_telemetry: bool = True
    record_timing: bool = True
    latency_histogram: bool = False
    log_fallbacks: bool = True
    circuit_breaker_enabled: bool = True
    failure_threshold: int = 5
    recovery_timeout_seconds: float = 30.0
    success_threshold: int = 1
    enable_fallback: bool = True
    max_fallback_attempts: int = 3
    config_path: str | None = None
    watch_interval_seconds: float = 1.0
    validate_on_reload: bool = True
    online_tuning: bool = False
    online_tuning_budget_ms: float = 200.0
    verify_first_calls: int = 0
    shape_free_plans: bool = True
    perf_db_path: str | None = None
    shipped_measurements: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", DispatchMode.parse(self.mode))
        errors: list[str] = []

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                errors.append(f"DispatchConfig.{name}: {msg}, got {getattr(self, name)!r}")

        for name in ("enable_cache", "enable_telemetry", "record_timing", "latency_histogram", "log_fallbacks",
                     "circuit_breaker_enabled", "enable_fallback", "validate_on_reload", "online_tuning",
                     "shape_free_plans", "shipped_measurements"):
            need(isinstance(getattr(self, name), bool), name, "must be a bool")
        for name in ("cache_size", "failure_threshold", "max_fallback_attempts", "success_threshold",
                     "verify_first_calls"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool), name, "must be an int")
        if not errors:
            need(self.cache_size >= 0, "cache_size", "must be >= 0")
            need(self.failure_threshold >= 1, "failure_threshold", "must be >= 1")
            need(self.success_threshold >= 1, "success_threshold", "must be >= 1")
            need(self.max_fallback_attempts >= 0, "max_fallback_attempts", "must be >= 0")
            need(self.verify_first_calls >= 0, "verify_first_calls", "must be >= 0")
        ttl = self.cache_ttl_seconds
        need(ttl is None or (isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0),
             "cache_ttl_seconds", "must be a positive number or None")
        for name in ("recovery_timeout_seconds", "online_tuning_budget_ms"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, name, "must be a positive number")
        wait = wait_problem(self.watch_interval_seconds)
        need(wait is None, "watch_interval_seconds", wait or "")
        m = self.static_kernel_map
        need(isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()),
             "static_kernel_map", "must map operation names to kernel ids (strings)")
        need(self.config_path is None or isinstance(self.config_path, (str, os.PathLike)), "config_path",
             "must be a path or None")
        need(self.perf_db_path is None or (isinstance(self.perf_db_path, (str, os.PathLike))
                                           and str(self.perf_db_path) != ""), "perf_db_path",
             "must be a path or None")
        if errors:  # a ConfigError is a ValueError (the seed's contract) and a LayerZeroError
            raise ConfigError("; ".join(errors), errors=errors, source="DispatchConfig")
        object.__setattr__(self, "static_kernel_map", dict(m))

    def __hash__(self) -> int:
        """Equal configs hash alike (the generated hash failed on ``static_kernel_map``, a dict): a config can
        key a dict or an ``lru_cache``."""
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    def replace(self, **changes: Any) -> DispatchConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> DispatchConfig:
        """Defaults, then ``LAYERZERO_*`` environment variables, then ``overrides``."""
        kwargs = {name: _coerce(var, name, raw, kind) for var, name, raw, kind in cls._env_settings(environ)}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def _env_settings(cls, environ: dict[str, str] | None) -> list[tuple[str, str, str, str]]:
        """``(variable, field, text, field type)`` of each ``LAYERZERO_*`` variable that is set."""
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        return [(var, name, raw, types[name]) for var, name in ENV_VARS.items()
                if (raw := env_text(var, environ)) is not None]

    @classmethod
    def from_env_keeping_defaults(cls, environ: dict[str, str] | None = None) -> tuple[DispatchConfig, list[str]]:
        """:meth:`from_env` where a variable it refuses is left at its default: ``(config, the problems)``.
        The global runtime is made this way on ``import layerzero``, which must not fail on a typo in the
        environment (``layerzero doctor`` is what reports it)."""
        config, problems = cls(), []
        for var, name, raw, kind in cls._env_settings(environ):
            try:
                config = dataclasses.replace(config, **{name: _coerce(var, name, raw, kind)})
            except ConfigError as exc:
                problems.append(f"{var}={raw!r}: {exc}" if var not in str(exc) else str(exc))
        return config, problems

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mode"] = self.mode.name
        return out


def _coerce(var: str, name: str, raw: str, type_name: str) -> Any:
    text = raw.strip()
    try:
        if name == "mode":
            return DispatchMode.parse(text)
        if type_name == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        if type_name == "int":
            return int(text)
        if "float" in type_name:
            return None if text.lower() == "none" else float(text)
        return text
    except ValueError as exc:
        raise ConfigError(f"{var}={raw!r} (DispatchConfig.{name}): {exc}", source=var) from None
