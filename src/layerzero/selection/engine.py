"""The selection engine: a pure function from (operation, context, registries,
policy, measurements, breaker state) to a ranked plan and a full decision trace.

Order of work: policy locks -> constraint filter (backend availability, the
spec's declared constraints, open breakers) -> allow/deny -> score (priority,
``prefer``, boosts, measured times) -> rank. The engine keeps no state (only a
memo of what the registries answer per device and dtype, dropped when either
changes) and reads no hardware: callers pass everything in, so tests can select
for a fake sm_90 GPU on a CPU-only machine. Ties break by kernel id, so two processes
with the same inputs always choose the same kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerzero.context import SelectionContext
from layerzero.errors import KernelNotSupportedError, NoKernelError
from layerzero.policy.model import EMPTY_POLICY, Policy, Rule, condition_env
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["SelectionEngine", "Selection", "CandidateDecision", "Measurement", "format_context"]


@dataclass(frozen=True, slots=True)
class Measurement:
    """A measured kernel time for one shape bucket (from the performance database)."""

    median_us: float
    spread_us: float = 0.0
    samples: int = 1
    source: str = "perf-db"
    failed: bool = False


@dataclass(slots=True)
class CandidateDecision:
    """What selection decided about one candidate kernel."""

    kernel_id: str
    backend: str
    accepted: bool
    priority: int
    score: float | None = None
    measured_us: float | None = None
    measured_spread_us: float | None = None
    measured_source: str | None = None
    reasons: list[Reason] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel_id": self.kernel_id, "backend": self.backend, "accepted": self.accepted,
            "priority": self.priority, "score": self.score, "rank": self.rank,
            "measured_us": self.measured_us, "measured_spread_us": self.measured_spread_us,
            "measured_source": self.measured_source,
            "reasons": [r.to_dict() for r in self.reasons], "rules": list(self.rules),
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """The engine's answer: ranked kernels (selected first) and the trace of every candidate."""

    operation: str
    context: SelectionContext
    ranked: tuple[KernelSpec, ...]
    trace: tuple[CandidateDecision, ...]
    locked_by: str | None = None
    policy_digest: str = ""

    @property
    def selected(self) -> KernelSpec:
        return self.ranked[0]

    @property
    def rejections(self) -> dict[str, list[Reason]]:
        return {d.kernel_id: list(d.reasons) for d in self.trace if not d.accepted}

    def decision(self, kernel_id: str) -> CandidateDecision | None:
        for d in self.trace:
            if d.kernel_id == kernel_id:
                return d
        return None


MeasurementLookup = Callable[[str, SelectionContext, tuple[KernelSpec, ...]], Mapping[str, Measurement]]
BreakerProbe = Callable[[str], bool]


