"""The torch kernels of ``lz.linear_cross_entropy``: chunked (the logits never exist whole) and naive.

``torch_linear_cross_entropy_chunked`` walks the tokens in chunks of :func:`chunk_rows` rows; for each it
computes the chunk's logits ``(rows, V)`` in float32 (float64 for float64 inputs), its losses and, when a
gradient is wanted, the gradient of those logits, which it folds at once into ``grad_hidden`` (the chunk's
rows) and ``grad_weight`` / ``grad_bias`` (accumulated). So the extra memory is one chunk's logits and their
gradient, not ``N x V``:

* ``mean`` / ``sum``: the gradients are computed in the forward (one pass over the logits instead of two) and
  the backward only scales them by the upstream gradient (a scalar; divided by the valid count for
  ``mean``), in place: the backward runs once.
* ``none``: the forward keeps nothing but its inputs, and the backward recomputes the chunks with the
  upstream per-row gradient folded in before ``grad_weight`` sums over rows.

``grad_weight`` accumulates in the weight's dtype, as Liger's kernel does (``addmm`` sums each chunk in
float32; a float32 copy of a 128k x 4k bf16 weight would cost 2 GB). Ignored rows contribute nothing;
``mean`` over no valid row is NaN, as ``F.cross_entropy`` gives.

``torch_linear_cross_entropy_naive`` is ``F.cross_entropy(F.linear(...).float())``: the full logits, one
matmul and PyTorch's own loss, fastest where the logits are small, and only there
(:func:`naive_logits_limit`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from layerzero.context import SelectionContext
from layerzero.spec import Reason, ReasonCode
from layerzero.tensor_helpers import differentiable_grads

__all__ = ["torch_linear_cross_entropy_chunked", "torch_linear_cross_entropy_naive", "chunk_rows",
           "naive_logits_limit", "NAIVE_MAX_LOGITS"]

#: The naive kernel serves calls whose full logits have at most this many elements (64 MiB in float32):
#: beyond, not materializing them is what the op is for (its forward and backward hold about 3x them).
NAIVE_MAX_LOGITS = 1 << 24


def chunk_rows(n: int, h: int, v: int) -> int:
    """Rows per chunk: about ``N x H`` logit elements per chunk (the size of ``hidden`` itself, Liger's rule),
    a power of two of at least 64 rows and at most an eighth of the rows (so one chunk's logits stay a small
    fraction of the full ones), never more than ``n``."""
    factor = max(1, math.ceil(v / max(h, 1)))
    rows = 1 << (math.ceil(n / factor) - 1).bit_length()
    cap = max(64, 1 << (max(1, n // 8).bit_length() - 1))
    return max(1, min(n, max(64, min(rows, cap))))


def naive_logits_limit(ctx: SelectionContext) -> list[Reason]:
    """Rejects the naive kernel where the full logits exceed :data:`NAIVE_MAX_LOGITS` elements, except under
    torch.compile: there the naive kernel is what an unpatched model's loss is (``lm_head`` then
    cross-entropy), and Inductor's code for it is faster than the chunked loop (H200, a ~1B Llama's compiled
    training step at 4 x 1024 tokens and a 32k vocabulary: 1.064x the unpatched step with the chunked loss,
    385 MB less memory); a patched compiled model then holds the logits exactly as the unpatched one does."""
    elements = (ctx.num_tokens or 0) * (ctx.hidden_size or 0)
    if elements <= NAIVE_MAX_LOGITS or ctx.compiling:
        return []
    return [Reason(ReasonCode.HIDDEN_TOO_LARGE, f"full logits of {ctx.num_tokens} x {ctx.hidden_size} = {elements} "
                                                f"elements > {NAIVE_MAX_LOGITS} (the chunked kernels never hold them)")]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, smoothing: float,
           softcap: float | None, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: per-row losses and, when ``grad``, ``p``: the gradient of each row's loss with respect to
    its (pre-cap) logits, except for smoothing's constant ``-smoothing / V`` when there is no softcap (the
    caller folds that term in through sums, without a pass over the chunk). Ignored rows are not masked
    here (``tgt`` holds 0 for them); the caller weighs rows.

    Passes over the chunk's ``rows x V`` logits: the matmul, log_softmax, and for the gradient one exp in
    place (plus the cap's tanh and its derivative with ``softcap``)."""
    z = (h @ weight.t()).to(_compute_dtype(h.dtype))
    if bias is not None:
        z = z.add_(bias)
    capped = None
    if softcap is not None:
        capped = torch.tanh(z.div_(softcap))
        z = capped * softcap
    logp = torch.log_softmax(z, dim=-1)
    del z
    loss = logp.gather(1, tgt[:, None]).squeeze(1).neg_()
    if smoothing:
        loss = (1.0 - smoothing) * loss - smoothing * logp.mean(dim=-1)
    if not grad:
        return loss, None
    p = logp.exp_()  # the softmax, written over logp
    p.scatter_add_(1, tgt[:, None], torch.full_like(loss, smoothing - 1.0)[:, None])
    if capped is not None:
        if smoothing:
            p.sub_(smoothing / p.shape[1])
        p.mul_(capped.mul_(capped).neg_().add_(1.0))
    return loss, p


