"""The FlexAttention backend: ``torch.nn.attention.flex_attention``, compiled once per shape family.

FlexAttention ships with PyTorch (2.5+) and generates a fused Triton kernel
for a mask written as Python (``mask_mod``). Its value here is causal and
sliding-window attention without a dense mask, with native GQA
(``enable_gqa=True``), and the attention variants: softcap and ALiBi as a
``score_mod``, sinks as an exact rescale by the log-sum-exp flex returns.

* Compiled once per family (device, dtype, head dims, mask kind, window,
  scale: :func:`family_key`) with dynamic batch, head and sequence sizes (see
  ``_family_fn``), on the family's first call. ``enable_gqa=True`` always (it
  is exact for equal head counts too).
* Block masks (``create_block_mask``) are built once per (query length, key
  length, causal, window, device) and kept in a small cache; their mask
  functions are one object per mask kind, so masks of one family trace alike.
* Never unfused: a new size class compiles with Dynamo's
  ``fail_on_recompile_limit_hit``, and a family that cannot compile is
  rejected from then on with the reason (``COMPILE_UNSAFE``) instead of
  running eager FlexAttention.
* The causal mask is upper-left aligned (``q_idx >= kv_idx``), as in
  ``F.scaled_dot_product_attention``, so no alignment restriction applies.

Constraints from the implementation (``torch/_inductor/kernel/flex``): head
dim >= 16 on CUDA, query heads per KV head a power of two (decoding kernel),
no explicit ``attn_mask`` and no dropout. CUDA only: on the CPU FlexAttention
needs a C++ toolchain and is slower than SDPA. Compiled code and the block-mask
cache are not safe to build during CUDA-graph capture or inside another
``torch.compile`` trace, so those contexts reject it.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from collections import OrderedDict
from typing import Any

import torch

from layerzero import forksafe
from layerzero.context import SelectionContext
from layerzero.errors import KernelDeclinedError, first_line
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "flex_attention_kernel", "block_mask_for", "FLEX_KERNEL_IDS",
           "family_key", "COMPILE_BACKEND", "SPEC_FIELDS", "declare", "built", "failure", "check_offsets", "OFFSETS_32"]

log = logging.getLogger("layerzero")
_MASK_CACHE_SIZE = 64
_masks: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_compiled: dict[tuple[Any, ...], Any] = {}
_seen: dict[tuple[Any, ...], int] = {}  # (family, size class) -> calls that ran compiled (counted to 2)
_WATCHED_CALLS = 2  # calls per (family, size class) run with fail_on_recompile_limit_hit (it costs ~2-15 us)
_failed: dict[tuple[Any, ...], str] = {}  # families that cannot be compiled (more), with the reason
_declined: dict[tuple[Any, ...], str] = {}  # (family, size class) Inductor found no kernel for, with the reason
#: FlexAttention's decoding kernel (a query shorter than DECODE_BELOW) holds the query rows of every head that
#: shares a KV head in one block of at most DECODE_ROWS rows; more (group x query length) and Inductor finds no
#: kernel (NoValidChoicesError; measured on an H100 with torch 2.11: 8 x 32 and 2 x 100 fail, 8 x 16 and 4 x 32 run).
DECODE_BELOW, DECODE_ROWS = 128, 128
_lock = forksafe.module_lock()
#: The torch.compile backend of the family functions ("inductor"; tests on a CPU may use another).
COMPILE_BACKEND: list[str] = ["inductor"]


_flex_attention: Any = None  # torch.nn.attention.flex_attention.flex_attention, imported on first use


_lse_request: Any = None  # keyword arguments asking flex_attention for the log-sum-exp too


def _flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float | None) -> Any:
    return _flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def _flex_variant_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float | None,
                       score_mod: Any, lse: bool) -> Any:
    if lse:
        return _flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True,
                               **_lse_request)
    return _flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)


def _load() -> None:
    global _flex_attention, _lse_request
    if _flex_attention is None:
        from torch.nn.attention import flex_attention as module

        aux = getattr(module, "AuxRequest", None)  # torch >= 2.9; return_lse=True before (deprecated after)
        _lse_request = {"return_lse": True} if aux is None else {"return_aux": aux(lse=True)}
        _flex_attention = module.flex_attention


def _lse_of(result: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` from flex_attention's ``(out, lse)`` or ``(out, AuxOutput)``."""
    out, aux = result
    return out, (aux if isinstance(aux, torch.Tensor) else aux.lse)


