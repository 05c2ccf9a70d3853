"""``lz.rope``, ``lz.swiglu``, ``lz.geglu``, ``lz.gelu``, ``lz.silu``: position encoding and activations.

Canonical kernel arguments: rope ``(x, cos, sin, interleaved)``; swiglu
``(gate, up)``; geglu ``(gate, up, approximate)``; gelu ``(x, approximate)``;
silu ``(x,)``.

RoPE: ``x`` is ``(..., seq, head_dim)``; ``cos`` / ``sin`` broadcast against
``x`` except in the last dimension, which is ``head_dim`` (HuggingFace's
``cat(freqs, freqs)`` form) or ``head_dim // 2``. ``interleaved=False`` rotates
halves (GPT-NeoX / Llama); ``interleaved=True`` rotates adjacent pairs (GPT-J).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.ops.base import GUARD_NAMES, OpDef, dense_guard, largest, layout_problem, option_flag, pick
from layerzero.ops.contract import CallContract
from layerzero.runtime import get_runtime
from layerzero.tensor_helpers import half_cos_sin, holds_in_dtype

__all__ = ["rope", "swiglu", "geglu", "gelu", "silu", "ROPE", "SWIGLU", "GEGLU", "GELU", "SILU", "rope_reference",
           "half_cos_sin"]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    x64 = x.double()
    c, s = half_cos_sin(x, cos.double(), sin.double(), interleaved)
    if interleaved:
        x1, x2 = x64[..., 0::2], x64[..., 1::2]
        o1 = x1 * c - x2 * s
        o2 = x1 * s + x2 * c
        return torch.stack((o1, o2), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class _UnaryLike(OpDef):
    def _tensor(self, operation: str, args: tuple[Any, ...], name: str, t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise self.invalid(operation, f"{name} must be a torch.Tensor, got {type(t).__name__}", args)
        problem = layout_problem(name, t)
        if problem is not None:
            raise self.invalid(operation, problem, args)
        if not t.is_floating_point():
            raise self.invalid(operation, f"{name} must be floating point, got {t.dtype}", args)
        return t

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        x = args[0]
        grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        return SelectionContext.from_rows(x, requires_grad=grad, **self._extra(args))

    def _extra(self, args: tuple[Any, ...]) -> dict[str, Any]:
        return {}

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        x = args[0]
        return self.output_meta_check(operation, out, x.shape, x.dtype, x.device)

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, hidden_size=h, num_tokens=n, batch_size=n,
                                 **self._ctx_extra())
                for n, h in ((1, 4096), (16, 1024))]

    def _ctx_extra(self) -> dict[str, Any]:
        return {}


class RopeOp(_UnaryLike):
    family = "rope"
    arg_names = ("x", "cos", "sin", "interleaved")
    input_aliases = ("input", "q")
    grad_inputs = ("x",)  # transformers' cos / sin come from the rotary embedding, without gradients

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        x, cos, sin, interleaved = args
        self._tensor(operation, args, "x", x)
        self._tensor(operation, args, "cos", cos)
        self._tensor(operation, args, "sin", sin)
        d = x.shape[-1] if x.dim() else 0
        if x.dim() < 2 or d == 0 or d % 2:
            raise self.invalid(operation, f"x must be (..., seq, head_dim) with an even head_dim, got {tuple(x.shape)}", args)
        if cos.dim() < 1:
            raise self.invalid(operation, f"cos and sin need a last dimension, got {cos.dim()}-D tensors", args)
        if cos.shape != sin.shape:
            raise self.invalid(operation, f"cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}", args)
        if cos.shape[-1] not in (d, d // 2):
            raise self.invalid(operation, f"cos/sin last dimension must be head_dim={d} or head_dim/2={d // 2}, "
                                          f"got {cos.shape[-1]}", args)
        try:
            fits = torch.broadcast_shapes(tuple(cos.shape[:-1]), tuple(x.shape[:-1])) == x.shape[:-1]
        except RuntimeError:
            fits = False
        if not fits:  # the output is x's shape: cos/sin broadcast to x, never x to them
            raise self.invalid(operation, f"cos/sin of shape {tuple(cos.shape)} do not broadcast to "
                                          f"x of shape {tuple(x.shape)}", args)
        if cos.device != x.device or sin.device != x.device:
            raise self.invalid(operation, f"cos, sin and x must be on one device, got cos on {cos.device}, "
                                          f"sin on {sin.device}, x on {x.device}", args)
        if cos.dtype != x.dtype or sin.dtype != x.dtype:
            raise self.invalid(operation, f"cos and sin must have x's dtype {x.dtype}, got {cos.dtype} and {sin.dtype} "
                                          "(cast them with .to(x.dtype), as transformers' rotary embedding does)", args)
        if not isinstance(interleaved, bool):
            raise self.invalid(operation, f"interleaved must be a bool, got {interleaved!r}", args)

    def _extra(self, args: tuple[Any, ...]) -> dict[str, Any]:
        return {"interleaved": bool(args[3]), "head_dim": args[0].shape[-1]}

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        return rope_reference(*args)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32)
        d = ctx.head_dim or ctx.hidden_size or 64
        s = ctx.seq_len_q or ctx.num_tokens or 16
        x = torch.randn(ctx.batch_size or 1, ctx.num_heads or 4, s, d, generator=generator, **kw)
        pos = torch.arange(s, device=ctx.device, dtype=torch.float64).unsqueeze(-1)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=ctx.device, dtype=torch.float64) / d))
        freqs = pos * inv
        full = torch.cat((freqs, freqs), -1) if not ctx.interleaved else freqs.repeat_interleave(2, -1)
        return (x, full.cos().to(kw["dtype"]), full.sin().to(kw["dtype"]), ctx.interleaved)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "x", "input", "q", operation=operation), pick(merged, "cos", operation=operation),
                pick(merged, "sin", operation=operation), option_flag(merged, "interleaved", operation))

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, head_dim=64, hidden_size=64, seq_len=s,
                                 num_heads=4, batch_size=1, interleaved=il) for s in (1, 32) for il in (False, True)]


class SwigluOp(_UnaryLike):
    family = "swiglu"
    arg_names = ("gate", "up")
    input_aliases = ("x", "y")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        gate, up = args
        self._tensor(operation, args, "gate", gate)
        self._tensor(operation, args, "up", up)
        if gate.shape != up.shape:
            raise self.invalid(operation, f"gate and up shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}", args)
        if gate.dtype != up.dtype:
            raise self.invalid(operation, f"gate and up dtypes differ: {gate.dtype} vs {up.dtype}", args)
        if gate.device != up.device:
            raise self.invalid(operation, f"gate and up devices differ: {gate.device} vs {up.device}", args)

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """The product of gate and up stays finite in their dtype."""
        return holds_in_dtype(largest(args[0]) * largest(args[1]), args[0].dtype)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        g, u = args[0].double(), args[1].double()
        return g * torch.sigmoid(g) * u

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        shape = (ctx.num_tokens or 4, ctx.hidden_size or 1024)
        return (torch.randn(shape, **kw), torch.randn(shape, **kw))

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "gate", "x", operation=operation), pick(merged, "up", "y", operation=operation))


class GegluOp(SwigluOp):
    """GeGLU: ``gelu(gate) * up`` (Gemma's MLP: ``gelu_pytorch_tanh`` on the gate)."""

    family = "geglu"
    arg_names = ("gate", "up", "approximate")

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        super().validate(operation, args[:2])
        if args[2] not in ("none", "tanh"):
            raise self.invalid(operation, f"approximate must be 'none' or 'tanh', got {args[2]!r}", args)

    def _extra(self, args: tuple[Any, ...]) -> dict[str, Any]:
        return {"approximate": args[2]}

    def _ctx_extra(self) -> dict[str, Any]:
        return {"approximate": "tanh"}

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        return GELU.reference("gelu", (args[0], args[2])) * args[1].double()

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        return (*super().make_inputs(operation, ctx, generator), ctx.approximate)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (*super().args_from_inputs(operation, inputs, kwargs), merged.get("approximate", "tanh"))


class GeluOp(_UnaryLike):
    family = "gelu"
    arg_names = ("x", "approximate")
    input_aliases = ("input",)

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        self._tensor(operation, args, "x", args[0])
        if args[1] not in ("none", "tanh"):
            raise self.invalid(operation, f"approximate must be 'none' or 'tanh', got {args[1]!r}", args)

    def _extra(self, args: tuple[Any, ...]) -> dict[str, Any]:
        return {"approximate": args[1]}

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """The tanh approximation's cube of x stays finite in x's dtype."""
        return args[1] != "tanh" or holds_in_dtype(largest(args[0]) ** 3, args[0].dtype)

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        x = args[0].double()
        if args[1] == "tanh":
            return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x.pow(3))))
        return 0.5 * x * (1 + torch.erf(x / 2**0.5))

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        return (torch.randn(ctx.num_tokens or 4, ctx.hidden_size or 1024, **kw), ctx.approximate)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "x", "input", operation=operation), merged.get("approximate", "none"))


