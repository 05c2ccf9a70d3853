"""The tuner: measure every eligible kernel for a set of shape buckets and store the times.

For each (operation, context) the tuner asks the selection engine which
kernels can run it (availability and declared constraints only: policies are
applied later, at selection time), then for each kernel, in priority order:

1. **correctness first**: fresh random inputs (``OpDef.make_inputs``), the
   kernel's output compared with the float64 ``OpDef.reference`` within the
   kernel's declared tolerance (x4, as the runtime's verify mode). The check
   runs on a capped copy of the shape (batch <= 2, sequences <= 512, rows <=
   256) because a float64 reference of a 16k-token attention does not fit in
   memory; the full shape is then run once and its output checked for shape,
   dtype, device and NaN/Inf. A kernel that raises or is wrong is recorded as
   *failed*, and selection never picks it for that bucket;
2. **timing**: :func:`layerzero.tuning.timing.time_call` (``triton.testing.
   do_bench`` on CUDA, ``perf_counter_ns`` on CPU): warm-up, repeats, median
   and spread.

Each bucket's results are written in one transaction, which invalidates the
runtime's cached plans. ``budget_s`` bounds the whole run: once it is spent,
the remaining kernels and buckets are reported as skipped.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from layerzero.context import SelectionContext
from layerzero.errors import LayerZeroError, PerfDBError, is_out_of_memory
from layerzero.ops import canonical_operation, op_for
from layerzero.ops.base import OpDef
from layerzero.selection.engine import Measurement, SelectionEngine
from layerzero.spec import KernelSpec
from layerzero.tuning.buckets import bucket_of
from layerzero.tuning.fingerprint import hardware_fingerprint
from layerzero.tuning.report import BucketResult, KernelResult, TuneReport
from layerzero.tuning.source import libraries_for
from layerzero.timing import quantile, time_call

if TYPE_CHECKING:
    from layerzero.runtime import Runtime
    from layerzero.tuning.perfdb import PerfDB, Record

__all__ = ["Tuner", "KernelResult", "BucketResult", "TuneReport", "check_context"]

Progress = Callable[[int, int, str], None]

_CHECK_BATCH = 2
_CHECK_SEQ = 512
_CHECK_ROWS = 256


def check_context(operation: str, ctx: SelectionContext) -> SelectionContext:
    """A capped copy of ``ctx`` small enough for a float64 reference (same dtype, heads, head dim, flags)."""
    family = operation.split(".", 1)[0]
    b = ctx.batch_size
    changes: dict[str, Any] = {}
    if b is not None and b > _CHECK_BATCH:
        changes["batch_size"] = _CHECK_BATCH
    if family == "attention":
        sq = ctx.seq_len_q or 16
        sk = ctx.seq_len_k or sq
        if sq == sk:
            sq = sk = min(sq, _CHECK_SEQ)
        elif sq < sk:
            sk2 = min(sk, _CHECK_SEQ)
            sq = min(sq, sk2)
            sk = sk2
        else:
            sq2 = min(sq, _CHECK_SEQ)
            sk = min(sk, sq2)
            sq = sq2
        changes.update(seq_len_q=sq, seq_len_k=sk)
    elif family == "rope":
        if ctx.seq_len_q is not None and ctx.seq_len_q > _CHECK_SEQ:
            changes.update(seq_len_q=_CHECK_SEQ, seq_len_k=_CHECK_SEQ)
        if ctx.num_tokens is not None:
            changes["num_tokens"] = min(ctx.num_tokens, _CHECK_ROWS)
    else:
        if ctx.num_tokens is not None and ctx.num_tokens > _CHECK_ROWS:
            changes["num_tokens"] = _CHECK_ROWS
            if b is not None and b > _CHECK_ROWS:
                changes["batch_size"] = _CHECK_ROWS
    return ctx.replace(**changes) if changes else ctx


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _nonfinite(out: Any) -> str | None:
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
        if not bool(torch.isfinite(out).all()):
            return "returned NaN or Inf"
    return None


def _per_call_us(impl: Callable[..., Any], args: tuple[Any, ...], device: torch.device, n: int = 1) -> float:
    """Wall time per call of ``n`` back-to-back calls, the device synchronized on both sides (us)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        out = impl(*args)
        del out
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n * 1e6


