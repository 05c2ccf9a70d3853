"""The dispatched row-wise custom ops: ``layerzero::rms_norm``, ``layer_norm``, ``rope``, ``swiglu``, ``geglu``,
``gelu``, ``silu``, ``cross_entropy`` and ``linear_cross_entropy``, each with a recomputing ``*_backward`` op (see :mod:`.dispatched`).

They are built from one table (:data:`ROW_OPS`): each entry gives the op's schema, the public function it
runs, its op definition (the fake validates with it) and which inputs are differentiable; :func:`define_dispatched`
makes the forward op, its fake, the backward op and the autograd registration from it.

Every row op ends in ``str pinned_kernel=""``. Empty, the op selects at run time (the public function's cached
dispatch). A kernel id pins the op to the kernel that selection chose when the graph was traced (an opaque
kernel measured faster than Inductor's code in compiled mode, :func:`~.choose.answer`): forward and the
recomputing backward run that kernel, so the graph runs what the trace-time explanation says. A pinned
kernel that raises (other than out of memory) is logged once and left for the public function's dispatch,
with its fallbacks and breakers, from then on.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from layerzero.integrations.compile.dispatched import dense, recompute_grads

__all__ = ["rms_norm_op", "layer_norm_op", "rope_op", "swiglu_op", "geglu_op", "gelu_op", "silu_op", "cross_entropy_op",
           "linear_cross_entropy_op", "NORMS_MOD", "ELEMENTWISE_MOD", "LOSSES_MOD", "LINEAR_LOSSES_MOD", "lz_rms_norm", "lz_layer_norm", "lz_rope", "lz_swiglu",
           "lz_geglu", "lz_gelu", "lz_silu", "lz_cross_entropy", "lz_linear_cross_entropy", "ROW_OPS", "ROW_CUSTOM_OPS",
           "RowOp", "define_dispatched", "pinned_call", "BROKEN"]

Tensor = torch.Tensor
log = logging.getLogger("layerzero")

NORMS_MOD = importlib.import_module("layerzero.ops.norms")
ELEMENTWISE_MOD = importlib.import_module("layerzero.ops.elementwise")
LOSSES_MOD = importlib.import_module("layerzero.ops.losses")
LINEAR_LOSSES_MOD = importlib.import_module("layerzero.ops.linear_losses")

# The original public functions (captured before anything could wrap them).
lz_rms_norm = NORMS_MOD.rms_norm
lz_layer_norm = NORMS_MOD.layer_norm
lz_rope = ELEMENTWISE_MOD.rope
lz_swiglu = ELEMENTWISE_MOD.swiglu
lz_geglu = ELEMENTWISE_MOD.geglu
lz_gelu = ELEMENTWISE_MOD.gelu
lz_silu = ELEMENTWISE_MOD.silu
lz_cross_entropy = LOSSES_MOD.cross_entropy
lz_linear_cross_entropy = LINEAR_LOSSES_MOD.linear_cross_entropy


def _cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, reduction: str
                   ) -> Tensor:
    return lz_cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            reduction=reduction)


def _linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
                          label_smoothing: float, reduction: str, softcap: float | None) -> Tensor:
    return lz_linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, reduction=reduction, softcap=softcap)


def _loss_shape(reduction: str, rows: int) -> tuple[int, ...]:
    return (rows,) if reduction == "none" else ()


@dataclass(frozen=True)
class RowOp:
    """One row-wise op as a custom op: ``layerzero::<name><schema>`` runs ``call(*args)``.

    ``differentiable`` names the tensor inputs gradients flow to; ``out_shape(args)`` is the output's shape
    (the first input's by default)."""

    name: str
    schema: str
    call: Callable[..., Tensor]
    op: Any
    differentiable: tuple[int, ...]
    out_shape: Callable[[tuple[Any, ...]], tuple[int, ...]] | None = None
    out_dtype: Callable[[tuple[Any, ...]], torch.dtype] | None = None
    canonical: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None

    @property
    def tensor_positions(self) -> tuple[int, ...]:
        params = self.schema.split("->")[0].strip()[1:-1].split(",")
        return tuple(i for i, p in enumerate(params) if re.match(r"\s*Tensor\b", p))


ROW_OPS: tuple[RowOp, ...] = (
    RowOp("rms_norm", "(Tensor x, Tensor? weight, float eps) -> Tensor", lz_rms_norm, NORMS_MOD.RMS_NORM, (0, 1)),
    RowOp("layer_norm", "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor", lz_layer_norm,
          NORMS_MOD.LAYER_NORM, (0, 1, 2)),
    RowOp("rope", "(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor", lz_rope, ELEMENTWISE_MOD.ROPE,
          (0, 1, 2)),
    RowOp("swiglu", "(Tensor gate, Tensor up) -> Tensor", lz_swiglu, ELEMENTWISE_MOD.SWIGLU, (0, 1)),
    RowOp("geglu", "(Tensor gate, Tensor up, str approximate) -> Tensor", lz_geglu, ELEMENTWISE_MOD.GEGLU, (0, 1)),
    RowOp("gelu", "(Tensor x, str approximate) -> Tensor", lz_gelu, ELEMENTWISE_MOD.GELU, (0,)),
    RowOp("silu", "(Tensor x) -> Tensor", lz_silu, ELEMENTWISE_MOD.SILU, (0,)),
    RowOp("cross_entropy", "(Tensor logits, Tensor target, int ignore_index, float label_smoothing, str reduction) "
          "-> Tensor", _cross_entropy, LOSSES_MOD.CROSS_ENTROPY, (0,),
          lambda args: _loss_shape(args[4], args[0].shape[0])),
    RowOp("linear_cross_entropy", "(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
          "float label_smoothing, str reduction, float? softcap) -> Tensor", _linear_cross_entropy,
          LINEAR_LOSSES_MOD.LINEAR_CROSS_ENTROPY, (0, 1, 3), lambda args: _loss_shape(args[6], args[0].shape[0]),
          lambda args: LINEAR_LOSSES_MOD.loss_dtype(args[0].dtype)),
)


#: Kernels a pinned op stopped running after they raised (the public function's dispatch serves instead).
BROKEN: set[str] = set()


def pinned_call(row: RowOp, kernel: str) -> Callable[..., Tensor]:
    """What ``row``'s op runs for ``kernel``: the public function (``pinned_kernel=""``), or that kernel's ``impl``
    with the public function as its fallback."""
    if not kernel or kernel in BROKEN:
        return row.call
    from layerzero.runtime import get_runtime

    impl = get_runtime().kernels.get(kernel).impl

    def pinned(*args: Any) -> Tensor:
        try:
            return impl(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # the failure contract: dispatch (fallbacks, breakers) serves from now on
            BROKEN.add(kernel)
            log.warning("layerzero: %s pinned by torch.compile raised %s: %s; layerzero::%s dispatches at run "
                        "time from now on", kernel, type(exc).__name__, exc, row.name)
            return row.call(*args)

    return pinned


def _examples(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``args`` with each SymInt scalar replaced by the value it was traced with (its hint; reading it installs
    no guard), for validation, whose checks want ints; None when one has no hint (an unbacked size: the call is
    validated when it runs)."""
    if not any(isinstance(a, torch.SymInt) for a in args):
        return args
    out = []
    for a in args:
        if isinstance(a, torch.SymInt):
            node = getattr(a, "node", None)
            a = node.hint if node is not None and getattr(node, "has_hint", lambda: False)() else None
            if not isinstance(a, int):
                return None
        out.append(a)
    return tuple(out)


def define_dispatched(row: RowOp) -> Any:
    """The forward custom op of ``row`` with its fake, its recomputing backward op and its autograd formula."""
    tensors = row.tensor_positions
    params = row.schema.split("->")[0].strip()[1:-1]
    # not ``kernel``: Inductor lowers an op it does not know with FallbackKernel.create(kernel, *args, **kwargs),
    # and an argument of that name collided ("got multiple values for argument 'kernel'")
    schema = f"({params}, str pinned_kernel=\"\") -> {row.schema.split('->')[1].strip()}"
    arity = len(params.split(","))

    def split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
        # the dispatcher leaves out a trailing argument equal to its default: ``pinned_kernel`` may be absent
        return args[:arity], str(kwargs.get("pinned_kernel", args[arity] if len(args) > arity else ""))

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        args, kernel = split(args, kwargs)
        return dense(pinned_call(row, kernel)(*args))

    def fake(*args: Any, **kwargs: Any) -> Tensor:
        args, _kernel = split(args, kwargs)
        concrete = _examples(args)  # a SymInt scalar (max_seqlen, top_k under dynamic shapes) by its example value
        if concrete is not None:
            row.op.validate(row.name, row.canonical(concrete) if row.canonical else concrete)
        shape = row.out_shape(args) if row.out_shape else args[0].shape
        return args[0].new_empty(shape, dtype=row.out_dtype(args) if row.out_dtype else None)

    def backward(grad: Tensor, *rest: Any) -> list[Tensor]:
        *args, kernel, needs = rest
        return recompute_grads(pinned_call(row, kernel), grad, args, needs)

    def backward_fake(grad: Tensor, *rest: Any) -> list[Tensor]:
        *args, _kernel, needs = rest
        present = [args[i] for i in tensors if args[i] is not None]
        return [t.new_empty(t.shape) for t, n in zip(present, needs, strict=True) if n]

    fwd = torch.library.custom_op(f"layerzero::{row.name}", forward, mutates_args=(), schema=schema)
    fwd.register_fake(fake)
    bwd = torch.library.custom_op(f"layerzero::{row.name}_backward", backward, mutates_args=(),
                                  schema=f"(Tensor grad, {params}, str pinned_kernel, bool[] needs) -> Tensor[]")
    bwd.register_fake(backward_fake)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*(inputs[i] for i in tensors))
        ctx.inputs = tuple(None if i in tensors else a for i, a in enumerate(inputs[:arity]))
        ctx.kernel = inputs[arity] if len(inputs) > arity else ""
        ctx.arity = len(inputs)

    def autograd(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        args, kernel = list(ctx.inputs), ctx.kernel
        for i, t in zip(tensors, ctx.saved_tensors, strict=True):
            args[i] = t
        wants = {i: i in row.differentiable and args[i] is not None and bool(ctx.needs_input_grad[i])
                 for i in tensors}
        needs = [wants[i] for i in tensors if args[i] is not None]
        grads = iter(bwd(grad.contiguous(), *args, kernel, needs) if any(needs) else [])
        out = tuple(next(grads) if wants.get(i) else None for i in range(len(args)))
        return out + (None,) * (ctx.arity - len(out))

    fwd.register_autograd(autograd, setup_context=setup)
    return fwd


#: Row op name -> its dispatched custom op.
ROW_CUSTOM_OPS: dict[str, Any] = {row.name: define_dispatched(row) for row in ROW_OPS}
rms_norm_op = ROW_CUSTOM_OPS["rms_norm"]
layer_norm_op = ROW_CUSTOM_OPS["layer_norm"]
rope_op = ROW_CUSTOM_OPS["rope"]
swiglu_op = ROW_CUSTOM_OPS["swiglu"]
geglu_op = ROW_CUSTOM_OPS["geglu"]
gelu_op = ROW_CUSTOM_OPS["gelu"]
silu_op = ROW_CUSTOM_OPS["silu"]
cross_entropy_op = ROW_CUSTOM_OPS["cross_entropy"]
linear_cross_entropy_op = ROW_CUSTOM_OPS["linear_cross_entropy"]
