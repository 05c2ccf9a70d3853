"""Kernel selection at trace time, for the ``lz.*`` stand-ins that Dynamo traces.

The stand-ins (:mod:`.traced`) read the metadata of the (fake) tensors Dynamo traces with and pass it,
as Python constants, to :func:`choose_attention` / :func:`choose_rows`. Those run the ordinary selection
(policy, baked table, measurements, breakers) for a context with ``compiling=True`` and answer with a
kernel id, :data:`OPAQUE`, a pinned opaque kernel (:data:`PINNED`, row-wise ops) or :data:`BUCKETS`. Dynamo calls them once per trace
(``torch.compiler.assume_constant_result``) and bakes the answer into the graph.

What the answer depends on is guarded: the stand-ins read :data:`RUNTIME` ``.version`` (bumped by every
policy, config, registry and performance-database change, see ``Runtime.invalidate``) and the number of
live policy scopes, so Dynamo installs a guard on both and a change recompiles; dtype, device, grad mode,
deterministic mode and the static sizes are guarded by Dynamo itself. Sizes Dynamo made dynamic are first
left out (None): when selection is the same for every shape (``Runtime.shape_free_reason``) that is the
answer, with no guard on those sizes. Otherwise the answer is :data:`BUCKETS` and the stand-in asks again
with power-of-two buckets of those sizes (each bucket a guard, as the plan key buckets them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.errors import LayerZeroError
from layerzero.policy.scope import LIVE
from layerzero.runtime import get_runtime
from layerzero.selection.engine import Selection
from layerzero.spec import KernelSpec

__all__ = ["RUNTIME", "LIVE", "OPAQUE", "BUCKETS", "RESIDUAL", "PINNED", "NATIVE_IMPLS", "choose_attention", "choose_rows",
           "bucket", "answer"]

RUNTIME = get_runtime()
OPAQUE = ""  # no kernel chosen at trace time: the dispatched custom op selects at run time
BUCKETS = "?"  # selection depends on sizes that are dynamic: ask again with their buckets
RESIDUAL = "residual:"  # prefix: an opaque kernel with a forward-with-residuals / backward pair
PINNED = "kernel:"  # prefix: the dispatched row op runs this opaque kernel (``pinned_kernel=`` of the op)

#: kernel id -> the PyTorch function Dynamo traces for it (filled by the choosers, read by the stand-ins).
NATIVE_IMPLS: dict[str, Callable[..., Any]] = {}


def bucket(n: Any) -> int:
    """``n`` rounded up to a power of two; traced with a symbolic ``n``, each comparison is a guard."""
    b = 1
    while b < n:
        b *= 2
    return b


def _shape_free(sel: Selection) -> bool:
    """Whether ``sel`` holds for every size of the dynamic dimensions (``Runtime.shape_free_reason``).

    A ``compile_native`` kernel counts as ``shape_free`` here: it is traced with the real (symbolic) sizes,
    so PyTorch checks them while tracing and a size it cannot run fails the trace instead of running.
    """
    primary = sel.ranked[0]
    if primary.compile_native and not primary.shape_free:
        sel = dataclasses.replace(sel, ranked=(dataclasses.replace(primary, shape_free=True), *sel.ranked[1:]))
    return RUNTIME.shape_free_reason(sel) is None


def answer(sel: Selection, dims_known: bool, pin: bool = False) -> str:
    """What the stand-in does for ``sel``: a native kernel id, a residual kernel, opaque, or ask again.
    With ``pin`` (row-wise ops), an opaque first choice is named (:data:`PINNED`): the dispatched op runs
    the kernel trace-time selection chose, not what eager selection would choose at run time."""
    if not dims_known and not _shape_free(sel):
        return BUCKETS
    spec: KernelSpec = sel.ranked[0]
    if spec.compile_native:
        NATIVE_IMPLS.setdefault(spec.kernel_id, spec.impl)
        return spec.kernel_id
    pair = spec.residual_pair
    if pair is not None and (pair.check is None or not pair.check(sel.context)):
        return RESIDUAL + spec.kernel_id
    return PINNED + spec.kernel_id if pin else OPAQUE


def _select(operation: str, ctx: SelectionContext) -> Selection | None:
    rt = RUNTIME
    try:
        sel = rt.baked_selection(operation, ctx)
        return sel if sel is not None else rt.select(operation, ctx)
    except LayerZeroError:
        return None  # no kernel here: the dispatched op raises with the full explanation at run time


@torch.compiler.assume_constant_result
def choose_attention(version: int, scopes: int, operation: str, dtype: torch.dtype, device: torch.device,
                     b: int | None, hq: int, hkv: int, sq: int | None, sk: int | None, d: int, dv: int,
                     causal: bool, mask_kind: str, dropout_p: float, scale: float | None, window: int | None,
                     grad: bool, deterministic: bool, contiguous: bool, softcap: bool = False, sinks: bool = False,
                     alibi: bool = False) -> str:
    """The attention kernel for this traced call (``version`` and ``scopes`` are there to be guarded).

    With a variant (``softcap``, ``sinks``, ``alibi``) only a native kernel is an answer: the residual
    attention op takes no variant arguments, so an opaque choice runs the dispatched op."""
    if scopes:
        return OPAQUE  # a policy scope is live: run-time dispatch reads it
    ctx = SelectionContext(device=device, dtype=dtype, batch_size=b, seq_len_q=sq, seq_len_k=sk, num_heads=hq,
                           num_kv_heads=hkv, head_dim=d, head_dim_v=dv, layout="BHSD", is_causal=causal,
                           mask_kind=mask_kind, dropout_p=dropout_p, scale=scale, window=window,
                           requires_grad=grad, deterministic=deterministic, is_contiguous=contiguous,
                           compiling=True, softcap=softcap, sinks=sinks, alibi=alibi)
    sel = _select(operation, ctx)
    kid = OPAQUE if sel is None else answer(sel, None not in (b, sq, sk))
    if (softcap or sinks or alibi) and kid.startswith(RESIDUAL):
        return OPAQUE
    return kid


@torch.compiler.assume_constant_result
def choose_rows(version: int, scopes: int, operation: str, dtype: torch.dtype, device: torch.device, hidden: int,
                rows: int | None, batch: int | None, grad: bool, deterministic: bool, contiguous: bool,
                interleaved: bool, head_dim: int | None, approximate: str) -> str:
    """The kernel for a traced row-wise call (norms, activations, rope, cross-entropy)."""
    if scopes:
        return OPAQUE
    extra: dict[str, Any] = {"interleaved": interleaved, "approximate": approximate}
    if head_dim is not None:
        extra["head_dim"] = head_dim
    ctx = SelectionContext(device=device, dtype=dtype, hidden_size=hidden, num_tokens=rows, batch_size=batch,
                           requires_grad=grad, deterministic=deterministic, is_contiguous=contiguous,
                           compiling=True, **extra)
    sel = _select(operation, ctx)
    return OPAQUE if sel is None else answer(sel, rows is not None, pin=True)