def format_context(operation: str, ctx: SelectionContext) -> str:
    """A one-line description of a call for error messages."""
    parts = [f"device={ctx.platform}" + (f":{ctx.device_index}" if ctx.device_index is not None else "")]
    if ctx.compute_capability:
        parts.append(f"sm={ctx.sm}")
    if ctx.dtype is not None:
        parts.append(f"dtype={ctx.dtype_name}")
    for name in ("batch_size", "seq_len_q", "seq_len_k", "num_heads", "num_kv_heads", "head_dim",
                 "hidden_size", "num_tokens", "layout"):
        value = getattr(ctx, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if ctx.is_causal:
        parts.append("is_causal=True")
    if ctx.mask_kind != "none":
        parts.append(f"mask={ctx.mask_kind}")
    if ctx.window is not None:
        parts.append(f"window={ctx.window}")
    parts.extend(f"{name}=True" for name, on in (("softcap", ctx.softcap), ("sinks", ctx.sinks),
                                                 ("alibi", ctx.alibi)) if on)
    if ctx.requires_grad:
        parts.append("requires_grad=True")
    return f"{operation}({', '.join(parts)})"


class SelectionEngine:
    """Selects kernels for an operation and context.

    Args:
        kernel_registry / backend_registry: where candidates and availability come from.
        measurements: optional lookup of measured times per kernel for a context's bucket.

    Example:
        >>> engine = SelectionEngine(get_global_kernel_registry(), get_global_backend_registry())
        >>> sel = engine.select("attention.causal", SelectionContext(device="cuda", compute_capability=90, ...))
        >>> sel.selected.kernel_id, [d.kernel_id for d in sel.trace]
    """

    def __init__(self, kernel_registry: KernelRegistry, backend_registry: BackendRegistry,
                 measurements: MeasurementLookup | None = None) -> None:
        self.kernels = kernel_registry
        self.backends = backend_registry
        self.measurements = measurements
        self._screens: dict[tuple[Any, ...], tuple[tuple[KernelSpec, tuple[Reason, ...]], ...]] = {}
        self._screens_of: tuple[int, int] = (-1, -1)

    def screened(self, operation: str, platform: str, compute_capability: tuple[int, int] | None,
                 dtype: Any) -> tuple[tuple[KernelSpec, tuple[Reason, ...]], ...]:
        """Each kernel of ``operation`` with why it cannot run on this device and dtype at all (its backend's
        availability, then :meth:`KernelSpec.device_reasons`; empty: it may).

        Remembered per (operation, device, dtype) until either registry changes: a selection for a new shape
        then checks only what depends on the call. The answer is the one the registries give now."""
        versions = (self.kernels.version, self.backends.version)
        screens = self._screens
        if self._screens_of != versions or len(screens) > 4096:
            screens = self._screens = {}
            self._screens_of = versions
        key = (operation, platform, compute_capability, dtype)
        found = screens.get(key)
        if found is None:
            rows = []
            for spec in self.kernels.for_operation(operation):
                unavailable = self.backends.unavailable_reason(spec.backend)
                on_device = spec.device_reasons(platform, compute_capability, dtype)
                rows.append((spec, ((unavailable,) if unavailable is not None else ()) + tuple(on_device)))
            found = screens[key] = tuple(rows)
        return found

    def select(self, operation: str, ctx: SelectionContext, *, policy: Policy = EMPTY_POLICY,
               breaker_open: BreakerProbe | None = None, raise_on_empty: bool = True,
               use_measurements: bool = True) -> Selection:
        """Rank every kernel of ``operation`` for ``ctx``.

        Raises:
            NoKernelError: no candidate survives (when ``raise_on_empty``); lists every reason.
            KernelNotSupportedError: a policy lock names a kernel that cannot run ``ctx``.
        """
        rules = policy.for_operation(operation) if policy.rules else ()
        env_base = condition_env(ctx, operation) if rules else None

        decisions: list[CandidateDecision] = []
        eligible: list[tuple[KernelSpec, CandidateDecision]] = []
        for spec, on_device in self.screened(operation, ctx.platform, ctx.compute_capability, ctx.dtype):
            reasons = spec.call_reasons(ctx)
            if on_device:
                reasons[:0] = on_device
            if breaker_open is not None and breaker_open(spec.kernel_id):
                reasons.append(Reason(ReasonCode.CIRCUIT_OPEN,
                                      f"circuit breaker for {spec.kernel_id} is open after repeated failures"))
            d = CandidateDecision(spec.kernel_id, spec.backend, False, spec.priority, reasons=reasons)
            decisions.append(d)
            if not reasons:
                eligible.append((spec, d))

        locked_by: str | None = None
        behind_lock: list[tuple[KernelSpec, CandidateDecision]] = []
        if rules:
            eligible, behind_lock, locked_by = self._apply_policy(operation, ctx, rules, env_base, eligible, decisions)

        measured: Mapping[str, Measurement] = {}
        if use_measurements and self.measurements is not None and eligible:
            measured = self.measurements(operation, ctx, tuple(s for s, _ in eligible + behind_lock))
            eligible = _drop_failed(eligible, measured)
            behind_lock = _drop_failed(behind_lock, measured)
            measured = {k: m for k, m in measured.items() if not m.failed}  # a failed run's time ranks nothing

        ranked = self.rank(eligible, measured, rules, env_base)
        if ctx.compiling and operation.split(".", 1)[0] in NATIVE_FIRST_UNDER_COMPILE and not any(
                r.kind in ("boost", "prefer") for r in rules):
            ranked = native_first(ranked)
        ranked += self.rank(behind_lock, measured, rules, env_base)
        for i, (spec, d) in enumerate(ranked):
            d.accepted = True
            d.rank = i
        trace = tuple(sorted(decisions, key=lambda d: (d.rank is None, d.rank or 0, d.kernel_id)))
        if not ranked and raise_on_empty:
            raise NoKernelError(_no_kernel_message(operation, ctx, trace), operation=operation,
                                rejections={d.kernel_id: d.reasons for d in trace})
        return Selection(operation, ctx, tuple(s for s, _ in ranked), trace, locked_by, policy.digest)

    # ------------------------------------------------------------------
    def _apply_policy(self, operation: str, ctx: SelectionContext, rules: tuple[Rule, ...], env_base: dict[str, Any] | None,
                      eligible: list[tuple[KernelSpec, CandidateDecision]], decisions: list[CandidateDecision],
                      ) -> tuple[list[tuple[KernelSpec, CandidateDecision]], list[tuple[KernelSpec, CandidateDecision]], str | None]:
        """Returns (eligible, kept-behind-a-lock as fallbacks, the lock that fired)."""
        if env_base is None:
            env_base = condition_env(ctx, operation)
        by_id = {d.kernel_id: d for d in decisions}
        specs = {s.kernel_id: s for s in self.kernels.for_operation(operation)}

        def env_for(spec: KernelSpec) -> dict[str, Any]:
            env = dict(env_base)
            env["backend"] = spec.backend
            env["kernel"] = spec.kernel_id
            return env

        def excluded(spec: KernelSpec, upto: int) -> Reason | None:
            """The deny, or the allow list, among ``rules[:upto]`` that keeps ``spec`` from running, or None."""
            env = env_for(spec)
            denied = next((r for r in rules[:upto] if r.kind == "deny" and r.targets(spec) and r.holds(env)), None)
            if denied is not None:
                return Reason(ReasonCode.POLICY_DENIED, f"denied by policy: {denied.describe()}")
            allows = [r for r in rules[:upto] if r.kind == "allow" and r.holds(env_base)]
            if allows and not any(r.targets(spec) for r in allows):
                return Reason(ReasonCode.POLICY_NOT_ALLOWED,
                              "not in the policy's allow list: " + "; ".join(r.describe() for r in allows))
            return None

        def allowed(items: list[tuple[KernelSpec, CandidateDecision]]) -> list[tuple[KernelSpec, CandidateDecision]]:
            """``items`` without the kernels a deny or allow rule keeps out (their decisions say which rule)."""
            kept = []
            for spec, d in items:
                reason = excluded(spec, len(rules))
                if reason is None:
                    kept.append((spec, d))
                else:
                    d.reasons.append(reason)
            return kept

        # 1. Locks: the first lock whose condition holds decides. A deny or allow of higher precedence (scoped
        # before programmatic before the document: earlier in ``rules``) that excludes every kernel the lock
        # names overrides it; denied kernels are never its fallbacks.
        for at, rule in enumerate(rules):
            if rule.kind != "lock" or not rule.holds(env_base):
                continue
            targets = [s for s in specs.values() if rule.targets(s)]
            if not targets:
                raise KernelNotSupportedError(
                    f"{rule.describe()}: no kernel {', '.join(rule.kernels or rule.backends)} serves {operation}",
                    kernel_id=",".join(rule.kernels), reasons=[])
            usable = [(s, by_id[s.kernel_id]) for s in targets if not by_id[s.kernel_id].reasons]
            if not usable:
                reasons = [r for s in targets for r in by_id[s.kernel_id].reasons]
                detail = "; ".join(f"{s.kernel_id}: " + "; ".join(str(r) for r in by_id[s.kernel_id].reasons)
                                   for s in targets)
                raise KernelNotSupportedError(
                    f"{format_context(operation, ctx)} is locked by {rule.describe()}, but it cannot run here: {detail}",
                    kernel_id=",".join(s.kernel_id for s in targets), reasons=reasons)
            overriding = [(d, excluded(s, at)) for s, d in usable]
            if all(reason is not None for _, reason in overriding):
                for d, reason in overriding:
                    d.rules.append(f"{rule.describe()} overridden: {reason.message}")  # type: ignore[union-attr]
                continue
            usable = [(s, d) for (s, d), (_, reason) in zip(usable, overriding, strict=True) if reason is None]
            locked_ids = {s.kernel_id for s, _ in usable}
            for spec, d in usable:
                d.rules.append(rule.describe())
            # Other eligible kernels stay as runtime fallbacks behind the locked ones, unless a rule keeps them out.
            rest = allowed([(s, d) for s, d in eligible if s.kernel_id not in locked_ids])
            for _, d in rest:
                d.rules.append(f"not selected: {rule.describe()} (kept as fallback)")
            return usable, rest, rule.describe()

        # 2. Deny and allow.
        return allowed(eligible), [], None

    def rank(self, items: list[tuple[KernelSpec, CandidateDecision]], measured: Mapping[str, Measurement],
             rules: tuple[Rule, ...] = (), env_base: dict[str, Any] | None = None
             ) -> list[tuple[KernelSpec, CandidateDecision]]:
        """``items`` best first: by score (priority, then policy boosts and prefers, then measured times),
        ties broken by the kernels' own priorities, then ids; fills in each decision's score."""
        if not items:
            return []
        boosts = [r for r in rules if r.kind in ("boost", "prefer")]
        for spec, d in items:
            priority = float(spec.priority)
            factor = 1.0
            if boosts:
                env = dict(env_base or {})
                env["backend"], env["kernel"] = spec.backend, spec.kernel_id
                preferred = False
                for r in boosts:
                    if r.targets(spec) and r.holds(env):
                        if r.kind == "prefer" and r.priority is not None:
                            if preferred:  # earlier rules win: scoped, then programmatic, then the document
                                continue
                            priority = float(r.priority)
                            preferred = True
                        elif r.kind == "boost":
                            factor *= r.factor
                        d.rules.append(r.describe())
            d.score = priority * factor
            m = measured.get(spec.kernel_id)
            if m is not None:
                d.measured_us = m.median_us / factor
                d.measured_spread_us = m.spread_us / factor
                d.measured_source = m.source

        timed = [(s, d) for s, d in items if d.measured_us is not None]
        untimed = [(s, d) for s, d in items if d.measured_us is None]
        untimed.sort(key=_by_score)
        if not timed:
            return untimed
        # Measured kernels: fastest first, but a kernel only overtakes a higher-scored one
        # when it is faster beyond both kernels' spread; otherwise score and id decide.
        timed.sort(key=lambda sd: (sd[1].measured_us, sd[0].kernel_id))
        groups: list[list[tuple[KernelSpec, CandidateDecision]]] = []
        for item in timed:
            if groups:
                lead = groups[-1][0][1]
                d = item[1]
                if d.measured_us - d.measured_spread_us <= lead.measured_us + lead.measured_spread_us:  # type: ignore[operator]
                    groups[-1].append(item)
                    continue
            groups.append([item])
        ordered: list[tuple[KernelSpec, CandidateDecision]] = []
        for g in groups:
            ordered.extend(sorted(g, key=_by_score))
        return ordered + untimed


#: Families where, under torch.compile, Inductor's code for the PyTorch kernel (``compile_native``) is
#: preferred to an opaque kernel: Inductor fuses a norm or activation into its neighbours, which no opaque
#: kernel can match unless a compiled-mode measurement says otherwise.
NATIVE_FIRST_UNDER_COMPILE: frozenset[str] = frozenset({
    "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "gelu", "silu", "cross_entropy"})

_NATIVE_NOTE = "torch.compile: Inductor's code for the native op ranks first"


def _by_score(sd: tuple[KernelSpec, CandidateDecision]) -> tuple[float, int, str]:
    """Best score first; ties (a backend's kernels all given one priority by ``prefer``) by the kernels' own
    priorities, then ids."""
    return -(sd[1].score or 0.0), -sd[0].priority, sd[0].kernel_id


def native_first(ranked: list[tuple[KernelSpec, CandidateDecision]]) -> list[tuple[KernelSpec, CandidateDecision]]:
    """``ranked`` with the ``compile_native`` kernels first, except opaque kernels measured (in compiled mode:
    the bucket says so) faster than every measured native one beyond both spreads."""
    natives = [sd for sd in ranked if sd[0].compile_native]
    if not natives or len(natives) == len(ranked):
        return ranked
    timed = [d for _, d in natives if d.measured_us is not None]
    bound = min((d.measured_us - d.measured_spread_us for d in timed), default=None)  # type: ignore[operator]
    ahead = [sd for sd in ranked if not sd[0].compile_native and bound is not None and sd[1].measured_us is not None
             and sd[1].measured_us + (sd[1].measured_spread_us or 0.0) < bound]
    moved = {id(d) for _, d in ahead}
    rest = [sd for sd in ranked if not sd[0].compile_native and id(sd[1]) not in moved]
    for _, d in natives:
        d.rules.append(_NATIVE_NOTE)
    return ahead + natives + rest


def _drop_failed(items: list[tuple[KernelSpec, CandidateDecision]], measured: Mapping[str, Measurement],
                 ) -> list[tuple[KernelSpec, CandidateDecision]]:
    """``items`` without the kernels whose tuning run failed; when that would leave none (every row says failed:
    a broken tuning run, a database edited by hand), all of them, noted: the breakers judge them at run time."""
    bad = {s.kernel_id: m for s, _ in items if (m := measured.get(s.kernel_id)) is not None and m.failed}
    if bad and len(bad) == len(items):
        for _, d in items:
            d.rules.append("its tuning run failed, as every candidate's did: the measurements are not used")
        return items
    kept = []
    for spec, d in items:
        if spec.kernel_id in bad:
            d.reasons.append(Reason(ReasonCode.MEASURED_FAILED, f"{spec.kernel_id} failed its correctness check "
                                                                f"when tuned ({bad[spec.kernel_id].source})"))
            continue
        kept.append((spec, d))
    return kept


def _no_kernel_message(operation: str, ctx: SelectionContext, trace: tuple[CandidateDecision, ...]) -> str:
    if not trace:
        return f"no kernel is registered for {operation!r} (call: {format_context(operation, ctx)})"
    lines = [f"no kernel can run {format_context(operation, ctx)}; every candidate was rejected:"]
    for d in trace:
        lines.append(f"  {d.kernel_id}: " + "; ".join(str(r) for r in d.reasons))
    return "\n".join(lines)
