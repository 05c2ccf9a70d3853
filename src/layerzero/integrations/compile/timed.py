"""What the tuner times for a compiled-mode bucket (``SelectionContext.compiling``, ``;compiled=1``).

Under ``torch.compile`` a row-wise call runs one of two things (:mod:`.traced`): Inductor's code for a
``compile_native`` kernel (``torch_rms_norm``, the activations, RoPE, cross-entropy: PyTorch code that
Dynamo traces), or an opaque kernel (Liger's) inside the dispatched custom op, pinned by trace-time
selection. :func:`compiled_callable` builds exactly that, compiled (``fullgraph=True``, static shapes), so
the tuner measures Inductor's generated kernel against the opaque op as a compiled graph runs them, and
stores both under the compiled bucket, apart from eager measurements.

Each callable is its own code object, so Dynamo's per-code-object recompile limit (8) is never reached
however many buckets are tuned; its graphs are dropped with it.

What isolated timing cannot see: in a model, Inductor also fuses the native op with its neighbours (a
residual add into the RMSNorm, the MLP's activation into its projections' epilogues); an opaque kernel
cannot be fused. Selection therefore moves an opaque kernel ahead only when it is faster beyond both
spreads (:func:`~layerzero.selection.engine.native_first`).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.errors import InvalidInputError
from layerzero.integrations.compile.dispatched_rows import ROW_CUSTOM_OPS
from layerzero.ops import canonical_operation
from layerzero.spec import KernelSpec

__all__ = ["COMPILED_FAMILIES", "compiled_family", "compiled_callable"]

#: The operation families compiled-mode tuning covers (those whose traced call can be Inductor's code).
COMPILED_FAMILIES: frozenset[str] = frozenset(ROW_CUSTOM_OPS)


def compiled_family(operation: str) -> str:
    """``operation``'s family when compiled-mode tuning covers it.

    Raises:
        InvalidInputError: it does not (attention under compile is ranked as in eager).
    """
    family = canonical_operation(operation).split(".", 1)[0]
    if family not in COMPILED_FAMILIES:
        raise InvalidInputError(
            f"compiled-mode tuning covers {', '.join(sorted(COMPILED_FAMILIES))}; not {operation} (attention "
            "under torch.compile runs PyTorch's SDPA code or a kernel with a residual pair, ranked as in eager)")
    return family


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function calling ``fn`` with a code object of its own (Dynamo caches compiled graphs per code object)."""

    def call(*args: Any) -> Any:
        return fn(*args)

    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, None, call.__closure__)


def compiled_callable(spec: KernelSpec, operation: str, ctx: SelectionContext) -> Callable[..., Any]:
    """``spec`` for ``operation`` as a compiled graph runs it: Inductor's code for a ``compile_native`` kernel,
    else the dispatched custom op pinned to ``spec`` (``pinned_kernel=spec.kernel_id``). Takes the op's arguments
    (``OpDef.make_inputs`` order); compiles on its first call."""
    op = ROW_CUSTOM_OPS[compiled_family(operation)]
    if spec.compile_native:
        body: Callable[..., Any] = spec.impl
    else:
        kernel = spec.kernel_id

        def body(*args: Any) -> Any:
            return op(*args, kernel)

    return torch.compile(_fresh(body), fullgraph=True, dynamic=False)
