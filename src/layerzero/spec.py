"""KernelSpec: one kernel of one operation, declared as a frozen value.

A spec carries the callable and everything selection needs to know about it
(platforms, compute capability, dtypes, head-dim range, masks, autograd, ...).
``spec.check(ctx)`` answers with a list of :class:`Reason` objects, each with a
stable ``code`` and a sentence naming the observed value and what is
supported. An empty list means the kernel can run that context.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero.context import DTYPE_NAMES, SelectionContext, dtype_from_name, dtype_name

__all__ = ["KernelSpec", "Reason", "ReasonCode", "ResidualPair"]

_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_OP_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")


class ReasonCode:
    """The stable reason codes (plain strings; compare ``reason.code == ReasonCode.SM_TOO_OLD``)."""

    PLATFORM_MISMATCH = "PLATFORM_MISMATCH"
    SM_TOO_OLD = "SM_TOO_OLD"
    SM_TOO_NEW = "SM_TOO_NEW"
    DTYPE_UNSUPPORTED = "DTYPE_UNSUPPORTED"
    HEAD_DIM_TOO_SMALL = "HEAD_DIM_TOO_SMALL"
    HEAD_DIM_TOO_LARGE = "HEAD_DIM_TOO_LARGE"
    HEAD_DIM_ALIGNMENT = "HEAD_DIM_ALIGNMENT"
    HEAD_DIM_MISMATCH = "HEAD_DIM_MISMATCH"
    SEQ_LEN_TOO_LONG = "SEQ_LEN_TOO_LONG"
    SEQ_LEN_UNSUPPORTED = "SEQ_LEN_UNSUPPORTED"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    HIDDEN_TOO_LARGE = "HIDDEN_TOO_LARGE"
    GQA_UNSUPPORTED = "GQA_UNSUPPORTED"
    MQA_UNSUPPORTED = "MQA_UNSUPPORTED"
    MASK_UNSUPPORTED = "MASK_UNSUPPORTED"
    CAUSAL_UNSUPPORTED = "CAUSAL_UNSUPPORTED"
    CAUSAL_ALIGNMENT = "CAUSAL_ALIGNMENT"
    WINDOW_UNSUPPORTED = "WINDOW_UNSUPPORTED"
    DROPOUT_UNSUPPORTED = "DROPOUT_UNSUPPORTED"
    LAYOUT_UNSUPPORTED = "LAYOUT_UNSUPPORTED"
    NOT_CONTIGUOUS = "NOT_CONTIGUOUS"
    GRAD_UNSUPPORTED = "GRAD_UNSUPPORTED"
    NOT_DETERMINISTIC = "NOT_DETERMINISTIC"
    CUDA_GRAPH_UNSAFE = "CUDA_GRAPH_UNSAFE"
    COMPILE_UNSAFE = "COMPILE_UNSAFE"
    VARIANT_UNSUPPORTED = "VARIANT_UNSUPPORTED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    BACKEND_UNHEALTHY = "BACKEND_UNHEALTHY"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    POLICY_DENIED = "POLICY_DENIED"
    POLICY_NOT_ALLOWED = "POLICY_NOT_ALLOWED"
    POLICY_LOCKED_OTHER = "POLICY_LOCKED_OTHER"
    MEASURED_FAILED = "MEASURED_FAILED"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a kernel was rejected. ``str(reason)`` is the human sentence."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(sorted(DTYPE_NAMES.get(d, str(d)) for d in dtypes))


def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


@dataclass(frozen=True, slots=True)
class ResidualPair:
    """A kernel's forward that keeps what its own backward needs, and that backward.

    Under ``torch.compile`` a kernel Inductor cannot see runs as one opaque node; with a pair its backward
    node calls ``backward`` on the saved residuals instead of running the forward again.

    * ``forward(*args) -> (out, residuals)``: the operation's canonical arguments in, the output and a tuple
      of tensors out (attention: the log-sum-exp, and whatever else the kernel's backward reads);
    * ``backward(grad, args, out, residuals) -> grads``: one gradient (or None) per tensor-valued canonical
      argument, in order;
    * ``fake(*args) -> residuals``: empty tensors of the residuals' shapes and dtypes, for tracing;
    * ``check(ctx) -> reasons`` (optional): why the pair cannot serve a context its kernel accepts (xFormers'
      residual API has no dropout); a rejected call runs as the dispatched op, which recomputes the forward.
    """

    forward: Callable[..., tuple[Any, tuple[Any, ...]]]
    backward: Callable[..., tuple[Any, ...]]
    fake: Callable[..., tuple[Any, ...]]
    check: Callable[[SelectionContext], list[Reason]] | None = None


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """A kernel: identity, callable, and declared constraints (all permissive by default).

    Only ``kernel_id``, ``operation``, ``backend`` and ``impl`` are required.
    ``None`` for a constraint means "no limit". ``impl`` is called with the
    operation's canonical positional arguments (see ``layerzero.ops``).
    ``specialize(ctx) -> (key, fn)`` optionally returns a callable with the same
    signature specialized for a context (constants bound ahead of time); plans
    with equal ``key`` share one specialization.
    ``shape_free=True`` declares that the kernel runs every shape its operation
    accepts, or raises for a shape it cannot run (it checks its inputs itself,
    as ``F.scaled_dot_product_attention`` does), also in its specialized form:
    such a kernel may serve a whole call family from one plan whose hot path
    reads no shapes (see ``Runtime.shape_free_reason``).
    ``covers`` names kernels whose every call this kernel runs the same way
    (``torch_sdpa_gqa`` covers ``torch_sdpa``: SDPA with ``enable_gqa=True`` is
    SDPA when the head counts match): when one of them outranks it only for
    some shapes, a shape-free plan of this kernel still serves the family.
    ``compile_native=True`` declares that ``impl`` is plain PyTorch that Dynamo
    can trace: under ``torch.compile`` the call is traced as that code, so
    Inductor fuses it with its neighbours. Other kernels run as one opaque node;
    ``residual_pair`` (a :class:`ResidualPair`) gives that node a backward that
    reuses the forward's residuals, without it the backward recomputes the forward.

    Example:
        >>> KernelSpec("my_rms_norm", "rms_norm", "custom", my_fn, dtypes={torch.float16})
    """

    kernel_id: str
    operation: str
    backend: str
    impl: Callable[..., Any] = field(compare=False, repr=False)
    priority: int = 50
    platforms: frozenset[str] | None = None
    min_compute_capability: tuple[int, int] | None = None
    max_compute_capability: tuple[int, int] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    head_dim_min: int | None = None
    head_dim_max: int | None = None
    head_dim_multiple: int | None = None
    head_dim_v_equal: bool = False
    max_seq_len: int | None = None
    max_batch_size: int | None = None
    max_hidden_size: int | None = None
    supports_gqa: bool = True
    supports_mqa: bool = True
    mask_kinds: frozenset[str] | None = None
    supports_causal: bool = True
    causal_alignment: str = "upper_left"
    supports_window: bool = False
    supports_dropout: bool = True
    supports_softcap: bool = False
    supports_sinks: bool = False
    supports_alibi: bool = False
    layouts: frozenset[str] | None = None
    requires_contiguous: bool = False
    supports_autograd: bool = True
    deterministic: bool = True
    cuda_graph_safe: bool = True
    compile_safe: bool = True
    supports_interleaved: bool | None = None
    approximations: frozenset[str] | None = None
    shape_free: bool = False
    covers: frozenset[str] = frozenset()
    compile_native: bool = False
    residual_pair: ResidualPair | None = field(default=None, compare=False, repr=False)
    tolerance: dict[str, tuple[float, float]] | None = field(default=None, compare=False, hash=False)
    extra_check: Callable[[SelectionContext], list[Reason]] | None = field(default=None, compare=False, repr=False)
    specialize: Callable[[SelectionContext], tuple[Any, Callable[..., Any]]] | None = field(
        default=None, compare=False, repr=False)
    description: str = ""

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.kernel_id):
            raise ValueError(f"KernelSpec.kernel_id must be snake_case, got {self.kernel_id!r}")
        if not _OP_RE.match(self.operation):
            raise ValueError(f"KernelSpec.operation must be a dotted lower-case name, got {self.operation!r}")
        if not callable(self.impl):
            raise ValueError(f"KernelSpec.impl of {self.kernel_id!r} must be callable, got {type(self.impl).__name__}")
        if not 0 <= int(self.priority) <= 1000:
            raise ValueError(f"KernelSpec.priority of {self.kernel_id!r} must be in 0..1000, got {self.priority}")
        if self.causal_alignment not in ("upper_left", "lower_right"):
            raise ValueError(f"KernelSpec.causal_alignment must be 'upper_left' or 'lower_right', got {self.causal_alignment!r}")
        # Normalise iterables to frozensets so specs hash and compare by value.
        for name in ("platforms", "mask_kinds", "layouts", "approximations", "covers"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, frozenset):
                object.__setattr__(self, name, frozenset(value))
        if self.dtypes is not None:
            object.__setattr__(self, "dtypes", frozenset(dtype_from_name(d) for d in self.dtypes))

    # -------------------------------------------------------------------------
    def check(self, ctx: SelectionContext) -> list[Reason]:
        """Every reason this kernel cannot run ``ctx`` (empty: it can)."""
        out = self.device_reasons(ctx.platform, ctx.compute_capability, ctx.dtype)
        out.extend(self.call_reasons(ctx))
        return out

    def device_reasons(self, platform: str, compute_capability: tuple[int, int] | None,
                       dtype: torch.dtype | None) -> list[Reason]:
        """Why this kernel cannot run on this device and dtype (the platform, compute capability and dtype):
        the part of :meth:`check` that depends on nothing else, so selection may remember it per device."""
        out: list[Reason] = []
        if self.platforms is not None and platform not in self.platforms:
            out.append(Reason(ReasonCode.PLATFORM_MISMATCH,
                              f"device is {platform}, kernel runs on {', '.join(sorted(self.platforms))}"))
        cc = compute_capability
        if platform == "cuda":
            if self.min_compute_capability is not None:
                if cc is None:
                    out.append(Reason(ReasonCode.SM_TOO_OLD, f"needs compute capability >= "
                                      f"{_cc(self.min_compute_capability)}, this GPU's is unknown"))
                elif cc < self.min_compute_capability:
                    out.append(Reason(ReasonCode.SM_TOO_OLD, f"needs compute capability >= "
                                      f"{_cc(self.min_compute_capability)}, this GPU has {_cc(cc)}"))
            if self.max_compute_capability is not None and cc is not None and cc > self.max_compute_capability:
                out.append(Reason(ReasonCode.SM_TOO_NEW, f"supports compute capability <= "
                                  f"{_cc(self.max_compute_capability)}, this GPU has {_cc(cc)}"))
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            out.append(Reason(ReasonCode.DTYPE_UNSUPPORTED,
                              f"dtype={dtype_name(dtype)} (supported: {_names(self.dtypes)})"))
        return out

    def call_reasons(self, ctx: SelectionContext) -> list[Reason]:
        """Why this kernel cannot run this call, the device and dtype aside: shapes, masks, variants, layouts,
        modes and ``extra_check``."""
        out: list[Reason] = []
        add = out.append
        self._shape_reasons(ctx, add)
        self._attention_reasons(ctx, add)
        self._mode_reasons(ctx, add)
        if self.extra_check is not None:
            out.extend(self.extra_check(ctx))
        return out

    def _shape_reasons(self, ctx: SelectionContext, add: Callable[[Reason], None]) -> None:
        """Head dims, lengths, batch, hidden size and head grouping."""
        d = ctx.head_dim
        if d is not None:
            if self.head_dim_min is not None and d < self.head_dim_min:
                add(Reason(ReasonCode.HEAD_DIM_TOO_SMALL, f"head_dim={d} < {self.head_dim_min} minimum"))
            if self.head_dim_max is not None and d > self.head_dim_max:
                add(Reason(ReasonCode.HEAD_DIM_TOO_LARGE, f"head_dim={d} > {self.head_dim_max} supported"))
            if self.head_dim_multiple is not None and d % self.head_dim_multiple:
                add(Reason(ReasonCode.HEAD_DIM_ALIGNMENT,
                           f"head_dim={d} is not a multiple of {self.head_dim_multiple} (pad the head dimension)"))
            if self.head_dim_v_equal and ctx.head_dim_v is not None and ctx.head_dim_v != d:
                add(Reason(ReasonCode.HEAD_DIM_MISMATCH,
                           f"value head_dim={ctx.head_dim_v} differs from query/key head_dim={d}"))
        if self.max_seq_len is not None:
            longest = max(ctx.seq_len_q or 0, ctx.seq_len_k or 0)
            if longest > self.max_seq_len:
                add(Reason(ReasonCode.SEQ_LEN_TOO_LONG, f"seq_len={longest} > {self.max_seq_len} supported"))
        if self.max_batch_size is not None and (ctx.batch_size or 0) > self.max_batch_size:
            add(Reason(ReasonCode.BATCH_TOO_LARGE, f"batch_size={ctx.batch_size} > {self.max_batch_size} supported"))
        if self.max_hidden_size is not None and (ctx.hidden_size or 0) > self.max_hidden_size:
            add(Reason(ReasonCode.HIDDEN_TOO_LARGE, f"hidden_size={ctx.hidden_size} > {self.max_hidden_size} supported"))
        if not self.supports_gqa and ctx.is_gqa:
            add(Reason(ReasonCode.GQA_UNSUPPORTED,
                       f"grouped-query attention (num_heads={ctx.num_heads}, num_kv_heads={ctx.num_kv_heads}) is not supported"))
        if not self.supports_mqa and ctx.is_mqa:
            add(Reason(ReasonCode.MQA_UNSUPPORTED,
                       f"multi-query attention (num_heads={ctx.num_heads}, num_kv_heads=1) is not supported"))

    def _attention_reasons(self, ctx: SelectionContext, add: Callable[[Reason], None]) -> None:
        """Masks, causal alignment, windows, dropout, the attention variants and layouts."""
        if self.mask_kinds is not None and ctx.mask_kind not in self.mask_kinds:
            add(Reason(ReasonCode.MASK_UNSUPPORTED,
                       f"mask={ctx.mask_kind} (supported: {', '.join(sorted(self.mask_kinds))})"))
        if ctx.is_causal:
            if not self.supports_causal:
                add(Reason(ReasonCode.CAUSAL_UNSUPPORTED, "is_causal=True is not supported"))
            elif (self.causal_alignment == "lower_right" and ctx.seq_len_q is not None
                  and ctx.seq_len_k is not None and ctx.seq_len_q != ctx.seq_len_k):
                add(Reason(ReasonCode.CAUSAL_ALIGNMENT,
                           f"causal mask is aligned lower-right, which differs from SDPA's upper-left "
                           f"when seq_len_q={ctx.seq_len_q} != seq_len_k={ctx.seq_len_k}"))
        if ctx.window is not None and not self.supports_window:
            add(Reason(ReasonCode.WINDOW_UNSUPPORTED, f"sliding window={ctx.window} is not supported"))
        if ctx.dropout_p > 0 and not self.supports_dropout:
            add(Reason(ReasonCode.DROPOUT_UNSUPPORTED, f"dropout_p={ctx.dropout_p} > 0 is not supported"))
        if ctx.softcap and not self.supports_softcap:
            add(Reason(ReasonCode.VARIANT_UNSUPPORTED, "softcap is not supported: this kernel cannot apply "
                       "tanh(scores / softcap) * softcap to the attention scores before the softmax"))
        if ctx.sinks and not self.supports_sinks:
            add(Reason(ReasonCode.VARIANT_UNSUPPORTED, "sinks are not supported: this kernel cannot add a per-head "
                       "sink logit to the softmax denominator"))
        if ctx.alibi and not self.supports_alibi:
            add(Reason(ReasonCode.VARIANT_UNSUPPORTED, "alibi_slopes are not supported: this kernel cannot add the "
                       "ALiBi bias -slope * |i + seq_k - seq_q - j| to the attention scores"))
        if self.layouts is not None and ctx.layout is not None and ctx.layout not in self.layouts:
            add(Reason(ReasonCode.LAYOUT_UNSUPPORTED,
                       f"layout={ctx.layout} (supported: {', '.join(sorted(self.layouts))})"))

    def _mode_reasons(self, ctx: SelectionContext, add: Callable[[Reason], None]) -> None:
        """Strides, autograd, determinism, graph capture, compile and op variants."""
        if self.requires_contiguous and not ctx.is_contiguous:
            add(Reason(ReasonCode.NOT_CONTIGUOUS, "inputs are not contiguous in the last dimension (call .contiguous())"))
        if ctx.requires_grad and not self.supports_autograd:
            add(Reason(ReasonCode.GRAD_UNSUPPORTED, "inputs require grad and this kernel has no backward"))
        if ctx.deterministic and not self.deterministic:
            add(Reason(ReasonCode.NOT_DETERMINISTIC,
                       "torch.use_deterministic_algorithms(True) is on and this kernel is not deterministic"))
        if ctx.cuda_graph_capturing and not self.cuda_graph_safe:
            add(Reason(ReasonCode.CUDA_GRAPH_UNSAFE, "a CUDA graph is being captured and this kernel is not capture-safe"))
        if ctx.compiling and not self.compile_safe:
            add(Reason(ReasonCode.COMPILE_UNSAFE, "torch.compile is tracing and this kernel is not compile-safe"))
        if self.supports_interleaved is not None and ctx.interleaved != self.supports_interleaved:
            want = "interleaved" if ctx.interleaved else "half-rotation"
            add(Reason(ReasonCode.VARIANT_UNSUPPORTED, f"rope variant {want} is not supported by this kernel"))
        if self.approximations is not None and ctx.approximate not in self.approximations:
            add(Reason(ReasonCode.VARIANT_UNSUPPORTED,
                       f"approximate={ctx.approximate!r} (supported: {', '.join(sorted(self.approximations))})"))

    def tolerance_for(self, dtype: torch.dtype) -> tuple[float, float]:
        """(atol, rtol) this kernel promises against a float64 reference."""
        name = DTYPE_NAMES.get(dtype, str(dtype))
        if self.tolerance and name in self.tolerance:
            return self.tolerance[name]
        return _DEFAULT_TOL.get(name, (1e-5, 1e-5))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the spec's declared constraints."""
        out: dict[str, Any] = {}
        for name in self.__slots__:  # type: ignore[attr-defined]
            if name in ("impl", "extra_check", "tolerance", "specialize", "residual_pair"):
                continue
            value = getattr(self, name)
            if isinstance(value, frozenset):
                value = sorted(DTYPE_NAMES.get(v, str(v)) if isinstance(v, torch.dtype) else v for v in value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        out["residual_backward"] = self.residual_pair is not None
        return out


_DEFAULT_TOL: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (2e-5, 2e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}