def _prepare(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = target != ignore_index
    return valid, torch.where(valid, target, 0).long()


def _pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
          opts: tuple[int, float, float | None], row_scale: torch.Tensor | None, need: tuple[bool, bool, bool]
          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Every chunk once: per-row losses (0 on ignored rows), the valid-row mask, and the gradients ``need``
    asks for (hidden, weight, bias) of ``sum(loss * row_scale)`` (``row_scale`` None: of the plain sum).

    Rows are weighed (0 for ignored ones, the upstream gradient for ``"none"``) on the ``rows x H`` side:
    ``grad_hidden = (p @ W) * r`` and ``grad_weight += p.T @ (h * r)``, not on ``p``."""
    ignore_index, smoothing, softcap = opts
    n, h_dim = hidden.shape
    rows = chunk_rows(n, h_dim, weight.shape[0])
    valid, tgt = _prepare(target, ignore_index)
    cdt = _compute_dtype(hidden.dtype)
    r_all = valid.to(cdt) if row_scale is None else valid.to(cdt) * row_scale
    grad = any(need)
    const = smoothing / weight.shape[0] if smoothing and softcap is None and grad else 0.0
    losses = torch.empty(n, dtype=cdt, device=hidden.device)
    g_h = torch.empty_like(hidden) if need[0] else None
    g_w = torch.zeros_like(weight) if need[1] else None
    g_b = torch.zeros(weight.shape[0], dtype=cdt, device=hidden.device) if need[2] else None
    w_sum = weight.sum(0, dtype=cdt) if const and need[0] else None
    hr_sum = torch.zeros(h_dim, dtype=cdt, device=hidden.device) if const and need[1] else None
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        h, r = hidden[sl], r_all[sl]
        loss, p = _chunk(h, weight, bias, tgt[sl], smoothing, softcap, grad)
        losses[sl] = loss.mul_(valid[sl])
        if p is None:
            continue
        if g_b is not None:
            g_b += p.t().mv(r)
        p_lo = p.to(hidden.dtype)
        del p
        if g_h is not None:
            gh = (p_lo @ weight).to(cdt)
            if w_sum is not None:
                gh.sub_(w_sum, alpha=const)
            g_h[sl] = gh.mul_(r[:, None])
        if g_w is not None:
            hr = h * r[:, None].to(h.dtype)
            g_w.addmm_(p_lo.t(), hr)
            if hr_sum is not None:
                hr_sum += hr.sum(0, dtype=cdt)
    if hr_sum is not None:  # smoothing's constant term: -const * outer(ones(V), sum of weighed rows)
        g_w.sub_(hr_sum.to(weight.dtype)[None, :], alpha=const)
    if g_b is not None and const:
        g_b.sub_(r_all.sum() * const)
    return losses, valid, [g_h, g_w, g_b]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd for the chunked kernel (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, opts: tuple[int, float, float | None], reduction: str,
                need: tuple[bool, bool, bool]) -> torch.Tensor:
        ctx.reduction, ctx.opts, ctx.need, ctx.used = reduction, opts, need, False
        ctx.bias_dtype = None if bias is None else bias.dtype
        if reduction == "none":
            losses, _, _ = _pass(hidden, weight, bias, target, opts, None, (False, False, False))
            ctx.save_for_backward(hidden, weight, bias, target)
            return losses
        losses, valid, grads = _pass(hidden, weight, bias, target, opts, None, need)
        total = losses.sum()
        # mean: the gradients of the sum, divided by the valid count in the backward (with the upstream one)
        ctx.count = valid.sum().to(total.dtype) if reduction == "mean" else None
        if ctx.count is not None:
            total = total / ctx.count
        ctx.save_for_backward(*grads, hidden, weight, bias, target)  # the inputs only for create_graph=True
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow (see _twice_differentiable)
            return _twice_differentiable(ctx, grad_out)
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            row_scale = grad_out.to(_compute_dtype(hidden.dtype))
            _, _, grads = _pass(hidden, weight, bias, target, ctx.opts, row_scale, ctx.need)
        else:
            if ctx.used:
                raise RuntimeError("linear_cross_entropy (torch_linear_cross_entropy_chunked): backward ran twice "
                                   "through one graph; its gradients are computed in the forward and scaled in "
                                   "place, so call the op again instead of retain_graph=True")
            ctx.used = True
            grads = list(ctx.saved_tensors[:3])
            # 0-dim, float32 or float64; no valid target at all (a batch of prompt or padding): the loss is NaN
            # (0 / 0, as F.cross_entropy's) but every gradient is 0, as torch's: the count floors at 1
            factor = grad_out if ctx.count is None else grad_out / ctx.count.clamp(min=1)
            for g in grads:
                if g is not None:
                    g.mul_(factor)
        g_h, g_w, g_b = grads
        if g_b is not None:
            g_b = g_b.to(ctx.bias_dtype)
        return g_h, g_w, g_b, None, None, None, None


def _twice_differentiable(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    """The backward under ``create_graph=True`` (a gradient penalty, a Hessian-vector product): the chunked pass
    computes its gradients by hand, outside any graph, so their own derivative would be missing (the loss's
    Hessian silently dropped). This differentiates the plain loss instead (full logits: memory as the naive
    kernel's, for this backward only)."""
    hidden, weight, bias, target = ctx.saved_tensors[-4:]
    ignore_index, smoothing, softcap = ctx.opts
    loss = torch_linear_cross_entropy_naive(hidden, weight, target, bias, ignore_index, smoothing, ctx.reduction,
                                            softcap)
    return (*differentiable_grads(loss, (hidden, weight, bias), ctx.need, grad_out), None, None, None, None)


def torch_linear_cross_entropy_chunked(hidden, weight, target, bias, ignore_index, label_smoothing,  # type: ignore[no-untyped-def]
                                       reduction, softcap):
    opts = (int(ignore_index), float(label_smoothing), None if softcap is None else float(softcap))
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and any(need)):
        losses, valid, _ = _pass(hidden, weight, bias, target, opts, None, (False, False, False))
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / valid.sum() if reduction == "mean" else total
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, opts, reduction, need)


def torch_linear_cross_entropy_naive(hidden, weight, target, bias, ignore_index, label_smoothing,  # type: ignore[no-untyped-def]
                                     reduction, softcap):
    z = F.linear(hidden, weight, bias).to(_compute_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, target.long(), ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
