"""Inspection: ``lz.explain``, ``lz.which``, ``lz.select``, ``lz.list_kernels``, ``lz.validate``.

``explain`` answers "which kernel runs for these inputs, and why": the
selected kernel and its score, whether the plan is already cached, every
candidate's rejection reasons, the policy rules that fired, and the measured
times used (with where they came from).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.errors import InvalidInputError, LayerZeroError, NoKernelError
from layerzero.ops import canonical_operation, op_for
from layerzero.ops.attention import gqa_refused, names_and_layout
from layerzero.ops.names import operation_problem
from layerzero.ops.sampling import sampling_operation
from layerzero.runtime import get_runtime
from layerzero.runtime.gates import guard_trips
from layerzero.selection.engine import CandidateDecision, Selection, format_context
from layerzero.spec import KernelSpec, Reason

__all__ = ["Explanation", "explain", "explain_context", "which", "select", "list_kernels", "validate",
           "args_for", "cache_key", "cache_keys"]


@dataclass
class Explanation:
    """The answer of :func:`explain`. ``str(explanation)`` is a readable report."""

    operation: str
    context: SelectionContext
    selected_kernel: str | None
    score: float | None
    cached: bool
    candidates: list[tuple[str, float | None]]
    rejection_reasons: dict[str, list[Reason]]
    rules_fired: list[str]
    locked_by: str | None
    trace: list[CandidateDecision] = field(default_factory=list)
    policy_digest: str = ""
    error: str | None = None
    shape_free: str | None = None  # "yes", or why this call family needs a plan per shape

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation, "context": self.context.to_dict(), "selected_kernel": self.selected_kernel,
            "score": self.score, "cached": self.cached,
            "candidates": [{"kernel_id": k, "score": s} for k, s in self.candidates],
            "rejection_reasons": {k: [r.to_dict() for r in v] for k, v in self.rejection_reasons.items()},
            "rules_fired": self.rules_fired, "locked_by": self.locked_by, "policy_digest": self.policy_digest,
            "trace": [d.to_dict() for d in self.trace], "error": self.error, "shape_free": self.shape_free,
        }

    def __str__(self) -> str:
        lines = [f"layerzero: {format_context(self.operation, self.context)}"]
        if self.selected_kernel is None:
            lines.append(f"  no kernel selected: {self.error}")
        else:
            how = f"score {self.score:g}" if self.score is not None else f"from the {self.locked_by or 'plan'}"
            lines.append(f"  selected: {self.selected_kernel} ({how}"
                         f"{', cached plan' if self.cached else ', not cached yet'})")
        if self.shape_free == "yes":
            lines.append("  plan: shape-free (one plan serves every shape of this dtype, device and flags)")
        elif self.shape_free:
            lines.append(f"  plan: one per shape ({self.shape_free})")
        if self.locked_by:
            lines.append(f"  locked by: {self.locked_by}")
        if self.candidates and not self.trace:
            lines.append("  the table's kernels, in order: " + ", ".join(k for k, _ in self.candidates))
        elif self.candidates:
            lines.append("  ranked candidates:")
            for d in self.trace:
                if d.accepted:
                    timing = ""
                    if d.measured_us is not None:
                        timing = f", measured {d.measured_us:.2f} us +/- {d.measured_spread_us or 0:.2f} ({d.measured_source})"
                    lines.append(f"    {d.rank + 1 if d.rank is not None else '-'}. {d.kernel_id} "
                                 f"(score {d.score:g}{timing})")
        if self.rejection_reasons:
            lines.append("  rejected:")
            for kid, reasons in self.rejection_reasons.items():
                lines.append(f"    {kid}: " + "; ".join(f"{r.message} [{r.code}]" for r in reasons))
        if self.rules_fired:
            lines.append("  policy rules that fired:")
            lines.extend(f"    {r}" for r in self.rules_fired)
        return "\n".join(lines)


def operation_name(operation: Any) -> str:
    """``operation`` as the real call names it: an alias replaced (``attention.varlen`` -> ``attention_varlen``),
    a name no kernel serves refused as the call refuses it (``attention.causl``)."""
    if not isinstance(operation, str):
        raise InvalidInputError(f"operation must be a string such as 'attention.causal', "
                                f"got {type(operation).__name__}")
    op_for(operation)
    name = canonical_operation(operation)
    problem = operation_problem(name, (s.operation for s in get_runtime().kernels))
    if problem is not None:
        raise InvalidInputError(problem)
    return name


def args_for(operation: str, tensors: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Canonical kernel arguments for ``operation`` from positional tensors and keyword options, read as the
    public call reads them (the layout and ``enable_gqa`` of attention checked as ``lz.attention`` checks them)."""
    op = op_for(operation)
    kw = dict(kwargs)
    if len(tensors) > len(op.arg_names):
        raise InvalidInputError(f"{operation}: {len(tensors)} positional inputs, the call takes at most "
                                f"{len(op.arg_names)} ({', '.join(op.arg_names)})")
    inputs = dict(zip(op.arg_names, tensors, strict=False))
    if op.family == "attention":
        layout, enable_gqa = kw.pop("layout", "BHSD"), kw.pop("enable_gqa", None)
        q, k, v = (inputs.get(n) for n in ("q", "k", "v"))
        operation, causal = names_and_layout(operation, kw.get("is_causal", False), layout, q, k, v)
        if causal:
            kw["is_causal"] = True
        if layout == "BSHD":
            inputs = {n: (t.transpose(1, 2) if isinstance(t, torch.Tensor) and n in ("q", "k", "v") else t)
                      for n, t in inputs.items()}
        if enable_gqa is not None and enable_gqa is not True:
            gqa_refused(operation, enable_gqa, *(inputs.get(n) for n in ("q", "k", "v")))
    op.check_names(operation, inputs, kw)
    return op.args_from_inputs(operation, inputs, kw)


