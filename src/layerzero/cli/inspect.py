"""``layerzero list`` and ``layerzero explain``: which kernels exist, and which one a call would get.

``explain`` builds a :class:`~layerzero.context.SelectionContext` from shapes
given on the command line (through the same ``from_attention`` / ``from_rows``
builders a real call uses, on meta tensors), so it can explain a CUDA decision
on a CPU-only machine::

    layerzero explain --op attention.causal --shape q=1,32,1,128 --shape k=1,8,4096,128 \\
        --dtype bfloat16 --device cuda --sm 90

Exit codes: 0 ok; 1 nothing matched (``list``) or no kernel fits (``explain``,
which still prints every rejection); 2 usage error (bad shape, unknown operation).
"""

from __future__ import annotations

import json
import math
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table

__all__ = ["register", "list_command", "explain_command", "context_from_shapes", "parse_shape"]

_ATTN_NAMES = {"q": "q", "query": "q", "k": "k", "key": "k", "v": "v", "value": "v"}
_ROW_NAMES = ("x", "input", "hidden_states", "logits")


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


#: The largest dimension ``--shape`` takes (as ``layerzero tune --shapes``): a tensor's sizes are int64 in torch.
MAX_DIM = 2**31


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"q=1,32,1,128"`` -> ``("q", (1, 32, 1, 128))``; ``BadParameter`` naming the problem otherwise."""
    name, sep, dims = text.partition("=")
    name = name.strip().lower()
    if not sep or not name or not dims.strip():
        raise click.BadParameter(f"{text!r}: expected NAME=D1,D2,... (for example q=1,32,1,128)", param_hint="--shape")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: dimensions must be integers", param_hint="--shape") from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"{text!r}: dimensions must be positive", param_hint="--shape")
    if any(d > MAX_DIM for d in shape) or math.prod(shape) >= 2**63:
        raise click.BadParameter(f"{text!r}: dimensions out of range 1..{MAX_DIM} (and fewer than 2**63 elements in "
                                 "all)", param_hint="--shape")
    return name, shape


def _sm(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    text = value.strip().lower().removeprefix("sm_").removeprefix("sm")
    try:
        if "." in text:
            major, minor = text.split(".", 1)
            return int(major), int(minor)
        n = int(text)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a compute capability like 90, 8.6 or sm_80",
                                 param_hint="--sm") from None
    return (n // 10, n % 10) if n >= 10 else (n, 0)


_RAGGED_SHAPES = {"attention_varlen": ("q", "k", "v", "cu_seqlens"),
                  "attention_paged": ("q", "k_cache", "v_cache", "block_table")}


def _ragged_context(family: str, shapes: dict[str, tuple[int, ...]], dt: torch.dtype, dev: torch.device,
                    sm: tuple[int, int] | None, causal: bool, window: int | None) -> Any:
    """The context of a packed (``q=T,H,D k=T,Hkv,D cu_seqlens=B+1``) or paged (``q=B,S,H,D
    k_cache=P,page,Hkv,D block_table=B,M``) call, from meta tensors."""
    from layerzero.ops import OPS

    names = _RAGGED_SHAPES[family]
    missing = [n for n in names[:2] if n not in shapes]
    unknown = sorted(set(shapes) - set(names))
    if missing or unknown:
        raise click.BadParameter(f"{family} takes shapes named {', '.join(names)}; missing {missing}, "
                                 f"unknown {unknown}", param_hint="--shape")
    meta = {n: torch.empty(s, dtype=dt, device="meta") for n, s in shapes.items()}
    meta.setdefault(names[2], meta[names[1]])
    if family == "attention_varlen":
        cu = torch.empty(shapes.get("cu_seqlens", (2,)), dtype=torch.int32, device="meta")
        t = shapes["q"][0]
        args = (meta["q"], meta["k"], meta["v"], cu, cu, t, shapes["k"][0], causal, None, window, None)
    else:
        b = shapes["q"][0]
        table = torch.empty(shapes.get("block_table", (b, 1)), dtype=torch.int32, device="meta")
        args = (meta["q"], meta["k_cache"], meta["v_cache"], table, torch.empty(b, dtype=torch.int32, device="meta"),
                True, None, window, None)  # the paged op is causal by default
    ctx = OPS[family].context(family, args)
    return ctx.replace(device=dev, compute_capability=sm)


def context_from_shapes(operation: str, shapes: dict[str, tuple[int, ...]], *, dtype: str | None = None,
                        device: str = "cpu", sm: tuple[int, int] | None = None, causal: bool = False,
                        layout: str = "BHSD", mask: str = "none", window: int | None = None,
                        dropout: float = 0.0, requires_grad: bool = False, interleaved: bool = False,
                        approximate: str = "none") -> Any:
    """The SelectionContext a call with tensors of these shapes would build (no memory is allocated).

    Raises:
        click.BadParameter: a shape is missing, misnamed or of the wrong rank for the operation.
    """
    from layerzero.context import SelectionContext, dtype_from_name
    from layerzero.ops import op_for, operation_problem
    from layerzero.runtime import get_runtime

    family = op_for(operation).family
    problem = operation_problem(operation, (s.operation for s in get_runtime().kernels))
    if problem is not None:  # 'attention.causl' would explain full attention, as dispatch() would have run it
        raise click.BadParameter(problem, param_hint="--op")
    dev = torch.device(device)
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    try:
        dt = dtype_from_name(dtype)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dtype") from None
    if dev.type == "cuda" and sm is None and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device here: say which GPU to explain for, e.g. --sm 90 (H100) or --sm 80",
                                 param_hint="--sm")

    def meta(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device="meta")

    if family in ("attention_varlen", "attention_paged"):
        return _ragged_context(family, shapes, dt, dev, sm, causal, window)
    if family == "attention":
        named = {}
        for name, shape in shapes.items():
            if name not in _ATTN_NAMES:
                raise click.BadParameter(f"attention takes shapes named q, k, v; got {name!r}", param_hint="--shape")
            named[_ATTN_NAMES[name]] = shape
        if "q" not in named:
            raise click.BadParameter("attention needs --shape q=B,H,S,D (and usually k=...)", param_hint="--shape")
        q_shape = named["q"]
        k_shape = named.get("k", q_shape)
        v_shape = named.get("v", k_shape)
        for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
            if len(shape) != 4:
                raise click.BadParameter(f"{name} must have 4 dimensions ({layout}), got {len(shape)}",
                                         param_hint="--shape")
        mask_t = None
        if mask != "none":
            sq = q_shape[1] if layout == "BSHD" else q_shape[2]
            sk = k_shape[1] if layout == "BSHD" else k_shape[2]
            mask_t = torch.empty((sq, sk), dtype=torch.bool if mask == "bool" else dt, device="meta")
        _validate_attention(operation, [meta(s) for s in (q_shape, k_shape, v_shape)], mask_t,
                            causal or operation == "attention.causal", dropout, layout, window)
        ctx = SelectionContext.from_attention(
            meta(q_shape), meta(k_shape), meta(v_shape), attn_mask=mask_t,
            is_causal=causal or operation == "attention.causal", dropout_p=dropout, layout=layout, window=window)
    elif family == "linear_cross_entropy":  # the LM head's weight sets the vocabulary: the logits' width
        ctx = _lce_context(operation, shapes, meta)
    else:
        if len(shapes) != 1:
            raise click.BadParameter(f"{operation} takes one input shape (x=D1,...,H); got {sorted(shapes) or 'none'}",
                                     param_hint="--shape")
        (name, shape), = shapes.items()
        if name not in _ROW_NAMES:
            raise click.BadParameter(f"{operation} takes a shape named one of {', '.join(_ROW_NAMES)}; got {name!r}",
                                     param_hint="--shape")
        extra: dict[str, Any] = {}
        if family == "rope":  # as RopeOp.context reads the call: the head dim is x's last
            extra["interleaved"] = interleaved
            extra["head_dim"] = shape[-1]
        if family == "gelu":
            extra["approximate"] = approximate
        ctx = SelectionContext.from_rows(meta(shape), requires_grad=False, **extra)
    changes: dict[str, Any] = {"device": dev, "requires_grad": requires_grad}
    if dev.type == "cuda" and sm is not None:
        changes["compute_capability"] = sm  # else: looked up for the real device (a cpu has none)
    return ctx.replace(**changes)


def _lce_context(operation: str, shapes: dict[str, tuple[int, ...]], meta: Any) -> Any:
    """linear_cross_entropy's context from ``x=N,H`` (or ``hidden=``) and ``weight=V,H``, as the call builds it
    (the vocabulary is the logits' width; the model's width the matmul's)."""
    hidden = shapes.get("x") or shapes.get("hidden") or shapes.get("hidden_states")
    weight = shapes.get("weight") or shapes.get("w")
    if hidden is None or weight is None or len(shapes) != 2:
        raise click.BadParameter(f"{operation} takes the shapes x=N,H and weight=V,H (the LM head's); got "
                                 f"{sorted(shapes)}", param_hint="--shape")
    args = (meta(hidden), meta(weight), torch.empty(hidden[:1], dtype=torch.int64, device="meta"), None, -100,
            0.0, "mean", None)
    return _validated(operation, args).context(operation, args)


def _validate_attention(operation: str, qkv: list[torch.Tensor], mask: torch.Tensor | None, causal: bool,
                        dropout: float, layout: str, window: int | None) -> None:
    """The real call's validation of these shapes: what ``lz.attention`` refuses (head dims that differ, heads
    that do not divide, a mask with causal) is a usage error here too."""
    q, k, v = (t.transpose(1, 2) for t in qkv) if layout == "BSHD" else qkv
    _validated(operation, (q, k, v, mask, causal, dropout, None, window))


def _validated(operation: str, args: tuple[Any, ...]) -> Any:
    """``operation``'s op, once its validation passed ``args`` (meta tensors of the shapes given); what the real
    call refuses is a usage error (exit 2), its message without the inputs' description."""
    from layerzero.errors import InvalidInputError
    from layerzero.ops import op_for

    op = op_for(operation)
    try:
        op.validate(operation, args)
    except InvalidInputError as exc:
        raise click.BadParameter(str(exc).split(" (inputs:")[0], param_hint="--shape") from None
    return op


def _usage(exc: Exception) -> click.UsageError:
    return click.UsageError(str(exc))


@click.command("list")
@click.argument("pattern", default="*", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(pattern: str, as_json: bool) -> None:
    """Kernels whose id or operation matches PATTERN, and whether each can run here (and why not).

    PATTERN is a glob (torch_sdpa_*, attention*); a plain word matches anywhere in the id or operation.
    """
    from layerzero.doctor import kernel_rows

    if any(c in pattern for c in "*?["):
        rows = kernel_rows(pattern)
    else:  # a plain word matches as a substring, and as an operation name (attention.causal: its kernels)
        from layerzero.ops import canonical_operation

        rows = kernel_rows(canonical_operation(pattern))
        seen = {r["kernel_id"] for r in rows}
        rows = sorted(rows + [r for r in kernel_rows(f"*{pattern}*") if r["kernel_id"] not in seen],
                      key=lambda r: r["kernel_id"])
    if as_json:
        _json({"pattern": pattern, "kernels": rows})
    else:
        table = Table(title=f"kernels matching {pattern!r}", title_justify="left")
        for name, kw in (("kernel", {"no_wrap": True}), ("operation", {"no_wrap": True}), ("backend", {}),
                         ("priority", {"justify": "right"}), ("usable here", {})):
            table.add_column(name, **kw)
        for r in rows:
            status = "yes" if r["usable"] else "no: " + "; ".join(r["reasons"])
            table.add_row(r["kernel_id"], r["operation"], r["backend"], str(r["priority"]), status)
        if rows:
            _console().print(table)
    if not rows:
        click.echo(f"no kernel id or operation matches {pattern!r} (try: layerzero list)", err=True)
        raise click.exceptions.Exit(1)


@click.command("explain")
@click.option("--op", "operation", required=True, help="Operation, e.g. attention.causal, rms_norm.")
@click.option("--shape", "shapes", multiple=True, required=True, metavar="NAME=D1,D2,...",
              help="An input shape: q=/k=/v= for attention (BHSD unless --layout BSHD), x= for the others.")
@click.option("--dtype", default=None, help="Input dtype (default: bfloat16 on cuda, float32 on cpu).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--sm", default=None, help="Compute capability to explain for (90, 8.6, sm_80); needed for cuda "
                                          "on a machine without one.")
@click.option("--causal", is_flag=True, help="Causal attention (implied by attention.causal).")
@click.option("--layout", type=click.Choice(["BHSD", "BSHD"]), default="BHSD", show_default=True)
@click.option("--mask", type=click.Choice(["none", "bool", "additive"]), default="none", show_default=True)
@click.option("--window", type=int, default=None, help="Sliding-window size.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["softcap", "sinks", "alibi"]),
              help="An attention variant the call has (repeatable): softcap, sinks, alibi.")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--requires-grad", is_flag=True, help="Inputs require grad (kernels without autograd are rejected).")
@click.option("--interleaved", is_flag=True, help="rope: interleaved variant.")
@click.option("--approximate", default="none", show_default=True, help="gelu: none or tanh.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def explain_command(operation: str, shapes: tuple[str, ...], dtype: str | None, device: str, sm: str | None,
                    causal: bool, layout: str, mask: str, window: int | None, variants: tuple[str, ...],
                    dropout: float, requires_grad: bool, interleaved: bool, approximate: str, as_json: bool) -> None:
    """Which kernel runs OP for inputs of these shapes, and why every other candidate was rejected."""
    import layerzero as lz
    from layerzero.errors import LayerZeroError

    parsed: dict[str, tuple[int, ...]] = {}
    for text in shapes:
        name, shape = parse_shape(text)
        if name in parsed:
            raise click.BadParameter(f"shape {name!r} given twice", param_hint="--shape")
        parsed[name] = shape
    try:
        from layerzero.ops import canonical_operation

        operation = canonical_operation(operation)
        ctx = context_from_shapes(operation, parsed, dtype=dtype, device=device, sm=_sm(sm), causal=causal,
                                  layout=layout, mask=mask, window=window, dropout=dropout,
                                  requires_grad=requires_grad, interleaved=interleaved, approximate=approximate)
        if variants:
            ctx = ctx.replace(**{name: True for name in variants})
        exp = lz.explain_context(operation, ctx)
    except (LayerZeroError, RuntimeError, ValueError) as exc:
        if isinstance(exc, click.ClickException):
            raise
        raise _usage(exc) from None
    if as_json:
        _json(exp.to_dict())
    else:
        _print_explanation(exp)
    if exp.selected_kernel is None:
        raise click.exceptions.Exit(1)


def _print_explanation(exp: Any) -> None:
    from layerzero.selection.engine import format_context

    con = _console()
    con.print(format_context(exp.operation, exp.context), markup=False)
    if exp.selected_kernel is None:
        con.print("no kernel fits: every candidate was rejected", markup=False)
    else:
        con.print(f"selected: {exp.selected_kernel} (score {exp.score:g})"
                  + (f", locked by {exp.locked_by}" if exp.locked_by else ""), markup=False)
    accepted = [d for d in exp.trace if d.accepted]
    if accepted:
        table = Table(title="candidates", title_justify="left")
        for name, kw in (("rank", {"justify": "right"}), ("kernel", {"no_wrap": True}), ("backend", {}),
                         ("priority", {"justify": "right"}), ("score", {"justify": "right"}), ("measured", {}),
                         ("rules", {})):
            table.add_column(name, **kw)
        for d in sorted(accepted, key=lambda d: d.rank if d.rank is not None else 1 << 30):
            measured = "-" if d.measured_us is None else f"{d.measured_us:.2f} us ({d.measured_source})"
            table.add_row(str(d.rank + 1 if d.rank is not None else "-"), d.kernel_id, d.backend, str(d.priority),
                          f"{d.score:g}" if d.score is not None else "-", measured, "; ".join(d.rules) or "-")
        con.print(table)
    if exp.rejection_reasons:
        table = Table(title="rejected", title_justify="left", show_lines=True)
        table.add_column("kernel", no_wrap=True)
        table.add_column("reasons")
        for kid, reasons in exp.rejection_reasons.items():
            table.add_row(kid, "\n".join(f"{r.message} [{r.code}]" for r in reasons))
        con.print(table)
    if exp.rules_fired:
        con.print("policy rules that fired: " + "; ".join(exp.rules_fired), markup=False)


def register(cli: click.Group) -> None:
    """Add ``list`` and ``explain`` to the ``layerzero`` command group."""
    cli.add_command(list_command)
    cli.add_command(explain_command)
