"""Small tensor helpers shared by the op references (``layerzero.ops``) and the torch kernels (no layerzero imports)."""

from __future__ import annotations

import torch

__all__ = ["window_mask", "half_cos_sin", "alibi_bias", "softcapped", "masked_softmax", "holds_in_dtype", "valueless",
           "unsaveable_inference", "differentiable_grads"]


def valueless(t: object) -> bool:
    """Whether ``t`` is a tensor with shapes but no values: on the meta device, or a FakeTensor (``FakeTensorMode``,
    what torch.compile and export trace with). Reading its data (``int(t.max())``) fails on valid shapes."""
    if not isinstance(t, torch.Tensor):
        return False
    if t.is_meta:
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return bool(is_fake(t))


def unsaveable_inference(args: tuple[object, ...]) -> list[int]:
    """The positions of inference tensors (made under ``torch.inference_mode``) among ``args`` that autograd would
    have to save for a backward: grad mode is on and another argument requires grad. PyTorch refuses such a call
    ("Inference tensors cannot be saved for backward"); empty when there are none."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return []
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if not any(a.requires_grad for _, a in tensors):
        return []
    return [i for i, a in tensors if a.is_inference()]


def differentiable_grads(out: torch.Tensor, inputs: tuple[torch.Tensor | None, ...], need: tuple[bool, ...],
                         grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``out`` (with ``grad_out``) for the ``inputs`` that ``need`` marks, None for the others,
    each with a graph of its own: what a hand-written backward returns under ``create_graph=True`` (a gradient
    penalty, a Hessian-vector product) after recomputing ``out`` from plain PyTorch ops."""
    wanted = [t for t, n in zip(inputs, need, strict=True) if n]
    got = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(got) if n else None for n in need)


def holds_in_dtype(bound: float, dtype: torch.dtype) -> bool:
    """Whether a value of at most ``bound`` in magnitude stays finite in ``dtype``, with room (a quarter of its
    largest value): beyond it a kernel computing in that dtype overflows where the float64 reference does not,
    and verify mode must not blame it (the ops' ``reference_applies``, and a result beyond the output's dtype)."""
    return bound == bound and bound < torch.finfo(dtype).max / 4


def window_mask(sq: int, sk: int, window: int | None, is_causal: bool, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for causal/sliding-window attention, upper-left aligned."""
    if window is None and not is_causal:
        return None
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    keep = j <= i  # a window is always causal
    if window is not None:
        keep &= j > i - window
    return keep


def alibi_bias(slopes: torch.Tensor, sq: int, sk: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi as FlashAttention defines it: ``-slope[h] * |i + sk - sq - j|`` for query ``i`` and key ``j``.

    ``slopes`` is ``(heads,)`` or ``(batch, heads)``; the bias is ``(1 or batch, heads, sq, sk)`` in ``dtype``.
    """
    i = torch.arange(sq, device=slopes.device, dtype=dtype).unsqueeze(1)
    j = torch.arange(sk, device=slopes.device, dtype=dtype).unsqueeze(0)
    dist = (i + (sk - sq) - j).abs()
    s = slopes.to(dtype)
    s = s.view(1, -1, 1, 1) if s.dim() == 1 else s.view(s.shape[0], s.shape[1], 1, 1)
    return -s * dist


def masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, a row whose every score is -inf (it sees no key) giving zeros, as SDPA's
    math kernel does. Its scores become 0 before the softmax, not after: the softmax of an all -inf row is NaN,
    and its backward carried NaN on (NaN * 0) into the gradients. A NaN or inf from the data stays what it is."""
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``tanh(scores / softcap) * softcap`` (Gemma 2's attention-logit softcapping); ``scores`` when None."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def half_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin reduced to head_dim // 2 entries (one per rotated pair)."""
    half = x.shape[-1] // 2
    if cos.shape[-1] == half:
        return cos, sin
    if interleaved:
        return cos[..., ::2], sin[..., ::2]
    return cos[..., :half], sin[..., :half]