def cache_keys(operation: str, args: tuple[Any, ...]) -> tuple[Hashable | None, Hashable] | None:
    """``(family, key)``: the shape-free and the exact-shape plan-cache keys the operation's hot path
    builds for ``args`` (``None`` for an operation outside the ``lz.*`` families)."""
    try:
        op = op_for(operation)
    except LayerZeroError:
        return None
    try:
        return op.keys(operation, args)
    except NotImplementedError:
        return None


def cache_key(operation: str, args: tuple[Any, ...]) -> Hashable | None:
    """The exact-shape key the operation's hot path would use for ``args`` (see :func:`cache_keys`)."""
    keys = cache_keys(operation, args)
    return None if keys is None else keys[1]


def _explanation(operation: str, ctx: SelectionContext, cached: bool, family: Hashable = None) -> Explanation:
    rt = get_runtime()
    try:  # a baked plan table in force answers first, as it does for the call
        sel = rt.baked_selection(operation, ctx) or rt.select(operation, ctx)
    except NoKernelError as err:
        return Explanation(operation, ctx, None, None, cached, [], err.rejections, [], None, [], "", str(err))
    exp = _from_selection(sel, cached)
    if family is not None:
        if rt.family_dropped(family):
            exp.shape_free = "a shape of this family needed another kernel, so each shape has its own plan"
        else:
            exp.shape_free = rt.shape_free_reason(sel) or "yes"
    return exp


def _from_selection(sel: Selection, cached: bool) -> Explanation:
    top = sel.decision(sel.selected.kernel_id)
    fired = sorted({r for d in sel.trace for r in d.rules})
    candidates = [(d.kernel_id, d.score) for d in sel.trace if d.accepted]
    if not sel.trace:  # a baked plan table's choice: its kernels in its order, nothing scored
        candidates = [(spec.kernel_id, None) for spec in sel.ranked]
    return Explanation(sel.operation, sel.context, sel.selected.kernel_id, top.score if top else None, cached,
                       candidates, sel.rejections, fired, sel.locked_by, list(sel.trace), sel.policy_digest)


