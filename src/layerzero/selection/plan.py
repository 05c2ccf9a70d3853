"""ExecutionPlan: what the plan cache stores for one call shape.

A plan is the ranked kernel list (selected first, then fallbacks), the context
it was chosen for, and ``run``: a small closure that calls the selected kernel
with the breaker check and telemetry count compiled in, falling back through
the runtime when the kernel is fenced off or raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from layerzero.context import SelectionContext
from layerzero.spec import KernelSpec

if TYPE_CHECKING:
    from layerzero.ops.base import OpDef

__all__ = ["ExecutionPlan"]


class ExecutionPlan:
    """The selected kernel, its ranked fallbacks, and the runner that calls them."""

    __slots__ = ("operation", "op", "kernels", "context", "locked_by", "policy_digest", "source", "run", "__weakref__")

    def __init__(self, operation: str, op: OpDef, kernels: tuple[KernelSpec, ...], context: SelectionContext,
                 *, locked_by: str | None = None, policy_digest: str = "", source: str = "selection") -> None:
        self.operation = operation
        self.op = op
        self.kernels = kernels
        self.context = context
        self.locked_by = locked_by
        self.policy_digest = policy_digest
        self.source = source
        self.run: Callable[..., Any] = _unbound

    @property
    def selected(self) -> KernelSpec:
        return self.kernels[0]

    @property
    def kernel_id(self) -> str:
        return self.kernels[0].kernel_id

    @property
    def fallbacks(self) -> tuple[KernelSpec, ...]:
        return self.kernels[1:]

    def __repr__(self) -> str:
        fb = ", ".join(k.kernel_id for k in self.kernels[1:]) or "none"
        return f"ExecutionPlan({self.operation} -> {self.kernel_id}; fallbacks: {fb})"

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "kernel_id": self.kernel_id,
                "fallbacks": [k.kernel_id for k in self.kernels[1:]], "locked_by": self.locked_by,
                "policy_digest": self.policy_digest, "source": self.source, "context": self.context.to_dict()}


def _unbound(*args: Any) -> Any:
    raise RuntimeError("ExecutionPlan.run was called before the runtime bound it")
