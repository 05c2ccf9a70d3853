"""The torch side of ``lz.attention``'s variants (``softcap``, ``sinks``, ``alibi_slopes``).

* :func:`torch_attention_eager`: attention written out in PyTorch ops (``q k^T``, the variants, the masks,
  softmax, ``p v``), as transformers' ``eager`` attention computes it but with the scores and the softmax
  in float32 for half-precision inputs. It runs every variant, alone or together, on any device, with
  autograd (``sinks`` may require grad, as GPT-OSS's do in training), and is the fallback for softcap.
* :func:`variant_inputs`: how the SDPA adapters run ``alibi_slopes`` and ``sinks`` exactly: ALiBi is an
  additive float mask (``-slope * |i + sk - sq - j|``), and a sink is one more key: a zero key row and a zero
  value row are appended to k and v, and the mask's extra column holds ``sinks[h]``, so that column's score
  is ``q . 0 * scale + sinks[h] = sinks[h]`` and its value contributes nothing: the softmax denominator gains
  ``exp(sinks[h])`` and the output is GPT-OSS's. The causal / window masks are folded into the same mask (the
  sink column is always visible). The mask is materialized in q's dtype (what SDPA takes), so for float16
  and bfloat16 the bias and sink are rounded to that dtype. Softcapping (a function of each score) has no
  SDPA form: those kernels reject it.
"""

from __future__ import annotations

import math

import torch

from layerzero.tensor_helpers import alibi_bias, masked_softmax, softcapped, window_mask

__all__ = ["torch_attention_eager", "variant_inputs"]

_HALF = (torch.float16, torch.bfloat16)


def _keep_and_bias(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                   window: int | None, alibi_slopes: torch.Tensor | None, dtype: torch.dtype
                   ) -> torch.Tensor | None:
    """One additive float mask (``dtype``) from the causal / window mask, ``mask`` and the ALiBi bias."""
    sq, sk = q.shape[2], k.shape[2]
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # slope * distance, rounded once
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, sq, sk, wide)
    keep = window_mask(sq, sk, window, is_causal or window is not None, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            bias = mask.to(wide) if bias is None else bias + mask.to(wide)
    if keep is not None:
        base = torch.zeros(keep.shape, dtype=wide, device=q.device).masked_fill_(~keep, -math.inf)
        bias = base if bias is None else bias + base
    return None if bias is None else bias.to(dtype)


def variant_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                   window: int | None, sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """``(k, v, mask, is_causal)`` that make plain SDPA compute ALiBi and sinks exactly (module docstring)."""
    bias = _keep_and_bias(q, k, mask, is_causal, window, alibi_slopes, q.dtype)
    if sinks is None:
        return k, v, bias, False
    b, hq, sq = q.shape[0], q.shape[1], q.shape[2]
    if bias is None:
        bias = torch.zeros((1, 1, sq, k.shape[2]), dtype=q.dtype, device=q.device)
    bias = bias[(None,) * (4 - bias.dim())].expand(b, hq, sq, k.shape[2])
    sink = sinks.to(q.dtype).view(1, hq, 1, 1).expand(b, hq, sq, 1)
    bias = torch.cat([bias, sink], dim=-1)
    k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])], dim=2)
    v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], 1, v.shape[3])], dim=2)
    return k, v, bias, False


def torch_attention_eager(q, k, v, mask, is_causal, dropout_p, scale, window,  # type: ignore[no-untyped-def]
                          softcap=None, sinks=None, alibi_slopes=None):
    """Attention in PyTorch ops with every variant; scores and softmax in float32 for half inputs."""
    work = torch.float32 if q.dtype in _HALF else q.dtype
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = softcapped(torch.matmul(q.to(work), k.to(work).transpose(-2, -1)) * s, softcap)
    bias = _keep_and_bias(q, k, mask, is_causal, window, alibi_slopes, work)
    if bias is not None:
        scores = scores + bias
    if sinks is not None:
        sink = sinks.to(work).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    elif bias is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # a row with no visible key: 0 and clean gradients (a padded batch's Gemma 2 softcap runs here)
        probs = masked_softmax(scores)
    if dropout_p > 0:
        probs = torch.dropout(probs, dropout_p, True)
    return torch.matmul(probs.to(v.dtype), v)