class SiluOp(_UnaryLike):
    family = "silu"
    arg_names = ("x",)
    input_aliases = ("input",)

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        self._tensor(operation, args, "x", args[0])

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        x = args[0].double()
        return x * torch.sigmoid(x)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        kw = dict(device=ctx.device, dtype=ctx.dtype or torch.float32, generator=generator)
        return (torch.randn(ctx.num_tokens or 4, ctx.hidden_size or 1024, **kw),)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        return (pick(merged, "x", "input", operation=operation),)


ROPE = RopeOp()
SWIGLU = SwigluOp()
GELU = GeluOp()
GEGLU = GegluOp()
SILU = SiluOp()

#: ``lz.rope``'s cached call: one plan per shape; the key carries cos's and sin's dtypes and shapes (a sin of
#: another shape or dtype is its own key, which validation rejects); ``interleaved=1`` compares equal to True.
ROPE_CONTRACT = CallContract(
    name="rope",
    signature="x, cos, sin, interleaved=False",
    args="x, cos, sin, interleaved",
    operation='"rope"',
    family='("rope", x.dtype, x.is_cpu or x.device, cos.dtype, sin.dtype, interleaved)',
    shape="x.shape, cos.shape, sin.shape",
    guard="interleaved.__class__ is bool and " + dense_guard("x", "cos", "sin", shapes_keyed=True),
    namespace=GUARD_NAMES,
    doc="""Rotary position embedding (``cos`` / ``sin`` of x's dtype).

    ``cos`` / ``sin`` are half width (``head_dim // 2``: one angle per rotated pair) or full width in the form
    every RoPE module builds, ``cat((freqs, freqs), -1)`` (``repeat_interleave(freqs, 2, -1)`` with
    ``interleaved=True``): only one value per pair is read, as Liger's and FlashAttention's kernels read it,
    so a full-width table whose two halves differ is not a rotation and its second half is not used.

    Example:
        >>> q = lz.rope(q, cos, sin)                    # Llama-style halves
        >>> q = lz.rope(q, cos, sin, interleaved=True)  # GPT-J-style pairs
    """,
)

