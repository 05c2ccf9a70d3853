"""The torch sampling kernels: greedy argmax, temperature / top-k / top-p multinomial, Gumbel-max."""

from __future__ import annotations

import math

import torch

__all__ = ["torch_sample_greedy", "torch_sample", "torch_sample_gumbel"]


def torch_sample_greedy(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
    return logits.argmax(-1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in float32, each row's maximum moved to 0 first: a tiny temperature (1e-39, or
    1e-36 with logits near 2000) then sends the others to -inf instead of the maximum to inf (inf - inf: NaN
    probabilities). The distribution is the same (softmax ignores a shift). Below 1e-30 (5e-324 is 0 in
    float32: 0 / 0) T is 1e-30, as in the reference (``filtered_probs``): the argmax either way."""
    x = logits.float()
    return (x - x.amax(-1, keepdim=True)) / max(temperature, 1e-30)


def torch_sample(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
    if temperature <= 0:
        return logits.argmax(-1)
    x = _scaled(logits, temperature)
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, idx = torch.sort(probs, dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sp.masked_fill(drop, 0.0))
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(logits.shape[:-1])


def torch_sample_gumbel(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
    """Sampling by the Gumbel-max trick: argmax(logits / T + Gumbel noise); no top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    g = -torch.log(-torch.log(u.clamp_(min=1e-20)))
    return (_scaled(logits, temperature) + g).argmax(-1)
