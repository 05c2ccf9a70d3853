"""The runtime core: registries, config, the plan cache, policy state, telemetry, selection and the miss.

``lz.attention`` and friends, and every dispatcher built on the global registries, share the global runtime
(:func:`get_runtime`): a breaker opened through ``dispatch()`` is open for ``lz.attention`` too.

The cached hot path lives in each op's generated entry function (its :class:`~layerzero.ops.contract.CallContract`):
a key from tensor metadata, one dictionary read, the guards, a breaker flag, a counter, and the kernel call.
Everything else is here, on the slow path: validation, context building, selection and caching
(:meth:`Runtime.miss`), with its collaborators: shape-free family plans (:class:`FamilyPlans`), running
plans under the failure contract (:class:`Executor`), and verify mode (:class:`Verifier`).
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.errors import CaptureError, message_of
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
from layerzero.runtime.breaker import BreakerBoard, CircuitBreaker, CircuitBreakerConfig, CircuitState
from layerzero.runtime.config import DispatchConfig
from layerzero.runtime.executor import Executor
from layerzero.runtime.family import FamilyPlans
from layerzero.runtime.gates import ALWAYS_SLOW, NEVER_SLOW, SINK, contiguous, guard_trips
from layerzero.runtime.verifier import Verifier
from layerzero.selection.cache import PlanCache
from layerzero.selection.engine import Measurement, Selection, SelectionEngine, format_context
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec
from layerzero.telemetry.core import Telemetry
from layerzero.telemetry.logs import log_event

__all__ = ["Runtime", "get_runtime"]

MeasurementSource = Callable[[str, SelectionContext, tuple[KernelSpec, ...]], dict[str, Measurement]]


class Runtime:
    """Shared state for one set of registries.

    Args:
        kernel_registry / backend_registry: default to the global registries.
        config: a :class:`DispatchConfig`; defaults to ``DispatchConfig.from_env()``.
        clock: monotonic clock for breakers and TTLs (injectable for tests).
    """

    # what every cached call reads (the compiled hot paths at their offsets); everything else in the instance dict
    __slots__ = ("version", "plans", "__dict__", "__weakref__")

    def __init__(self, kernel_registry: KernelRegistry | None = None, backend_registry: BackendRegistry | None = None,
                 config: DispatchConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 parent: Runtime | None = None) -> None:
        # ``is not None``: an empty registry is falsy (it has __len__) but is still the caller's registry.
        self.kernels = kernel_registry if kernel_registry is not None else get_global_kernel_registry()
        self.backends = backend_registry if backend_registry is not None else get_global_backend_registry()
        self.config = config if config is not None else DispatchConfig.from_env()
        self.clock = clock
        self.telemetry = Telemetry()
        self.telemetry.enabled = self.config.enable_telemetry
        self.breakers = BreakerBoard(self._breaker_config(self.config), clock)
        self.breakers.add_listener(self._on_breaker)
        self.plans: PlanCache = self._make_cache(self.config)
        self.telemetry.bind_cache(lambda: self.plans.stats())
        # a derived runtime (``derive``) shares its parent's policy and measurements
        self.parent = parent
        self.policy = parent.policy if parent is not None else PolicyState()
        self.measurement_source: MeasurementSource | None = None
        self.engine = SelectionEngine(self.kernels, self.backends, measurements=self._measurements)
        self.families = FamilyPlans(self)
        self.executor = Executor(self)
        self.verifier = Verifier(self.config.verify_first_calls, self.invalidate)
        self._scoped: dict[str, dict[Hashable, ExecutionPlan]] = {}
        self._interned: dict[tuple[Any, ...], ExecutionPlan] = {}
        self._family_keys: dict[Hashable, Hashable] = {}  # one tuple per call family, shared by its exact keys
        self._lock = forksafe.lock(self, reentrant=True)
        self.version = 0
        self.on_miss: list[Callable[[str, SelectionContext], None]] = []
        self.baked: Any = None  # a layerzero.solve.PlanTable in force, or None
        self._registered = {s.kernel_id for s in self.kernels}  # what forget_unregistered compares with
        me = weakref.ref(self)  # listeners on shared objects must not keep a derived runtime alive

        def on(reason: str) -> Callable[[], None]:
            def changed() -> None:
                rt = me()
                if rt is None:
                    return
                if reason == "kernel registry changed":
                    rt.forget_unregistered()
                if rt.parent is not None:  # a derived runtime: its parent logs the change, it only drops plans
                    rt.invalidate()
                elif reason == "policy":
                    rt._on_policy_change()
                else:
                    rt.invalidate(reason)
            return changed

        listening = ((self.kernels, on("kernel registry changed")), (self.backends, on("backend registry changed")),
                     (self.policy, on("policy")))
        for source, listener in listening:
            source.add_listener(listener)
        # a runtime that goes away (a dispatcher's derived one) takes its listeners off the shared objects
        weakref.finalize(self, _stop_listening, listening)

    def forget_unregistered(self) -> None:
        """Drop the breakers and per-kernel counters of kernels unregistered since the last change: an open
        breaker of a removed kernel was exported as fenced off for good (its alert never cleared), and kernels
        churned through the registry grew both without bound."""
        now = {s.kernel_id for s in self.kernels}
        gone, self._registered = self._registered - now, now
        if gone:
            self.breakers.forget(gone)
            self.telemetry.forget_kernels(gone)

    def derive(self, config: DispatchConfig) -> Runtime:
        """A runtime for a dispatcher with a config of its own on this runtime's registries: the same
        kernels, backends, policy and measurements, but its own config, plan cache, breakers and telemetry,
        so the dispatcher's settings never change what ``lz.*`` does."""
        return Runtime(self.kernels, self.backends, config, clock=self.clock, parent=self)

    @property
    def last_run(self) -> threading.local:
        """``last_run.value = (plan, index)`` of the kernel that ran on the slow and fallback paths."""
        return self.executor.last_run

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
            self.verifier.first_calls = config.verify_first_calls
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
        return self.verifier.first_calls

    @verify_first_calls.setter
    def verify_first_calls(self, n: int) -> None:
        self.verifier.first_calls = Verifier.checked(n)
        self.invalidate("verify mode changed")

    def invalidate(self, reason: str = "") -> None:
        """Drop every cached plan (O(1)); the next call of each shape selects again."""
        self.plans.invalidate()
        with self._lock:  # with store_scoped: a plan selected before this never lands in a scope's dict after it
            for plans in list(self._scoped.values()):
                plans.clear()  # live scopes hold these dicts: empty them in place
            self.version += 1
        self._interned = {}
        self._family_keys = {}
        self.families.clear()
        self.telemetry.record_invalidation()
        if reason:
            log_event("cache_invalidated", reason=reason)

    def reset(self) -> None:
        """Back to a fresh state, for tests: no policy, no baked table, fresh breakers, no verified kernels,
        an empty plan cache (the config, measurement source and miss hooks stay)."""
        self.policy.clear()
        self.baked = None
        self.breakers.clear()
        self.verifier.passed.clear()
        self.executor.distrusted.clear()
        self.invalidate("runtime reset")

    def forget(self, key: Hashable) -> None:
        """Drop one plan key from the shared cache and from every policy scope's plans."""
        self.plans.discard(key)
        for scoped in list(self._scoped.values()):
            scoped.pop(key, None)

    def _on_policy_change(self) -> None:
        self.telemetry.record_policy_change()
        log_event("policy_change", digest=self.policy.policy.digest, rules=len(self.policy.policy.rules),
                  document=self.policy.document_source)
        self.invalidate("policy changed")

    def _on_breaker(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        self.telemetry.record_breaker(breaker.kernel_id, old.name, new.name)

    # -- policy & selection ------------------------------------------------------
    def current_policy(self) -> Policy:
        scope = SCOPE.get()
        if scope is None:
            return self.policy.policy
        base = self.policy.policy
        if scope.hides:  # `with lz.unlock(...)` / `with lz.enabled(...)` lift process-wide rules in the block
            base = Policy(tuple(r for r in base.rules if not any(h(r) for h in scope.hides)))
        return scope.policy + base

    def scoped_plans(self, policy: Policy) -> dict[Hashable, ExecutionPlan]:
        """The plans of calls under scoped ``policy`` (one dict per policy digest, each at most ``cache_size``
        plans). At most :data:`SCOPED_POLICIES` digests keep theirs: the oldest is emptied and dropped to make
        room (a scope still alive that used it misses once, and its next plans go to a dict kept here, so
        invalidation still reaches every plan a call can read)."""
        d = self._scoped.get(policy.digest)
        if d is None:
            with self._lock:
                while len(self._scoped) >= SCOPED_POLICIES:
                    self._scoped.pop(next(iter(self._scoped))).clear()
                d = self._scoped.setdefault(policy.digest, {})
        return d

    def store_scoped(self, policy: Policy, scope: Any, entries: list[tuple[Hashable, ExecutionPlan]],
                     version: int) -> None:
        """Cache plans selected under scoped ``policy`` in its dict (at most ``cache_size``) and make it the
        scope's, unless the runtime moved past ``version`` (the one they were selected at). Under the lock, so a
        dict :meth:`scoped_plans` drops meanwhile never becomes a scope's (it would be out of invalidation's
        reach), and an invalidation clears either before the store or after it."""
        with self._lock:
            if self.version != version:
                return
            target = self.scoped_plans(policy)
            for k, p in entries:
                if len(target) < max(self.config.cache_size, 1):
                    target[k] = p
            scope.plans = target

    def visible_plans(self) -> dict[Hashable, ExecutionPlan]:
        """The plans a call in this context reads: the active scope's, else the shared cache's."""
        scope = SCOPE.get()
        return self.plans.data if scope is None else scope.plans

    def _measurements(self, operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]
                      ) -> dict[str, Measurement]:
        src = self.measurement_source
        if src is None and self.parent is not None:
            src = self.parent.measurement_source
        if src is None:
            return {}
        try:
            return src(operation, ctx, specs)
        except Exception as exc:  # measurements are advisory: never fail a call over them
            log_event("perf_lookup_failed", operation=operation, error=type(exc).__name__, message=message_of(exc),
                      action="using priorities")
            return {}

    def select(self, operation: str, ctx: SelectionContext, *, policy: Policy | None = None,
               use_measurements: bool = True) -> Selection:
        """Run the selection engine with this runtime's policy and breakers."""
        return self.engine.select(operation, ctx, policy=self.current_policy() if policy is None else policy,
                                  breaker_open=self.breakers.is_open if self.config.circuit_breaker_enabled else None,
                                  use_measurements=use_measurements)

    def baked_selection(self, operation: str, ctx: SelectionContext, policy: Policy | None = None
                        ) -> Selection | None:
        """A selection straight from the baked plan table (no scoring), or None when it has no usable entry.

        Policy rules for the operation win over the table (the table is ignored for it)."""
        table = self.baked  # read once: another thread may uninstall it meanwhile
        if table is None:
            return None
        pol = policy if policy is not None else self.current_policy()
        if pol.rules and pol.for_operation(operation):
            return None
        ids = table.lookup(operation, ctx)
        if not ids:
            return None
        # what may run this call (available, within its declared constraints, breaker closed), unscored: the
        # table's kernels first, every other one a fallback behind them, as behind a lock
        eligible = self.engine.select(operation, ctx, policy=pol, raise_on_empty=False, use_measurements=False,
                                      breaker_open=self.breakers.is_open if self.config.circuit_breaker_enabled
                                      else None).ranked
        by_id = {s.kernel_id: s for s in eligible}
        ranked = [by_id[kid] for kid in ids if kid in by_id]
        if not ranked:
            return None
        ranked += [s for s in eligible if s.kernel_id not in ids]
        return Selection(operation, ctx, tuple(ranked), (), "baked plan table", pol.digest)

    # -- plans -------------------------------------------------------------------
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
        sel = self.baked_selection(operation, ctx, policy)
        if sel is None:
            sel = self.select(operation, ctx, policy=policy)
        cfg = self.config
        ranked = sel.ranked[: 1 + cfg.max_fallback_attempts if cfg.enable_fallback else 1]
        primary = ranked[0]
        special_key, fn = primary.specialize(ctx) if primary.specialize is not None else (None, primary.impl)
        intern_key = (operation, tuple(k.kernel_id for k in ranked), special_key, sel.locked_by, sel.policy_digest,
                      self.version)
        plan = self._interned.get(intern_key)
        if plan is None:
            plan = ExecutionPlan(operation, op, ranked, ctx, locked_by=sel.locked_by, policy_digest=sel.policy_digest)
            plan.use(fn)
            self.bind(plan)
            if len(self._interned) >= 4 * max(cfg.cache_size, 256):  # sharing, bounded by the caches it serves
                self._interned = {}
            self._interned[intern_key] = plan
        self.telemetry.record_selection(operation, plan.kernel_id)
        return plan, sel

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
        plan.stats = self.telemetry.kernel(spec.kernel_id, plan.operation) if cfg.enable_telemetry else SINK
        if plan.op.consumes_rng(plan.operation, plan.context):
            # the fast path's kernel must hand the generator back as it found it when it raises, so that the
            # fallback draws the same numbers (the executor does the same between kernels)
            plan.fn = _restoring_generator(plan.fn, plan.op, plan.operation)
            plan.direct = None
        if guard_grad or guard_capture or guard_det:
            def run(*args: Any) -> Any:  # flags the cache key does not carry: re-select when they trip
                if guard_trips(args, guard_grad, guard_capture, guard_det):
                    return rt.run_uncached(plan.op, plan.operation, args)
                return rt.executor.run(plan, args, 0)
            plan.run = run
            plan.gate = ALWAYS_SLOW
        else:
            plan.run = lambda *args: rt.executor.run(plan, args, 0)
            if cfg.latency_histogram or self.verifier.pending(spec.kernel_id):
                plan.gate = ALWAYS_SLOW
            elif cfg.circuit_breaker_enabled:
                plan.gate = self.breakers.get(spec.kernel_id)
            else:
                plan.gate = NEVER_SLOW
        if plan.context.is_contiguous and spec.requires_contiguous:
            # Only the primary needs the per-call stride check: fallbacks run on the slow path, which
            # checks strides before calling a kernel that needs contiguous inputs (Executor.run).
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
                return rt.executor.run(alt, args, 0, check_output=True)
            return rt.call_plan(other[0], args)

        if op.family == "attention":  # the common case, inlined; is_contiguous() is the cheaper call
            def fn_checked(q: Any, k: Any, v: Any, *rest: Any) -> Any:
                if (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or (
                        q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1):
                    return fn(q, k, v, *rest)
                return elsewhere((q, k, v, *rest))
        else:
            def fn_checked(*args: Any) -> Any:
                return fn(*args) if contiguous(op, args) else elsewhere(args)

        def run_checked(*args: Any) -> Any:
            return run(*args) if contiguous(op, args) else elsewhere(args)

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
        out = self.executor.run(plan, args, 0, check_output=True)
        if not self.config.enable_cache or key is None or self.version != version:
            return out  # a policy / registry change during this call invalidated the cache: keep the plan out
        if family is not None and type(key) is tuple and key and key[0] == family:
            family = self._family_keys.setdefault(family, family) if len(self._family_keys) < 10_000 else family
            key = (family, *key[1:])  # exact keys of one family share its tuple (memory per plan)
        entries = [(key, plan)]
        if family is not None and getattr(self.last_run, "value", None) == (plan, 0):
            free = self.families.plan(plan, sel, family, policy)
            if free is not None:
                entries.append((family, free))
        if scope is None:
            for k, p in entries:
                plans.put(k, p, version=cache_version)
        else:
            self.store_scoped(policy, scope, entries, version)
        return out

    def run_exact(self, op: OpDef, operation: str, args: tuple[Any, ...]) -> Any:
        """Run a call through its exact-shape plan (selected on first need), as the hot path would."""
        try:  # a call its contract's guards do not admit goes uncached: the miss validates it
            key = op.keys(operation, args)[1] if op.admits(operation, args) else None
            plan = None if key is None else self.visible_plans().get(key)
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
            return self.executor.recover(plan, args, 0, exc)

    def run_uncached(self, op: OpDef, operation: str, args: tuple[Any, ...]) -> Any:
        op.validate(operation, args)
        ctx = op.context(operation, args)
        plan = self.plan_for(op, operation, ctx)
        self.telemetry.record_miss()
        return self.executor.run(plan, args, 0, check_output=True)

    # -- the collaborators' public faces (kept for dispatchers, inspection and tests) ---------------------
    def run_plan(self, plan: ExecutionPlan, args: tuple[Any, ...], start: int, *, check_output: bool = False,
                 timing: list[int] | None = None) -> Any:
        """:meth:`Executor.run`: the plan's kernels from ``start`` under the failure contract."""
        return self.executor.run(plan, args, start, check_output=check_output, timing=timing)

    def recover(self, plan: ExecutionPlan, args: tuple[Any, ...], index: int, exc: Exception) -> Any:
        """:meth:`Executor.recover`: the fast path's kernel raised."""
        return self.executor.recover(plan, args, index, exc)

    def shape_free_reason(self, sel: Selection, policy: Policy | None = None) -> str | None:
        """:meth:`FamilyPlans.reason`: why ``sel`` cannot serve every shape of its family, or None."""
        return self.families.reason(sel, policy)

    def family_plan(self, plan: ExecutionPlan, sel: Selection, family: Hashable, policy: Policy | None = None
                    ) -> ExecutionPlan | None:
        """:meth:`FamilyPlans.plan`: the shape-free plan to cache under ``family``, or None."""
        return self.families.plan(plan, sel, family, policy)

    def family_dropped(self, family: Hashable) -> bool:
        """Whether a shape of ``family`` needed another kernel since the last invalidation, so the family
        keeps one plan per shape."""
        return self.families.dropped(family)

    def circuit_stats(self, kernel_id: str) -> Any:
        return self.breakers.get(kernel_id).stats()


def _restoring_generator(fn: Callable[..., Any], op: OpDef, operation: str) -> Callable[..., Any]:
    """``fn`` for a plan whose calls draw random numbers: when it raises, the generator it drew from is set
    back to its state before the call, so the fallback kernel draws the same numbers."""
    def run(*args: Any) -> Any:
        generator = op.generator(operation, args)
        if generator is None:
            return fn(*args)
        state = generator.get_state()
        try:
            return fn(*args)
        except BaseException:
            generator.set_state(state)
            raise
    return run


_runtime: Runtime | None = None
_runtime_lock = forksafe.module_lock()


def _outside_layerzero() -> int:
    """The ``stacklevel`` of the first frame outside layerzero and the import machinery (the user's ``import
    layerzero``, or their first call), for a warning to name the user's line."""
    frame, level = sys._getframe(1), 1
    package = __file__.rsplit("runtime", 1)[0]
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith("<frozen importlib"):  # warnings skips these frames itself: not counted
            frame = frame.f_back
            continue
        if not name.startswith(package):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _stop_listening(listening: tuple[tuple[Any, Callable[[], None]], ...]) -> None:
    for source, listener in listening:
        source.remove_listener(listener)


#: Scoped policies (distinct digests) whose plans a runtime keeps at once (see Runtime.scoped_plans).
SCOPED_POLICIES = 64


#: Why ``LAYERZERO_*`` variables were left at their defaults when the global runtime was made (doctor shows it).
ENV_PROBLEMS: list[str] = []


def get_runtime() -> Runtime:
    """The global runtime shared by ``lz.*`` and the global dispatcher (made on ``import layerzero``, from the
    ``LAYERZERO_*`` variables; one that cannot be read keeps its default, with a warning)."""
    global _runtime
    rt = _runtime
    if rt is None:
        with _runtime_lock:
            if _runtime is None:
                config, problems = DispatchConfig.from_env_keeping_defaults()
                for problem in problems:
                    warnings.warn(f"layerzero: {problem}; the default is used", RuntimeWarning,
                                  stacklevel=_outside_layerzero())
                ENV_PROBLEMS[:] = problems
                _runtime = Runtime(config=config)
            rt = _runtime
    return rt
