"""The executor: runs a plan's kernels in order under the failure contract, in this one place.

The failure contract (``docs/`` reliability page):

* A kernel is blamed (a failure on its circuit breaker, a ``fallback`` event naming it) only when the call's
  inputs are shown valid: validation passes (:meth:`OpDef.validate`, then the data checks of
  :meth:`OpDef.diagnose`, run only now that a kernel raised), *and* another kernel of the plan, or the
  operation's float64 reference, computes the same call. Until then a failure is pending, not counted.
* When every candidate fails and the reference cannot compute the call either, the input is at fault: the
  call raises :class:`InvalidInputError` listing each kernel's message, and nothing is counted.
* Out of memory (CUDA's or the CPU allocator's) is a resource condition: it raises
  :class:`~layerzero.errors.OutOfMemoryError` (also a ``torch.OutOfMemoryError``) at once, is never counted
  and never cascades through the fallbacks.
* A kernel whose output has the wrong shape or dtype is blamed like one that raised (validation rejects the
  mixed dtypes that would make a correct kernel return another dtype).
* A call that consumes random numbers (sampling, attention dropout) hands its generator back as it found it
  before the next kernel runs, so a seeded call gives the same result whatever failed before it.
* A breaker's half-open probe that proved nothing (bad input, out of memory) is released uncounted.
* A kernel that raises :class:`~layerzero.errors.KernelDeclinedError` (a limit of its own it sees only in
  the call) is skipped: the next kernel runs, nothing is counted and nothing is screened.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layerzero.errors import (
    AllKernelsFailedError,
    InvalidInputError,
    KernelDeclinedError,
    KernelExecutionError,
    KernelNotSupportedError,
    OutOfMemoryError,
    first_line,
    is_out_of_memory,
)
from layerzero.runtime.breaker import CircuitBreaker
from layerzero.runtime.gates import ALWAYS_SLOW, contiguous
from layerzero.selection.plan import ExecutionPlan
from layerzero.telemetry.logs import log_event
from layerzero.tensor_helpers import unsaveable_inference, valueless

if TYPE_CHECKING:
    from layerzero.runtime.core import Runtime
    from layerzero.spec import KernelSpec

__all__ = ["Executor", "Failure"]


@dataclass
class Failure:
    """One kernel's failure on the call being run, counted only once the inputs are shown valid."""

    kernel_id: str
    error: BaseException
    breaker: CircuitBreaker | None
    invalid_output: bool = False


def _valueless(args: tuple[Any, ...]) -> bool:
    """Whether a tensor argument has shapes but no values (the meta device, a FakeTensor)."""
    return any(valueless(a) for a in args)


