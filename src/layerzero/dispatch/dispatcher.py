"""The base :class:`Dispatcher`: inputs dict -> kernel arguments -> plan -> kernel -> :class:`DispatchResult`.

Every dispatcher runs on a :class:`~layerzero.runtime.Runtime`. Dispatchers
built on the global registries use the global runtime (:func:`get_runtime`),
so they share its plan cache, circuit breakers, telemetry and policy with
``lz.*``: a breaker opened through ``dispatch()`` is open for
``lz.attention`` too. A dispatcher's config *is* its runtime's config, so
creating one on the global registries with an explicit config applies that
config process-wide (``get_runtime().configure(config)``); give a dispatcher
its own registries to run it with different settings side by side.

The base class implements selection-based dispatch; subclasses change where
plans come from by overriding :meth:`Dispatcher.build_plan` (the config
dispatcher turns its rules and fallback chains into a plan with
:meth:`Dispatcher.make_plan`). The hot path mirrors the ``lz.*`` one: a key
from tensor metadata, one cache read, the breaker flag, the kernel call.
Fallback, breaker bookkeeping and error reports are the runtime's
(:meth:`Runtime.run_plan`, :meth:`Runtime.recover`), never duplicated here.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from layerzero.context import SelectionContext
from layerzero.dispatch.breaker import CircuitStats
from layerzero.dispatch.config import DispatchConfig, DispatchMode
from layerzero.dispatch.generic import GENERIC, key_for, kwargs_kernel, map_inputs, op_for_dispatch
from layerzero.dispatch.result import (
    NOT_TIMED,
    DispatchResult,
    DispatchStats,
    DispatchTelemetry,
    DispatchTiming,
    KernelCounters,
)
from layerzero.errors import InvalidInputError, KernelNotFoundError
from layerzero.ops.base import OpDef
from layerzero.policy.model import Policy
from layerzero.policy.scope import SCOPE
from layerzero.registry import (
    BackendRegistry,
    KernelRegistry,
    get_global_backend_registry,
    get_global_kernel_registry,
)
from layerzero.runtime import Runtime, get_runtime
from layerzero.selection.cache import MVCCPlanCache, PlanCache
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec
from layerzero.telemetry.core import CacheStats

__all__ = ["Dispatcher", "DispatchResult", "DispatchTiming", "runtime_for", "PlanStore"]

PlanStore = PlanCache | MVCCPlanCache
_CTX = "explicit-context"
_perf_ns = time.perf_counter_ns


def runtime_for(kernel_registry: KernelRegistry | None = None, backend_registry: BackendRegistry | None = None,
                config: DispatchConfig | None = None, *, clock: Callable[[], float] | None = None) -> Runtime:
    """The runtime a dispatcher on these registries uses.

    The global registries (or ``None``) give the global runtime, with ``config``
    applied to it when it differs; other registries get a new runtime of their own.

    Raises:
        InvalidInputError: ``clock`` was given for the global runtime (it always uses ``time.monotonic``).
    """
    if config is not None and not isinstance(config, DispatchConfig):
        raise InvalidInputError(f"config must be a DispatchConfig, got {type(config).__name__}")
    kernels = get_global_kernel_registry() if kernel_registry is None else kernel_registry
    backends = get_global_backend_registry() if backend_registry is None else backend_registry
    if kernels is get_global_kernel_registry() and backends is get_global_backend_registry():
        if clock is not None:
            raise InvalidInputError("clock= needs a dispatcher on its own registries; the global runtime shared "
                                    "with lz.* always uses time.monotonic")
        rt = get_runtime()
        if config is not None and config != rt.config:
            rt.configure(config)
        return rt
    return Runtime(kernels, backends, config if config is not None else DispatchConfig.from_env(),
                   clock=clock if clock is not None else time.monotonic)


class Dispatcher:
    """Dispatch by kernel selection, on one runtime.

    Args:
        runtime: the runtime (see :func:`runtime_for`).
        cache: a plan cache of this dispatcher's own (an :class:`MVCCPlanCache` for many threads).
            ``None``: share the runtime's plan cache with ``lz.*`` when :attr:`shares_plan_cache`
            is True, else a private :class:`PlanCache` sized by the config.

    Example:
        >>> d = create_dynamic_dispatcher()
        >>> r = d.dispatch("attention.causal", {"query": q, "key": k, "value": v})
        >>> r.output, r.kernel_id, r.fallback_used
    """

    mode: DispatchMode = DispatchMode.DYNAMIC
    #: True: read and fill the runtime's plan cache (the one ``lz.*`` uses). Only dispatchers whose
    #: plans are exactly the runtime's selection may share it.
    shares_plan_cache: bool = False

    def __init__(self, runtime: Runtime, *, cache: PlanStore | None = None) -> None:
        self.runtime = runtime
        self._given_cache = cache
        self._cache: PlanStore | None = cache if cache is not None else (
            None if self.shares_plan_cache else self._new_cache(runtime.config))
        self._ops: dict[str, OpDef] = {}
        self._version = runtime.version
        self._config_seen = runtime.config
        self._timed = runtime.config.record_timing
        self._mode_value = self.mode.value  # an enum's .value costs a descriptor call per dispatch

    # -- configuration -------------------------------------------------------------------------------
    @property
    def config(self) -> DispatchConfig:
        """The dispatcher's config (its runtime's)."""
        return self.runtime.config

    @property
    def kernel_registry(self) -> KernelRegistry:
        return self.runtime.kernels

    @property
    def backend_registry(self) -> BackendRegistry:
        return self.runtime.backends

    def _new_cache(self, config: DispatchConfig) -> PlanCache:
        rt = self.runtime
        return PlanCache(config.cache_size if config.enable_cache else 0, config.cache_ttl_seconds, clock=rt.clock,
                         on_evict=rt.telemetry.record_eviction)

    def _sync(self) -> None:
        """The runtime changed (registry, policy or config): drop this dispatcher's cached plans."""
        rt = self.runtime
        if rt.config is not self._config_seen:
            self._config_seen = rt.config
            self._timed = rt.config.record_timing
            if self._cache is not None and self._given_cache is None:
                self._cache = self._new_cache(rt.config)
        if self._cache is not None:
            self._cache.invalidate()
        self._version = rt.version

    def invalidate(self) -> None:
        """Drop cached plans: this dispatcher's own cache, or the runtime's when shared."""
        if self._cache is None:
            self.runtime.invalidate("dispatcher.invalidate()")
        else:
            self._cache.invalidate()

    @property
    def plan_cache(self) -> PlanStore:
        """The plan cache this dispatcher reads."""
        return self.runtime.plans if self._cache is None else self._cache

    # -- plans ---------------------------------------------------------------------------------------
    def build_plan(self, op: OpDef, operation: str, ctx: SelectionContext, policy: Policy) -> ExecutionPlan:
        """The plan for a call that missed the cache. Subclasses override this to choose kernels differently."""
        plan = self.runtime.plan_for(op, operation, ctx, policy=policy)
        if op is GENERIC:
            plan = self.make_plan(operation, op, plan.kernels, ctx, locked_by=plan.locked_by,
                                  policy_digest=plan.policy_digest, source=plan.source)
        return plan

    def make_plan(self, operation: str, op: OpDef, kernels: Sequence[KernelSpec], ctx: SelectionContext, *,
                  locked_by: str | None = None, policy_digest: str = "", source: str = "dispatch") -> ExecutionPlan:
        """A bound plan running ``kernels`` in order (first choice, then fallbacks), trimmed to the config's
        ``max_fallback_attempts`` (or to one kernel when ``enable_fallback`` is off)."""
        cfg = self.runtime.config
        specs = tuple(kernels)[: 1 + cfg.max_fallback_attempts if cfg.enable_fallback else 1]
        if not specs:
            raise InvalidInputError(f"{operation}: a plan needs at least one kernel")
        if op is GENERIC:
            specs = tuple(kwargs_kernel(s) for s in specs)
        plan = ExecutionPlan(operation, op, specs, ctx, locked_by=locked_by, policy_digest=policy_digest, source=source)
        self.runtime.bind(plan)
        return plan

    def _op(self, operation: str) -> OpDef:
        if not isinstance(operation, str):
            return op_for_dispatch(operation)  # raises InvalidInputError naming it
        op = self._ops.get(operation)
        if op is None:
            op = op_for_dispatch(operation)
            if len(self._ops) < 4096:
                self._ops[operation] = op
        return op

    # -- dispatch ------------------------------------------------------------------------------------
    def dispatch(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None = None,
                 **kwargs: Any) -> DispatchResult:
        """Run ``operation`` on ``inputs`` with the kernel this dispatcher picks.

        Args:
            operation: ``"attention.causal"``, ``"rms_norm"``, ... or a user operation name.
            inputs: tensors by name (``query``/``q``, ``key``/``k``, ``value``/``v``, ``x``/``input``,
                ``weight``, ``bias``, ...; see ``layerzero.dispatch.generic.INPUT_NAMES``).
            context: a :class:`SelectionContext` to select with instead of one built from the tensors
                (reuse one object across calls: plans are cached per context object).
            **kwargs: more inputs or options (``is_causal``, ``scale``, ``eps``, ``layout="BSHD"``, ...).

        Raises:
            InvalidInputError: malformed inputs (names the operation and every input).
            NoKernelError: no kernel can run the call (lists every candidate's reasons).
            AllKernelsFailedError: every kernel tried raised (lists each attempt and its error).
        """
        rt = self.runtime
        if rt.version != self._version:
            self._sync()
        if self._timed:
            return self._dispatch_timed(operation, inputs, context, kwargs)
        try:
            op = self._ops.get(operation) or self._op(operation)
        except TypeError:  # an unhashable operation: op_for_dispatch reports it as bad input
            op = op_for_dispatch(operation)
        args, bshd = map_inputs(op, operation, inputs, kwargs)
        key = key_for(op, operation, args) if context is None else (operation, _CTX, id(context))
        # ---- cached hot path: key -> plan -> kernel ---------------------------------------------
        scope = SCOPE.get()
        try:
            if key is None:
                plan = None
            elif scope is None:
                plan = (rt.plans if self._cache is None else self._cache).get(key)
            else:
                plan = scope.plans.get(key) if self._cache is None else None
        except TypeError:  # an unhashable value in the key (window=[4]): validation names it on the slow path
            plan = key = None
        if plan is not None and (context is None or plan.context is context):
            ran = None
            if plan.gate.blocked:
                note = rt.last_run
                note.value = None
                out = plan.run(*args)
                ran = note.value
            else:
                plan.stats.calls += 1
                try:
                    out = plan.fn(*args)
                except Exception as exc:
                    note = rt.last_run
                    note.value = None
                    out = rt.recover(plan, args, 0, exc)
                    ran = note.value
            cached = True
        else:
            version = rt.version  # before the policy is read: a change during this call keeps the plan out
            plan = self._select(op, operation, args, context)
            out, ran = self._first_run(plan, args)
            if rt.version == version:
                self._store(key, plan, scope)
            cached = False
        # -------------------------------------------------------------------------------------------
        if bshd:
            out = out.transpose(1, 2)
        if ran is None:
            return DispatchResult(out, plan.kernels[0].kernel_id, operation, False, 1, NOT_TIMED, cached,
                                  self._mode_value)
        used, index = ran
        return DispatchResult(out, used.kernels[index].kernel_id, operation, index > 0, index + 1, NOT_TIMED, cached,
                              self._mode_value)

    def _select(self, op: OpDef, operation: str, args: tuple[Any, ...], context: SelectionContext | None
                ) -> ExecutionPlan:
        """Cache miss: validate, build the context (unless given), choose the plan."""
        if context is not None and not isinstance(context, SelectionContext):
            raise InvalidInputError(f"dispatch({operation!r}): context must be a SelectionContext, "
                                    f"got {type(context).__name__}")
        op.validate(operation, args)
        ctx = context if context is not None else op.context(operation, args)
        plan = self.build_plan(op, operation, ctx, self.runtime.current_policy())
        self.runtime.telemetry.record_miss()
        return plan

    def _first_run(self, plan: ExecutionPlan, args: tuple[Any, ...]) -> tuple[Any, tuple[ExecutionPlan, int] | None]:
        """A new plan's first call: with output checks, through the runtime's fallback runner."""
        note = self.runtime.last_run
        note.value = None
        out = self.runtime.run_plan(plan, args, 0, check_output=True)
        return out, note.value

    def _store(self, key: Hashable | None, plan: ExecutionPlan, scope: Any) -> None:
        rt = self.runtime
        if key is None or not rt.config.enable_cache:
            return
        if scope is None:
            (rt.plans if self._cache is None else self._cache).put(key, plan)
        elif self._cache is None:  # scoped policy: the scope's own plan dict, as lz.* does
            target = rt.scoped_plans(rt.current_policy())
            if len(target) < max(rt.config.cache_size, 1):
                target[key] = plan
            scope.plans = target

    def _dispatch_timed(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None,
                        kwargs: dict[str, Any]) -> DispatchResult:
        """``dispatch`` with ``record_timing``: the same steps, each timed."""
        rt = self.runtime
        t0 = _perf_ns()
        op = self._op(operation)
        args, bshd = map_inputs(op, operation, inputs, kwargs)
        key = key_for(op, operation, args) if context is None else (operation, _CTX, id(context))
        t1 = _perf_ns()
        scope = SCOPE.get()
        try:
            if key is None:
                plan = None
            elif scope is None:
                plan = (rt.plans if self._cache is None else self._cache).get(key)
            else:
                plan = scope.plans.get(key) if self._cache is None else None
        except TypeError:  # an unhashable value in the key (window=[4]): validation names it on the slow path
            plan = key = None
        t2 = _perf_ns()
        build_ns = t1 - t0
        if plan is not None and (context is None or plan.context is context):
            cached = True
            t3 = _perf_ns()
            note = rt.last_run
            note.value = None
            out = plan.run(*args)  # timing mode: plan.run is the runtime's timed runner
            ran = note.value
        else:
            cached = False
            version = rt.version
            plan = self._select(op, operation, args, context)
            t3 = _perf_ns()
            out, ran = self._first_run(plan, args)
            if rt.version == version:
                self._store(key, plan, scope)
        t4 = _perf_ns()
        if bshd:
            out = out.transpose(1, 2)
        t5 = _perf_ns()
        timing = DispatchTiming(selection_us=(t3 - t0) / 1000.0, execution_us=(t5 - t3) / 1000.0,
                                total_us=(t5 - t0) / 1000.0, context_build_ns=build_ns, cache_lookup_ns=t2 - t1,
                                kernel_invoke_ns=t4 - t3, recorded=True)
        if ran is None:
            return DispatchResult(out, plan.kernels[0].kernel_id, operation, False, 1, timing, cached,
                                  self._mode_value)
        used, index = ran
        return DispatchResult(out, used.kernels[index].kernel_id, operation, index > 0, index + 1, timing, cached,
                              self._mode_value)

    def __call__(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None = None,
                 **kwargs: Any) -> Any:
        """``dispatch(...).output``."""
        return self.dispatch(operation, inputs, context, **kwargs).output

    # -- observability -------------------------------------------------------------------------------
    def get_telemetry(self) -> DispatchTelemetry:
        """A snapshot of cache statistics, per-kernel counters and selections per operation."""
        rt = self.runtime
        tel = rt.telemetry
        shared = tel.cache_stats
        if self._cache is None:
            cache_stats = shared
        else:
            size, capacity = self._cache.stats()
            cache_stats = CacheStats(shared.hits, shared.misses, size, capacity, self._cache.evictions,
                                     shared.invalidations)
        kernels = {kid: KernelCounters(kid, s.operation, s.calls, s.failures, s.fallbacks, s.latency_count,
                                       s.latency_sum_us)
                   for kid, s in sorted(tel.kernels.items())}
        selections: dict[str, dict[str, int]] = {}
        for (operation, kid), n in sorted(tel.selections.items()):
            selections.setdefault(operation, {})[kid] = n
        return DispatchTelemetry(rt.config.enable_telemetry, cache_stats, kernels, selections,
                                 dict(tel.fallback_pairs), dict(tel.breaker_transitions))

    def get_circuit_stats(self, kernel_id: str) -> CircuitStats:
        """``state``, ``state_transitions``, ``failures``, ``successes``, ``last_failure`` of a kernel's breaker.

        Raises:
            KernelNotFoundError: no registered kernel (and no breaker) has this id.
        """
        rt = self.runtime
        if kernel_id not in rt.kernels and kernel_id not in rt.breakers.all():
            known = [s.kernel_id for s in rt.kernels] + list(rt.breakers.all())
            close = difflib.get_close_matches(str(kernel_id), known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KernelNotFoundError(f"get_circuit_stats(): unknown kernel {kernel_id!r}{hint}")
        return rt.circuit_stats(kernel_id)

    def reset_circuit(self, kernel_id: str) -> None:
        """Close a kernel's breaker now (operator action)."""
        self.get_circuit_stats(kernel_id)
        self.runtime.breakers.get(kernel_id).reset()

    @property
    def stats(self) -> DispatchStats:
        """Reload counters (a dispatcher that never reloads reports zeros)."""
        return DispatchStats(self.mode.value)

    def __repr__(self) -> str:
        where = "global runtime" if self.runtime is get_runtime() else "own runtime"
        return f"{type(self).__name__}(mode={self.mode.name}, {where})"
