"""OpDef: what the runtime needs to know about an operation family.

An op family (attention, rms_norm, ...) turns user arguments into the
canonical positional arguments every kernel of that family receives,
validates them (``InvalidInputError`` naming the operation and every input's
shape, dtype and device), builds the :class:`SelectionContext`, checks a
kernel's output shape and dtype, computes a float64 reference, and makes
fresh random inputs for tests, tuning and benchmarks.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.errors import InvalidInputError

__all__ = ["OpDef", "describe_tensor", "describe_args", "require_tensor", "pick", "layout_problem"]


def describe_tensor(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        dt = str(t.dtype).removeprefix("torch.")
        try:
            shape: Any = tuple(t.shape)
        except RuntimeError:  # a nested tensor of the strided layout has no sizes
            shape = "nested"
        return f"Tensor(shape={shape}, dtype={dt}, device={t.device})"
    if t is None:
        return "None"
    return f"{type(t).__name__}"


def describe_args(names: Sequence[str], args: Sequence[Any]) -> str:
    return ", ".join(f"{n}={describe_tensor(a)}" for n, a in zip(names, args, strict=False))


def require_tensor(op: str, name: str, value: Any, names: Sequence[str], args: Sequence[Any]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__} "
                                f"(inputs: {describe_args(names, args)})")
    return value


def layout_problem(name: str, t: torch.Tensor) -> str | None:
    """Why ``t`` cannot go to a kernel as it is (a sparse or nested-strided tensor), or None.

    Rejected here, a bad layout is the caller's error; reaching a kernel it would count as that
    kernel's failure on its circuit breaker.
    """
    layout = t.layout
    if layout is torch.strided:
        if t.is_nested:
            return f"{name} is a nested tensor of the strided layout (use layout=torch.jagged or pad it)"
        return None
    if layout is torch.jagged:
        return None
    return f"{name} must be a dense tensor, got layout={layout} (call .to_dense())"


_MISSING = object()


def pick(inputs: Mapping[str, Any], *names: str, default: Any = _MISSING, operation: str = "?") -> Any:
    """First present key of ``inputs`` among ``names``, never testing a tensor's truth value."""
    for n in names:
        if n in inputs and inputs[n] is not None:
            return inputs[n]
    if default is _MISSING:
        raise InvalidInputError(f"{operation}: inputs need one of {', '.join(repr(n) for n in names)}; "
                                f"got keys {sorted(inputs)}")
    return default


class OpDef:
    """Base class of op families. Subclasses fill in the methods below."""

    family: str = ""
    arg_names: tuple[str, ...] = ()

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        raise NotImplementedError

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        """A description of what is wrong with ``out``, or None if its shape/dtype/device are right."""
        return None

    def reference(self, operation: str, args: tuple[Any, ...]) -> Any:
        """The float64 PyTorch reference result for ``args``."""
        raise NotImplementedError

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """Whether :meth:`reference` is what a correct kernel returns for ``args`` (False when the
        result is random, e.g. attention with dropout); verify mode skips the comparison otherwise."""
        return True

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        """Fresh random canonical arguments matching ``ctx`` (never zeros)."""
        raise NotImplementedError

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
                         ) -> tuple[Any, ...]:
        """Canonical args from a ``dispatch()`` inputs dict (documented names per operation)."""
        raise NotImplementedError

    def keys(self, operation: str, args: tuple[Any, ...]) -> tuple[Hashable | None, Hashable]:
        """``(family, key)``: the plan-cache keys the op's hot path builds for ``args``.

        ``key`` names one exact call shape; ``family`` (None for ops without shape-free plans) is the
        same without any shape: dtype, device and the flags selection looks at. The device is ``True``
        for a CPU tensor (``t.is_cpu or t.device``: a bool compares for free, a ``torch.device`` is
        built and compared on every call) and the ``torch.device`` otherwise.
        """
        raise NotImplementedError

    def describe(self, args: Sequence[Any]) -> str:
        return describe_args(self.arg_names, args)

    def invalid(self, operation: str, problem: str, args: Sequence[Any]) -> InvalidInputError:
        return InvalidInputError(f"{operation}: {problem} (inputs: {self.describe(args)})")

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        """A small grid of contexts for tests, warm-up and tuning."""
        raise NotImplementedError

    def output_meta_check(self, operation: str, out: Any, shape: Sequence[int], dtype: torch.dtype,
                          device: torch.device) -> str | None:
        if not isinstance(out, torch.Tensor):
            return f"returned {type(out).__name__}, expected a Tensor"
        if tuple(out.shape) != tuple(shape):
            return f"returned shape {tuple(out.shape)}, expected {tuple(shape)}"
        if out.dtype != dtype:
            return f"returned dtype {out.dtype}, expected {dtype}"
        if out.device != device:
            return f"returned a tensor on {out.device}, expected {device}"
        return None