class Executor:
    """Runs plans for one runtime (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        # Plans whose kernel returned an invalid result while no breaker could fence it off: every result
        # of theirs is checked from then on (they leave the fast path).
        self.distrusted: weakref.WeakSet[ExecutionPlan] = weakref.WeakSet()
        # ``last_run.value = (plan, index)`` of the kernel that ran, set by :meth:`run` only (the slow and
        # fallback paths); dispatchers read it to report which kernel produced a result.
        self.last_run = threading.local()

    # -- the input check before any blame ------------------------------------------------------------------
    def screen(self, plan: ExecutionPlan, args: tuple[Any, ...], exc: BaseException, kernel_id: str) -> None:
        """A kernel raised ``exc`` on this call: raise now when the call, not the kernel, is at fault (an
        :class:`InvalidInputError` from the kernel, out of memory, inputs validation or the data checks
        reject). Returns when the inputs pass every check (the kernel may still be innocent: see :meth:`run`)."""
        if isinstance(exc, InvalidInputError):
            raise exc
        if is_out_of_memory(exc):
            raise self._oom(plan, args, kernel_id, exc) from exc
        op = plan.op
        try:
            op.validate(plan.operation, args)
            op.diagnose(plan.operation, args)
        except InvalidInputError as bad:
            raise bad from exc
        except Exception:  # a data check that cannot read these inputs: no verdict from it
            pass
        inference = unsaveable_inference(args)
        if inference:  # PyTorch refuses these too; the float64 reference, on copies, would not
            names = op.arg_names or ()
            shown = ", ".join(names[i] if i < len(names) else f"argument {i}" for i in inference)
            what, it = ("is an inference tensor", "it") if len(inference) == 1 else ("are inference tensors", "them")
            raise InvalidInputError(
                f"{plan.operation}: {shown} {what} (made under torch.inference_mode) and another argument requires "
                f"grad: autograd cannot save {it} for the backward (clone {it} outside inference_mode, or run the "
                f"call under torch.no_grad) (inputs: {op.describe(args)})") from exc

    def _oom(self, plan: ExecutionPlan, args: tuple[Any, ...], kid: str, exc: BaseException) -> OutOfMemoryError:
        return OutOfMemoryError(f"{plan.operation}: kernel {kid} ran out of memory; no kernel is blamed and no "
                                f"other is tried (a smaller batch or sequence is the fix) (inputs: "
                                f"{plan.op.describe(args)})\n  {type(exc).__name__}: {first_line(exc)}",
                                operation=plan.operation, kernel_id=kid)

    # -- running -------------------------------------------------------------------------------------------
    def run(self, plan: ExecutionPlan, args: tuple[Any, ...], start: int = 0, *, failed: Failure | None = None,
            check_output: bool = False, timing: list[int] | None = None,
            refused: list[tuple[str, BaseException]] | None = None) -> Any:
        """Run the plan's kernels from ``start`` in order, skipping fenced-off ones, until one succeeds.

        ``failed`` is the failure of the kernel before ``start`` on this very call (the fast path's kernel
        raised and :meth:`screen` passed the inputs). ``timing``, when given, receives the elapsed
        nanoseconds and the index of the kernel that produced the result.
        """
        rt = self.rt
        cfg = rt.config
        use_breakers, telemetry = cfg.circuit_breaker_enabled, cfg.enable_telemetry
        verifier = rt.verifier
        op, operation = plan.op, plan.operation
        generator = op.generator(operation, args)
        state = generator.get_state() if generator is not None else None
        failures: list[Failure] = [] if failed is None else [failed]
        skipped: list[tuple[str, BaseException]] = list(refused or ())
        kernels = plan.kernels
        for i in range(start, len(kernels)):
            if failures and not cfg.enable_fallback:
                break
            spec = kernels[i]
            kid = spec.kernel_id
            if spec.requires_contiguous and i > 0 and not contiguous(op, args):
                skipped.append((kid, KernelExecutionError(f"{kid} needs contiguous inputs; skipped")))
                continue
            breaker = rt.breakers.get(kid) if use_breakers else None
            if breaker is not None and not breaker.allow():
                skipped.append((kid, KernelExecutionError(f"circuit breaker for {kid} is open")))
                continue
            if state is not None and failures:
                generator.set_state(state)  # type: ignore[union-attr]
            if telemetry:
                rt.telemetry.kernel(kid, operation).calls += 1
            t0 = time.perf_counter_ns() if timing is not None or cfg.latency_histogram else 0
            problem = None
            try:
                out = spec.impl(*args)
                # A recovery probe (breaker not CLOSED) is checked like a first call.
                if check_output or verifier.first_calls or (breaker is not None and breaker.blocked) or (
                        self.distrusted and plan in self.distrusted):
                    problem = op.check_output(operation, args, out)
                    if problem is None and verifier.first_calls:
                        problem = verifier.verify(plan, spec, args, out)
                if problem is not None:
                    raise KernelExecutionError(f"kernel {kid} for {operation} {problem}")
            except KernelDeclinedError as exc:  # a limit the kernel sees only now: the next one runs, uncounted
                self._hand_on(operation, kid, breaker, exc, skipped)
                continue
            except Exception as exc:
                outside = self.outside_spec(plan, spec, args) if problem is None else None
                if outside is not None:  # a call the kernel declares it cannot serve reached it: not its fault
                    self._hand_on(operation, kid, breaker, outside, skipped)
                    continue
                failures.append(Failure(kid, exc, breaker, problem is not None))
                self._screen_during_run(plan, args, failures, exc, generator, state)
                continue
            if failures and _valueless(args):  # shapes without values: a kernel that reads values is not at fault
                self._release(failures)
            else:
                self._blame(plan, failures, kid)  # the inputs are shown valid: every kernel that failed on them is at fault
            if t0:
                elapsed = time.perf_counter_ns() - t0
                if timing is not None:
                    timing.append(elapsed)
                    timing.append(i)
                if cfg.latency_histogram and telemetry:
                    rt.telemetry.kernel(kid, operation).observe_us(elapsed / 1000.0)
            if breaker is not None:
                breaker.record_success()
            self.last_run.value = (plan, i)
            return out
        if state is not None:
            generator.set_state(state)  # type: ignore[union-attr]
        raise self._no_result(plan, args, failures, skipped)

    def _hand_on(self, operation: str, kid: str, breaker: CircuitBreaker | None, why: BaseException,
                 skipped: list[tuple[str, BaseException]]) -> None:
        """``kid`` passed the call on without failing (it declined it, or was handed one outside its declaration):
        its breaker probe is released, nothing counts against it, and the next kernel runs."""
        if breaker is not None:
            breaker.release()
        self.rt.telemetry.record_handoff(operation, kid)
        skipped.append((kid, why))

    def _screen_during_run(self, plan: ExecutionPlan, args: tuple[Any, ...], failures: list[Failure],
                           exc: BaseException, generator: Any, state: Any) -> None:
        """Out of memory, or an input found bad on the first failure: release the probes, give the generator
        back, raise (nothing is counted). A later failure is only checked for out-of-memory (the inputs were
        screened at the first)."""
        try:
            if is_out_of_memory(exc):
                raise self._oom(plan, args, failures[-1].kernel_id, exc) from exc
            if len(failures) == 1:
                self.screen(plan, args, exc, failures[0].kernel_id)
        except Exception:
            self._release(failures)
            if state is not None:
                generator.set_state(state)
            raise

    def recover(self, plan: ExecutionPlan, args: tuple[Any, ...], index: int, exc: Exception) -> Any:
        """The fast path's kernel (``plan.kernels[index]``) raised ``exc``: screen the call, then fall back.

        For a shape-free plan the call may simply be a shape its kernel does not take (GQA heads for
        ``torch_sdpa``, another hidden size for a bound ``normalized_shape``). If the family has another
        plan by now (a ``dispatch()`` memo held this one), the call runs through that; else the family
        plan goes (:meth:`FamilyPlans.drop`): the call selects again for the family when a covering kernel
        may serve it, or runs through its own exact-shape plan.
        """
        if isinstance(exc, KernelDeclinedError):  # not this call's kernel; the plan stays as it is
            self.rt.telemetry.record_handoff(plan.operation, plan.kernels[index].kernel_id)
            return self.run(plan, args, index + 1)
        self.screen(plan, args, exc, plan.kernels[index].kernel_id)
        rt = self.rt
        if plan.family is not None:
            current = rt.visible_plans().get(plan.family)
            if current is not None and current is not plan:
                # a family plan the runtime has replaced since (a dispatcher's memo held the old one): the
                # family moved on, so the call runs through its current plan
                note = self.last_run
                note.value = None
                out = rt.call_plan(current, args)
                if getattr(note, "value", None) is None:
                    note.value = (current, 0)
                return out
            if rt.families.drop(plan, exc):  # a kernel covering this one may serve the whole family
                family, key = plan.op.keys(plan.operation, args)
                return rt.miss(plan.op, plan.operation, key, args, family)
            return rt.run_exact(plan.op, plan.operation, args)
        spec = plan.kernels[index]
        kid = spec.kernel_id
        outside = self.outside_spec(plan, spec, args)
        if outside is not None:  # a hot path handed it a call its declaration excludes: next kernel, uncounted
            rt.telemetry.record_handoff(plan.operation, kid)
            return self.run(plan, args, index + 1, check_output=True, refused=[(kid, outside)])
        breaker = rt.breakers.get(kid) if rt.config.circuit_breaker_enabled else None
        return self.run(plan, args, index + 1, failed=Failure(kid, exc, breaker), check_output=True)

    @staticmethod
    def outside_spec(plan: ExecutionPlan, spec: KernelSpec, args: tuple[Any, ...]) -> KernelNotSupportedError | None:
        """A :class:`KernelNotSupportedError` when ``spec``'s declared constraints exclude this call (a static
        table's or an exact plan's hot path reached the kernel with shapes it never checks: GQA heads for
        ``torch_sdpa``), else None. Read only after the kernel raised."""
        try:
            reasons = spec.check(plan.op.context(plan.operation, args))
        except Exception:  # no context for these arguments: no verdict
            return None
        if not reasons:
            return None
        return KernelNotSupportedError(f"{spec.kernel_id} cannot run this {plan.operation} call: "
                                       + "; ".join(str(r) for r in reasons), kernel_id=spec.kernel_id,
                                       reasons=reasons)

    # -- blame ---------------------------------------------------------------------------------------------
    def _blame(self, plan: ExecutionPlan, failures: list[Failure], served_by: str | None) -> None:
        """Count each failure on its kernel (breaker, telemetry, log): the call's inputs were shown valid."""
        if not failures:
            return
        cfg = self.rt.config
        telemetry = self.rt.telemetry
        chain = [f.kernel_id for f in failures]
        for n, f in enumerate(failures):
            if f.breaker is not None:
                if f.invalid_output:  # the cached fast path cannot see a bad result: fence the kernel off now
                    f.breaker.trip(f.error)
                else:
                    f.breaker.record_failure(f.error)
            elif f.invalid_output:  # no breaker to fence it off: check every result of this plan from now on
                self.distrusted.add(plan)
                plan.gate = ALWAYS_SLOW
            nxt = chain[n + 1] if n + 1 < len(chain) else served_by
            if cfg.enable_telemetry:
                telemetry.record_failure(plan.operation, f.kernel_id, f.error)
                if nxt is not None:
                    telemetry.record_fallback(plan.operation, f.kernel_id, nxt)
            if cfg.log_fallbacks:
                log_event("fallback" if served_by is not None else "kernel_failed", operation=plan.operation,
                          from_kernel=f.kernel_id, to_kernel=nxt, error=type(f.error).__name__,
                          message=first_line(f.error))

    @staticmethod
    def _release(failures: list[Failure]) -> None:
        for f in failures:
            if f.breaker is not None:
                f.breaker.release()

    # -- when nothing produced a result ----------------------------------------------------------------------
    def _no_result(self, plan: ExecutionPlan, args: tuple[Any, ...], failures: list[Failure],
                   skipped: list[tuple[str, BaseException]]) -> Exception:
        """The error for a call no kernel answered: the kernels are blamed only if the reference computes it."""
        attempts = [(f.kernel_id, f.error) for f in failures] + skipped
        lines = [f"  {kid}: {type(err).__name__}: {first_line(err)}" for kid, err in attempts]
        if not failures and skipped and all(isinstance(err, KernelNotSupportedError) for _, err in skipped):
            return KernelNotSupportedError(f"{plan.operation}: no kernel of the plan can run this call (inputs: "
                                           f"{plan.op.describe(args)}):\n" + "\n".join(lines),
                                           kernel_id=skipped[0][0],
                                           reasons=[r for _, e in skipped for r in getattr(e, "reasons", [])])
        if not failures:  # nothing ran: every kernel was fenced off or skipped
            head = f"every kernel failed for {plan.operation} (inputs: {plan.op.describe(args)}):"
            if not attempts:
                lines.append("  no kernel could be tried (all circuit breakers open)")
            return AllKernelsFailedError("\n".join([head, *lines]), operation=plan.operation, attempts=attempts)
        valid, why = self._reference_verdict(plan, args)
        head = f"every kernel failed for {plan.operation} (inputs: {plan.op.describe(args)}):"
        if valid:  # the reference computes the call: the inputs are valid, the kernels at fault
            self._blame(plan, failures, None)
            err: Exception = AllKernelsFailedError("\n".join([head, *lines]), operation=plan.operation,
                                                   attempts=attempts)
        elif valid is None:  # no verdict (the reference ran out of memory): nobody is blamed
            self._release(failures)
            lines.append(f"  (no kernel is blamed: the float64 reference could not be computed: {why})")
            err = AllKernelsFailedError("\n".join([head, *lines]), operation=plan.operation, attempts=attempts)
        else:
            self._release(failures)
            head = (f"{plan.operation}: no kernel could compute this call and the float64 reference could not "
                    f"either ({why}), so the inputs are taken to be at fault and no kernel is blamed "
                    f"(inputs: {plan.op.describe(args)}):")
            err = InvalidInputError("\n".join([head, *lines]))
            err.attempts = attempts  # type: ignore[attr-defined]
        err.__cause__ = failures[-1].error
        return err

    @staticmethod
    def _reference_verdict(plan: ExecutionPlan, args: tuple[Any, ...]) -> tuple[bool | None, str]:
        """``(True, "")`` when the operation's float64 reference computes this call (its inputs are valid);
        ``(False, why)`` when it cannot (an operation without a reference gives no proof of validity either);
        ``(None, why)`` when it ran out of memory (no verdict)."""
        if _valueless(args):
            return None, "meta tensors carry no values, so a kernel that needs them fails on valid shapes"
        try:
            plan.op.reference(plan.operation, args)
        except NotImplementedError:
            return False, "the operation has no reference"
        except Exception as exc:  # noqa: BLE001 - any failure of the reference is the verdict
            return (None if is_out_of_memory(exc) else False), f"{type(exc).__name__}: {first_line(exc)}"
        return True, ""
