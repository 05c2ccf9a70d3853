"""The base :class:`Dispatcher`: inputs dict -> kernel arguments -> plan -> kernel -> :class:`DispatchResult`.

Every dispatcher runs on a :class:`~layerzero.runtime.Runtime`. Dispatchers
built on the global registries use the global runtime (:func:`get_runtime`),
so they share its plan cache, circuit breakers, telemetry and policy with
``lz.*``: a breaker opened through ``dispatch()`` is open for
``lz.attention`` too. A dispatcher given a config of its own gets a runtime
derived from the global one (:func:`~layerzero.dispatch.runtimes.runtime_for`):
the same registries and policy, its own config, cache and breakers.

The base class implements selection-based dispatch; subclasses change where
plans come from by overriding :meth:`Dispatcher.build_plan` (the config
dispatcher turns its rules and fallback chains into a plan with
:meth:`Dispatcher.make_plan`). The cached path mirrors the ``lz.*`` one: the
call family's shape-free key (then the exact-shape key) from tensor metadata,
one cache read, the breaker flag, the kernel call; a miss on the shared cache
caches a shape-free plan for the family when selection cannot depend on shapes
(:meth:`Runtime.family_plan`), as ``lz.*`` does. Attention inputs given by the
same names as before (``{"q": q, "k": k, "v": v}``), with the same options if any
(``layout="BSHD"``, ``is_causal=True``; keyed by exact type, see
:func:`~layerzero.dispatch.generic.kwargs_key`), skip the dict mapping altogether
(:class:`~layerzero.dispatch.generic.AttentionInputs`).
Fallback, breaker bookkeeping and error reports are the runtime's
(:meth:`Runtime.run_plan`, :meth:`Runtime.recover`), never duplicated here.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from types import MethodType
from typing import Any

from layerzero.context import SelectionContext
from layerzero.runtime.config import DispatchConfig, DispatchMode
from layerzero.dispatch.generic import (
    DISPATCH_DOC,
    GENERIC,
    NO_MEMO,
    AttentionInputs,
    OpInputs,
    attention_inputs,
    compiled_dispatch,
    context_key,
    hot_key,
    keys_for,
    kwargs_key,
    kwargs_kernel,
    map_inputs,
    op_for_dispatch,
    op_inputs,
)
from layerzero.dispatch.result import (
    NOT_TIMED,
    DispatchResult,
    DispatchTiming,
    stamp,
)
from layerzero.errors import InvalidInputError
from layerzero.ops import operation_problem
from layerzero.ops.base import OpDef
from layerzero.policy.model import Policy
from layerzero.policy.scope import LIVE, SCOPE
from layerzero.dispatch.observe import Observable
from layerzero.dispatch.runtimes import runtime_for
from layerzero.runtime import Runtime, get_runtime
from layerzero.selection.cache import MVCCPlanCache, PlanCache
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec

__all__ = ["Dispatcher", "DispatchResult", "DispatchTiming", "runtime_for", "PlanStore", "compile_dispatch"]

PlanStore = PlanCache | MVCCPlanCache
perf_ns = time.perf_counter_ns
new_result = DispatchResult.__new__  # the hot paths fill the slots themselves (no __init__ frame)
_UNSEEN: Any = object()
#: a ``dispatch`` method -> its compiled form (layerzero.accel): see ``Dispatcher.__init__`` and compile_dispatch.
COMPILED_FORMS: dict[Any, Any] = {}


# HOT_PATH_NOTES for ``Dispatcher.dispatch``: (1) CPU tensors of the dtype seen last use the shape-free plan
# this dispatcher found for them, with no key to build; the memo goes with every runtime change (_sync). A
# family plan the runtime takes back meanwhile still serves (selection picks its kernel for every shape of the
# family); a call its kernel cannot take goes the exact-shape way through Runtime.recover, dropping the memo.
# First the contract's shape relations must hold (the entry's scalars passed its guards when it was made): a
# call they do not admit never reaches a cached plan and takes the validating full path.


class Dispatcher(Observable):
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

    # What the hot path reads on every call lives in slots (read at a fixed offset, by the compiled form too);
    # everything else in the instance dict.
    __slots__ = ("runtime", "_version", "_timed", "_fast", "_cache", "_mode_value", "__dict__", "__weakref__")

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
        # operation (or generic.kwargs_key of it and its options) -> the input names its calls use, for the
        # cached hot path (attention only; see generic.AttentionInputs), or None. Filled after a call went the
        # full way; emptied by _sync.
        self._fast: dict[Hashable, AttentionInputs | None] = {}
        self._version = runtime.version
        self._config_seen = runtime.config
        self._timed = runtime.config.record_timing
        self._mode_value = self.mode.value  # an enum's .value costs a descriptor call per dispatch
        self._bind_compiled()

    def _bind_compiled(self) -> None:
        """Bind the compiled form of this class's dispatch (layerzero.accel) as this dispatcher's ``dispatch``
        attribute (class attributes stay Python functions, which torch.compile traces): it serves the hot path's
        cached hits and hands every other call to the Python method. Only where it can serve: a class that keeps
        the registered dispatch, reading the shared cache or an own PlanCache / MVCCPlanCache (static: its table
        is its cache). The bound form makes a reference cycle (the dispatcher holds it, it holds the dispatcher):
        a dispatcher is freed by the cyclic garbage collector (the hot-reload one drops its bound form on
        ``close()``, so that a closed one goes with its last reference)."""
        form = COMPILED_FORMS.get(type(self).dispatch)
        if form is not None and (self._cache is None or type(self._cache) in (PlanCache, MVCCPlanCache)):
            self.dispatch = MethodType(form, self)  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("dispatch", None)  # bound to this object: a copy binds its own (__setstate__)
        state.update((name, getattr(self, name)) for name in Dispatcher.__slots__
                     if not name.startswith("__") and hasattr(self, name))  # the slots, but the dict and weakref
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._bind_compiled()

    # -- configuration -------------------------------------------------------------------------------
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
        self._fast = {}
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
                  locked_by: str | None = None, policy_digest: str = "", source: str = "dispatch",
                  specialize_for: SelectionContext | None = None) -> ExecutionPlan:
        """A bound plan running ``kernels`` in order (first choice, then fallbacks), trimmed to the config's
        ``max_fallback_attempts`` (or to one kernel when ``enable_fallback`` is off). ``specialize_for``: the
        context of the one exact call shape the plan serves (built from its arguments), for which the first
        kernel may run its specialized form (``KernelSpec.specialize``: PyTorch's function itself, as ``lz.*``
        plans do)."""
        cfg = self.runtime.config
        specs = tuple(kernels)[: 1 + cfg.max_fallback_attempts if cfg.enable_fallback else 1]
        if not specs:
            raise InvalidInputError(f"{operation}: a plan needs at least one kernel")
        if op is GENERIC:
            specs = tuple(kwargs_kernel(s) for s in specs)
        plan = ExecutionPlan(operation, op, specs, ctx, locked_by=locked_by, policy_digest=policy_digest, source=source)
        if specialize_for is not None and op is not GENERIC and specs[0].specialize is not None:
            plan.use(specs[0].specialize(specialize_for)[1])
        self.runtime.bind(plan)
        return plan

    def _op(self, operation: str) -> OpDef:
        if not isinstance(operation, str):
            return op_for_dispatch(operation)  # raises InvalidInputError naming it
        op = self._ops.get(operation)
        if op is None:
            op = op_for_dispatch(operation)
            problem = operation_problem(operation, (s.operation for s in self.runtime.kernels))
            if problem is not None:
                raise InvalidInputError(f"dispatch(): {problem}")
            if len(self._ops) < 4096:
                self._ops[operation] = op
        return op

    # -- dispatch ------------------------------------------------------------------------------------
    def dispatch(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None = None,
                 **kwargs: Any) -> DispatchResult:
        """Run ``operation`` on ``inputs`` with the kernel this dispatcher picks."""
        rt = self.runtime
        if rt.version != self._version:
            self._sync()
        if type(inputs) is dict:
            # ---- cached hot path: q, k, v by known names -> plan -> kernel (as lz.attention) -----------
            t0 = perf_ns() if self._timed else 0
            try:  # None for an operation seen without usable names; options key apart (generic.kwargs_key)
                hot = self._fast[operation if not kwargs else kwargs_key(operation, kwargs)]
            except (KeyError, TypeError):  # not seen yet, or unhashable (the full path reports it)
                hot = None
            if hot.__class__ is OpInputs:  # an operation with a call contract, by known names
                r = self._hot_op(hot, operation, inputs, context, t0)
                if r is not None:
                    return r
            elif hot is not None and len(inputs) == 3:
                try:
                    q = inputs[hot.q_name]
                    k = inputs[hot.k_name]
                    v = inputs[hot.v_name]
                    if hot.bshd:  # BHSD views, as map_inputs hands them over
                        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    plan = None
                    if hot.find is not None and context is None and self._cache is None and not LIVE.scopes \
                            and rt.plans.ttl is None:
                        # the compiled lookup (layerzero.accel): the contract's keys and guards, as lz.attention
                        plan = hot.find(rt.plans.data, operation, q, k, v, hot.is_causal, hot.dropout_p, hot.window)
                    if plan is None:
                        plan = self._hot_plan(hot, operation, q, k, v, context)
                    kernel_id = plan.kernels[0].kernel_id if plan is not None else None
                except (KeyError, AttributeError, TypeError, IndexError, RuntimeError):  # other names, not tensors
                    plan = None
                if plan is not None:
                    t2 = perf_ns() if t0 else 0
                    if plan.gate.blocked:
                        return self._hot_detour(plan, hot, q, k, v, None, operation, t0, t2)
                    plan.stats.calls += 1
                    try:
                        if hot.direct_ok and plan.direct is not None:  # PyTorch's SDPA itself
                            out = plan.direct(q, k, v)
                        else:
                            out = plan.fn(q, k, v, None, hot.is_causal, hot.dropout_p, hot.scale, hot.window)
                    except Exception as exc:
                        return self._hot_detour(plan, hot, q, k, v, exc, operation, t0, t2)
                    r = new_result(DispatchResult)
                    r.output = out.transpose(1, 2) if hot.bshd else out
                    r.kernel_id, r.operation = kernel_id, operation
                    r.fallback_used, r.attempts, r.cached = False, 1, True
                    r.mode = self._mode_value
                    r.stamps = (t0, t0, t2, t2, (t := perf_ns()), t) if t0 else NOT_TIMED
                    return r
        return self._dispatch(operation, inputs, context, kwargs)

    def _hot_plan(self, hot: AttentionInputs, operation: str, q: Any, k: Any, v: Any, context: Any
                  ) -> ExecutionPlan | None:
        """A hot-path call's cached plan, looked up in Python: without the compiled path, for tensors only Python
        reads, for a dispatcher with its own cache or a TTL, in a policy scope, with a context. None: take the full
        path. What the contract's shape guard does not admit raises ``KeyError`` (so does the full path's
        mapping)."""
        if not hot.shapes_admit(operation, q, k, v, None, None, None, None, None):
            raise KeyError("not admitted")
        if context is not None:  # a plan per context object and exact call, as _dispatch keys it
            if LIVE.scopes:
                return None
            key = (hot.family(operation, q), q.shape, k.shape, v.shape, None)
            plan = self.plan_cache.peek(context_key(operation, context, key))
            return plan if plan is not None and plan.context is context else None
        dtype, plan, _ = hot.memo  # (1) in HOT_PATH_NOTES
        if q.dtype is dtype and q.is_cpu and not LIVE.scopes:
            return plan
        family = (operation, q.dtype, q.is_cpu or q.device, hot.is_causal, hot.dropout_p, hot.window, None)
        cache = self._cache
        if cache is not None:  # an own cache holds no scoped plans
            if LIVE.scopes and SCOPE.get() is not None:
                return None
            return cache.peek((family, q.shape, k.shape, v.shape, None))
        scope = SCOPE.get() if LIVE.scopes else None
        if scope is not None:
            data = scope.plans
            return data.get(family) or data.get((family, q.shape, k.shape, v.shape, None))
        plans = self.runtime.plans
        if plans.ttl is not None:  # TTL: the checked read
            return plans.get(family) or plans.get((family, q.shape, k.shape, v.shape, None))
        data = plans.data  # the lock-free read lz.* does (no LRU refresh)
        plan = data.get(family)
        if plan is not None and q.is_cpu:  # remembered until the runtime changes
            hot.memo = (q.dtype, plan, plan.kernels[0].kernel_id)
        return plan or data.get((family, q.shape, k.shape, v.shape, None))

    def _hot_detour(self, plan: ExecutionPlan, hot: AttentionInputs, q: Any, k: Any, v: Any, exc: Exception | None,
                    operation: str, t0: int, t2: int) -> DispatchResult:
        """A hot-path attention call its cached plan did not serve at once: :meth:`_hot_op_detour`, its memos
        dropped where the plan may have gone, the BSHD output transposed back."""
        if exc is not None and plan.family is not None:  # the runtime may take the family plan back
            hot.memo = NO_MEMO
        hot.cmemo = None  # the compiled path's exact-key memo: read the cache again
        return self._hot_op_detour(plan, hot.args(q, k, v), exc, operation, t0, t2, hot.bshd)

    def _hot_op(self, hot: OpInputs, operation: str, inputs: dict[str, Any], context: Any, t0: int
                ) -> DispatchResult | None:
        """A hot-path call of an operation with a call contract (see :class:`OpInputs`): its arguments filled by
        name, its plan from the contract's lookup in the shared cache (no policy scope, no TTL), or by its exact
        key (with a context: the context's) in this dispatcher's own cache. None: take the full path (other names,
        a None input, no plan)."""
        if len(inputs) != hot.size or LIVE.scopes:
            return None
        try:
            args = hot.fill(inputs)
            if args is None:
                return None
            if context is None and self._cache is None:
                plans = self.runtime.plans
                plan = hot.lookup(plans.data, operation, *args)[0] if plans.ttl is None else None
            elif hot.admits(operation, *args):
                key = hot.keys(operation, *args)[1]
                plan = self.plan_cache.peek(key if context is None else context_key(operation, context, key))
                if plan is not None and context is not None and plan.context is not context:
                    plan = None
            else:
                plan = None
        except Exception:  # other names, a malformed value: the full path maps and reports it
            return None
        if plan is None:
            return None
        t2 = perf_ns() if t0 else 0
        if plan.gate.blocked:
            return self._hot_op_detour(plan, args, None, operation, t0, t2)
        plan.stats.calls += 1
        try:
            out = plan.fn(*args)
        except Exception as exc:
            return self._hot_op_detour(plan, args, exc, operation, t0, t2)
        timing = stamp(DispatchTiming, (t0, t0, t2, t2, (t := perf_ns()), t)) if t0 else NOT_TIMED
        return self._result(out, plan, None, operation, timing, True)

    def _hot_op_detour(self, plan: ExecutionPlan, args: tuple[Any, ...], exc: Exception | None, operation: str,
                       t0: int, t2: int, bshd: bool = False) -> DispatchResult:
        """A hot-path call its cached plan did not serve at once: the gate is blocked (``exc`` None) or the kernel
        raised ``exc``. Runs it the slow way (:meth:`_run_slow`); ``bshd``: the output goes back to BSHD."""
        out, ran = self._run_slow(plan, args, exc)
        if bshd:
            out = out.transpose(1, 2)
        timing = stamp(DispatchTiming, (t0, t0, t2, t2, (t := perf_ns()), t)) if t0 else NOT_TIMED
        return self._result(out, plan, ran, operation, timing, True)

    def _dispatch(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None,
                  kwargs: dict[str, Any]) -> DispatchResult:
        """``dispatch`` past its hot path: map the inputs, build the keys, read the cache, select on a miss."""
        rt = self.runtime
        t0 = perf_ns() if self._timed else 0
        try:
            op = self._ops.get(operation) or self._op(operation)
        except TypeError:  # an unhashable operation: op_for_dispatch reports it as bad input
            op = op_for_dispatch(operation)
        args, bshd = map_inputs(op, operation, inputs, kwargs)
        if context is None:
            family, key = keys_for(op, operation, args)
        else:  # a plan per context object and exact call (the key decides validity, as for lz.*)
            family, key = None, context_key(operation, context, keys_for(op, operation, args)[1])
        if not op.admits(operation, args):  # the contract's guards fail: validate on the full path, cache nothing
            family = key = None
        t1 = perf_ns() if t0 else 0
        # ---- cached path: key (or the family's shape-free key) -> plan -> kernel ------------------------
        scope = SCOPE.get() if LIVE.scopes else None
        try:
            if key is None:
                plan = None
            elif self._cache is not None:
                plan = self._cache.get(key) if scope is None else None  # an own cache holds no scoped plans
            else:
                plans = rt.plans if scope is None else scope.plans
                plan = plans.get(family) if family is not None else None
                if plan is None:
                    plan = plans.get(key)
        except TypeError:  # an unhashable value in the key (window=[4]): validation names it on the slow path
            plan = key = family = None
        t2 = t3 = perf_ns() if t0 else 0
        if plan is not None and (context is None or plan.context is context):
            if plan.gate.blocked:
                out, ran = self._run_slow(plan, args, None)
            else:
                plan.stats.calls += 1
                try:
                    out = plan.fn(*args)
                    ran = None
                except Exception as exc:
                    out, ran = self._run_slow(plan, args, exc)
            cached = True
        else:
            # read before the policy: a change during this call keeps the plan out (the stores check them again,
            # under the cache's or the runtime's lock)
            versions = rt.version, (rt.plans if self._cache is None else self._cache).version
            plan, ctx, policy = self._select(op, operation, args, context)
            t3 = perf_ns() if t0 else 0
            out, ran = self._first_run(plan, args)
            if rt.version == versions[0]:
                self._store(key, plan, scope, versions)
                if family is not None and self._cache is None and ran is not None and ran[0] is plan \
                        and ran[1] == 0:
                    self._store_family(family, plan, ctx, policy, scope, versions)
            cached = False
        # -------------------------------------------------------------------------------------------
        t4 = perf_ns() if t0 else 0
        if bshd:
            out = out.transpose(1, 2)
        timing = stamp(DispatchTiming, (t0, t1, t2, t3, t4, perf_ns())) if t0 else NOT_TIMED
        self._learn(op, operation, inputs, kwargs)
        return self._result(out, plan, ran, operation, timing, cached)

    def _learn(self, op: OpDef, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
        """After a call went the full way: the hot-path entry for its operation and options
        (the input names of an attention call, see :func:`attention_inputs`), or, without options, None when
        its calls map in full (the hot path then reads None instead of missing the key). Options outside
        ``generic.HOT_OPTIONS`` get no entry at all (a value may be a tensor: nothing is kept of it)."""
        key = hot_key(operation, kwargs)
        if key is None:
            return
        found = self._fast.get(key, _UNSEEN)
        if found is _UNSEEN or (found is None and op.family == "attention"):
            fast = attention_inputs(op, operation, inputs, kwargs) if op.family == "attention" else (
                None if kwargs else op_inputs(op, operation, inputs))
            if (found is _UNSEEN and not kwargs) or fast is not None:
                if len(self._fast) < 4096:
                    self._fast[key] = None if fast is None else fast.copy()

    def _result(self, out: Any, plan: ExecutionPlan, ran: tuple[ExecutionPlan, int] | None, operation: str,
                timing: DispatchTiming, cached: bool) -> DispatchResult:
        """The result of a call ``plan`` served; ``ran`` is the ``(plan, index)`` that produced ``out`` when
        the runtime's runner says so (None: the plan's first kernel, on the fast path)."""
        if ran is None:
            return DispatchResult(out, plan.kernels[0].kernel_id, operation, False, 1, timing, cached,
                                  self._mode_value)
        used, index = ran
        return DispatchResult(out, used.kernels[index].kernel_id, operation, index > 0, index + 1, timing, cached,
                              self._mode_value)

    def _run_slow(self, plan: ExecutionPlan, args: tuple[Any, ...], exc: Exception | None
                  ) -> tuple[Any, tuple[ExecutionPlan, int] | None]:
        """A cached plan off the fast path: its gate is blocked (``exc`` None: the runtime's slow runner with
        fallback, breaker probes, timing and checks), or its kernel raised ``exc`` (the runtime recovers).
        Returns the output and the ``(plan, index)`` that produced it, when known."""
        rt = self.runtime
        note = rt.last_run
        note.value = None
        out = plan.run(*args) if exc is None else rt.recover(plan, args, 0, exc)
        ran = note.value
        if ran is None and plan.family is not None:
            # A shape-free plan hands calls it cannot take to the call's exact-shape plan; when that ran its
            # first kernel on the fast path the runtime notes nothing: name it from the cache.
            try:
                exact = rt.visible_plans().get(plan.op.keys(plan.operation, args)[1])
            except Exception:
                exact = None
            if exact is not None:
                ran = (exact, 0)
        return out, ran

    def _select(self, op: OpDef, operation: str, args: tuple[Any, ...], context: SelectionContext | None
                ) -> tuple[ExecutionPlan, SelectionContext, Policy]:
        """Cache miss: validate, build the context (unless given), choose the plan. Returns the plan, the
        context and the policy it was chosen under."""
        if context is not None and not isinstance(context, SelectionContext):
            raise InvalidInputError(f"dispatch({operation!r}): context must be a SelectionContext, "
                                    f"got {type(context).__name__}")
        op.validate(operation, args)
        real = op.context(operation, args)
        policy = self.runtime.current_policy()
        if context is None:
            plan = self.build_plan(op, operation, real, policy)
        else:
            plan = self._plan_for_context(op, operation, args, context, real, policy)
        self.runtime.telemetry.record_miss()
        return plan, real if context is None else context, policy

    def _plan_for_context(self, op: OpDef, operation: str, args: tuple[Any, ...], context: SelectionContext,
                          real: SelectionContext, policy: Policy) -> ExecutionPlan:
        """A call given ``context``: selection judges ``context``; the plan runs the call's own arguments. Its
        kernels are those of the selected list that accept the arguments (``real``, their context), the first
        one specialized for ``real`` (a specialization binds what it reads, a normalized shape or the causal
        flag: never from ``context``, which need not describe these arguments; the plan serves this exact call
        only). None accepts them: the context does not describe the inputs (``InvalidInputError`` with every
        kernel's reasons; no breaker counts it)."""
        chosen = self.build_plan(op, operation, context, policy)
        fit = [s for s in chosen.kernels if not s.check(real)]
        if not fit:
            why = "; ".join(f"{s.kernel_id}: {', '.join(str(r) for r in s.check(real))}" for s in chosen.kernels)
            raise InvalidInputError(f"dispatch({operation!r}): the given context does not describe the inputs "
                                    f"({op.describe(args)}): no kernel selected for it can run them ({why})")
        return self.make_plan(operation, op, fit, context, locked_by=chosen.locked_by,
                              policy_digest=chosen.policy_digest, source=chosen.source, specialize_for=real)

    def _first_run(self, plan: ExecutionPlan, args: tuple[Any, ...]) -> tuple[Any, tuple[ExecutionPlan, int] | None]:
        """A new plan's first call: with output checks, through the runtime's fallback runner."""
        note = self.runtime.last_run
        note.value = None
        out = self.runtime.run_plan(plan, args, 0, check_output=True)
        return out, note.value

    def _store(self, key: Hashable | None, plan: ExecutionPlan, scope: Any, versions: tuple[int, int]) -> None:
        """Cache a new plan, unless ``versions`` (the runtime's and the cache's, read before selection) moved."""
        rt = self.runtime
        if key is None or not rt.config.enable_cache:
            return
        if scope is None:
            (rt.plans if self._cache is None else self._cache).put(key, plan, version=versions[1])
        elif self._cache is None:  # scoped policy: the scope's own plan dict, as lz.* does
            rt.store_scoped(rt.current_policy(), scope, [(key, plan)], versions[0])

    def _store_family(self, family: Hashable, plan: ExecutionPlan, ctx: SelectionContext, policy: Policy,
                      scope: Any, versions: tuple[int, int]) -> None:
        """After a miss on the runtime's shared cache, cache a shape-free plan for the call's family too, as
        ``lz.*`` does (:meth:`Runtime.family_plan` decides whether selection can depend on shapes): later
        calls of any shape of the family skip selection."""
        rt = self.runtime
        if not (rt.config.shape_free_plans and rt.config.enable_cache):
            return
        if family in (rt.plans.data if scope is None else scope.plans):
            return  # the family has its plan (this call's v does not have k's size)
        try:
            sel = rt.select(plan.operation, ctx, policy=policy)
        except Exception:  # no verdict: keep one plan per shape
            return
        if sel.ranked[0].kernel_id != plan.kernel_id:
            return
        free = rt.family_plan(plan, sel, family, policy)
        if free is None:
            return
        if scope is None:
            rt.plans.put(family, free, version=versions[1])
        else:  # scoped policy: the scope's own plan dict, as lz.* does
            rt.store_scoped(policy, scope, [(family, free)], versions[0])

    def __call__(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None = None,
                 **kwargs: Any) -> Any:
        """``dispatch(...).output``."""
        return self.dispatch(operation, inputs, context, **kwargs).output

    def __repr__(self) -> str:
        where = "global runtime" if self.runtime is get_runtime() else "own runtime"
        return f"{type(self).__name__}(mode={self.mode.name}, {where})"


Dispatcher.dispatch.__doc__ = f"{Dispatcher.dispatch.__doc__}\n{DISPATCH_DOC}"


def compile_dispatch(cls: type[Dispatcher], kind: str) -> None:
    """Register the compiled form of ``cls.dispatch`` (:func:`~layerzero.dispatch.generic.compiled_dispatch`)."""
    form = compiled_dispatch(cls.dispatch, kind)
    if form is not None:
        COMPILED_FORMS[cls.dispatch] = form


compile_dispatch(Dispatcher, "select")
