"""ExecutionPlan: what the plan cache stores for one call shape.

A plan is the ranked kernel list (selected first, then fallbacks), the context
it was chosen for, and what the cached hot path reads:

* ``fn``: the selected kernel's callable (specialized for the plan's shapes when
  the kernel offers it, e.g. ``torch.rms_norm`` with the normalized shape bound);
* ``gate``: the kernel's circuit breaker, or a stand-in; while ``gate.blocked``
  the op calls ``run`` instead (breaker open, timing or verify mode, or a guard
  for a flag the cache key does not carry such as grad mode);
* ``stats``: the kernel's telemetry counters (a throwaway sink when disabled);
* ``run``: the slow runner with fallback, timing and checks;
* ``direct`` / ``const``: when the kernel is a PyTorch function the op can call
  without an adapter frame, that function (and the constant it takes, e.g. the
  bound ``normalized_shape``); ``None`` otherwise. ``lz.attention`` calls
  ``direct(q, k, v)`` when ``scale`` is None, ``lz.rms_norm``
  ``direct(x, const, weight, eps)``, ``lz.layer_norm``
  ``direct(x, const, weight, bias, eps)``;
* ``family``: for a shape-free plan (one plan serving every shape of a call
  family, keyed without shapes), that family key; ``None`` for a plan of one shape.
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

    __slots__ = ("operation", "op", "kernels", "context", "locked_by", "policy_digest", "source", "fn", "gate",
                 "stats", "run", "family", "direct", "const", "__weakref__")

    def __init__(self, operation: str, op: OpDef, kernels: tuple[KernelSpec, ...], context: SelectionContext,
                 *, locked_by: str | None = None, policy_digest: str = "", source: str = "selection") -> None:
        self.operation = operation
        self.op = op
        self.kernels = kernels
        self.context = context
        self.locked_by = locked_by
        self.policy_digest = policy_digest
        self.source = source
        self.fn: Callable[..., Any] = kernels[0].impl
        self.gate: Any = None
        self.stats: Any = None
        self.run: Callable[..., Any] = _unbound
        self.family: Any = None
        self.direct: Callable[..., Any] | None = None
        self.const: Any = None

    def use(self, fn: Callable[..., Any]) -> None:
        """Run ``fn`` (the first kernel's form specialized for this plan's calls) and, where it carries them, its
        direct-call form and constant (``fn.direct``, ``fn.const``: the op calls PyTorch's function itself)."""
        self.fn, self.direct, self.const = fn, getattr(fn, "direct", None), getattr(fn, "const", None)

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
                "policy_digest": self.policy_digest, "source": self.source, "shape_free": self.family is not None,
                "context": self.context.to_dict()}


def _unbound(*args: Any) -> Any:
    raise RuntimeError("ExecutionPlan.run was called before the runtime bound it")