def _prune_estimate_us(impl: Callable[..., Any], args: tuple[Any, ...], device: torch.device,
                       above_us: float) -> float:
    """A cheap upper estimate of one call: a single synchronized call, and when that exceeds ``above_us``
    a second look over enough back-to-back calls (up to 50, about 2 ms) to amortize the synchronization,
    which alone costs tens of microseconds on some hosts."""
    single = _per_call_us(impl, args, device)
    if single <= above_us:
        return single
    n = min(50, max(1, int(2000.0 / single)))
    return min(single, _per_call_us(impl, args, device, n))


def _compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from torch.compile's machinery (Dynamo, Inductor, a C++ or Triton compiler)
    rather than from the kernel: a compiled-mode bucket then stays unmeasured for that kernel."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _compiled_note(spec: KernelSpec, ctx: SelectionContext) -> str:
    """How a compiled-mode measurement ran (empty for an eager one)."""
    if not ctx.compiling:
        return ""
    return ", torch.compile: " + ("Inductor's code" if spec.compile_native else "opaque op")


def _callable(spec: KernelSpec, ctx: SelectionContext) -> Callable[..., Any]:
    """What a plan for ``ctx`` would call: the spec's specialization when it has one, else ``impl``."""
    if spec.specialize is not None:
        try:
            return spec.specialize(ctx)[1]
        except Exception:  # a specialization that cannot be built: time the generic callable
            return spec.impl
    return spec.impl


#: Training buckets of at least this many rows are timed device-bound on CUDA (:func:`device_bound`).
DEVICE_BOUND_MIN_TOKENS = 1024


def device_bound(ctx: SelectionContext) -> bool:
    """Whether ``ctx``'s bucket is timed by its kernels' time with the host ahead
    (:func:`~layerzero.timing.time_cuda_device`) rather than alone: a CUDA training bucket of at least
    :data:`DEVICE_BOUND_MIN_TOKENS` rows. Such a step's matmuls keep the GPU busier than its host, so a Triton
    launcher's host time hides behind them (on an H200, Liger's SwiGLU forward + backward at 8192 x 8192 timed
    alone read 332-630 us across processes for 298 us of kernels; host ahead, 304 us in every process).
    Smaller training steps are host-bound, and there the host time is the cost: timed alone, as inference."""
    return ctx.requires_grad and ctx.device.type == "cuda" and (ctx.num_tokens or 0) >= DEVICE_BOUND_MIN_TOKENS


