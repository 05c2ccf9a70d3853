"""Shape-free plans: one plan for every shape of a call family, when selection cannot depend on shapes.

A call family is an operation with a dtype, a device and the flags in its plan key (causal, dropout, window,
mask kind, ...): the ``family`` of its :class:`~layerzero.ops.contract.CallContract`. When selection provably
picks the same kernel for every shape of a family (:meth:`FamilyPlans.reason` is None), the miss caches a
plan under the family key too and the op's hot path serves later calls of any shape from it without reading
shapes. A shape the family kernel then cannot run (GQA heads for ``torch_sdpa``, another hidden size for a
bound ``normalized_shape``) gives the family up (:meth:`FamilyPlans.drop`): once to a covering kernel, then
to exact-shape plans until the next invalidation.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from layerzero.context import SelectionContext
from layerzero.errors import first_line
from layerzero.policy.model import Policy
from layerzero.runtime.gates import NEVER_SLOW
from layerzero.selection.engine import CandidateDecision, Selection
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec, ReasonCode
from layerzero.telemetry.logs import log_event

if TYPE_CHECKING:
    from layerzero.runtime.core import Runtime

__all__ = ["FamilyPlans", "SHAPE_INDEPENDENT_REASONS"]

# Rejections that hold for every shape of a call family (its dtype, device and keyed flags decide them).
SHAPE_INDEPENDENT_REASONS = frozenset({
    ReasonCode.PLATFORM_MISMATCH, ReasonCode.SM_TOO_OLD, ReasonCode.SM_TOO_NEW, ReasonCode.DTYPE_UNSUPPORTED,
    ReasonCode.MASK_UNSUPPORTED, ReasonCode.CAUSAL_UNSUPPORTED, ReasonCode.WINDOW_UNSUPPORTED,
    ReasonCode.DROPOUT_UNSUPPORTED, ReasonCode.VARIANT_UNSUPPORTED, ReasonCode.BACKEND_UNAVAILABLE,
    ReasonCode.BACKEND_UNHEALTHY, ReasonCode.CIRCUIT_OPEN, ReasonCode.POLICY_DENIED, ReasonCode.POLICY_NOT_ALLOWED,
    ReasonCode.POLICY_LOCKED_OTHER, ReasonCode.GRAD_UNSUPPORTED, ReasonCode.NOT_DETERMINISTIC,
    ReasonCode.CUDA_GRAPH_UNSAFE, ReasonCode.COMPILE_UNSAFE,
})

_UNSET: Any = object()


class FamilyPlans:
    """Decides and makes shape-free plans for one runtime; its sets are emptied by :meth:`clear`."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.exact_only: set[Hashable] = set()  # families whose shape-free plan met a shape it cannot run
        self.widened: set[Hashable] = set()  # families whose shape-free plan gave way once to a covering kernel
        self.measured_memo: dict[tuple[Any, ...], str | None] = {}

    def clear(self) -> None:
        self.exact_only = set()
        self.widened = set()
        self.measured_memo = {}

    def dropped(self, family: Hashable) -> bool:
        """Whether a shape of ``family`` needed another kernel since the last invalidation."""
        return family in self.exact_only

    # -- the decision --------------------------------------------------------------------------------
    def reason(self, sel: Selection, policy: Policy | None = None) -> str | None:
        """Why ``sel`` cannot serve every shape of its call family from one plan, or None when it can.

        Selection picks the same kernel for every shape of the family when: the selected kernel is
        ``shape_free`` (it runs any shape or raises for one it cannot) and needs no per-call guard; no
        candidate that could outrank it was rejected for a reason that depends on shapes, unless the
        selected kernel ``covers`` it (runs its calls the same way); no measurement, baked plan table,
        conditional policy rule, online tuning or verify mode is in play (they all look at shapes), except
        measurements that rank the same kernel (or one it covers) first in every stored bucket of the
        family; and the config allows it.
        """
        rt = self.rt
        cfg = rt.config
        if not cfg.shape_free_plans or not cfg.enable_cache:
            return "shape_free_plans is off" if not cfg.shape_free_plans else "the plan cache is off"
        if cfg.latency_histogram or rt.verifier.first_calls:
            return "the latency histogram or verify mode checks each call on the slow path"
        if rt.baked is not None:
            return "a baked plan table is in force (it is keyed by shape buckets)"
        if any(getattr(h, "needs_every_shape", False) for h in rt.on_miss):
            return "online tuning measures each new shape bucket"
        primary = sel.ranked[0]
        if not primary.shape_free:
            return f"{primary.kernel_id} is not declared shape_free"
        if primary.requires_contiguous or not (primary.supports_autograd and primary.cuda_graph_safe
                                               and primary.deterministic):
            return f"{primary.kernel_id} needs a per-call guard (contiguity, grad, capture or determinism)"
        pol = policy if policy is not None else rt.current_policy()
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
        found = self.measured_memo.get(memo_key, _UNSET)
        if found is not _UNSET:
            return found  # type: ignore[no-any-return]
        reason = self._measured_reason_now(operation, ctx, primary, rules)
        if len(self.measured_memo) < 10_000:
            self.measured_memo[memo_key] = reason
        return reason

    def _measured_reason_now(self, operation: str, ctx: SelectionContext, primary: KernelSpec, rules: bool
                             ) -> str | None:
        rt = self.rt
        src = rt.measurement_source
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
                spec = rt.kernels.find(kid)
                if spec is not None and not times[kid].failed:
                    items.append((spec, CandidateDecision(kid, spec.backend, True, spec.priority)))
            first = rt.engine.rank(items, times)[0][0]
            if first.kernel_id != primary.kernel_id and first.kernel_id not in primary.covers:
                return f"measured times rank {first.kernel_id} first for bucket {bucket}"
        return None

    # -- making and dropping family plans ----------------------------------------------------------------
    def plan(self, plan: ExecutionPlan, sel: Selection, family: Hashable, policy: Policy | None = None
             ) -> ExecutionPlan | None:
        """The shape-free plan to cache under ``family`` for a plan just made from ``sel``, or None when the
        family must keep one plan per shape (:meth:`reason`, or a shape of it already needed another kernel
        since the last invalidation)."""
        if family in self.exact_only or self.reason(sel, policy) is not None:
            return None
        return self._copy(plan, family)

    def _copy(self, plan: ExecutionPlan, family: Hashable) -> ExecutionPlan:
        """A copy of ``plan`` (its selected kernel only) for the family key: while its kernel's breaker
        is closed the op calls ``fn`` straight away; otherwise, and when the kernel raises, the call
        goes the exact-shape way (``Runtime.run_exact``), which owns fallback and breaker probes."""
        rt = self.rt
        free = ExecutionPlan(plan.operation, plan.op, plan.kernels[:1], plan.context, locked_by=plan.locked_by,
                             policy_digest=plan.policy_digest, source=plan.source)
        free.family = family
        free.fn, free.direct, free.const = plan.fn, plan.direct, plan.const
        free.stats = plan.stats
        op, operation = plan.op, plan.operation
        free.run = lambda *args: rt.run_exact(op, operation, args)
        free.gate = rt.breakers.get(plan.kernel_id) if rt.config.circuit_breaker_enabled else NEVER_SLOW
        return free

    def drop(self, plan: ExecutionPlan, exc: BaseException) -> bool:
        """A shape-free plan's kernel raised on a valid call: its family plan goes. The first time, when a
        shape-free kernel ``covers`` the plan's kernel (``torch_sdpa_gqa`` covers ``torch_sdpa``: an MHA
        family meeting its first GQA call), the family selects again with that call, which may give it a
        plan of the covering kernel (returns True); otherwise, or the second time, the family goes back to
        exact-shape plans until the next invalidation (returns False). The failure is not counted against
        the kernel here; the path that now runs the call counts it if the kernel fails there too."""
        rt = self.rt
        family = plan.family
        widen = family not in self.widened and any(
            plan.kernel_id in s.covers and s.shape_free for s in rt.kernels.for_operation(plan.operation))
        if widen:
            self.widened.add(family)
        else:
            self.exact_only.add(family)
        rt.forget(family)
        log_event("shape_free_plan_dropped", operation=plan.operation, kernel=plan.kernel_id,
                  error=type(exc).__name__, message=first_line(exc),
                  action="select again with this call (a kernel covering this one may serve the family)" if widen
                  else "exact-shape plans for this call family")
        return widen
