"""The same kernel on every rank: decision sharing and divergence checks over ``torch.distributed``.

Ranks that select on their own can pick different kernels for the same call
(a noisy measurement, a different perf DB, a lock set on one node, a library
missing on one host) and then produce slightly different numbers or hang in a
collective. This module makes that impossible to miss:

- :func:`synchronize` (collective): every rank sends the contexts it has
  dispatched; rank 0 selects for all of them (with its own policy, perf data
  and breakers) and broadcasts its decisions, the measured times it used and
  its policy digest. Every rank then installs rank 0's choices as policy
  locks scoped to exactly those contexts (placed before its own rules, so a
  rank with a different lock or perf DB still runs rank 0's kernel; its
  fallbacks stay behind the lock), plus rank 0's measured times for those
  shape buckets. A rank that cannot run rank 0's kernel is reported, and by
  default every rank raises :class:`SelectionDivergenceError`.
- :func:`check_consistency` (collective): every rank selects for the union of
  the contexts any rank has dispatched, the answers are gathered, and any
  context on which ranks disagree raises ``SelectionDivergenceError`` on every
  rank, naming the ranks, operations and kernels.
- :func:`auto_check` (or ``LAYERZERO_DIST_CHECK=1``): every ``synchronize``
  ends with ``check_consistency``.

Every rank must call these functions together (they are collectives). Without
an initialized process group they work on a group of one. The contexts a rank
has dispatched come from :class:`DecisionLog`, which ``import layerzero``
attaches to the global runtime's ``on_miss`` hooks (one dict insert per
selection, nothing on the cached hot path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.errors import LayerZeroError, SelectionDivergenceError, first_line
from layerzero.policy.model import Policy, Rule
from layerzero.environment import env_flag
from layerzero.runtime import Runtime, get_runtime
from layerzero.selection.engine import Measurement, format_context

__all__ = ["synchronize", "check_consistency", "auto_check", "SyncReport", "ConsistencyReport", "DecisionLog",
           "track", "decision_log", "SYNC_ORIGIN"]

log = logging.getLogger("layerzero")

SYNC_ORIGIN = "layerzero.distributed.synchronize()"
_MAX_CONTEXTS = 100_000
# Everything selection looks at, except what differs between ranks by design (which GPU, which TP rank).
_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SelectionContext)
                                 if f.name not in ("device_index", "tp_rank"))

Wire = tuple[Any, ...]


# -- contexts on the wire --------------------------------------------------------------------------

def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _wire_from_mapping(d: Mapping[str, Any]) -> Wire:
    """The rank-independent key of a context, from ``ctx.to_dict()`` or a policy condition's env."""
    return tuple(_norm(d.get(name)) for name in _FIELDS)


def wire(ctx: SelectionContext) -> Wire:
    return _wire_from_mapping(ctx.to_dict())


def _local_device(platform: str) -> torch.device:
    if platform == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(platform)


def context_from_wire(w: Wire) -> SelectionContext:
    """The context ``w`` describes, on this rank's device of the same type."""
    kw = dict(zip(_FIELDS, w, strict=True))
    platform = kw.pop("platform")
    return SelectionContext(device=_local_device(platform), **kw)


# -- what this rank has dispatched ---------------------------------------------------------------

def _group_active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


class DecisionLog:
    """The (operation, context) pairs a runtime has selected for, in first-seen order (bounded).

    The log ``import layerzero`` attaches records only while a ``torch.distributed`` process group is
    initialized (a single-process program keeps no contexts: they would cost ~450 bytes per cached shape);
    ``always=True`` (set by :func:`decision_log` or ``track(always=True)``) records every selection.
    """

    def __init__(self, capacity: int = _MAX_CONTEXTS, *, always: bool = False) -> None:
        self.capacity = capacity
        self.always = always
        self._seen: dict[tuple[str, SelectionContext], None] = {}
        self._lock = forksafe.lock(self)

    def __call__(self, operation: str, ctx: SelectionContext) -> None:  # a Runtime.on_miss hook
        if not self.always and not _group_active():
            return
        seen = self._seen
        if len(seen) < self.capacity:
            seen[(operation, ctx)] = None

    def __len__(self) -> int:
        return len(self._seen)

    def entries(self) -> list[tuple[str, SelectionContext]]:
        with self._lock:
            return list(self._seen.copy())  # dict.copy is atomic under the GIL; hooks may insert meanwhile

    def wires(self) -> list[tuple[str, Wire]]:
        out: dict[tuple[str, Wire], None] = {}
        for operation, ctx in self.entries():
            out[(operation, wire(ctx))] = None
        return list(out)

    def clear(self) -> None:
        with self._lock:
            self._seen = {}


