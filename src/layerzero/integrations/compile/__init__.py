"""torch.compile support: ``lz.attention`` & co. traced as PyTorch code where the kernel is PyTorch's own.

:func:`install` registers a stand-in for each public function with ``torch.compiler.substitute_in_graph``:
under ``torch.compile`` Dynamo traces the stand-in (:mod:`.traced`) instead of the eager function, while
eager calls run the original function unchanged (the eager hot path does no extra work). ``import
layerzero`` arranges for :func:`install` to run when ``torch._dynamo`` is first imported (see
``layerzero.integrations.hooks``), so users do nothing.

The stand-in selects the kernel when the graph is traced (:mod:`.choose`), with ``compiling=True`` in the
selection context, and the graph is guarded on what the choice depends on (the runtime's version, which
every policy, config, registry and performance-database change bumps; live policy scopes; dtype, device,
grad and deterministic modes, sizes), so a change recompiles instead of running a stale choice:

* PyTorch's own kernels (``KernelSpec.compile_native``) are traced as plain PyTorch code, so Inductor
  fuses and pattern-matches them as it would the user's own code;
* attention kernels Inductor cannot see that declare a ``ResidualPair`` become one
  ``layerzero::kernel_attention`` node whose backward reuses the saved residuals (:mod:`.residual`);
* anything else becomes a dispatched custom op (``layerzero::attention``, ``layerzero::rms_norm``, ...)
  that selects at run time and recomputes its forward in the backward (:mod:`.dispatched`); packed and
  paged attention and sampling always do (:mod:`.dispatched_serving`).

Every public operation has a stand-in: Dynamo never traces the eager hot path, whose plan cache and call
counters it would guard on (a recompilation per call until the recompile limit, then eager).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from layerzero.integrations.compile import traced as _traced_mod
from layerzero.integrations.compile.choose import NATIVE_IMPLS, RUNTIME
from layerzero.integrations.compile.dispatched import attention_op, lz_attention
from layerzero.integrations.compile.dispatched_rows import (
    cross_entropy_op,
    geglu_op,
    gelu_op,
    layer_norm_op,
    linear_cross_entropy_op,
    lz_cross_entropy,
    lz_geglu,
    lz_gelu,
    lz_layer_norm,
    lz_linear_cross_entropy,
    lz_rms_norm,
    lz_rope,
    lz_silu,
    lz_swiglu,
    rms_norm_op,
    rope_op,
    silu_op,
    swiglu_op,
)
from layerzero.integrations.compile.dispatched_serving import (
    attention_paged_op,
    attention_varlen_op,
    lz_attention_paged,
    lz_attention_varlen,
    lz_sample,
    sample_op,
)
from layerzero.integrations.compile.residual import kernel_attention_op

__all__ = ["install", "installed", "CUSTOM_OPS", "ORIGINALS", "attention_op", "rms_norm_op", "layer_norm_op",
           "rope_op", "swiglu_op", "geglu_op", "gelu_op", "silu_op", "cross_entropy_op", "linear_cross_entropy_op",
           "attention_varlen_op", "attention_paged_op", "sample_op", "kernel_attention_op"]

log = logging.getLogger("layerzero")

CUSTOM_OPS: dict[str, Any] = {
    "attention": attention_op, "rms_norm": rms_norm_op, "layer_norm": layer_norm_op, "rope": rope_op,
    "swiglu": swiglu_op, "geglu": geglu_op, "gelu": gelu_op, "silu": silu_op, "cross_entropy": cross_entropy_op,
    "linear_cross_entropy": linear_cross_entropy_op, "attention_varlen": attention_varlen_op,
    "attention_paged": attention_paged_op, "sample": sample_op,
}

#: The public functions as ``import layerzero`` defined them, by name (the eager path, untouched).
ORIGINALS: dict[str, Callable[..., Any]] = {
    "attention": lz_attention, "rms_norm": lz_rms_norm, "layer_norm": lz_layer_norm, "rope": lz_rope,
    "swiglu": lz_swiglu, "geglu": lz_geglu, "gelu": lz_gelu, "silu": lz_silu, "cross_entropy": lz_cross_entropy,
    "linear_cross_entropy": lz_linear_cross_entropy, "attention_varlen": lz_attention_varlen,
    "attention_paged": lz_attention_paged, "sample": lz_sample,
}

_installed: list[str] = []


def install() -> list[str]:
    """Make Dynamo trace the public operations as the stand-ins of :mod:`.traced` (idempotent).

    Returns the names of the functions substituted. A function whose signature no longer matches
    its stand-in is skipped with a warning (Dynamo would then trace its body as usual).
    """
    if _installed:
        return list(_installed)
    for spec in RUNTIME.kernels:
        if spec.compile_native:  # filled before any trace, so no trace changes the dict Dynamo guards on
            NATIVE_IMPLS.setdefault(spec.kernel_id, spec.impl)
    for name, original in ORIGINALS.items():
        try:
            torch.compiler.substitute_in_graph(original)(getattr(_traced_mod, f"traced_{name}"))
        except (TypeError, ValueError) as exc:
            log.warning("layerzero: torch.compile substitution for %s skipped: %s", name, exc)
            continue
        _installed.append(name)
    _skip_eager_entries()
    return list(_installed)


def _skip_eager_entries() -> None:
    """Dynamo never compiles a frame of the eager entries (nor what they call). Where a stand-in graph-breaks
    (sizes ``torch.compile(dynamic=True)`` made symbolic that the trace-time choice needs), Dynamo runs the
    public function eagerly and used to compile its generated entry as a frame of its own: guarded on the plan
    cache and the call counters it reads, so it recompiled at every call (``lz.silu``) or every size, up to the
    recompile limit. Skipped, the entry runs as eager code does (the graph break stays)."""
    try:
        from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # an older Dynamo: the frames are compiled as before
        return
    from layerzero.ops import OPS

    try:
        for op in OPS.values():
            if op.calls is not None:
                set_code_exec_strategy(op.calls.python_entry.__code__,
                                       FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    except Exception as exc:  # another Dynamo's signature: the entries are compiled as before, the stand-ins stay
        log.warning("layerzero: could not mark the eager entries for Dynamo to skip: %s: %s", type(exc).__name__, exc)


def installed() -> list[str]:
    """The public functions Dynamo currently traces as layerzero stand-ins."""
    return list(_installed)


install()  # importing this module (the torch._dynamo import hook does) is what makes Dynamo use the stand-ins