def timed_call_for(op: OpDef, impl: Callable[..., Any], args: tuple[Any, ...], ctx: SelectionContext
                ) -> Callable[[], Any]:
    """What one timed call runs: the kernel's forward, or for a ``grad=1`` bucket (``ctx.requires_grad``) its
    forward and backward through the op's :attr:`~layerzero.ops.base.OpDef.grad_inputs`, as a training step
    runs it (a kernel with a fast forward and a slow backward must not win a training bucket)."""
    if not ctx.requires_grad:
        return lambda: impl(*args)
    wanted = op.grad_inputs
    leaves: list[torch.Tensor] = []
    call_args = []
    for name, a in zip(op.arg_names, args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and (wanted is None or name in wanted):
            a = a.detach().requires_grad_(True)
            leaves.append(a)
        call_args.append(a)
    call_args += list(args[len(call_args):])
    frozen = tuple(call_args)

    def forward_backward() -> Any:
        with torch.enable_grad():
            out = impl(*frozen)
            outs = [o for o in (out if isinstance(out, tuple) else (out,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs and leaves:
                torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        return out

    return forward_backward


class Tuner:
    """Measures kernels and stores the results in a :class:`PerfDB`.

    Args:
        db: where results go (``None``: measure and report only).
        runtime: registries to take kernels from (default: the global runtime).
        budget_s: wall-clock budget for :meth:`tune` (``None``: unlimited).
        check: compare each kernel with the float64 reference before timing it.
        quick: fewer timing repeats (online tuning).
        source: stored with each row (``"tune"``, ``"online"``).
        seed: base seed of the random inputs (each kernel gets fresh inputs).
        progress: ``progress(done, total, label)`` after each bucket.

    Example:
        >>> report = Tuner(PerfDB("/tmp/perf.db")).tune({"rms_norm": grid("rms_norm", "quick", device="cpu")})
        >>> print(report.table())
    """

    def __init__(self, db: PerfDB | None = None, *, runtime: Runtime | None = None, budget_s: float | None = None,
                 check: bool = True, quick: bool = False, source: str = "tune", seed: int = 0,
                 progress: Progress | None = None) -> None:
        if runtime is None:
            from layerzero.runtime import get_runtime

            runtime = get_runtime()
        self.db = db
        self.runtime = runtime
        self.budget_s = budget_s
        self.check = check
        self.quick = quick
        self.source = source
        self.seed = int(seed)
        self.progress = progress
        self._draws = 0
        self._compiled: dict[str, Callable[..., Any]] = {}  # kernel id -> compiled callable, for one bucket
        self.store_error: str | None = None  # why the database took no more rows (the run goes on measuring)

    # -- public ------------------------------------------------------------------------
    def eligible(self, operation: str, ctx: SelectionContext) -> tuple[KernelSpec, ...]:
        """Kernels that can run ``ctx`` (availability + constraints), highest priority first."""
        sel = self.runtime.engine.select(operation, ctx, raise_on_empty=False, use_measurements=False)
        return sel.ranked

    def tune(self, plan: dict[str, Sequence[SelectionContext]]) -> TuneReport:
        """Measure every bucket of ``plan`` (``{operation: [contexts]}``) within the budget."""
        t0 = time.perf_counter()
        deadline = None if self.budget_s is None else t0 + self.budget_s
        total = sum(len(v) for v in plan.values())
        done = 0
        buckets: list[BucketResult] = []
        exhausted = False
        device = "cpu"
        for operation, contexts in plan.items():
            op_for(operation)  # an unknown operation fails here, naming the known families
            operation = canonical_operation(operation)  # measurements under the name calls look up
            for ctx in contexts:
                device = str(ctx.device)
                if deadline is not None and time.perf_counter() >= deadline:
                    exhausted = True
                    specs = self.eligible(operation, ctx)
                    buckets.append(BucketResult(operation, ctx, bucket_of(operation, ctx),
                                                [KernelResult(s.kernel_id, s.backend, "skipped",
                                                              error="tuning budget exhausted") for s in specs]))
                else:
                    result = self.tune_bucket(operation, ctx, deadline=deadline)
                    exhausted = exhausted or any(r.status == "skipped" for r in result.results)
                    buckets.append(result)
                done += 1
                if self.progress is not None:
                    self.progress(done, total, f"{operation} {buckets[-1].dtype} {buckets[-1].bucket}")
        hw = hardware_fingerprint(device).to_dict()
        return TuneReport(buckets, time.perf_counter() - t0, str(self.db.path) if self.db is not None else None,
                          device, hw, self.budget_s, exhausted, self.store_error)

    def tune_bucket(self, operation: str, ctx: SelectionContext, *, specs: Sequence[KernelSpec] | None = None,
                    deadline: float | None = None) -> BucketResult:
        """Measure ``specs`` (default: every eligible kernel) for one context and store the results."""
        t0 = time.perf_counter()
        op = op_for(operation)
        operation = canonical_operation(operation)
        bucket = bucket_of(operation, ctx)
        if specs is None:
            specs = self.eligible(operation, ctx)
        results: list[KernelResult] = []
        for spec in specs:
            if deadline is not None and time.perf_counter() >= deadline:
                results.append(KernelResult(spec.kernel_id, spec.backend, "skipped", error="tuning budget exhausted"))
                continue
            timed = [r.median_us for r in results if r.status == "ok" and r.median_us]
            results.append(self.measure(op, operation, ctx, spec,
                                        prune_above_us=self.PRUNE_FACTOR * min(timed) if timed else None))
        selected = self._winner(operation, ctx, results)
        default = next((r for r in results if r.status == "ok"), None)  # specs come highest priority first
        challenger = self._challenger(results, selected, default)
        if challenger is not None and (deadline is None or time.perf_counter() < deadline):
            # The priority choice and its closest rival are timed again, alternately: a measured winner
            # replaces the priority choice only if it stays faster beyond the noise across runs (not just
            # within one do_bench run), and a rival that one noisy run made look slow gets its chance.
            by_id = {s.kernel_id: s for s in specs}
            confirmed = self._confirm(op, operation, ctx, (by_id[challenger.kernel_id], challenger),
                                      (by_id[default.kernel_id], default))  # type: ignore[union-attr]
            if confirmed is not None:
                results = [confirmed.get(r.kernel_id, r) for r in results]
                selected = self._winner(operation, ctx, results)
        self._compiled.clear()  # compiled graphs go with their bucket
        if self.db is not None:
            self._store(operation, ctx, bucket, results)
        elapsed = time.perf_counter() - t0
        self.runtime.telemetry.record_tuning_run(
            operation=operation, dtype=ctx.dtype_name, bucket=bucket, winner=selected,
            default=default.kernel_id if default is not None else None, kernels=len(results),
            failed=sum(r.status == "failed" for r in results), source=self.source, ms=round(elapsed * 1000, 1))
        return BucketResult(operation, ctx, bucket, results, selected, elapsed)

    @staticmethod
    def _challenger(results: list[KernelResult], selected: str | None, default: KernelResult | None
                    ) -> KernelResult | None:
        """What to re-time against the priority choice: the measured winner when it is another kernel,
        else the fastest other kernel within 10% of it (one run's noise can hide a real lead)."""
        if default is None or default.median_us is None:
            return None
        others = [r for r in results if r.status == "ok" and r.kernel_id != default.kernel_id
                  and r.median_us is not None]
        if selected is not None and selected != default.kernel_id:
            return next((r for r in others if r.kernel_id == selected), None)
        close = [r for r in others if r.median_us < 1.10 * default.median_us]  # type: ignore[operator]
        return min(close, key=lambda r: (r.median_us, r.kernel_id)) if close else None

    #: Alternating confirmation rounds per challenged bucket (each a quick timing of both kernels).
    CONFIRM_ROUNDS = 4
    #: A kernel whose quick estimate (:func:`_prune_estimate_us`, after the warm-up) takes this many times
    #: the fastest median so far in its bucket cannot win it: the estimate is stored instead of a full timing
    #: run. (A 200 ms math attention call would otherwise cost do_bench's five estimation calls and repeats.)
    PRUNE_FACTOR = 3.0

    #: A rival replaces the priority choice only when its upper-quartile round is this much faster than the
    #: priority choice's median (and the priority choice keeps its bucket the same way).
    DECISIVE_MARGIN = 0.05

    def _confirm(self, op: OpDef, operation: str, ctx: SelectionContext, rival: tuple[KernelSpec, KernelResult],
                 default: tuple[KernelSpec, KernelResult]) -> dict[str, KernelResult] | None:
        """Time the ``rival`` and the priority choice (``default``) again, alternately
        (:attr:`CONFIRM_ROUNDS` rounds, order flipped each round), on one set of inputs.

        Each kernel keeps the median of its medians (the first measurement's and the rounds'), with a
        spread of at least half their interquartile range. The rival wins only decisively: its
        upper-quartile median (its bad rounds) must beat the priority choice's median by
        :attr:`DECISIVE_MARGIN`; otherwise it is stored with a spread reaching the priority choice's median,
        a tie, which priority breaks (``method`` ends in "not decisive: tie"). A kernel whose call costs more
        host time than GPU time (a Triton kernel launched from Python on a small problem) times with the
        host's state: on an H200, Liger's 4096x4096 RMSNorm read 22.9-29.5 us across rounds against
        F.rms_norm's steady 26.8 us; its good rounds must not decide."""
        impls = [(spec, first, self._impl(spec, operation, ctx)) for spec, first in (rival, default)]
        runs: dict[str, list[float]] = {spec.kernel_id: [] for spec, _, _ in impls}
        rounds = self.CONFIRM_ROUNDS
        try:
            with torch.no_grad():
                inputs = op.make_inputs(operation, ctx, self._generator(ctx.device))
                calls = {spec.kernel_id: timed_call_for(op, impl, inputs, ctx) for spec, _, impl in impls}
                for i in range(rounds):
                    for spec, _, impl in (impls if i % 2 == 0 else impls[::-1]):
                        runs[spec.kernel_id].append(time_call(calls[spec.kernel_id], ctx.device, quick=True,
                                                              device_bound=device_bound(ctx)).median_us)
                del inputs
        except Exception:  # confirmation is advisory: keep the first measurements
            return None
        out: dict[str, KernelResult] = {}
        upper: dict[str, float] = {}
        for spec, first, _ in impls:
            medians = sorted([float(first.median_us or 0.0), *runs[spec.kernel_id]])
            med = statistics.median(medians)
            q25, q75 = quantile(medians, 0.25), quantile(medians, 0.75)
            upper[spec.kernel_id] = q75
            spread = max(float(first.spread_us or 0.0), (q75 - q25) / 2.0)
            out[spec.kernel_id] = KernelResult(first.kernel_id, first.backend, "ok", med, spread, first.samples,
                                               f"{first.method}, confirmed x{rounds}")
        rid = rival[0].kernel_id
        r, d = out[rid], out[default[0].kernel_id]
        if r.median_us is not None and d.median_us is not None and r.median_us < d.median_us:
            if upper[rid] < (1.0 - self.DECISIVE_MARGIN) * d.median_us:
                # decisive: make sure the stored spreads say so too (the runtime ranks by them)
                room = (d.median_us - (d.spread_us or 0.0)) - r.median_us
                if (r.spread_us or 0.0) >= room > 0:
                    out[rid] = KernelResult(r.kernel_id, r.backend, "ok", r.median_us, room * 0.5, r.samples, r.method)
            else:
                out[rid] = KernelResult(r.kernel_id, r.backend, "ok", r.median_us,
                                        max(r.spread_us or 0.0, d.median_us - r.median_us), r.samples,
                                        f"{r.method}, not decisive: tie")
        return out

    def measure(self, op: OpDef, operation: str, ctx: SelectionContext, spec: KernelSpec, *,
                prune_above_us: float | None = None) -> KernelResult:
        """Check one kernel against the reference, then time it at the full shape (or, when its quick
        estimate exceeds ``prune_above_us``, store that estimate: see :attr:`PRUNE_FACTOR`)."""
        args: tuple[Any, ...] = ()
        try:
            with torch.no_grad():
                if self.check:
                    problem = self._check(op, operation, ctx, spec)
                    if problem is not None:
                        return KernelResult(spec.kernel_id, spec.backend, "failed", error=problem)
                args = op.make_inputs(operation, ctx, self._generator(ctx.device))
                impl = self._impl(spec, operation, ctx)
                out = impl(*args)  # also the warm-up that absorbs JIT compilation (and torch.compile's)
                problem = op.check_output(operation, args, out) or _nonfinite(out)
                del out
                if problem is not None:
                    return KernelResult(spec.kernel_id, spec.backend, "failed", error=f"at full shape: {problem}")
                run = timed_call_for(op, impl, args, ctx)
                if ctx.requires_grad:
                    run()  # the backward's own warm-up
                if prune_above_us is not None and not device_bound(ctx):  # (a host-bound estimate would prune)
                    est = _prune_estimate_us(lambda: run(), (), ctx.device, prune_above_us)
                    if est > prune_above_us:
                        return KernelResult(spec.kernel_id, spec.backend, "ok", est, 0.0, 1,
                                            f"quick estimate, pruned: over {self.PRUNE_FACTOR:g}x the bucket's "
                                            "fastest" + _compiled_note(spec, ctx))
                timing = time_call(run, ctx.device, quick=self.quick, device_bound=device_bound(ctx))
        except Exception as exc:
            if is_out_of_memory(exc):  # CUDA's or the host's allocator: not the kernel's fault, left unmeasured
                return KernelResult(spec.kernel_id, spec.backend, "skipped", error=_describe(exc))
            if ctx.compiling and _compile_failure(exc):
                return KernelResult(spec.kernel_id, spec.backend, "skipped",
                                    error=f"torch.compile could not build it: {_describe(exc)}")
            return KernelResult(spec.kernel_id, spec.backend, "failed", error=_describe(exc))
        finally:
            del args
        return KernelResult(spec.kernel_id, spec.backend, "ok", timing.median_us, timing.spread_us, timing.samples,
                            timing.method + _compiled_note(spec, ctx))

    # -- internals -------------------------------------------------------------------------
    def _impl(self, spec: KernelSpec, operation: str, ctx: SelectionContext) -> Callable[..., Any]:
        """What is timed: the plan's callable, or for a compiled-mode bucket (``ctx.compiling``) the kernel as
        a compiled graph runs it (:func:`layerzero.integrations.compile.timed.compiled_callable`)."""
        if not ctx.compiling:
            return _callable(spec, ctx)
        if spec.kernel_id not in self._compiled:
            from layerzero.integrations.compile.timed import compiled_callable

            self._compiled[spec.kernel_id] = compiled_callable(spec, operation, ctx)
        return self._compiled[spec.kernel_id]

    def _generator(self, device: torch.device) -> torch.Generator:
        self._draws += 1
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed * 1_000_003 + self._draws)
        return gen

    def _check(self, op: OpDef, operation: str, ctx: SelectionContext, spec: KernelSpec) -> str | None:
        small = check_context(operation, ctx)
        if spec.check(small):
            small = ctx  # capping made it ineligible (rare): check at the full shape
        args = op.make_inputs(operation, small, self._generator(small.device))
        try:
            out = _callable(spec, small)(*args)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise  # the measurement's handler: skipped, not failed
            return f"raised on a correctness check: {_describe(exc)}"
        problem = op.check_output(operation, args, out)
        if problem is not None:
            return f"correctness check: {problem}"
        family = operation.split(".", 1)[0]
        if family == "sample" or ctx.dropout_p > 0 or not isinstance(out, torch.Tensor) \
                or not out.is_floating_point():
            return None  # random by design: shape, dtype and device are all that can be checked
        try:
            ref = op.reference(operation, args)
        except NotImplementedError:
            return None
        got = out.detach().to(torch.float64)
        ref = ref.to(got.device, torch.float64)
        atol, rtol = spec.tolerance_for(out.dtype)
        if torch.isnan(got).any() and not torch.isnan(ref).any():
            return "correctness check: returned NaN where the float64 reference has none"
        if not torch.allclose(got, ref, atol=atol * 4, rtol=rtol * 4, equal_nan=True):
            err = (got - ref).abs().nan_to_num(0.0).max().item()
            return (f"correctness check: output differs from the float64 reference by up to {err:.3g} "
                    f"(allowed atol={atol * 4:g}, rtol={rtol * 4:g})")
        return None

    def _store(self, operation: str, ctx: SelectionContext, bucket: str, results: list[KernelResult]) -> None:
        from layerzero.tuning.perfdb import Record

        hw = hardware_fingerprint(ctx.device)
        records: list[Record] = []
        for r in results:
            if r.status == "skipped":
                continue
            records.append(Record(
                hardware=hw.digest, libraries=libraries_for(self.runtime, r.backend), kernel_id=r.kernel_id,
                operation=operation, dtype=ctx.dtype_name or "?", bucket=bucket,
                median_us=float(r.median_us or 0.0), spread_us=float(r.spread_us or 0.0), samples=r.samples,
                failed=r.status == "failed", error=r.error, source=self.source))
        if records and self.db is not None and self.store_error is None:
            try:
                self.db.record(records, fingerprints={hw.digest: json.dumps(hw.to_dict(), sort_keys=True)})
            except PerfDBError as exc:  # read-only, full, locked: the report still has every measurement
                self.store_error = str(exc)

    def _winner(self, operation: str, ctx: SelectionContext, results: list[KernelResult]) -> str | None:
        measured = {r.kernel_id: Measurement(r.median_us or 0.0, r.spread_us or 0.0, r.samples, self.source,
                                             r.status == "failed")
                    for r in results if r.status in ("ok", "failed")}
        engine = SelectionEngine(self.runtime.kernels, self.runtime.backends,
                                 measurements=lambda _op, _ctx, _specs: measured)
        try:
            sel = engine.select(operation, ctx, policy=self.runtime.current_policy(), raise_on_empty=False)
        except LayerZeroError:  # a policy lock on a kernel that cannot run here: nothing to report as chosen
            return None
        return sel.ranked[0].kernel_id if sel.ranked else None
