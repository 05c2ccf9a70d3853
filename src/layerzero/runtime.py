"""The runtime: one object owning the registries, the policy in force, the plan
cache, the circuit breakers and the telemetry.

``lz.attention`` and friends, and every dispatcher built on the global
registries, share the global runtime (:func:`get_runtime`): a breaker opened
through ``dispatch()`` is open for ``lz.attention`` too.

The cached hot path lives in the op functions (``layerzero/ops/*.py``): a key
from tensor metadata, one dictionary read, a breaker flag, a counter, and the
kernel call. Everything else (validation, context building, selection, output
checks, fallback) is here, on the slow path.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.dispatch.breaker import BreakerBoard, CircuitBreaker, CircuitBreakerConfig, CircuitState
from layerzero.dispatch.config import DispatchConfig
from layerzero.errors import AllKernelsFailedError, CaptureError, InvalidInputError, KernelExecutionError, LayerZeroError
from layerzero.ops.base import OpDef
from layerzero.policy.model import Policy
from layerzero.policy.scope import SCOPE
from layerzero.policy.state import PolicyState
from layerzero.registry import (
    BackendRegistry,
    KernelRegistry,
    get_global_backend_registry,
    get_global_kernel_registry,
)
from layerzero.selection.cache import PlanCache
from layerzero.selection.engine import CandidateDecision, Measurement, Selection, SelectionEngine, format_context
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec, ReasonCode
from layerzero.telemetry.core import KernelStats, Telemetry
from layerzero.telemetry.logs import log_event

__all__ = ["Runtime", "get_runtime"]

log = logging.getLogger("layerzero")

# Rejections that hold for every shape of a call family (its dtype, device and keyed flags decide them).
SHAPE_INDEPENDENT_REASONS = frozenset({
    ReasonCode.PLATFORM_MISMATCH, ReasonCode.SM_TOO_OLD, ReasonCode.SM_TOO_NEW, ReasonCode.DTYPE_UNSUPPORTED,
    ReasonCode.MASK_UNSUPPORTED, ReasonCode.CAUSAL_UNSUPPORTED, ReasonCode.WINDOW_UNSUPPORTED,
    ReasonCode.DROPOUT_UNSUPPORTED, ReasonCode.VARIANT_UNSUPPORTED, ReasonCode.BACKEND_UNAVAILABLE,
    ReasonCode.BACKEND_UNHEALTHY, ReasonCode.CIRCUIT_OPEN, ReasonCode.POLICY_DENIED, ReasonCode.POLICY_NOT_ALLOWED,
    ReasonCode.POLICY_LOCKED_OTHER, ReasonCode.GRAD_UNSUPPORTED, ReasonCode.NOT_DETERMINISTIC,
    ReasonCode.CUDA_GRAPH_UNSAFE, ReasonCode.COMPILE_UNSAFE,
})

MeasurementSource = Callable[[str, SelectionContext, tuple[KernelSpec, ...]], dict[str, Measurement]]


class Runtime:
    """Shared state for one set of registries.

    Args:
        kernel_registry / backend_registry: default to the global registries.
        config: a :class:`DispatchConfig`; defaults to ``DispatchConfig.from_env()``.
        clock: monotonic clock for breakers and TTLs (injectable for tests).
    """

    def __init__(self, kernel_registry: KernelRegistry | None = None, backend_registry: BackendRegistry | None = None,
                 config: DispatchConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        # ``is not None``: an empty registry is falsy (it has __len__) but is still the caller's registry.
        self.kernels = kernel_registry if kernel_registry is not None else get_global_kernel_registry()
        self.backends = backend_registry if backend_registry is not None else get_global_backend_registry()
        self.config = config or DispatchConfig.from_env()
        self.clock = clock
        self.telemetry = Telemetry()
        self.telemetry.enabled = self.config.enable_telemetry
        self.breakers = BreakerBoard(self._breaker_config(self.config), clock)
        self.breakers.add_listener(self._on_breaker)
        self.plans: PlanCache = self._make_cache(self.config)
        self.telemetry.bind_cache(lambda: self.plans.stats())
        self.policy = PolicyState()
        self.measurement_source: MeasurementSource | None = None
        self.engine = SelectionEngine(self.kernels, self.backends, measurements=self._measurements)
        self._scoped: dict[str, dict[Hashable, ExecutionPlan]] = {}
        self._interned: dict[tuple[Any, ...], ExecutionPlan] = {}
        self._exact_only: set[Hashable] = set()  # call families whose shape-free plan met a shape it cannot run
        self._widened: set[Hashable] = set()  # families whose shape-free plan gave way once to a covering kernel
        self._families: dict[Hashable, Hashable] = {}  # one tuple per call family, shared by its exact keys
        self._measured_memo: dict[tuple[Any, ...], str | None] = {}
        self._lock = threading.RLock()
        self.version = 0
        self._verify_first_calls = self.config.verify_first_calls
        self._verified: dict[str, int] = {}  # kernel id -> outputs that passed verification
        # Plans whose kernel returned an invalid result while no breaker could fence it off: every result
        # of theirs is checked from then on (they leave the fast path).
        self._distrusted: weakref.WeakSet[ExecutionPlan] = weakref.WeakSet()
        self.on_miss: list[Callable[[str, SelectionContext], None]] = []
        self.baked: Any = None  # a layerzero.solve.PlanTable in force, or None
        # ``last_run.value = (plan, index)`` of the kernel that ran, set by :meth:`run_plan` only (the slow
        # and fallback paths); dispatchers read it to report which kernel produced a result.
        self.last_run = threading.local()
        self.kernels.add_listener(lambda: self.invalidate("kernel registry changed"))
        self.backends.add_listener(lambda: self.invalidate("backend registry changed"))
        self.policy.add_listener(self._on_policy_change)

    # -- configuration -----------------------------------------------------------
    @staticmethod
    def _breaker_config(config: DispatchConfig) -> CircuitBreakerConfig:
        return CircuitBreakerConfig(config.failure_threshold, config.recovery_timeout_seconds, config.success_threshold)

    def _make_cache(self, config: DispatchConfig) -> PlanCache:
        capacity = config.cache_size if config.enable_cache else 0
        return PlanCache(capacity, config.cache_ttl_seconds, clock=self.clock, on_evict=self.telemetry.record_eviction)

    def configure(self, config: DispatchConfig) -> None:
        """Apply a new DispatchConfig: rebuilds the cache and every plan runner."""
        with self._lock:
            self.config = config
            self._verify_first_calls = config.verify_first_calls
            self.telemetry.enabled = config.enable_telemetry
            self.breakers.reconfigure(self._breaker_config(config))
            self.plans = self._make_cache(config)
            self.invalidate("dispatch config changed")

    @property
    def verify_first_calls(self) -> int:
        """Verify mode: each kernel's first N passing outputs are checked against the float64 reference.

        0 (the default) is off. Set it with ``DispatchConfig(verify_first_calls=N)`` or
        ``LAYERZERO_VERIFY=N``; assigning it here works too and drops cached plans.
        """
        return self._verify_first_calls

    @verify_first_calls.setter
    def verify_first_calls(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInputError(f"verify_first_calls must be an int >= 0, got {n!r}")
        self._verify_first_calls = n
        self.invalidate("verify mode changed")

    def _verify_pending(self, kernel_id: str) -> bool:
        n = self._verify_first_calls
        return bool(n) and self._verified.get(kernel_id, 0) < n

    def invalidate(self, reason: str = "") -> None:
        """Drop every cached plan (O(1)); the next call of each shape selects again."""
        self.plans.invalidate()
        for plans in list(self._scoped.values()):
            plans.clear()  # live scopes hold these dicts: empty them in place
        self._interned = {}
        self._exact_only = set()
        self._widened = set()
        self._families = {}
        self._measured_memo = {}
        self.version += 1
        self.telemetry.record_invalidation()
        if reason:
            log_event("cache_invalidated", reason=reason)

    def _on_policy_change(self) -> None:
        self.telemetry.record_policy_change()
        log_event("policy_change", digest=self.policy.policy.digest, rules=len(self.policy.policy.rules),
                  document=self.policy.document_source)
        self.invalidate("policy changed")

    def _on_breaker(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        self.telemetry.record_breaker(breaker.kernel_id, old.name, new.name)

    # -- policy & plans ----------------------------------------------------------
    def current_policy(self) -> Policy:
        scope = SCOPE.get()
        if scope is None:
            return self.policy.policy
        base = self.policy.policy
        if scope.hides:  # `with lz.unlock(...)` / `with lz.enabled(...)` lift process-wide rules in the block
            base = Policy(tuple(r for r in base.rules if not any(h(r) for h in scope.hides)))
        return scope.policy + base

    def scoped_plans(self, policy: Policy) -> dict[Hashable, ExecutionPlan]:
        d = self._scoped.get(policy.digest)
        if d is None:
            d = self._scoped.setdefault(policy.digest, {})
        return d

    def _measurements(self, operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]
                      ) -> dict[str, Measurement]:
        src = self.measurement_source
        if src is None:
            return {}
        try:
            return src(operation, ctx, specs)
        except Exception as exc:  # measurements are advisory: never fail a call over them
            log_event("perf_lookup_failed", operation=operation, error=type(exc).__name__, message=str(exc),
                      action="using priorities")
            return {}

    def select(self, operation: str, ctx: SelectionContext, *, policy: Policy | None = None,
               use_measurements: bool = True) -> Selection:
        """Run the selection engine with this runtime's policy and breakers."""
        return self.engine.select(operation, ctx, policy=self.current_policy() if policy is None else policy,
                                  breaker_open=self.breakers.is_open if self.config.circuit_breaker_enabled else None,
                                  use_measurements=use_measurements)

    def plan_for(self, op: OpDef, operation: str, ctx: SelectionContext, *, policy: Policy | None = None
                 ) -> ExecutionPlan:
        """Select and build a bound plan (not cached)."""
        return self._select_plan(op, operation, ctx, policy)[0]

    def _select_plan(self, op: OpDef, operation: str, ctx: SelectionContext, policy: Policy | None
                     ) -> tuple[ExecutionPlan, Selection]:
        if ctx.cuda_graph_capturing:
            raise CaptureError(
                f"{format_context(operation, ctx)}: kernel selection was needed while a CUDA graph is being "
                f"captured; run the same shapes once before capture (or lz.warmup) so the plan is cached")
        for hook in self.on_miss:
            hook(operation, ctx)
        sel = self._baked_selection(operation, ctx, policy) if self.baked is not None else None
        if sel is None:
            sel = self.select(operation, ctx, policy=policy)
        ranked = sel.ranked
        if not self.config.enable_fallback:
            ranked = ranked[:1]
        else:
            ranked = ranked[: 1 + self.config.max_fallback_attempts]
        primary = ranked[0]
        special_key, fn = primary.specialize(ctx) if primary.specialize is not None else (None, primary.impl)
        intern_key = (operation, tuple(k.kernel_id for k in ranked), special_key, sel.locked_by, sel.policy_digest,
                      self.version)
        plan = self._interned.get(intern_key)
        if plan is None:
            plan = ExecutionPlan(operation, op, ranked, ctx, locked_by=sel.locked_by, policy_digest=sel.policy_digest)
            plan.fn = fn
            plan.direct = getattr(fn, "direct", None)  # see ExecutionPlan: the op calls PyTorch's function itself
            plan.const = getattr(fn, "const", None)
            self.bind(plan)
            if len(self._interned) < 100_000:
                self._interned[intern_key] = plan
        self.telemetry.record_selection(operation, plan.kernel_id)
        return plan, sel

    def _baked_selection(self, operation: str, ctx: SelectionContext, policy: Policy | None) -> Selection | None:
        """A selection straight from the baked plan table (no scoring), or None when it has no usable entry.

        Policy rules for the operation win over the table (the table is ignored for it)."""
        pol = policy if policy is not None else self.current_policy()
        if pol.rules and pol.for_operation(operation):
            return None
        ids = self.baked.lookup(operation, ctx)
        if not ids:
            return None
        ranked = []
        for kid in ids:
            spec = self.kernels.find(kid)
            if spec is None or self.backends.unavailable_reason(spec.backend) is not None or spec.check(ctx):
                continue
            if self.config.circuit_breaker_enabled and self.breakers.is_open(kid):
                continue
            ranked.append(spec)
        if not ranked:
            return None
        return Selection(operation, ctx, tuple(ranked), (), "baked plan table", pol.digest)

    def bind(self, plan: ExecutionPlan) -> None:
        """Set what the cached hot path reads: ``gate`` (breaker or stand-in), ``stats``, ``run``.

        The op functions call ``plan.fn`` directly while ``plan.gate.blocked`` is False; otherwise
        they call ``plan.run``, the slow runner (fallback, timing, verify mode, guards).
        """
        spec = plan.kernels[0]
        rt = self
        guard_grad = not spec.supports_autograd
        guard_capture = not spec.cuda_graph_safe
        guard_det = not spec.deterministic
        cfg = self.config
        plan.stats = self.telemetry.kernel(spec.kernel_id, plan.operation) if cfg.enable_telemetry else _SINK
        if guard_grad or guard_capture or guard_det:
            def run(*args: Any) -> Any:  # flags the cache key does not carry: re-select when they trip
                if _guard_trips(args, guard_grad, guard_capture, guard_det):
                    return rt.run_uncached(plan.op, plan.operation, args)
                return rt.run_plan(plan, args, 0)
            plan.run = run
            plan.gate = _ALWAYS_SLOW
        else:
            plan.run = lambda *args: rt.run_plan(plan, args, 0)
            if cfg.record_timing or self._verify_pending(spec.kernel_id):
                plan.gate = _ALWAYS_SLOW
            elif cfg.circuit_breaker_enabled:
                plan.gate = self.breakers.get(spec.kernel_id)
            else:
                plan.gate = _NEVER_SLOW
        if plan.context.is_contiguous and spec.requires_contiguous:
            # Only the primary needs the per-call stride check: fallbacks run on the slow path, which
            # checks strides before calling a kernel that needs contiguous inputs (run_plan).
            self._guard_contiguity(plan)

    def _guard_contiguity(self, plan: ExecutionPlan) -> None:
        """The cache key does not carry strides: a call whose inputs are not contiguous must not reach a
        kernel of this plan that needs them (PyTorch's CPU flash kernel returns garbage for a q whose last
        dimension is strided). Such calls run a plan selected for their own context, made on first need
        and kept with this plan; contiguous calls pay one stride check per input."""
        if getattr(plan.fn, "_layerzero_contiguity_guard", False):
            return
        rt = self
        op, operation, fn, run = plan.op, plan.operation, plan.fn, plan.run
        other: list[ExecutionPlan] = []

        def elsewhere(args: tuple[Any, ...]) -> Any:
            if not other:
                op.validate(operation, args)
                alt = rt.plan_for(op, operation, op.context(operation, args))
                rt.telemetry.record_miss()
                other.append(alt)
                return rt.run_plan(alt, args, 0, check_output=True)
            return rt.call_plan(other[0], args)

        if op.family == "attention":  # the common case, inlined; is_contiguous() is the cheaper call
            def fn_checked(q: Any, k: Any, v: Any, *rest: Any) -> Any:
                if (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or (
                        q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1):
                    return fn(q, k, v, *rest)
                return elsewhere((q, k, v, *rest))
        else:
            def fn_checked(*args: Any) -> Any:
                return fn(*args) if _contiguous(op, args) else elsewhere(args)

        def run_checked(*args: Any) -> Any:
            return run(*args) if _contiguous(op, args) else elsewhere(args)

        fn_checked._layerzero_contiguity_guard = True  # type: ignore[attr-defined]
        plan.fn = fn_checked
        plan.direct = None  # every call must pass the stride check
        plan.run = run_checked

    # -- the slow path -------------------------------------------------------------
    def miss(self, op: OpDef, operation: str, key: Hashable, args: tuple[Any, ...], family: Hashable = None) -> Any:
        """Cache miss: validate, build the context, select, cache, then run with output checks.

        ``family`` is the call's shape-free key (the ``lz.*`` ops pass it): when selection would pick the
        same kernel for every shape of the family (:meth:`shape_free_reason` is None), a shape-free plan
        is cached under it too, and later calls of any shape skip the shape key.
        """
        plans, cache_version, version = self.plans, self.plans.version, self.version  # before the policy is read
        op.validate(operation, args)
        ctx = op.context(operation, args)
        scope = SCOPE.get()
        policy = self.current_policy()
        plan, sel = self._select_plan(op, operation, ctx, policy)
        self.telemetry.record_miss()
        out = self.run_plan(plan, args, 0, check_output=True)
        if self.config.enable_cache and key is not None and self.version == version:
            # a policy / registry change during this call invalidated the cache: do not store a stale plan
            if family is not None and type(key) is tuple and key and key[0] == family:
                family = self._families.setdefault(family, family) if len(self._families) < 10_000 else family
                key = (family, *key[1:])  # exact keys of one family share its tuple (memory per plan)
            entries = [(key, plan)]
            if family is not None and getattr(self.last_run, "value", None) == (plan, 0):
                free = self.family_plan(plan, sel, family, policy)
                if free is not None:
                    entries.append((family, free))
            if scope is None:
                for k, p in entries:
                    plans.put(k, p, version=cache_version)
            else:
                target = self.scoped_plans(policy)
                for k, p in entries:
                    if len(target) < max(self.config.cache_size, 1):
                        target[k] = p
                scope.plans = target
        return out

    # -- shape-free plans ----------------------------------------------------------
    def shape_free_reason(self, sel: Selection, policy: Policy | None = None) -> str | None:
        """Why ``sel`` cannot serve every shape of its call family from one plan, or None when it can.

        A call family is an operation with a dtype, a device and the flags in the cache key (causal,
        dropout, window, mask kind, ...). Selection picks the same kernel for every shape of the family
        when: the selected kernel is ``shape_free`` (it runs any shape or raises for one it cannot) and
        needs no per-call guard; no candidate that could outrank it was rejected for a reason that
        depends on shapes, unless the selected kernel ``covers`` it (runs its calls the same way); no
        measurement, baked plan table, conditional policy rule, online tuning or verify mode is in play
        (they all look at shapes), except measurements that rank the same kernel (or one it covers)
        first in every stored bucket of the family; and the config allows it.
        """
        cfg = self.config
        if not cfg.shape_free_plans or not cfg.enable_cache:
            return "shape_free_plans is off" if not cfg.shape_free_plans else "the plan cache is off"
        if cfg.record_timing or self._verify_first_calls:
            return "timing or verify mode checks each call on the slow path"
        if self.baked is not None:
            return "a baked plan table is in force (it is keyed by shape buckets)"
        if any(getattr(h, "needs_every_shape", False) for h in self.on_miss):
            return "online tuning measures each new shape bucket"
        primary = sel.ranked[0]
        if not primary.shape_free:
            return f"{primary.kernel_id} is not declared shape_free"
        if primary.requires_contiguous or not (primary.supports_autograd and primary.cuda_graph_safe
                                               and primary.deterministic):
            return f"{primary.kernel_id} needs a per-call guard (contiguity, grad, capture or determinism)"
        pol = policy if policy is not None else self.current_policy()
        rules = pol.for_operation(sel.operation) if pol.rules else ()
        if any(r.condition is not None for r in rules):
            return "a conditional policy rule applies to the operation"
        for d in sel.trace:
            if d.accepted or d.kernel_id == primary.kernel_id:
                continue  # ranked below the primary by priority alone: the same for every shape
            if d.kernel_id in primary.covers:
                continue  # where it would outrank the primary, the primary runs its call the same way
            if any(r.code in SHAPE_INDEPENDENT_REASONS for r in d.reasons):
                continue  # out for every shape of the family
            if rules or d.priority >= primary.priority:  # another shape might make it eligible and first
                codes = ", ".join(dict.fromkeys(r.code for r in d.reasons))
                return f"{d.kernel_id} was rejected for a shape-dependent reason ({codes})"
        return self._measured_reason(sel.operation, sel.context, primary, bool(rules))

    def _measured_reason(self, operation: str, ctx: SelectionContext, primary: KernelSpec, rules: bool
                         ) -> str | None:
        """Why stored measurements may pick another kernel than ``primary`` for some shape of the family,
        or None when every measured bucket ranks ``primary`` first too (or nothing is measured).

        Remembered per (operation, device, dtype, kernel) until the next invalidation (a change of the
        performance data invalidates)."""
        memo_key = (operation, ctx.platform, ctx.device_index, ctx.dtype, primary.kernel_id, rules)
        found = self._measured_memo.get(memo_key, _UNSET)
        if found is not _UNSET:
            return found  # type: ignore[return-value]
        reason = self._measured_reason_now(operation, ctx, primary, rules)
        if len(self._measured_memo) < 10_000:
            self._measured_memo[memo_key] = reason
        return reason

    def _measured_reason_now(self, operation: str, ctx: SelectionContext, primary: KernelSpec, rules: bool
                             ) -> str | None:
        src = self.measurement_source
        if src is None:
            return None
        buckets = getattr(src, "buckets", None)
        if buckets is None:  # a source we cannot enumerate: assume it ranks by shape
            return "a measurement source ranks this operation by shape"
        try:
            stored = buckets(operation, ctx)
        except Exception:
            stored = None
        if stored is None:
            return "the performance database cannot be read"
        if stored and rules:  # boosts and prefers weigh measured times: no shortcut
            return "policy rules weigh measured times for this operation"
        for bucket, times in sorted(stored.items()):
            mine = times.get(primary.kernel_id)
            if mine is None or mine.failed:
                return f"measured times rank another kernel first for bucket {bucket}"
            items = []
            for kid in times:
                spec = self.kernels.find(kid)
                if spec is not None and not times[kid].failed:
                    items.append((spec, CandidateDecision(kid, spec.backend, True, spec.priority)))
            first = self.engine._order(items, times, (), None)[0][0]
            if first.kernel_id != primary.kernel_id and first.kernel_id not in primary.covers:
                return f"measured times rank {first.kernel_id} first for bucket {bucket}"
        return None

    def family_plan(self, plan: ExecutionPlan, sel: Selection, family: Hashable, policy: Policy | None = None
                    ) -> ExecutionPlan | None:
        """The shape-free plan to cache under ``family`` for a plan just made from ``sel``, or None when the
        family must keep one plan per shape (:meth:`shape_free_reason`, or a shape of it already needed
        another kernel since the last invalidation)."""
        if family in self._exact_only or self.shape_free_reason(sel, policy) is not None:
            return None
        return self._family_plan(plan, family)

    def _family_plan(self, plan: ExecutionPlan, family: Hashable) -> ExecutionPlan:
        """A copy of ``plan`` (its selected kernel only) for the family key: while its kernel's breaker
        is closed the op calls ``fn`` straight away; otherwise, and when the kernel raises, the call
        goes the exact-shape way (:meth:`run_exact`), which owns fallback and breaker probes."""
        free = ExecutionPlan(plan.operation, plan.op, plan.kernels[:1], plan.context, locked_by=plan.locked_by,
                             policy_digest=plan.policy_digest, source=plan.source)
        free.family = family
        free.fn, free.direct, free.const = plan.fn, plan.direct, plan.const
        free.stats = plan.stats
        rt, op, operation = self, plan.op, plan.operation
        free.run = lambda *args: rt.run_exact(op, operation, args)
        cfg = self.config
        free.gate = self.breakers.get(plan.kernel_id) if cfg.circuit_breaker_enabled else _NEVER_SLOW
        return free

    def visible_plans(self) -> dict[Hashable, ExecutionPlan]:
        """The plans a call in this context reads: the active scope's, else the shared cache's."""
        scope = SCOPE.get()
        return self.plans.data if scope is None else scope.plans

    def run_exact(self, op: OpDef, operation: str, args: tuple[Any, ...]) -> Any:
        """Run a call through its exact-shape plan (selected on first need), as the hot path would."""
        try:
            key = op.keys(operation, args)[1]
            plan = self.visible_plans().get(key)
        except Exception:  # malformed arguments: the miss validates and names the problem
            key = plan = None
        if plan is None:
            return self.miss(op, operation, key, args)
        return self.call_plan(plan, args)

    def call_plan(self, plan: ExecutionPlan, args: tuple[Any, ...]) -> Any:
        """Run a cached plan as the ``lz.*`` hot paths do (they inline these lines): the slow runner while
        its gate is blocked, else its kernel, counted, with :meth:`recover` if it raises."""
        if plan.gate.blocked:
            return plan.run(*args)
        plan.stats.calls += 1
        try:
            return plan.fn(*args)
        except Exception as exc:
            return self.recover(plan, args, 0, exc)

    def family_dropped(self, family: Hashable) -> bool:
        """Whether a shape of ``family`` needed another kernel since the last invalidation, so the family
        keeps one plan per shape (:meth:`recover`)."""
        return family in self._exact_only

    def _drop_family(self, plan: ExecutionPlan, exc: BaseException) -> bool:
        """A shape-free plan's kernel raised on a valid call: its family plan goes. The first time, when a
        shape-free kernel ``covers`` the plan's kernel (``torch_sdpa_gqa`` covers ``torch_sdpa``: an MHA
        family meeting its first GQA call), the family selects again with that call, which may give it a
        plan of the covering kernel (returns True); otherwise, or the second time, the family goes back to
        exact-shape plans until the next invalidation (returns False). The failure is not counted against
        the kernel here; the path that now runs the call counts it if the kernel fails there too."""
        family = plan.family
        widen = family not in self._widened and any(
            plan.kernel_id in s.covers and s.shape_free for s in self.kernels.for_operation(plan.operation))
        if widen:
            self._widened.add(family)
        else:
            self._exact_only.add(family)
        self.plans.discard(family)
        for scoped in list(self._scoped.values()):
            scoped.pop(family, None)
        log_event("shape_free_plan_dropped", operation=plan.operation, kernel=plan.kernel_id,
                  error=type(exc).__name__, message=str(exc).splitlines()[0] if str(exc) else "",
                  action="select again with this call (a kernel covering this one may serve the family)" if widen
                  else "exact-shape plans for this call family")
        return widen

    def run_uncached(self, op: OpDef, operation: str, args: tuple[Any, ...]) -> Any:
        op.validate(operation, args)
        ctx = op.context(operation, args)
        plan = self.plan_for(op, operation, ctx)
        self.telemetry.record_miss()
        return self.run_plan(plan, args, 0, check_output=True)

    def run_plan(self, plan: ExecutionPlan, args: tuple[Any, ...], start: int, *, check_output: bool = False,
                 timing: list[int] | None = None) -> Any:
        """Run the plan's kernels from ``start`` in order, skipping fenced-off ones, until one succeeds."""
        attempts: list[tuple[str, BaseException]] = []
        use_breakers = self.config.circuit_breaker_enabled
        telemetry = self.config.enable_telemetry
        prev: str | None = None
        kernels = plan.kernels
        for i in range(start, len(kernels)):
            spec = kernels[i]
            kid = spec.kernel_id
            if spec.requires_contiguous and i > 0 and not _contiguous(plan.op, args):
                attempts.append((kid, KernelExecutionError(f"{kid} needs contiguous inputs; skipped")))
                continue
            breaker = self.breakers.get(kid) if use_breakers else None
            if breaker is not None and not breaker.allow():
                attempts.append((kid, KernelExecutionError(f"circuit breaker for {kid} is open")))
                continue
            if prev is not None and telemetry:
                self.telemetry.record_fallback(plan.operation, prev, kid)
            if telemetry:
                self.telemetry.kernel(kid, plan.operation).calls += 1
            t0 = time.perf_counter_ns() if timing is not None or self.config.record_timing else 0
            problem = None
            try:
                out = spec.impl(*args)
                # A recovery probe (breaker not CLOSED) is checked like a first call.
                if check_output or self._verify_first_calls or (breaker is not None and breaker.blocked) or (
                        self._distrusted and plan in self._distrusted):
                    problem = plan.op.check_output(plan.operation, args, out)
                    if problem is None and self._verify_first_calls:
                        problem = self._verify(plan, spec, args, out)
                if problem is not None:
                    raise KernelExecutionError(f"kernel {kid} for {plan.operation} {problem}")
            except Exception as exc:
                if isinstance(exc, InvalidInputError):
                    raise
                if not attempts:
                    self._raise_if_bad_input(plan, args, exc)
                self._failed(plan, kid, exc, breaker, invalid_output=problem is not None)
                attempts.append((kid, exc))
                prev = kid
                if not self.config.enable_fallback:
                    break
                continue
            if t0:
                elapsed = time.perf_counter_ns() - t0
                if timing is not None:
                    timing.append(elapsed)
                    timing.append(i)
                if self.config.record_timing and telemetry:
                    self.telemetry.kernel(kid, plan.operation).observe_us(elapsed / 1000.0)
            if breaker is not None:
                breaker.record_success()
            self.last_run.value = (plan, i)
            return out
        raise self._all_failed(plan, args, attempts)

    def recover(self, plan: ExecutionPlan, args: tuple[Any, ...], index: int, exc: Exception) -> Any:
        """The fast path's kernel raised: check the input, count the failure, fall back.

        For a shape-free plan the call may simply be a shape its kernel does not take (GQA heads for
        ``torch_sdpa``, another hidden size for a bound ``normalized_shape``). If the family has another
        plan by now (a ``dispatch()`` memo held this one), the call runs through that; else the family
        plan goes (:meth:`_drop_family`): the call selects again for the family when a covering kernel
        may serve it, or runs through its own exact-shape plan.
        """
        if isinstance(exc, LayerZeroError) and isinstance(exc, InvalidInputError):
            raise exc
        self._raise_if_bad_input(plan, args, exc)
        if plan.family is not None:
            current = self.visible_plans().get(plan.family)
            if current is not None and current is not plan:
                # a family plan the runtime has replaced since (a dispatcher's memo held the old one): the
                # family moved on, so the call runs through its current plan
                note = self.last_run
                note.value = None
                out = self.call_plan(current, args)
                if getattr(note, "value", None) is None:
                    note.value = (current, 0)
                return out
            if self._drop_family(plan, exc):  # a kernel covering this one may serve the whole family
                family, key = plan.op.keys(plan.operation, args)
                return self.miss(plan.op, plan.operation, key, args, family)
            return self.run_exact(plan.op, plan.operation, args)
        kid = plan.kernels[index].kernel_id
        breaker = self.breakers.get(kid) if self.config.circuit_breaker_enabled else None
        self._failed(plan, kid, exc, breaker)
        if not self.config.enable_fallback or index + 1 >= len(plan.kernels):
            raise self._all_failed(plan, args, [(kid, exc)])
        if self.config.enable_telemetry:
            self.telemetry.record_fallback(plan.operation, kid, plan.kernels[index + 1].kernel_id)
        try:
            return self.run_plan(plan, args, index + 1, check_output=True)
        except AllKernelsFailedError as err:
            raise self._all_failed(plan, args, [(kid, exc), *err.attempts]) from None

    def _raise_if_bad_input(self, plan: ExecutionPlan, args: tuple[Any, ...], exc: BaseException) -> None:
        try:
            plan.op.validate(plan.operation, args)
        except InvalidInputError as bad:
            raise bad from exc

    def _failed(self, plan: ExecutionPlan, kid: str, exc: BaseException, breaker: CircuitBreaker | None,
                *, invalid_output: bool = False) -> None:
        if breaker is not None:
            if invalid_output:  # the cached fast path cannot see a bad result: fence the kernel off now
                breaker.trip(exc)
            else:
                breaker.record_failure(exc)
        elif invalid_output:  # no breaker to fence it off: check every result of this plan from now on
            self._distrusted.add(plan)
            plan.gate = _ALWAYS_SLOW
        if self.config.enable_telemetry:
            self.telemetry.record_failure(plan.operation, kid, exc)
        if self.config.log_fallbacks:
            ids = [k.kernel_id for k in plan.kernels]
            i = ids.index(kid) + 1 if kid in ids else len(ids)
            nxt = ids[i] if self.config.enable_fallback and i < len(ids) else None
            log_event("fallback" if nxt else "kernel_failed", operation=plan.operation, from_kernel=kid,
                      to_kernel=nxt, error=type(exc).__name__, message=str(exc).splitlines()[0] if str(exc) else "")

    def _all_failed(self, plan: ExecutionPlan, args: tuple[Any, ...], attempts: list[tuple[str, BaseException]]
                    ) -> AllKernelsFailedError:
        lines = [f"every kernel failed for {plan.operation} (inputs: {plan.op.describe(args)}):"]
        for kid, err in attempts:
            lines.append(f"  {kid}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if not attempts:
            lines.append("  no kernel could be tried (all circuit breakers open)")
        err = AllKernelsFailedError("\n".join(lines), operation=plan.operation, attempts=attempts)
        if attempts:
            err.__cause__ = attempts[-1][1]
        return err

    def _verify(self, plan: ExecutionPlan, spec: KernelSpec, args: tuple[Any, ...], out: Any) -> str | None:
        """Verify mode: compare a kernel's first outputs with the float64 reference.

        Only passing outputs count towards ``verify_first_calls``: a kernel that keeps returning wrong
        values keeps failing (and its breaker stays open) instead of being trusted after N tries. Once a
        kernel has passed N times the plans are rebound, so its cached calls skip the check again.
        """
        kid = spec.kernel_id
        n = self._verify_first_calls
        if self._verified.get(kid, 0) >= n:
            return None
        problem = _compare_with_reference(plan, spec, args, out)
        if problem is None:
            passed = self._verified.get(kid, 0) + 1
            self._verified[kid] = passed
            if passed == n:
                self.invalidate(f"kernel {kid} verified")
        return problem

    # -- inspection --------------------------------------------------------------------
    def circuit_stats(self, kernel_id: str) -> Any:
        return self.breakers.get(kernel_id).stats()


class _Gate:
    """Stand-in for a circuit breaker on the hot path."""

    __slots__ = ("blocked",)

    def __init__(self, blocked: bool) -> None:
        self.blocked = blocked


_UNSET = object()
_ALWAYS_SLOW = _Gate(True)
_NEVER_SLOW = _Gate(False)
_SINK = KernelStats("__telemetry_disabled__")  # counts nobody reads, so the hot path needs no branch


def _compare_with_reference(plan: ExecutionPlan, spec: KernelSpec, args: tuple[Any, ...], out: Any) -> str | None:
    """What is wrong with ``out`` against the op's float64 reference, or None (also when there is no verdict:
    no reference, a random result, a non-float or meta output, or a reference that cannot be computed)."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.device.type == "meta":
        return None
    try:
        if not plan.op.reference_applies(plan.operation, args):
            return None
        ref = plan.op.reference(plan.operation, args)
        if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
            return None
        got = out.detach().to(torch.float64)
        ref = ref.detach().to(device=got.device, dtype=torch.float64)
        ref_nan = torch.isnan(ref)
        if bool((torch.isnan(got) & ~ref_nan).any()):
            return "returned NaN where the float64 reference has none"
        atol, rtol = spec.tolerance_for(out.dtype)
        if not torch.allclose(got, ref, atol=atol * 4, rtol=rtol * 4, equal_nan=True):
            err = (got - ref).abs().nan_to_num(nan=float("inf")).max().item()
            return (f"returned values off the float64 reference by up to {err:.3g} "
                    f"(tolerance atol={atol:g}, rtol={rtol:g})")
    except Exception:  # the check itself failed (NotImplementedError, odd tensors): no verdict on the kernel
        return None
    return None


def _contiguous(op: OpDef, args: tuple[Any, ...]) -> bool:
    """What the context builders record as ``is_contiguous`` for these arguments
    (:meth:`SelectionContext.from_attention`: q, k and v have a stride-1 last dimension;
    :meth:`SelectionContext.from_rows`: the first tensor is contiguous)."""
    try:
        if op.family == "attention":
            return args[0].stride(-1) == 1 and args[1].stride(-1) == 1 and args[2].stride(-1) == 1
        first = args[0]
        if isinstance(first, Mapping):  # the generic op's inputs dict
            first = next((v for v in first.values() if isinstance(v, torch.Tensor)), None)
        return not isinstance(first, torch.Tensor) or first.is_contiguous()
    except Exception:  # not tensors after all: the other path validates and names the problem
        return False


def _guard_trips(args: tuple[Any, ...], grad: bool, capture: bool, det: bool) -> bool:
    if grad and torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return True
    if det and torch.are_deterministic_algorithms_enabled():
        return True
    if capture:
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_cuda:
                return bool(torch.cuda.is_current_stream_capturing())
    return False


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The global runtime shared by ``lz.*`` and the global dispatcher."""
    global _runtime
    rt = _runtime
    if rt is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime()
            rt = _runtime
    return rt