def explain(*tensors: Any, operation: str, **kwargs: Any) -> Explanation:
    """Explain the decision for a call with these tensors (nothing is run or cached).

    Example:
        >>> print(lz.explain(q, k, v, operation="attention.causal"))
        >>> lz.explain(x, w, operation="rms_norm").selected_kernel
    """
    operation = operation_name(operation)
    args = args_for(operation, tensors, kwargs)
    op = op_for(operation)
    if op.family == "sample" and operation == "sample":  # lz.sample names its operation from its options
        operation = sampling_operation(*args[1:4])
    op.validate(operation, args)
    ctx = op.context(operation, args)
    rt = get_runtime()
    family, key = cache_keys(operation, args) or (None, None)
    data = rt.visible_plans()  # a policy scope's own plans inside one
    plan = (data.get(family) if family is not None else None) or (data.get(key) if key is not None else None)
    if plan is not None:
        first = plan.kernels[0]
        if guard_trips(args, not first.supports_autograd, not first.cuda_graph_safe, not first.deterministic):
            plan = None  # a flag the key does not carry sends this call past the plan, to a fresh selection
    exp = _explanation(operation, ctx, plan is not None, family)
    runs = _cached_kernel(rt, plan)
    if runs is not None and runs != exp.selected_kernel:
        # the call runs its cached plan, chosen when it was made (grad mode, a policy condition the key does not
        # carry): say so, with what selection would choose now
        exp.rules_fired = [f"the cached plan runs {runs} (selection now would choose "
                           f"{exp.selected_kernel})", *exp.rules_fired]
        exp.selected_kernel, exp.locked_by = runs, plan.locked_by  # type: ignore[union-attr]
    return exp


def _cached_kernel(rt: Any, plan: Any) -> str | None:
    """The kernel a cached plan runs: its first whose breaker lets calls through (None: no plan, or none does)."""
    if plan is None:
        return None
    if not rt.config.circuit_breaker_enabled:
        return plan.kernel_id  # type: ignore[no-any-return]
    return next((k.kernel_id for k in plan.kernels if not rt.breakers.is_open(k.kernel_id)), None)


def explain_context(operation: str, context: SelectionContext) -> Explanation:
    """Explain the decision for an explicit context (for example a CUDA context on a CPU machine)."""
    return _explanation(operation_name(operation), context, False)


def which(operation: str, *tensors: Any, **kwargs: Any) -> str:
    """The kernel id that would run ``operation`` for these tensors.

    Example:
        >>> lz.which("attention.causal", q, k, v)
        'torch_sdpa'
    """
    exp = explain(*tensors, operation=operation, **kwargs)
    if exp.selected_kernel is None:
        raise NoKernelError(exp.error or f"no kernel for {operation}", operation=operation,
                            rejections=exp.rejection_reasons)
    return exp.selected_kernel


def select(operation: str, context: SelectionContext) -> Selection:
    """Run selection for an explicit context: ``.selected``, ``.ranked``, ``.trace``, ``.rejections``."""
    if not isinstance(context, SelectionContext):
        raise InvalidInputError(f"select(): context must be a SelectionContext, got {type(context).__name__}")
    return get_runtime().select(operation_name(operation), context)


def list_kernels(pattern: str = "*") -> list[KernelSpec]:
    """Registered kernels whose id or operation matches the glob ``pattern``."""
    if not isinstance(pattern, str):
        raise InvalidInputError(f"list_kernels(): pattern must be a glob string such as 'attention*', got "
                                f"{type(pattern).__name__} {pattern!r}")
    return get_runtime().kernels.match(canonical_operation(pattern))


def validate(kernel_id: str, context: SelectionContext) -> tuple[bool, list[Reason]]:
    """Can ``kernel_id`` run ``context``? ``(ok, reasons)``; availability and constraints, not policy."""
    if not isinstance(context, SelectionContext):
        raise InvalidInputError(f"validate(): context must be a SelectionContext, got {type(context).__name__}")
    rt = get_runtime()
    spec = rt.kernels.get(kernel_id)
    reasons: list[Reason] = []
    unavailable = rt.backends.unavailable_reason(spec.backend)
    if unavailable is not None:
        reasons.append(unavailable)
    reasons.extend(spec.check(context))
    return (not reasons, reasons)
