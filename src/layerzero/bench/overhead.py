"""``layerzero bench``'s overhead lines: each documented call path against the direct call it replaces.

Every line times the candidate and the direct call in alternating batches (:func:`layerzero.timing.
interleaved`) on a decode-shaped attention call (q 1x8x1x64 over 128 keys) or a 4096-wide RMSNorm, so
the ratio is the path's own cost. The ``lz.*`` headline lines are budgeted in absolute time (at most
1.0 µs over the direct call at p50, what a Python call path can promise); their ratio to the direct
call is printed beside it, and the old 5% line is kept for information. The dispatch lines are budgeted
at 10% over the direct call, with ``record_timing`` on (the default: each result carries its timing) and
off (the seed's low-latency configuration). Components (the key, the guards, the lookup, the breaker check) are timed
against an empty call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.timing import PairResult, interleaved

__all__ = ["OverheadRow", "run_overhead", "ratio_row"]

#: The lz.* headline budget: nanoseconds over the direct call, at p50.
HEADLINE_NS = 1000.0


@dataclass
class OverheadRow:
    path: str
    direct: str
    result: PairResult | None
    budget: str
    passed: bool
    note: str = ""
    value: float | None = None
    info: bool = False  # shown for comparison, no budget: never a MISS

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "direct": self.direct, "budget": self.budget, "passed": self.passed,
                "note": self.note, "value": self.value, "info": self.info,
                "result": self.result.to_dict() if self.result else None}


def ratio_row(path: str, direct: str, res: PairResult, limit: float, note: str = "", info: bool = False
              ) -> OverheadRow:
    """A line budgeted as a ratio: at most ``limit`` over the direct call (p50)."""
    budget = f"<= {limit * 100:.0f}% over direct (p50)" if not info else f"{limit * 100:.0f}% line (for information)"
    return OverheadRow(path, direct, res, budget, info or res.ratio <= 1 + limit, note, res.ratio, info=info)


def _headline(path: str, direct: str, res: PairResult, note: str) -> list[OverheadRow]:
    """The absolute budget line, then the 5% line for information."""
    over = res.overhead_ns
    row = OverheadRow(path, direct, res, f"<= {HEADLINE_NS / 1000:.1f} µs over direct (p50)", over <= HEADLINE_NS,
                      f"{over:.0f} ns over; {note}", res.ratio)
    return [row, ratio_row(f"{path}, as a ratio", direct, res, 0.05, note, info=True)]


@dataclass
class _Setup:
    """What every group of lines shares: the tensors, the timing pair and the runtime."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    x: torch.Tensor
    w: torch.Tensor
    pair: Callable[[Callable[[], Any], Callable[[], Any]], PairResult]
    rounds: int
    rt: Any

    @property
    def attn_args(self) -> tuple[Any, ...]:
        return (self.q, self.k, self.v, None, False, 0.0, None, None)

    def cached_plan(self, operation: str, args: tuple[Any, ...]) -> Any:
        from layerzero.inspection import cache_keys

        family, key = cache_keys(operation, args)  # type: ignore[misc]
        return self.rt.plans.data.get(family) or self.rt.plans.data[key]


def _plan_note(plan: Any) -> str:
    kind = "shape-free plan" if plan.family is not None else "exact-shape plan"
    return f"kernel: {plan.kernel_id}, {kind}"


def _ops_lines(s: _Setup, progress: Callable[[str], None]) -> list[OverheadRow]:
    import layerzero as lz

    q, k, v, x, w = s.q, s.k, s.v, s.x, s.w
    sdpa, frms, ns = F.scaled_dot_product_attention, F.rms_norm, (x.shape[-1],)
    lz.attention(q, k, v)
    lz.rms_norm(x, w)
    rows: list[OverheadRow] = []
    progress("overhead lz.attention")
    rows += _headline("lz.attention(q, k, v) cached", "F.scaled_dot_product_attention",
                      s.pair(lambda: sdpa(q, k, v), lambda: lz.attention(q, k, v)),
                      _plan_note(s.cached_plan("attention.full", s.attn_args)))
    progress("overhead lz.rms_norm")
    rows += _headline("lz.rms_norm(x, w) cached", "F.rms_norm", s.pair(lambda: frms(x, ns, w, 1e-6),
                                                                       lambda: lz.rms_norm(x, w)),
                      _plan_note(s.cached_plan("rms_norm", (x, w, 1e-6))))
    if s.cached_plan("attention.full", s.attn_args).family is None:
        return rows
    # For comparison: the same calls through exact-shape plans, as in a call family whose selection depends
    # on shapes (measured times on a tuned GPU, shape-conditional policy rules).
    saved = s.rt.config
    s.rt.configure(saved.replace(shape_free_plans=False))
    try:
        lz.attention(q, k, v)
        lz.rms_norm(x, w)
        progress("overhead exact-shape plans")
        for path, direct, pair, plan in (
                ("lz.attention(q, k, v), exact-shape plan", "F.scaled_dot_product_attention",
                 (lambda: sdpa(q, k, v), lambda: lz.attention(q, k, v)), ("attention.full", s.attn_args)),
                ("lz.rms_norm(x, w), exact-shape plan", "F.rms_norm",
                 (lambda: frms(x, ns, w, 1e-6), lambda: lz.rms_norm(x, w)), ("rms_norm", (x, w, 1e-6)))):
            res = s.pair(*pair)
            rows.append(OverheadRow(path, direct, res, "none (for comparison)", True,
                                    _plan_note(s.cached_plan(*plan)), res.ratio, info=True))
    finally:
        s.rt.configure(saved)
        lz.attention(q, k, v)
    return rows