#: ``lz.swiglu``'s cached call: one plan per shape; ``up``'s dtype and shape are in the key (a float64 or
#: differently shaped ``up``, or a Python number, never reaches the plan of a valid call).
SWIGLU_CONTRACT = CallContract(
    name="swiglu",
    signature="gate, up",
    args="gate, up",
    operation='"swiglu"',
    family='("swiglu", gate.dtype, gate.is_cpu or gate.device, up.dtype)',
    shape="gate.shape, up.shape",
    guard=dense_guard("gate", "up", shapes_keyed=True),
    namespace=GUARD_NAMES,
    doc="""SwiGLU: ``silu(gate) * up``.

    Example:
        >>> h = lz.swiglu(gate_proj(x), up_proj(x))
    """,
)

GEGLU_CONTRACT = CallContract(
    name="geglu",
    signature="gate, up, approximate='tanh'",
    args="gate, up, approximate",
    operation='"geglu"',
    family='("geglu", gate.dtype, gate.is_cpu or gate.device, up.dtype, approximate)',
    shape="gate.shape, up.shape",
    guard=dense_guard("gate", "up", shapes_keyed=True),
    namespace=GUARD_NAMES,
    doc="""GeGLU: ``gelu(gate, approximate) * up`` (``"tanh"`` by default, as Gemma's ``gelu_pytorch_tanh``).

    Example:
        >>> h = lz.geglu(gate_proj(x), up_proj(x))
    """,
)

GELU_CONTRACT = CallContract(
    name="gelu",
    signature="x, approximate='none'",
    args="x, approximate",
    operation='"gelu"',
    family='("gelu", x.dtype, x.is_cpu or x.device, approximate)',
    shape="x.shape",
    shape_free=True,
    guard=dense_guard("x"),
    namespace=GUARD_NAMES,
    doc="""GELU, exact (``"none"``) or tanh-approximated (``"tanh"``).""",
)

SILU_CONTRACT = CallContract(
    name="silu",
    signature="x",
    args="x",
    operation='"silu"',
    family='("silu", x.dtype, x.is_cpu or x.device)',
    shape="x.shape",
    shape_free=True,
    guard=dense_guard("x"),
    namespace=GUARD_NAMES,
    doc="""SiLU (swish): ``x * sigmoid(x)``.""",
)

_RT = get_runtime()
rope = ROPE.bind_contract(ROPE_CONTRACT, _RT)
swiglu = SWIGLU.bind_contract(SWIGLU_CONTRACT, _RT)
geglu = GEGLU.bind_contract(GEGLU_CONTRACT, _RT)
gelu = GELU.bind_contract(GELU_CONTRACT, _RT)
silu = SILU.bind_contract(SILU_CONTRACT, _RT)
