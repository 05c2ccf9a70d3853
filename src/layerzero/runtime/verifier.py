"""Verify mode: each kernel's first N passing outputs are compared with the operation's float64 reference.

Only passing outputs count towards ``verify_first_calls``: a kernel that keeps returning wrong values keeps
failing (and its breaker stays open) instead of being trusted after N tries. Once a kernel has passed N times
the runtime drops its plans, so its cached calls skip the check again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerzero.errors import InvalidInputError
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec
from layerzero.tensor_helpers import holds_in_dtype

__all__ = ["Verifier", "compare_with_reference"]


class Verifier:
    """Counts verified outputs per kernel; ``invalidate(reason)`` is called when a kernel is trusted."""

    def __init__(self, first_calls: int, invalidate: Callable[[str], None]) -> None:
        self.first_calls = first_calls
        self.passed: dict[str, int] = {}  # kernel id -> outputs that passed verification
        self._invalidate = invalidate

    @staticmethod
    def checked(n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInputError(f"verify_first_calls must be an int >= 0, got {n!r}")
        return n

    def pending(self, kernel_id: str) -> bool:
        """Whether the kernel's outputs are still checked."""
        n = self.first_calls
        return bool(n) and self.passed.get(kernel_id, 0) < n

    def verify(self, plan: ExecutionPlan, spec: KernelSpec, args: tuple[Any, ...], out: Any) -> str | None:
        """What is wrong with ``out`` against the reference, or None (counted as a pass)."""
        kid = spec.kernel_id
        n = self.first_calls
        if self.passed.get(kid, 0) >= n:
            return None
        problem = compare_with_reference(plan, spec, args, out)
        if problem is None:
            passed = self.passed.get(kid, 0) + 1
            self.passed[kid] = passed
            if passed == n:
                self._invalidate(f"kernel {kid} verified")
        return problem


def compare_with_reference(plan: ExecutionPlan, spec: KernelSpec, args: tuple[Any, ...], out: Any) -> str | None:
    """What is wrong with ``out`` against the op's float64 reference, or None (also when there is no verdict:
    no reference, a random result, a non-float or meta output, or a reference that cannot be computed)."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.device.type == "meta":
        return None
    try:
        if not plan.op.reference_applies(plan.operation, args):
            return None
        if any(isinstance(a, torch.Tensor) and a.is_floating_point() and not bool(torch.isfinite(a).all())
               for a in args):  # NaN or inf in the data: what comes out depends on the kernel's arithmetic
            return None
        ref = plan.op.reference(plan.operation, args)
        if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
            return None
        got = out.detach().to(torch.float64)
        ref = ref.detach().to(device=got.device, dtype=torch.float64)
        finite = ref[torch.isfinite(ref)]
        if finite.numel() and not holds_in_dtype(float(finite.abs().amax()), out.dtype):
            return None  # the true result (nearly) overflows the output's dtype: every kernel returns inf there
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
