"""The Liger backend: Liger-Kernel's Triton kernels for rms_norm, layer_norm, rope, swiglu, geglu and
cross-entropy.

Specs are registered whether or not ``liger_kernel`` is installed; the
library is imported on a kernel's first call, so a missing install shows up
as ``liger is not available: python package 'liger_kernel' is not installed
(install with: pip install liger-kernel)`` in every decision trace. Liger's
kernels are Triton programs, so the backend also needs Triton (probe).

Adapters (Liger 0.5-0.8, ``liger_kernel.ops.*``):

* rms_norm -> ``LigerRMSNormFunction.apply(X, W, eps, offset=0.0, casting_mode="llama", in_place=False)``;
  ``in_place=False`` because the in-place backward overwrites ``dY``, which is
  wrong when the caller reuses it. Rows wider than 65536 are rejected
  (``calculate_settings``' ``MAX_FUSED_SIZE``).
* layer_norm -> ``LigerLayerNormFunction.apply(X, W, B, eps)``; Liger needs W
  and B, so None becomes ones / zeros.
* rope -> ``LigerRopeFunction.apply(q, k, cos, sin)``: rotate-half only (no
  interleaved variant); q is (batch, heads, seq, head_dim) and cos/sin are
  (1 or batch, seq, rotary_dim). Liger rotates q *and* k and may write into
  q's storage, so the adapter hands it a private copy when it would, and a
  scratch one-head k.
* swiglu / geglu -> ``swiglu_forward`` / ``swiglu_backward`` (``geglu_*``: the tanh form of GELU only) in an
  autograd function of ours: Liger's own (``LigerSiLUMulFunction``) saves the caller's gate and up and its
  backward writes the gradients into them, so after ``backward()`` the caller's tensors held gradients. Ours
  saves them too and hands the backward kernel copies (transient, during backward only).
* cross_entropy -> ``LigerCrossEntropyFunction.apply(logits, target, None, ignore_index, 0.0,
  label_smoothing, reduction)`` on a copy of the logits (Liger overwrites its input), cast back to the
  logits' dtype.
* linear_cross_entropy -> ``LigerFusedLinearCrossEntropyFunction.apply(...)``, its arguments bound by name
  from the installed ``forward``'s signature (0.5 has no ``ce_weight``; 0.6 adds it before ``ignore_index``
  and returns a tuple; 0.8 adds ``accum_dtype`` and more), every parameter we do not set at its default.
  Its loss is float32. Before 0.8.2 its ``reduction="none"`` backward is wrong, so the adapter refuses
  ``"none"`` there; it syncs on the valid-token count (not CUDA-graph safe); it returns 0 for a ``mean``
  over no valid token where ``F.cross_entropy`` gives NaN, which the adapter restores; it computes the
  weight's gradient only when its input wants one, so a frozen ``hidden`` goes in as a detached copy that does.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.backends.first_order import first_order
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec
from layerzero.tensor_helpers import differentiable_grads

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "LIGER_KERNEL_IDS", "liger_rms_norm", "liger_layer_norm",
           "liger_rope", "liger_swiglu", "liger_geglu", "liger_cross_entropy",
           "liger_linear_cross_entropy", "liger_linear_cross_entropy_wide", "bind_fused_linear_cross_entropy"]

_PIP = "pip install liger-kernel"
_FUNCTIONS = {
    "rms_norm": ("liger_kernel.ops.rms_norm", "LigerRMSNormFunction"),
    "layer_norm": ("liger_kernel.ops.layer_norm", "LigerLayerNormFunction"),
    "rope": ("liger_kernel.ops.rope", "LigerRopeFunction"),
    "swiglu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
    "geglu": ("liger_kernel.ops.geglu", "LigerGELUMulFunction"),
    "cross_entropy": ("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction"),
    "linear_cross_entropy": ("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction"),
}
MAX_HIDDEN = 65536  # liger_kernel.ops.utils.calculate_settings: MAX_FUSED_SIZE


@functools.cache
def _function(name: str) -> Any:
    """``LigerXFunction`` for ``name``, imported on first use."""
    module, cls = _FUNCTIONS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ImportError(f"liger is not installed or broken ({exc}); install with: {_PIP}") from exc


def _apply(name: str) -> Any:
    return _function(name).apply


def liger_rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    return first_order(_apply("rms_norm")(x, weight, eps, 0.0, "llama", False), "rms_norm", "liger_rms_norm",
                       "torch_rms_norm")


def liger_layer_norm(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    h = x.shape[-1]
    if weight is None:
        weight = torch.ones(h, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(h, dtype=x.dtype, device=x.device)
    return first_order(_apply("layer_norm")(x, weight, bias, eps), "layer_norm", "liger_layer_norm",
                       "torch_layer_norm")


def _rope_tables(cos: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """cos/sin broadcastable to (..., seq, d) -> contiguous (1 or batch, seq, d), as Liger wants."""
    c = cos
    while c.dim() < 4:
        c = c.unsqueeze(0)
    if c.dim() > 4 or c.shape[1] != 1:
        raise ValueError(f"liger rope needs cos/sin shared across heads, got shape {tuple(cos.shape)}")
    c = c[:, 0]
    cb = c.shape[0]
    if cb not in (1, batch):
        raise ValueError(f"liger rope: cos/sin batch {cb} does not match x batch {batch}")
    return c.expand(cb, seq, c.shape[-1]).contiguous()


def liger_rope(x, cos, sin, interleaved):  # type: ignore[no-untyped-def]
    d, s = x.shape[-1], x.shape[-2]
    if x.dim() == 4:
        x4 = x
    elif x.dim() in (2, 3):
        x4 = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    else:
        x4 = x.reshape(-1, x.shape[-3], s, d)
        if cos.dim() > 3 and cos.shape[0] != 1:
            raise ValueError(f"liger rope: cos/sin of shape {tuple(cos.shape)} vary over more than one batch dim")
    b, h = x4.shape[0], x4.shape[1]
    # Liger transposes q to (b, s, h, d) and calls .contiguous(): when that view is already
    # contiguous (transformers' q: a (b, s, h, d) projection viewed as (b, h, s, d)) it rotates q's own
    # storage, so hand it a private copy with the same strides: one straight copy, and Liger's
    # transpose stays contiguous (a (b, h, s, d)-contiguous clone would cost two permuting copies).
    if x4.transpose(1, 2).is_contiguous():
        x4 = x4.transpose(1, 2).clone().transpose(1, 2)
    scratch_k = x4.new_empty((b, 1, s, d))
    c, sn = _rope_tables(cos, b, s), _rope_tables(sin, b, s)
    rotary = d if c.shape[-1] == d // 2 else None
    q_out, _ = _apply("rope")(x4, scratch_k, c, sn, None, 1, rotary)
    out = q_out.reshape(x.shape)
    if out.requires_grad:  # Liger's backward rotates the incoming gradient in place when its (b, s, h, d)
        shape = x4.shape   # view is contiguous (a gradient laid out as transformers' q): hand it a copy

        def private(grad: torch.Tensor) -> torch.Tensor:
            return grad.clone() if grad.reshape(shape).transpose(1, 2).is_contiguous() else grad

        out.register_hook(private)
    return first_order(out, "rope", "liger_rope", "torch_rope")


@functools.cache
def _gated_kernels(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Liger's ``(swiglu_forward, swiglu_backward)`` (or ``geglu_*``), imported on first use."""
    module = importlib.import_module(_FUNCTIONS[name][0])
    return getattr(module, f"{name}_forward"), getattr(module, f"{name}_backward")