def family_key(device: torch.device, dtype: torch.dtype, d: int, dv: int, is_causal: bool, window: int | None,
               scale: float | None, variants: bool = False) -> tuple[Any, ...]:
    """What one compiled FlexAttention serves: device, dtype, head dims, mask kind, window, scale and whether
    a variant (softcap, ALiBi: a ``score_mod``; sinks: the log-sum-exp too) is on.

    Everything in it is a constant Dynamo would guard on (the mask function, the scale), so calls of one
    family differ only in sizes, which are dynamic."""
    kind = "window" if window is not None else "causal" if is_causal else "full"
    return (device.type, device.index, dtype, d, dv, kind, window, scale, bool(variants))


def _family_fn(key: tuple[Any, ...], dynamic: bool | None = True) -> Any:
    """The compiled FlexAttention for one family (:func:`family_key`) and size class (``_size_class``).

    Each family gets its own code object (a copy of ``_flex_call``'s), because Dynamo keeps its cache and
    its recompile limit per code object: one shared compiled function would hit the limit after a handful
    of families (causal, full and sliding-window masks each trace another graph, and so does each
    combination of sizes Dynamo specializes: batch 1, one KV head, one block of 128 or several) and fall
    back to eager FlexAttention, which materializes the score matrix. Within one, batch, heads and
    sequence lengths are dynamic, so it compiles once (``dynamic=None``: only the sizes marked dynamic are).
    """
    fn = _compiled.get(key)
    if fn is None:
        with _lock:
            fn = _compiled.get(key)
            if fn is None:
                base = _flex_variant_call if key[8] else _flex_call
                code = base.__code__.replace(co_name=f"_flex_family_{len(_compiled)}")
                family = types.FunctionType(code, base.__globals__, code.co_name)
                fn = torch.compile(family, dynamic=dynamic, backend=COMPILE_BACKEND[0])
                _compiled[key] = fn
    return fn


def _size_class(q: torch.Tensor, k: torch.Tensor, static_bh: bool) -> tuple[Any, ...]:
    """The size facts Dynamo specializes on (0/1 sizes: batch, heads, one block of 128 or several).

    ``static_bh``: batch and head counts and the key length are part of the class itself (they stay static in
    the graph: FlexAttention's decoding kernel needs a static batch and head count, and a paged cache's pool
    has one size), and a query length under 128 is the decoding kernel's case."""
    if static_bh:
        return (q.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[2] == 1, q.shape[2] < 128)
    return (q.shape[0] == 1, q.shape[1] == 1, k.shape[1] == 1, q.shape[2] == 1, q.shape[2] <= 128,
            k.shape[2] <= 128)