def _dispatch_lines(s: _Setup, progress: Callable[[str], None]) -> list[OverheadRow]:
    from layerzero.context import SelectionContext
    from layerzero.dispatch import (
        StaticDispatcherBuilder,
        create_config_dispatcher,
        create_dynamic_dispatcher,
        get_global_dispatcher,
    )

    q, k, v = s.q, s.k, s.v
    sdpa = F.scaled_dot_product_attention
    kernel = s.cached_plan("attention.full", s.attn_args).kernels[0].impl
    static = (StaticDispatcherBuilder().with_kernel(kernel, operation="attention.full", default=True)
              .with_config(enable_telemetry=False).build())
    quiet = (StaticDispatcherBuilder().with_kernel(kernel, operation="attention.full", default=True)
             .with_config(enable_telemetry=False, record_timing=False).build())  # the seed's low-latency config
    resolved = static.resolve("attention.full")
    args = s.attn_args
    progress("overhead static resolve")
    row = ratio_row("static resolve(op)(...)", "the kernel itself",
                    s.pair(lambda: kernel(*args), lambda: static.resolve("attention.full")(*args)), 0.02,
                    "resolve returns the kernel itself" if resolved is kernel else "resolve returned a wrapper")
    row.passed = row.passed and resolved is kernel
    rows = [row]
    inputs = {"q": q, "k": k, "v": v}
    bshd = {"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2)}

    def from_bshd() -> tuple[torch.Tensor, ...]:  # what a direct call on BSHD tensors does first
        return bshd["q"].transpose(1, 2), bshd["k"].transpose(1, 2), bshd["v"].transpose(1, 2)
    gd = get_global_dispatcher()
    untimed = create_dynamic_dispatcher(config=s.rt.config.replace(record_timing=False))
    causal = (q, k, v, None, True, 0.0, None, None)
    x, w, ns = s.x, s.w, (s.x.shape[-1],)
    norm = {"x": x, "weight": w}
    mvcc = create_dynamic_dispatcher(use_mvcc_cache=True)  # the seed's "MVCC cache for concurrent access"
    config = create_config_dispatcher(config_path={"version": "1.0"})  # CONFIG mode, rules from a (here empty) file
    ctx = SelectionContext(batch_size=q.shape[0], seq_len=k.shape[2], dtype=q.dtype, device=q.device.type)  # reused
    cases: list[tuple[str, str, Callable[[], Any], Callable[[], Any]]] = [
        ("static dispatch(op, inputs)", "the kernel itself", lambda: kernel(*args),
         lambda: static.dispatch("attention.full", inputs)),
        ("static dispatch(op, inputs), record_timing=False", "the kernel itself", lambda: kernel(*args),
         lambda: quiet.dispatch("attention.full", inputs)),
        ("static dispatch(op, inputs, layout='BSHD')", "the kernel on BSHD tensors (3 transposes in, 1 out)",
         lambda: kernel(*from_bshd(), None, False, 0.0, None, None).transpose(1, 2),
         lambda: static.dispatch("attention.full", bshd, layout="BSHD")),
        ("static dispatch(op, inputs, is_causal=True)", "the kernel itself", lambda: kernel(*causal),
         lambda: static.dispatch("attention.full", inputs, is_causal=True)),
        ("dynamic dispatch(op, inputs) cached", "F.scaled_dot_product_attention", lambda: sdpa(q, k, v),
         lambda: gd.dispatch("attention.full", inputs)),
        ("dynamic dispatch(op, inputs) cached, record_timing=False", "F.scaled_dot_product_attention",
         lambda: sdpa(q, k, v), lambda: untimed.dispatch("attention.full", inputs)),
        ("dynamic dispatch(op, inputs, layout='BSHD') cached", "F.scaled_dot_product_attention on BSHD tensors",
         lambda: sdpa(*from_bshd()).transpose(1, 2), lambda: gd.dispatch("attention.full", bshd, layout="BSHD")),
        ("dynamic dispatch('rms_norm', inputs) cached", "F.rms_norm", lambda: F.rms_norm(x, ns, w, 1e-6),
         lambda: gd.dispatch("rms_norm", norm)),
        ("MVCC dispatcher: dispatch(op, inputs) cached", "F.scaled_dot_product_attention", lambda: sdpa(q, k, v),
         lambda: mvcc.dispatch("attention.full", inputs)),
        ("config dispatcher: dispatch(op, inputs) cached", "F.scaled_dot_product_attention", lambda: sdpa(q, k, v),
         lambda: config.dispatch("attention.full", inputs)),
        ("dynamic dispatch(op, inputs, context=ctx) cached", "F.scaled_dot_product_attention", lambda: sdpa(q, k, v),
         lambda: gd.dispatch("attention.full", inputs, context=ctx)),
    ]
    for path, direct, base, cand in cases:
        cand()
        progress(f"overhead {path}")
        rows.append(ratio_row(path, direct, s.pair(base, cand), 0.10))
    # For comparison: a miss on every call (the seed's "DYNAMIC (uncached)": validation, the context, selection
    # with its full trace, the plan and its checked first run), as a new call family's first call costs.
    uncached = create_dynamic_dispatcher(config=s.rt.config.replace(enable_cache=False))
    uncached.dispatch("attention.full", inputs)
    progress("overhead uncached dispatch")
    res = s.pair(lambda: sdpa(q, k, v), lambda: uncached.dispatch("attention.full", inputs))
    rows.append(OverheadRow("dynamic dispatch(op, inputs), enable_cache=False", "F.scaled_dot_product_attention",
                            res, "none (for comparison)", True,
                            f"{res.overhead_ns / 1000:.1f} µs over: selection on every call", res.ratio, info=True))
    return rows


def _component_lines(s: _Setup, att: PairResult, progress: Callable[[str], None]) -> list[OverheadRow]:
    from layerzero.ops.attention import ATTENTION

    rt, rounds, batch = s.rt, s.rounds, 20
    family, key = ATTENTION.calls.keys("attention.full", *s.attn_args)
    data = rt.plans.data
    shape_free = family in data
    key = family if shape_free else key
    contract = ATTENTION.calls  # the key and guards lz.attention's generated entry runs inline
    op_name, attn_args = "attention.full", s.attn_args

    def empty(*args: Any) -> None:
        return None

    def noop() -> None:
        return None

    plan = s.cached_plan("attention.full", attn_args)

    def gate_and_count() -> None:
        if plan.gate.blocked:
            return
        plan.stats.calls += 1

    progress("overhead components")
    direct_ns, cached_ns = att.direct.p50_ns, att.candidate.p50_ns
    kind = "shape-free family key" if shape_free else "exact-shape key"
    q, k, v = attn_args[:3]
    hit = contract.compiled  # the compiled hot path's forms of the key and guards, where lz.attention uses them
    key_line = ("context key from tensors, and the lookup (compiled)", lambda: empty(data, op_name, *attn_args[:3]),
                lambda: hit.find(data, op_name, q, k, v, False, 0.0, None), "family key, guard, lookup") \
        if hit is not None else ("context key from tensors", lambda: empty(op_name, *attn_args),
                                 lambda: contract.keys(op_name, *attn_args), "family and exact key")
    guard_line = ("call-contract shape guard (compiled)", lambda: empty(q, k, v), lambda: hit.admits(q, k, v),
                  "shapes; the scalars are checked by type as the call binds them") if hit is not None else \
        ("call-contract guards", lambda: empty(op_name, *attn_args), lambda: contract.admits(op_name, *attn_args),
         "shapes and scalars")
    rows = []
    for path, base, cand, share, of, note in (
            ("plan-cache lookup", noop, lambda: data.get(key), 0.01, "the direct SDPA call", kind),
            (*key_line[:3], 0.03, "the direct SDPA call", key_line[3]),
            (*guard_line[:3], 0.03, "the direct SDPA call", guard_line[3]),
            ("breaker check + telemetry record", noop, gate_and_count, 0.05, "the cached lz.attention call", "")):
        res = interleaved(base, cand, rounds=rounds, batch=batch)
        ref = cached_ns if "lz.attention" in of else direct_ns
        rows.append(OverheadRow(path, "empty call", res, f"<= {share * 100:.0f}% of {of}",
                                res.overhead_ns <= share * ref,
                                f"{res.overhead_ns:.0f} ns" + (f" ({note})" if note else ""),
                                res.overhead_ns / ref))
    return rows


def run_overhead(device: str, dtype: torch.dtype, quick: bool, sync: Callable[[], None] | None,
                 progress: Callable[[str], None]) -> list[OverheadRow]:
    """Every overhead line (see the module docstring)."""
    from layerzero.runtime import get_runtime

    kw = dict(device=device, dtype=dtype)
    rounds = 200 if quick else 400  # rounds of 20 calls each side: the p50 difference settles by ~200

    def pair(direct: Callable[[], Any], cand: Callable[[], Any]) -> PairResult:
        return interleaved(direct, cand, rounds=rounds, batch=20, sync=sync)

    s = _Setup(torch.randn(1, 8, 1, 64, **kw), torch.randn(1, 8, 128, 64, **kw), torch.randn(1, 8, 128, 64, **kw),
               torch.randn(1, 4096, **kw), torch.randn(4096, **kw), pair, rounds, get_runtime())
    rows = _ops_lines(s, progress)
    att = rows[0].result
    assert att is not None
    rows += _dispatch_lines(s, progress)
    rows += _component_lines(s, att, progress)
    return rows