def track(runtime: Runtime | None = None, *, always: bool = False) -> DecisionLog:
    """Attach a :class:`DecisionLog` to ``runtime`` (the global one by default); idempotent.

    ``always=True`` records selections even without an initialized process group."""
    rt = runtime or get_runtime()
    for hook in rt.on_miss:
        if isinstance(hook, DecisionLog):
            if always:
                hook.always = True
            return hook
    dl = DecisionLog(always=always)
    rt.on_miss.append(dl)
    return dl


def decision_log(runtime: Runtime | None = None) -> DecisionLog:
    """The runtime's decision log (attached now if it was not), recording from now on even without a
    process group."""
    return track(runtime, always=True)


# -- selection as the runtime would do it on a miss ---------------------------------------------------

def _user_policy(rt: Runtime) -> Policy:
    return Policy(tuple(r for r in rt.policy.policy.rules if r.origin != SYNC_ORIGIN))


def _decide(rt: Runtime, operation: str, ctx: SelectionContext, policy: Policy | None = None
            ) -> tuple[str, ...] | str:
    """Ranked kernel ids the runtime would plan for ``ctx`` now, or an ``"error: ..."`` string."""
    try:
        sel = rt.baked_selection(operation, ctx, policy)  # a baked plan table answers before selection
        if sel is None:
            sel = rt.select(operation, ctx, policy=policy)
        return tuple(k.kernel_id for k in sel.ranked)
    except LayerZeroError as exc:
        return f"error: {type(exc).__name__}: {first_line(exc)}"


def _primary(decision: tuple[str, ...] | str) -> str:
    return decision if isinstance(decision, str) else decision[0]


def _perf_key(operation: str, ctx: SelectionContext) -> tuple[Any, ...]:
    try:
        from layerzero.tuning.buckets import bucket_of
    except ImportError:  # no tuning package: key by the exact context
        return (operation, wire(ctx))
    return (operation, ctx.dtype_name or "-", ctx.platform, bucket_of(operation, ctx))


def _measure(rt: Runtime, operation: str, ctx: SelectionContext) -> dict[str, tuple[Any, ...]]:
    source = rt.measurement_source
    if source is None:
        return {}
    try:
        got = source(operation, ctx, rt.kernels.for_operation(operation))
    except Exception as exc:  # perf data is advisory
        log.warning("layerzero.distributed: performance data lookup failed: %s: %s", type(exc).__name__, exc)
        return {}
    return {kid: (m.median_us, m.spread_us, m.samples, m.source, m.failed) for kid, m in got.items()}


class SharedMeasurements:
    """A measurement source answering from rank 0's measured times for the buckets it shared.

    Buckets rank 0 shared answer with exactly its data (even when that is "no measurements"); all
    others go to the rank's own source (``inner``).
    """

    def __init__(self, inner: Any, shared: Mapping[tuple[Any, ...], Mapping[str, tuple[Any, ...]]],
                 source_rank: int) -> None:
        self.inner = inner
        self.source_rank = source_rank
        self.shared = {k: {kid: Measurement(*v[:4], failed=bool(v[4])) for kid, v in row.items()}
                       for k, row in shared.items()}

    def __call__(self, operation: str, ctx: SelectionContext, specs: tuple[Any, ...]) -> dict[str, Measurement]:
        row = self.shared.get(_perf_key(operation, ctx))
        if row is not None:
            return {s.kernel_id: row[s.kernel_id] for s in specs if s.kernel_id in row}
        return self.inner(operation, ctx, specs) if self.inner is not None else {}

    def __getattr__(self, name: str) -> Any:  # the wrapped source's own API (db, open, ...)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _install_measurements(rt: Runtime, perf: Mapping[tuple[Any, ...], Mapping[str, tuple[Any, ...]]],
                          src_rank: int) -> None:
    current = rt.measurement_source
    inner = current.inner if isinstance(current, SharedMeasurements) else current
    rt.measurement_source = SharedMeasurements(inner, perf, src_rank) if perf else inner
    rt.invalidate("performance data shared by rank 0")