class _Gated(torch.autograd.Function):
    """``act(gate) * up`` through Liger's kernels, the caller's gate and up left as they were: Liger's backward
    writes the gradients into the tensors it is given, so it is given copies of the saved inputs."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:  # type: ignore[override]
        a, b = gate.contiguous(), up.contiguous()
        _, _, out = _gated_kernels(name)[0](a, b)
        ctx.save_for_backward(a, b)
        ctx.name = name
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain op (Liger's pass has no derivative)
            act = F.silu(a) if ctx.name == "swiglu" else F.gelu(a, approximate="tanh")
            return (*differentiable_grads(act * b, (a, b), ctx.needs_input_grad[:2], grad), None)
        da, db = _gated_kernels(ctx.name)[1](a.clone(), b.clone(), grad.contiguous())
        return da, db, None


def liger_swiglu(gate, up):  # type: ignore[no-untyped-def]
    return _Gated.apply(gate, up, "swiglu")


def liger_geglu(gate, up, approximate):  # type: ignore[no-untyped-def]
    # Liger's GeGLU computes the tanh form only (the spec declares approximations={"tanh"}).
    return _Gated.apply(gate, up, "geglu")


def liger_cross_entropy(logits, target, ignore_index, label_smoothing, reduction):  # type: ignore[no-untyped-def]
    # Liger writes into its input: rows whose target is ignore_index are zeroed, and with grad enabled the
    # logits are overwritten by their gradient. The caller's logits must survive the call, so Liger gets a
    # copy (autograd flows back through it). Liger returns float32 losses (and, from 0.7, a tuple).
    out = _apply("cross_entropy")(logits.clone(), target, None, ignore_index, 0.0, float(label_smoothing), reduction)
    loss = out[0] if isinstance(out, tuple) else out
    return first_order(loss.to(logits.dtype), "cross_entropy", "liger_cross_entropy", "torch_cross_entropy")


def bind_fused_linear_cross_entropy(forward: Callable[..., Any], values: dict[str, Any]) -> tuple[Any, ...]:
    """The positional arguments of ``LigerFusedLinearCrossEntropyFunction.apply`` (which takes no keywords) for
    the named ``values``, ordered by ``forward``'s own signature, every other parameter at its default."""
    params = list(inspect.signature(forward).parameters.values())[1:]  # drop ctx
    names = {p.name for p in params}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"this liger's LigerFusedLinearCrossEntropyFunction.forward has no {unknown} parameter")
    out = []
    for p in params:
        if p.name in values:
            out.append(values[p.name])
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"LigerFusedLinearCrossEntropyFunction.forward needs {p.name!r}, which we do not pass")
        else:
            out.append(p.default)
    return tuple(out)