def _compiled_call(key: tuple[Any, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: Any,
                   scale: float | None, *extra: Any, static_bh: bool = False) -> Any:
    """Run the compiled FlexAttention for the family and size class of this call; never the unfused one.

    Each (family, size class) has its own code object, so the 0/1 size specializations Dynamo makes do
    not add up to its recompile limit on one. A code object's first call runs with Dynamo's
    ``fail_on_recompile_limit_hit``, so a family that cannot compile raises (and is rejected from then on,
    see :func:`_check`) instead of running eager FlexAttention. Its sizes are marked dynamic, so one graph
    serves the size class (with ``static_bh`` only the query length is dynamic: see :func:`_size_class`);
    the first two calls are watched, later ones run without the patch."""
    failed = _failed.get(key)
    if failed is not None:
        raise RuntimeError(failed)
    signature = (*key, *_size_class(q, k, static_bh))
    declined = _declined.get(signature)
    if declined is not None:
        raise KernelDeclinedError(declined)
    fn = _family_fn(signature, None if static_bh else True)
    calls = _seen.get(signature, 0)
    if calls >= _WATCHED_CALLS:
        return fn(q, k, v, bm, scale, *extra)
    if calls == 0:  # the first graph already has dynamic sizes (else Dynamo's second one would)
        for t in (q,) if static_bh else (q, k, v):
            for dim in (2,) if static_bh else range(3):
                if t.shape[dim] > 1:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out = fn(q, k, v, bm, scale, *extra)
    except Exception as exc:
        if type(exc).__name__ == "FailOnRecompileLimitHit":
            _failed[key] = (f"FlexAttention for this family ({key[2]}, head_dim={key[3]}, mask={key[5]}) reached "
                            f"Dynamo's recompile limit; rejected rather than run unfused ({type(exc).__name__})")
        elif "NoValidChoicesError" in str(exc):  # Inductor has no kernel for these sizes: theirs, not the input's
            _declined[signature] = (f"FlexAttention: Inductor has no kernel for q {tuple(q.shape)}, k "
                                    f"{tuple(k.shape)} ({q.dtype}): NoValidChoicesError")
            raise KernelDeclinedError(_declined[signature]) from exc
        raise
    _seen[signature] = calls + 1
    return out


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


_sliding: dict[int, Any] = {}


def _mask_mod(is_causal: bool, window: int | None) -> Any:
    """One function object per mask kind (and window), so block masks of one family share it: Dynamo
    guards on the mask function, and a fresh closure per block mask would recompile per shape."""
    if window is not None:
        w = int(window)
        fn = _sliding.get(w)
        if fn is None:
            def sliding(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
                return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

            fn = _sliding.setdefault(w, sliding)
        return fn
    if is_causal:
        return _causal
    from torch.nn.attention.flex_attention import noop_mask

    return noop_mask


def block_mask_for(sq: int, sk: int, is_causal: bool, window: int | None, device: torch.device) -> Any:
    """The cached BlockMask for (seq_q, seq_k, causal, window) on ``device`` (all-visible when neither is set).

    Unmasked calls get an explicit all-visible mask too, so every call of a family
    traces the same graph.
    """
    key = (sq, sk, bool(is_causal), window, device.type, device.index)
    found = _masks.get(key)
    if found is not None:
        return found
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(_mask_mod(is_causal, window), None, None, sq, sk, device=device)
    with _lock:
        _masks[key] = mask
        while len(_masks) > _MASK_CACHE_SIZE:
            _masks.popitem(last=False)
    return mask


_caps: dict[tuple[float, str, int | None], torch.Tensor] = {}


def _cap_tensor(cap: float, device: torch.device) -> torch.Tensor:
    key = (cap, device.type, device.index)
    found = _caps.get(key)
    if found is None:
        found = _caps.setdefault(key, torch.tensor(cap, dtype=torch.float32, device=device))
    return found


def _score_mod(softcap: float | None, alibi_slopes: torch.Tensor | None, sq: int, sk: int,
               device: torch.device) -> Any:
    """The ``score_mod`` for a softcap and ALiBi (flex applies it to the scaled score, before the block mask).

    The ALiBi offset ``sk - sq`` is a captured tensor, not a Python int: a decode step's offset grows with
    the cache, and a constant would make Dynamo recompile the family's kernel at every step."""
    # the softcap too is a captured tensor: under dynamic shapes Dynamo turns a Python float into a graph input
    # and Inductor cannot lower flex's score_mod over it (an unbacked scalar)
    cap = None if softcap is None else _cap_tensor(float(softcap), device)
    offset = None if alibi_slopes is None else torch.tensor(sk - sq, dtype=torch.int32, device=alibi_slopes.device)
    per_batch = alibi_slopes is not None and alibi_slopes.dim() == 2

    def variant_scores(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        if alibi_slopes is not None:
            slope = alibi_slopes[b, h] if per_batch else alibi_slopes[h]
            score = score - slope * torch.abs(q_idx + offset - kv_idx)
        return score

    return variant_scores


def flex_attention_kernel(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                          softcap=None, sinks=None, alibi_slopes=None, *, compiled=True):
    """FlexAttention on canonical BHSD arguments (``compiled=False`` runs eagerly, for tests).

    ``softcap`` and ``alibi_slopes`` are a ``score_mod``. ``sinks`` rescale flex's output by its log-sum-exp:
    with ``Z = sum_j exp(s_j) = exp(lse)``, the sink's softmax gives
    ``sum_j exp(s_j) v_j / (Z + exp(sink)) = out * Z / (Z + exp(sink)) = out * sigmoid(lse - sink)``
    (exact; a row with no visible key has ``lse = -inf`` and stays 0).
    """
    _load()
    bm = block_mask_for(q.shape[2], k.shape[2], is_causal, window, q.device)
    if softcap is None and sinks is None and alibi_slopes is None:
        if not compiled:
            return _flex_call(q, k, v, bm, scale)
        key = family_key(q.device, q.dtype, q.shape[-1], v.shape[-1], is_causal, window, scale)
        return _compiled_call(key, q, k, v, bm, scale)
    mod = None if softcap is None and alibi_slopes is None else _score_mod(softcap, alibi_slopes, q.shape[2],
                                                                          k.shape[2], q.device)
    key = family_key(q.device, q.dtype, q.shape[-1], v.shape[-1], is_causal, window, scale, variants=True)

    def call(*args: Any) -> Any:
        return _compiled_call(key, *args) if compiled else _flex_variant_call(*args)

    if sinks is None:
        return call(q, k, v, bm, scale, mod, False)
    out, lse = _lse_of(call(q, k, v, bm, scale, mod, True))
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


def _check(ctx: SelectionContext) -> list[Reason]:
    out = []
    if ctx.dtype is not None and ctx.head_dim is not None and _failed:
        key = family_key(ctx.device, ctx.dtype, ctx.head_dim, ctx.head_dim_v or ctx.head_dim, ctx.is_causal,
                         ctx.window, ctx.scale, ctx.softcap or ctx.sinks or ctx.alibi)
        if key in _failed:
            out.append(Reason(ReasonCode.COMPILE_UNSAFE, _failed[key]))
    if ctx.head_dim is not None and ctx.head_dim < 16:
        out.append(Reason(ReasonCode.HEAD_DIM_TOO_SMALL,
                          f"head_dim={ctx.head_dim} < 16 (FlexAttention's tl.dot minimum)"))
    if ctx.head_dim_v is not None and ctx.head_dim_v < 16:
        out.append(Reason(ReasonCode.HEAD_DIM_TOO_SMALL, f"value head_dim={ctx.head_dim_v} < 16"))
    if ctx.num_heads and ctx.num_kv_heads and ctx.num_heads % ctx.num_kv_heads == 0:
        group = ctx.num_heads // ctx.num_kv_heads
        if group & (group - 1):
            out.append(Reason(ReasonCode.GQA_UNSUPPORTED,
                              f"{group} query heads per KV head is not a power of two (FlexAttention's GQA kernel)"))
        sq = ctx.seq_len_q
        if sq is not None and sq < DECODE_BELOW and group * sq > DECODE_ROWS:
            out.append(Reason(ReasonCode.GQA_UNSUPPORTED,
                              f"{group} query heads per KV head x {sq} query tokens = {group * sq} rows > "
                              f"{DECODE_ROWS}, one block of FlexAttention's decoding kernel (queries < {DECODE_BELOW})"))
    return out


def _probe() -> str | None:
    major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor < (2, 5):
        return f"FlexAttention needs torch >= 2.5, this is {torch.__version__}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (FlexAttention compiles to Triton on CUDA)"
    return None


#: What every FlexAttention kernel declares: CUDA sm80+, half precision (float32 is left out: on torch 2.11 /
#: H200 Inductor finds no template for a float32 MQA flex_attention with dynamic shapes, NoValidChoicesError,
#: and float32 is not its fast path), windows and softcap, no dropout; compiled by the kernel itself, so not
#: inside another trace or a CUDA-graph capture.
SPEC_FIELDS: dict[str, Any] = dict(
    platforms=frozenset({"cuda"}), min_compute_capability=(8, 0), dtypes=frozenset({torch.float16, torch.bfloat16}),
    supports_window=True, supports_softcap=True, supports_dropout=False, deterministic=False, cuda_graph_safe=False,
    compile_safe=False, tolerance={"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2)})


def _specs() -> list[KernelSpec]:
    return [
        KernelSpec("flex_attention", "attention", "flex", flex_attention_kernel, priority=30,
                   mask_kinds=frozenset({"none"}), supports_sinks=True, supports_alibi=True, extra_check=_check,
                   description="torch.nn.attention.flex_attention, compiled once; causal / sliding-window block masks",
                   **SPEC_FIELDS),
    ]


def declare(backends: BackendRegistry) -> None:
    """Declare the ``flex`` backend (idempotent; every FlexAttention module's ``register`` does)."""
    backends.register("flex", module="torch.nn.attention.flex_attention", pip="pip install 'torch>=2.5' triton",
                      probe=_probe)


_builders: dict[Any, Any] = {}


def built(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` (a pure tensor function that builds a block mask's index tensors), compiled with dynamic
    shapes when its first argument is on CUDA: eagerly a layout costs ~50 small kernel launches (~0.7 ms of
    host time on an H100 host), compiled a few fused ones. A builder that cannot be compiled runs eagerly
    from then on (slower, never wrong: the attention kernel itself is unaffected)."""
    if not args[0].is_cuda:
        return fn(*args)
    compiled = _builders.get(fn)
    if compiled is None:
        compiled = _builders.setdefault(fn, torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND[0]))
    if compiled is fn:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as exc:  # an Inductor limitation: the eager builder computes the same tensors
        _builders[fn] = fn
        log.warning("block-mask builder %s runs eagerly: %s: %s", fn.__name__, type(exc).__name__,
                    first_line(exc))
        return fn(*args)


#: Elements of one tensor past which the 32-bit offsets of FlexAttention's Triton kernels overflow (on an
#: H100 a paged pool of exactly 2**31 elements failed to compile).
OFFSETS_32 = 2**31


def check_offsets(kernel_id: str, what: str, *tensors: torch.Tensor) -> None:
    """Decline (:class:`~layerzero.errors.KernelDeclinedError`: the next kernel serves the call, nothing is
    counted) a call whose largest tensor is past FlexAttention's 32-bit offsets."""
    n = max(t.numel() for t in tensors)
    if n >= OFFSETS_32:
        raise KernelDeclinedError(f"{kernel_id}: {what} of {n} elements is past the 32-bit offsets of "
                                  "FlexAttention's kernels", kernel_id=kernel_id)


def failure(key: tuple[Any, ...]) -> str | None:
    """Why the family ``key`` cannot be compiled (it reached Dynamo's recompile limit), or None."""
    return _failed.get(key)


# What layerzero.backends.flex_varlen / flex_paged build on (public names: nothing private crosses a module).
check = _check
load = _load
lse_of = _lse_of
score_mod = _score_mod
compiled_call = _compiled_call
variant_call = _flex_variant_call


FLEX_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())

# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("flex",)
KERNEL_IDS: tuple[str, ...] = FLEX_KERNEL_IDS


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the flex backend and its kernel (idempotent)."""
    declare(backends)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