class _InContexts:
    """A lock condition: the call's context is one of a fixed set (compared without device index / TP rank)."""

    __slots__ = ("keys",)

    def __init__(self, keys: frozenset[Wire]) -> None:
        self.keys = keys

    def __call__(self, env: Mapping[str, Any]) -> bool:
        return _wire_from_mapping(env) in self.keys


def _runnable(rt: Runtime, kernel_id: str, ctx: SelectionContext) -> list[str]:
    spec = rt.kernels.find(kernel_id)
    if spec is None:
        return [f"kernel {kernel_id} is not registered here"]
    reasons = [str(r) for r in spec.check(ctx)]
    unavailable = rt.backends.unavailable_reason(spec.backend)
    if unavailable is not None:
        reasons.insert(0, str(unavailable))
    if rt.config.circuit_breaker_enabled and rt.breakers.is_open(kernel_id):  # a lock to it would only raise
        reasons.append("its circuit breaker is open on this rank")
    return reasons


# -- collectives -----------------------------------------------------------------------------------

def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_gather(obj: Any, group: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _broadcast(obj: Any, src_group_rank: int, group: Any) -> Any:
    dist = _dist()
    if dist is None:
        return obj
    src = src_group_rank if group is None else dist.get_global_rank(group, src_group_rank)
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _ranks(group: Any) -> tuple[int, int, int]:
    """(global rank, rank in group, group size)."""
    dist = _dist()
    if dist is None:
        return 0, 0, 1
    return dist.get_rank(), dist.get_rank(group), dist.get_world_size(group)


def _union(per_rank: Iterable[list[tuple[str, Wire]]]) -> list[tuple[str, Wire]]:
    out: dict[tuple[str, Wire], None] = {}
    for entries in per_rank:
        for e in entries:
            out[(e[0], tuple(e[1]))] = None
    return list(out)


def _describe(operation: str, w: Wire) -> str:
    return format_context(operation, context_from_wire(w))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _rank_list(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in sorted(ranks))


# -- reports ----------------------------------------------------------------------------------------

@dataclass
class SyncReport:
    """What :func:`synchronize` did (identical on every rank)."""

    world_size: int
    source_rank: int
    decisions: list[dict[str, Any]] = field(default_factory=list)
    perf_buckets: int = 0
    policy_digests: dict[int, str] = field(default_factory=dict)
    problems: dict[int, list[str]] = field(default_factory=dict)
    checked: ConsistencyReport | None = None

    @property
    def policy_mismatch(self) -> list[int]:
        """Ranks whose own policy differs from the source rank's (their decisions were overridden)."""
        ref = self.policy_digests.get(self.source_rank)
        return sorted(r for r, d in self.policy_digests.items() if d != ref)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def __str__(self) -> str:
        lines = [f"layerzero.distributed.synchronize: {_count(len(self.decisions), 'context')} decided by rank "
                 f"{self.source_rank} for {_count(self.world_size, 'rank')}; measured times shared for "
                 f"{_count(self.perf_buckets, 'shape bucket')}"]
        for d in self.decisions:
            lines.append(f"  {d['context']} -> {d['kernel']}")
        if self.policy_mismatch:
            lines.append(f"  own policy differs from rank {self.source_rank}'s on "
                         f"{_rank_list(self.policy_mismatch)} (rank {self.source_rank}'s choices are in force there)")
        for rank, problems in sorted(self.problems.items()):
            for p in problems:
                lines.append(f"  rank {rank}: {p}")
        return "\n".join(lines)


@dataclass
class ConsistencyReport:
    """The answer of :func:`check_consistency` when every rank agrees."""

    world_size: int
    contexts: int
    policy_digests: dict[int, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"layerzero.distributed.check_consistency: all of {_count(self.world_size, 'rank')} select the same "
                f"kernel for each of {_count(self.contexts, 'dispatched context')}")


# -- public API ------------------------------------------------------------------------------------

_auto = env_flag("LAYERZERO_DIST_CHECK")


def auto_check(enabled: bool = True) -> bool:
    """Run :func:`check_consistency` at the end of every :func:`synchronize` (returns the previous setting).

    Also switched on by the environment variable ``LAYERZERO_DIST_CHECK=1``.
    """
    global _auto
    previous, _auto = _auto, bool(enabled)
    return previous


def synchronize(group: Any = None, *, src: int = 0, strict: bool = True, check: bool | None = None
                ) -> SyncReport:
    """Make every rank of ``group`` use rank ``src``'s kernel choices (a collective: call it on every rank).

    Args:
        group: a ``torch.distributed`` process group (default: the whole world).
        src: the rank (within ``group``) whose decisions everyone adopts.
        strict: raise :class:`SelectionDivergenceError` on every rank when some rank cannot run the
            source rank's choice (not registered, rejected by its constraints, its backend missing, or its
            circuit breaker open there), after taking this call's locks back on every rank (the locks of an
            earlier synchronize stay); with ``strict=False`` the problems are only reported.
        check: run :func:`check_consistency` afterwards (default: the :func:`auto_check` setting).

    Returns:
        A :class:`SyncReport`, the same on every rank.

    Example:
        >>> model(warmup_batch)                     # dispatch the shapes once
        >>> layerzero.distributed.synchronize()     # every rank now runs rank 0's kernels
    """
    rt = get_runtime()
    log_ = track(rt)
    global_rank, group_rank, world = _ranks(group)
    contexts = _union(_all_gather(log_.wires(), group))

    payload = None
    if group_rank == src:
        policy = _user_policy(rt)
        decisions = []
        perf: dict[tuple[Any, ...], dict[str, tuple[Any, ...]]] = {}
        for operation, w in contexts:
            ctx = context_from_wire(w)
            decision = _decide(rt, operation, ctx, policy)
            decisions.append((operation, w, None if isinstance(decision, str) else decision,
                              decision if isinstance(decision, str) else None))
            key = _perf_key(operation, ctx)
            if key not in perf:
                perf[key] = _measure(rt, operation, ctx)
        payload = {"rank": global_rank, "decisions": decisions, "perf": perf, "policy_digest": policy.digest}
    payload = _broadcast(payload, src, group)

    earlier = [r for r in rt.policy.api_rules if r.origin == SYNC_ORIGIN]
    problems = _install(rt, payload, is_source=group_rank == src)
    gathered = _all_gather((global_rank, problems, _user_policy(rt).digest), group)
    report = SyncReport(
        world_size=world, source_rank=payload["rank"],
        decisions=[{"operation": op, "context": _describe(op, w), "kernel": ranked[0] if ranked else err}
                   for op, w, ranked, err in payload["decisions"]],
        perf_buckets=sum(1 for row in payload["perf"].values() if row),
        policy_digests={r: d for r, _, d in gathered},
        problems={r: p for r, p, _ in gathered if p},
    )
    if report.policy_mismatch:
        log.warning("layerzero.distributed: policy differs from rank %d's on %s; rank %d's kernel choices are "
                    "in force for the synchronized contexts", report.source_rank,
                    _rank_list(report.policy_mismatch), report.source_rank)
    if strict and not report.ok:  # every rank raises: every rank takes this sync's locks back
        rt.policy.remove(lambda r: r.origin == SYNC_ORIGIN)
        for rule in earlier:
            rt.policy.add(rule, replace_same_target=False)
        raise SelectionDivergenceError(
            "layerzero.distributed.synchronize: some ranks cannot run rank "
            f"{report.source_rank}'s kernel choices:\n" + "\n".join(
                f"  rank {r}: {p}" for r, ps in sorted(report.problems.items()) for p in ps),
            differences=[{"rank": r, "problem": p} for r, ps in sorted(report.problems.items()) for p in ps])
    if _auto if check is None else check:
        report.checked = check_consistency(group)
    return report


def _install(rt: Runtime, payload: Mapping[str, Any], *, is_source: bool) -> list[str]:
    """Put the source rank's decisions in force here; returns this rank's problems.

    The source rank keeps its own measurement source (its data is the shared data)."""
    src_rank = payload["rank"]
    problems: list[str] = []
    groups: dict[tuple[str, str], set[Wire]] = {}
    checks: list[tuple[str, SelectionContext, str]] = []
    for operation, w, ranked, err in payload["decisions"]:
        w = tuple(w)
        if not ranked:
            continue  # the source rank cannot run it either: nothing to agree on (its error reaches every rank)
        ctx = context_from_wire(w)
        kid = ranked[0]
        reasons = _runnable(rt, kid, ctx)
        if reasons:
            problems.append(f"{format_context(operation, ctx)}: rank {src_rank} runs {kid}, which cannot run "
                            f"here: {'; '.join(reasons)}")
            continue
        groups.setdefault((operation, kid), set()).add(w)
        checks.append((operation, ctx, kid))
    state = rt.policy
    state.remove(lambda r: r.origin == SYNC_ORIGIN)
    for (operation, kid), keys in sorted(groups.items()):
        digest = hashlib.sha256(repr(sorted(keys, key=repr)).encode()).hexdigest()[:8]
        rule = Rule("lock", operation, (kid,), condition=_InContexts(frozenset(keys)),
                    condition_source=f"context is one of {len(keys)} synchronized from rank {src_rank} [{digest}]",
                    origin=SYNC_ORIGIN)
        state.add(rule, replace_same_target=False)
    if not is_source:
        _install_measurements(rt, {tuple(k): v for k, v in payload["perf"].items()}, src_rank)
    for operation, ctx, kid in checks:
        now = _primary(_decide(rt, operation, ctx))
        if now != kid:
            problems.append(f"{format_context(operation, ctx)}: rank {src_rank} runs {kid}, this rank still "
                            f"selects {now} (a scoped policy or plan table overrides it)")
    return problems


def check_consistency(group: Any = None) -> ConsistencyReport:
    """Check that every rank of ``group`` selects the same kernel for every dispatched context (a collective).

    Each rank selects, with its policy, perf data and breakers as they are now, for the union of the
    contexts any rank has dispatched; the answers are compared.

    Raises:
        SelectionDivergenceError: on every rank, when ranks disagree; ``.differences`` lists, per context,
            the operation, the context and each rank's kernel.

    Example:
        >>> layerzero.distributed.check_consistency()   # after warm-up, on every rank
    """
    rt = get_runtime()
    log_ = track(rt)
    global_rank, _, world = _ranks(group)
    contexts = _union(_all_gather(log_.wires(), group))
    mine = [_primary(_decide(rt, op, context_from_wire(w))) for op, w in contexts]
    gathered = _all_gather((global_rank, mine, _user_policy(rt).digest), group)
    digests = {r: d for r, _, d in gathered}
    differences = []
    for i, (operation, w) in enumerate(contexts):
        by_rank = {r: decisions[i] for r, decisions, _ in gathered}
        if len(set(by_rank.values())) > 1:
            differences.append({"operation": operation, "context": _describe(operation, w), "kernels": by_rank})
    if differences:
        raise SelectionDivergenceError(_divergence_message(differences, len(contexts), digests),
                                       differences=differences)
    return ConsistencyReport(world, len(contexts), digests)


def _divergence_message(differences: list[dict[str, Any]], total: int, digests: Mapping[int, str]) -> str:
    lines = [f"layerzero: ranks chose different kernels for {len(differences)} of {total} dispatched contexts:"]
    for d in differences:
        by_kernel: dict[str, list[int]] = {}
        for r, kid in d["kernels"].items():
            by_kernel.setdefault(kid, []).append(r)
        groups = sorted(by_kernel.items(), key=lambda item: min(item[1]))
        parts = "; ".join(f"{_rank_list(rs)} -> {kid}" for kid, rs in groups)
        lines.append(f"  {d['context']}: {parts}")
    if len(set(digests.values())) > 1:
        lines.append("policy digests differ: " + ", ".join(f"rank {r} {d}" for r, d in sorted(digests.items())))
    lines.append("call layerzero.distributed.synchronize() on every rank to adopt rank 0's choices")
    return "\n".join(lines)
