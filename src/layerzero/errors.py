"""Exception types raised by layerzero.

Every error layerzero raises on purpose is a :class:`LayerZeroError`. Each
subclass also derives from the builtin a caller would naturally catch
(``ValueError`` for bad input, ``LookupError`` when nothing fits), so existing
``except ValueError`` blocks keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from layerzero.spec import Reason

__all__ = [
    "LayerZeroError",
    "InvalidInputError",
    "NoKernelError",
    "KernelNotFoundError",
    "KernelNotSupportedError",
    "KernelExecutionError",
    "KernelDeclinedError",
    "AllKernelsFailedError",
    "OutOfMemoryError",
    "ConfigError",
    "PolicyError",
    "ConditionError",
    "PlanMismatchError",
    "CaptureError",
    "SelectionDivergenceError",
    "PerfDBError",
    "UnsupportedModelError",
]


class LayerZeroError(Exception):
    """Base class of every error layerzero raises on purpose."""


class InvalidInputError(LayerZeroError, ValueError):
    """The tensors or arguments given to an operation are malformed."""


class NoKernelError(LayerZeroError, LookupError):
    """Automatic selection found no kernel that can run this call.

    ``rejections`` maps every candidate kernel id to its list of reasons.
    """

    def __init__(self, message: str, *, operation: str = "", rejections: dict[str, list[Reason]] | None = None):
        super().__init__(message)
        self.operation = operation
        self.rejections = dict(rejections or {})


class KernelNotFoundError(LayerZeroError, LookupError):
    """A kernel id was named that no registry knows."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a KeyError
        return str(self.args[0]) if self.args else ""


class KernelNotSupportedError(LayerZeroError, ValueError):
    """A kernel the user named explicitly (lock, static map) cannot run this call."""

    def __init__(self, message: str, *, kernel_id: str = "", reasons: list[Reason] | None = None):
        super().__init__(message)
        self.kernel_id = kernel_id
        self.reasons = list(reasons or [])


class KernelDeclinedError(LayerZeroError, RuntimeError):
    """A kernel found, once it saw the call, a limit of its own that selection cannot see (a paged cache pool
    past the 32-bit offsets of FlexAttention's kernels, say): the plan's next kernel runs and nothing is
    counted against this one (no breaker failure, no fallback event): the input is valid, and so is the
    kernel for every other call."""

    def __init__(self, message: str, *, kernel_id: str = ""):
        super().__init__(message)
        self.kernel_id = kernel_id


class KernelExecutionError(LayerZeroError, RuntimeError):
    """A kernel raised, or returned something that is not a valid result."""


class AllKernelsFailedError(KernelExecutionError):
    """Every kernel of a plan was tried and each failed.

    ``attempts`` lists ``(kernel_id, exception)`` pairs in the order tried.
    """

    def __init__(self, message: str, *, operation: str = "", attempts: list[tuple[str, BaseException]] | None = None):
        super().__init__(message)
        self.operation = operation
        self.attempts = list(attempts or [])


_TORCH_OOM: type[RuntimeError] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class OutOfMemoryError(LayerZeroError, _TORCH_OOM):  # type: ignore[misc, valid-type]
    """The call needs more memory than the device (or the CPU allocator) could give: a resource condition,
    not a kernel fault, so no breaker counts it and no other kernel is tried.

    It is also a ``torch.OutOfMemoryError``: serving code that catches PyTorch's OOM to shrink a batch keeps
    working. ``operation`` names the operation, ``kernel_id`` the kernel that asked for the memory.
    """

    def __init__(self, message: str, *, operation: str = "", kernel_id: str = ""):
        super().__init__(message)
        self.operation = operation
        self.kernel_id = kernel_id


def message_of(exc: BaseException) -> str:
    """``str(exc)``, which never raises here (a kernel's exception whose ``__str__`` fails must not turn a
    fallback into a crash)."""
    try:
        return str(exc)
    except Exception:
        return f"<the {type(exc).__name__}'s message could not be read>"


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ("" for none); never raises."""
    text = message_of(exc)
    return text.splitlines()[0] if text else ""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (CUDA's or the CPU allocator's out-of-memory error)."""
    if isinstance(exc, (_TORCH_OOM, MemoryError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = message_of(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "not enough memory" in text


class ConfigError(LayerZeroError, ValueError):
    """A config or policy document failed validation.

    ``errors`` lists every problem found, each prefixed by its path in the
    document (``dispatch_rules[0].priority: must be between 0 and 1000, got 2000``).
    """

    def __init__(self, message: str, *, errors: list[str] | None = None, source: Any = None):
        super().__init__(message)
        self.errors = list(errors or [message])
        self.source = source


class PolicyError(ConfigError):
    """A policy document or programmatic policy call is invalid."""


class ConditionError(PolicyError):
    """A condition expression failed to parse or type-check.

    ``position`` is the 0-based character offset of the problem.
    """

    def __init__(self, message: str, *, expression: str = "", position: int = 0):
        super().__init__(message, errors=[message])
        self.expression = expression
        self.position = position


class PlanMismatchError(LayerZeroError, RuntimeError):
    """A baked plan table was made for other hardware or library versions."""


class CaptureError(LayerZeroError, RuntimeError):
    """Selection was needed while a CUDA graph was being captured."""


class SelectionDivergenceError(LayerZeroError, RuntimeError):
    """Ranks of a process group chose different kernels for the same context."""

    def __init__(self, message: str, *, differences: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


class PerfDBError(LayerZeroError, RuntimeError):
    """The performance database could not be used (only raised by explicit tooling)."""


class UnsupportedModelError(LayerZeroError, ValueError):
    """A model cannot run a layerzero integration (its attention does not go through transformers'
    ``AttentionInterface``, so ``attn_implementation="layerzero"`` would never call layerzero).

    ``model_class`` names the model class; the message says what to use instead.
    """

    def __init__(self, message: str, *, model_class: str = ""):
        super().__init__(message)
        self.model_class = model_class