@functools.cache
def _liger_version() -> tuple[int, ...]:
    try:
        text = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def liger_linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing,  # type: ignore[no-untyped-def]
                               reduction, softcap):
    return _fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, reduction,
                                       softcap, 1)


#: ``chunk_mem_const`` of ``liger_linear_cross_entropy_wide``: each chunk's logits may take up to this many times
#: ``hidden``'s size (Liger's default is 1). On an H200 at 8192 tokens x 2048 -> 128256 (bf16) the loss with
#: its gradients took 23.3 ms instead of 29.4 ms for 188 MB more transient memory (32 chunks of 256 rows become
#: 4 of 2048: the weight gradient is read and written 4 times instead of 32); scripts/gpu_training_probe.py.
WIDE_CHUNK_MEM = 8


def liger_linear_cross_entropy_wide(hidden, weight, target, bias, ignore_index,  # type: ignore[no-untyped-def]
                                    label_smoothing, reduction, softcap):
    return _fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, reduction,
                                       softcap, WIDE_CHUNK_MEM)


def _fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing,  # type: ignore[no-untyped-def]
                                reduction, softcap, chunk_mem):
    if reduction == "none" and _liger_version() < (0, 8, 2):
        raise ValueError("liger_linear_cross_entropy: Liger before 0.8.2 computes a wrong reduction='none' "
                         f"gradient (installed: {'.'.join(map(str, _liger_version()))})")
    fn = _function("linear_cross_entropy")
    params = (weight, bias) if bias is not None else (weight,)
    if torch.is_grad_enabled() and not hidden.requires_grad and any(p.requires_grad for p in params):
        # Liger computes the weight's and bias' gradients only when its input wants one (a frozen trunk with a
        # trained head would get none): give it a detached input that does, whose gradient goes nowhere.
        hidden = hidden.detach().requires_grad_(True)
    args = bind_fused_linear_cross_entropy(fn.forward, {
        "_input": hidden, "weight": weight, "target": target, "bias": bias, "ignore_index": int(ignore_index),
        "label_smoothing": float(label_smoothing), "reduction": reduction,
        "softcap": None if softcap is None else float(softcap),
        **({"chunk_mem_const": chunk_mem} if chunk_mem != 1 else {})})
    out = fn.apply(*args)
    loss = out[0] if isinstance(out, tuple) else out
    if reduction == "mean":  # Liger's mean over no valid token is 0; F.cross_entropy's is NaN
        loss = torch.where((target != ignore_index).any(), loss, torch.nan)
    return first_order(loss.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32),
                       "linear_cross_entropy", "liger_linear_cross_entropy" + ("" if chunk_mem == 1 else "_wide"),
                       "torch_linear_cross_entropy_naive")


