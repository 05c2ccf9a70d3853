"""FlashAttention 2 and 3 for ``lz.attention_varlen`` and ``lz.attention_paged``.

Written against flash-attention's ``flash_attn/flash_attn_interface.py`` (FA2) and
``hopper/flash_attn_interface.py`` (FA3):

* ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=,
  causal=, window_size=(left, right), softcap=)``: our packed layout exactly (``(total, heads, head_dim)``,
  int32 offsets). FA3 returns ``out`` or ``(out, softmax_lse)`` by release; both are handled.
* ``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, block_table= (FA2) / page_table= (FA3),
  softmax_scale=, causal=, window_size=, softcap=)``: q ``(batch, seq_q, heads, d)``, caches ``(num_blocks,
  page_block_size, kv_heads, d)``, ``cache_seqlens`` the valid tokens (with no new ``k``/``v`` passed, they
  already include the new tokens, which is our ``seq_lens``). FA2 needs ``page_block_size % 256 == 0``.

FlashAttention aligns ``causal`` and ``window_size`` bottom-right (query ``i`` sits at key position
``i + seqlen_k - seqlen_q``), which is these ops' meaning; our ``window=w`` is ``window_size=(w - 1, 0)``;
``softcap=0.0`` means none; rows that see no key come back as zeros ("If the row of the mask is all zero,
the output will be zero"). fp16/bf16, head dims up to 256 (FA3: multiples of 8), sm80+ (FA3: sm90).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = ["register", "BACKENDS", "KERNEL_IDS", "fa2_varlen", "fa3_varlen", "fa2_paged", "fa3_paged"]

_PIP_V2 = "pip install flash-attn --no-build-isolation"
_PIP_V3 = "build flash-attention's hopper/ package (pip install flash-attn-3 where wheels exist)"
_FA2_PAGE = 256


def _fn(module: str, name: str, pip: str) -> Any:
    try:
        lib = importlib.import_module("flash_attn") if module == "flash_attn" else \
            importlib.import_module("flash_attn_interface")
        return getattr(lib, name)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed or broken ({exc}); install with: {pip}") from exc


def _options(is_causal: bool, scale: float | None, window: int | None, softcap: float | None) -> dict[str, Any]:
    causal = bool(is_causal or window is not None)
    return {"softmax_scale": scale, "causal": causal,
            "window_size": (-1, -1) if window is None else (int(window) - 1, 0),
            "softcap": 0.0 if softcap is None else float(softcap)}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def fa2_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    fn = _fn("flash_attn", "flash_attn_varlen_func", _PIP_V2)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **_options(is_causal, scale, window, softcap))


def fa3_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    fn = _fn("flash_attn_interface", "flash_attn_varlen_func", _PIP_V3)
    return _first(fn(q, k, v, cu_q, cu_k, max_q, max_k, **_options(is_causal, scale, window, softcap)))


def fa2_paged(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    fn = _fn("flash_attn", "flash_attn_with_kvcache", _PIP_V2)
    return fn(q, kc, vc, cache_seqlens=seq_lens, block_table=table, **_options(is_causal, scale, window, softcap))


def fa3_paged(q, kc, vc, table, seq_lens, is_causal, scale, window, softcap):  # type: ignore[no-untyped-def]
    fn = _fn("flash_attn_interface", "flash_attn_with_kvcache", _PIP_V3)
    return _first(fn(q, kc, vc, cache_seqlens=seq_lens, page_table=table,
                     **_options(is_causal, scale, window, softcap)))


def _fa2_page_check(ctx: SelectionContext) -> list[Reason]:
    page = ctx.hidden_size  # the paged op's context carries the page size here
    if page is not None and page % _FA2_PAGE:
        return [Reason(ReasonCode.CUSTOM, f"page_size={page} is not a multiple of {_FA2_PAGE} "
                                          "(FlashAttention-2's paged KV cache)")]
    return []


def _specs() -> list[KernelSpec]:
    half = frozenset({torch.float16, torch.bfloat16})
    tol = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2)}
    common: dict[str, Any] = dict(platforms=frozenset({"cuda"}), dtypes=half, head_dim_max=256, head_dim_v_equal=True,
                                  supports_window=True, supports_softcap=True, deterministic=False,
                                  compile_safe=False, tolerance=tol)
    v2: dict[str, Any] = dict(common, min_compute_capability=(8, 0))
    v3: dict[str, Any] = dict(common, min_compute_capability=(9, 0), max_compute_capability=(9, 0),
                              head_dim_multiple=8)
    return [
        KernelSpec("flash_attn_v2_varlen", "attention_varlen", "flash_attn", fa2_varlen, priority=75,
                   description="flash_attn.flash_attn_varlen_func (FlashAttention-2)", **v2),
        KernelSpec("flash_attn_v3_varlen", "attention_varlen", "flash_attn_v3", fa3_varlen, priority=80,
                   description="flash_attn_interface.flash_attn_varlen_func (FlashAttention-3, Hopper)", **v3),
        KernelSpec("flash_attn_v2_paged", "attention_paged", "flash_attn", fa2_paged, priority=75,
                   supports_autograd=False, extra_check=_fa2_page_check,
                   description="flash_attn.flash_attn_with_kvcache(block_table=) (FlashAttention-2)", **v2),
        KernelSpec("flash_attn_v3_paged", "attention_paged", "flash_attn_v3", fa3_paged, priority=80,
                   supports_autograd=False,
                   description="flash_attn_interface.flash_attn_with_kvcache(page_table=) (FlashAttention-3)", **v3),
    ]


BACKENDS: tuple[str, ...] = ("flash_attn", "flash_attn_v3")
KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Declare flash_attn / flash_attn_v3 (as :mod:`layerzero.backends.flash_attn` does) and add the kernels."""
    backends.register("flash_attn", module="flash_attn", pip=_PIP_V2)
    backends.register("flash_attn_v3", module="flash_attn_interface", pip=_PIP_V3)
    return [kernels.register(s) for s in _specs() if s.kernel_id not in kernels]