def _needs_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (Liger's kernels are Triton programs)"
    return None


def _specs() -> list[KernelSpec]:
    cuda = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    tol = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2), "float32": (5e-5, 5e-5)}
    lce_tol = {"float16": (5e-3, 5e-3), "bfloat16": (3e-2, 3e-2), "float32": (5e-5, 5e-5)}
    # compile_safe: under torch.compile a Liger kernel runs inside the dispatched row op (opaque to Dynamo,
    # pinned by trace-time selection), chosen only where a compiled-mode measurement shows it ahead of
    # Inductor's code for the native op (``native_first``); Dynamo never traces Liger's Triton launchers.
    common: dict[str, Any] = dict(platforms=cuda, dtypes=dtypes, tolerance=tol, compile_safe=True)
    return [
        KernelSpec("liger_rms_norm", "rms_norm", "liger", liger_rms_norm, priority=55,
                   max_hidden_size=MAX_HIDDEN, description="Liger Triton RMSNorm (llama casting mode)", **common),
        KernelSpec("liger_layer_norm", "layer_norm", "liger", liger_layer_norm, priority=55,
                   max_hidden_size=MAX_HIDDEN, description="Liger Triton LayerNorm", **common),
        # Below torch's priority (50) for the elementwise ops: each Liger call is a Triton launch from
        # Python, about 20 us of host time on an H200 host, so for small token counts torch's kernels ran
        # 2-8x faster (gpu_bench, geglu at 1 and 128 tokens), while Liger's fused pass wins 1.1-1.5x only on
        # large ones. Untuned, the choice that cannot lose badly goes first; tuning picks Liger where it wins.
        KernelSpec("liger_rope", "rope", "liger", liger_rope, priority=45, supports_interleaved=False,
                   description="Liger Triton RoPE (rotate-half, HF Llama form)", **common),
        KernelSpec("liger_swiglu", "swiglu", "liger", liger_swiglu, priority=45,
                   description="Liger Triton SiLU(gate) * up", **common),
        KernelSpec("liger_geglu", "geglu", "liger", liger_geglu, priority=45, approximations=frozenset({"tanh"}),
                   description="Liger Triton GELU-tanh(gate) * up", **common),
        # Below torch's priority: the copy it needs costs a pass over the logits; tuning picks it where it wins.
        KernelSpec("liger_cross_entropy", "cross_entropy", "liger", liger_cross_entropy, priority=45,
                   max_hidden_size=None, description="Liger Triton cross-entropy (on a copy of the logits)",
                   **common),
        # Above the chunked torch kernel: one Triton pass per chunk computes loss and logit gradient in place.
        # It reads the valid-token count on the host (.item()): not capture-safe.
        KernelSpec("liger_linear_cross_entropy", "linear_cross_entropy", "liger", liger_linear_cross_entropy,
                   priority=55, max_hidden_size=None, cuda_graph_safe=False,
                   description="Liger fused linear cross-entropy (chunked; Triton loss and gradient in place)",
                   **{**common, "tolerance": lce_tol}),
        # Above Liger's own chunking where this liger has chunk_mem_const (0.8.5 does; older ones raise a
        # TypeError naming the parameter, and the next kernel runs): chunks of up to 8x hidden's size.
        KernelSpec("liger_linear_cross_entropy_wide", "linear_cross_entropy", "liger",
                   liger_linear_cross_entropy_wide, priority=56, max_hidden_size=None, cuda_graph_safe=False,
                   description="Liger fused linear cross-entropy, chunks of up to 8x hidden's size (faster: "
                               "fewer weight-gradient passes; more transient memory)",
                   **{**common, "tolerance": lce_tol}),
    ]


LIGER_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())

# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("liger",)
KERNEL_IDS: tuple[str, ...] = LIGER_KERNEL_IDS


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the liger backend and its kernels (idempotent)."""
    backends.register("liger", module="liger_kernel", pip=_PIP, probe=_needs_triton)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
