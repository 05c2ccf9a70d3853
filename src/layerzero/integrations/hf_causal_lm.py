"""``patch()``'s causal-LM parts: the loss through ``lz.linear_cross_entropy`` and RoPE through ``lz.rope``.

**Loss.** A transformers ``*ForCausalLM`` whose ``forward`` is the standard one (``self.model(...)``, then
``logits = self.lm_head(hidden_states)``, optionally Gemma 2/3's final-logit softcapping, then
``self.loss_function(...)``: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3 in transformers 5.x) gets a
``forward`` that, when labels are passed and the logits are not wanted, computes the loss from the final
hidden states and ``lm_head.weight`` (and bias) with ``lz.linear_cross_entropy``, never materializing the
logits; ``logits`` is then None. The logits are wanted, as in Liger's ``lce_forward``, unless the model is
in training mode; ``skip_logits=True`` / ``False`` overrides. Otherwise the original ``forward`` runs. The
loss is transformers' ``ForCausalLMLoss``: labels shifted by one (or ``shift_labels`` as given), ``-100``
(or ``ignore_index``) ignored, ``num_items_in_batch`` turning the mean into ``sum / num_items_in_batch``,
softcapping ``config.final_logit_softcapping``. A forward of another shape (an extra logit scale, an
auxiliary loss) is left alone, with the reason in the report.

**RoPE.** transformers applies rotary embeddings through a module-level ``apply_rotary_pos_emb`` in each
modeling module, looked up at call time, so the patch replaces that module attribute with a function
running ``lz.rope`` on ``q`` and ``k`` (calls it cannot serve as they are, such as partial rotary or
``unsqueeze_dim != 1``, go to the original). The replacement is process-wide for that modeling module;
it is counted per patched model and the original comes back when the last one is unpatched. It is
checked numerically against the original once per module before it is installed.
"""

from __future__ import annotations

import functools
import gc
import inspect
import weakref
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import layerzero.ops as lz_ops
from layerzero.errors import InvalidInputError

__all__ = ["loss_problem", "patch_loss", "install_forward", "causal_lm_loss", "patch_rope", "unpatch_causal_lm", "ROPE_ATTR",
           "LOSS_ATTR"]

LOSS_ATTR = "_layerzero_loss_softcap"  # on a patched model: the softcap its loss uses (None for none)
ROPE_ATTR = "_layerzero_rope_module"  # on a patched model: the modeling module whose rope it patched
# modeling module -> (original function, the live models using ours); a model dropped without unpatch() leaves
# the set by itself, so it never keeps the module patched for later models
_ROPE: dict[str, tuple[Callable[..., Any], weakref.WeakSet[nn.Module]]] = {}
_SOFTCAP_LINES = ("logits = logits / self.config.final_logit_softcapping", "logits = torch.tanh(logits)",
                  "logits = logits * self.config.final_logit_softcapping",
                  "if self.config.final_logit_softcapping is not None:")


#: The LM-head line of transformers' standard causal-LM forward -> the line slicing ``logits_to_keep`` before it
#: (transformers 5.24 and later; the releases before, 4.5x to 5.2x).
_LM_HEAD_LINES = {
    "logits = self.lm_head(hidden_states)": "hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)",
    "logits = self.lm_head(hidden_states[:, slice_indices, :])":
        "slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep",
}

# (output_attentions / output_hidden_states: transformers 4.x's Gemma 2 and 3 name them; they go to the base model)
_PARAMS = frozenset({"self", "input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                     "labels", "use_cache", "logits_to_keep", "cache_position", "output_attentions",
                     "output_hidden_states", "kwargs"})


def _forward_shape(cls: type) -> tuple[bool, str | None]:
    """(softcapped, None) when ``cls.forward`` is the standard causal-LM forward, else (False, why not)."""
    try:
        lines = [ln.strip() for ln in inspect.getsource(cls.forward).splitlines()]
    except (OSError, TypeError):
        return False, "its forward's source is not available to check"
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    found = [(line, keep) for line, keep in _LM_HEAD_LINES.items() if line in body]
    try:
        head_line, keep_line = found[0]
        head = body.index(head_line)
        end = body.index("loss = None", head)
    except (IndexError, ValueError):
        return False, "its forward does not compute logits = self.lm_head(hidden_states) then the loss"
    between = body[head + 1:end]
    if any(ln not in _SOFTCAP_LINES for ln in between):
        return False, f"its forward changes the logits before the loss ({between[0]!r})"
    needed = (keep_line, "if labels is not None:")
    if not all(n in body for n in needed) or not any(ln.startswith("loss = self.loss_function(") for ln in body):
        return False, "its forward is not transformers' standard causal-LM forward"
    if not any(ln.startswith("outputs") and "= self.model(" in ln for ln in body):
        return False, "its forward does not call self.model(...) for the hidden states"
    if "return CausalLMOutputWithPast(" not in body:  # a MoE's auxiliary loss, other outputs
        return False, "its forward returns more than CausalLMOutputWithPast (an auxiliary loss?)"
    params = set(inspect.signature(cls.forward).parameters)
    if not params <= _PARAMS:
        return False, f"its forward takes parameters the patch does not know: {sorted(params - _PARAMS)}"
    return bool(between), None


def loss_problem(model: nn.Module) -> str | None:
    """Why ``model``'s loss cannot go through ``lz.linear_cross_entropy`` (None when it can)."""
    cls = type(model)
    if not cls.__name__.endswith("ForCausalLM"):
        return "not a *ForCausalLM model"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or not isinstance(getattr(model, "model", None), nn.Module):
        return "no nn.Linear lm_head and base model"
    if getattr(getattr(model, "config", None), "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1 splits the LM head"
    if head.weight.device.type == "meta":
        return "parameters are on the meta device (load the weights first)"
    _, why = _forward_shape(cls)
    return why


def _softcap(model: nn.Module) -> float | None:
    softcapped, _ = _forward_shape(type(model))
    cap = getattr(model.config, "final_logit_softcapping", None) if softcapped else None
    return None if cap is None else float(cap)


def causal_lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None,
                   shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None, ignore_index: int = -100,
                   softcap: float | None = None) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``lm_head(hidden)``, computed by ``lz.linear_cross_entropy``."""
    if shift_labels is None:
        if labels is None:
            raise InvalidInputError("linear_cross_entropy (layerzero.patch): the loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(h.device)
    weight, bias = model.lm_head.weight, model.lm_head.bias
    if torch.is_autocast_enabled(h.device.type):  # what F.linear would compute in
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = lz_ops.linear_cross_entropy(h, weight, target, bias, ignore_index=ignore_index, reduction=reduction,
                                       softcap=softcap)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _loss_forward(self: nn.Module, *args: Any, skip_logits: bool | None = None, **kwargs: Any) -> Any:
    """The patched causal-LM ``forward`` (see the module docstring)."""
    original = type(self).forward
    bound = inspect.signature(original).bind(self, *args, **kwargs).arguments
    extra = dict(bound.pop("kwargs", {}))
    bound.pop("self")
    labels, shift_labels = bound.pop("labels", None), extra.get("shift_labels")
    wants_loss = labels is not None  # as transformers: shift_labels alone give no loss
    skip = (self.training and wants_loss) if skip_logits is None else bool(skip_logits)
    if not skip:
        return original(self, *args, **kwargs)
    if not wants_loss:
        raise InvalidInputError(f"{type(self).__name__} (layerzero.patch): skip_logits=True needs labels "
                                "(without them there is no loss, and nothing to return)")
    return_dict = getattr(self.config, "return_dict", True)
    passed = extra.pop("return_dict", return_dict)
    return_dict = return_dict if passed is None else passed
    if "past_key_values" in extra and "cache" in bound and bound["cache"] is None:
        bound["cache"] = extra.pop("past_key_values")
    logits_to_keep = bound.pop("logits_to_keep", 0)
    outputs = self.model(**bound, **extra)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # as transformers
    hidden = outputs.last_hidden_state[:, keep, :]
    loss = causal_lm_loss(self, hidden, labels, shift_labels, extra.get("num_items_in_batch"),
                          extra.get("ignore_index", -100), getattr(self, LOSS_ATTR))
    fields = {f for f in CausalLMOutputWithPast.__dataclass_fields__}
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state" and k in fields}
    out = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    # a tuple keeps the logits' place (None), so out[2] is the cache as without the patch
    return out if return_dict else (loss, None, *out.to_tuple()[1:])


def _verify_loss(model: nn.Module, softcap: float | None) -> str | None:
    """None when ``lz.linear_cross_entropy`` on the LM head matches ``F.cross_entropy`` of its logits."""
    head = model.lm_head
    w = head.weight
    g = torch.Generator(device="cpu").manual_seed(4321)
    h = torch.randn(6, w.shape[1], generator=g).to(device=w.device, dtype=w.dtype)
    target = torch.randint(0, w.shape[0], (6,), generator=g).to(w.device)
    target[0] = -100
    with torch.no_grad():
        z = head(h).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        want = F.cross_entropy(z, target).item()
        got = causal_lm_loss(model, h, None, target, softcap=softcap).item()
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not math.isfinite(got) or abs(got - want) > tol * max(1.0, abs(want)):
        return f"linear_cross_entropy gives {got:.6g} where the logits' loss is {want:.6g}"
    return None


def patch_loss(model: nn.Module, verify: bool = True) -> str | None:
    """Give ``model`` the loss forward; returns why not (None when patched)."""
    problem = loss_problem(model)
    softcap = _softcap(model) if problem is None else None
    if problem is None and verify:
        problem = _verify_loss(model, softcap)
    if problem is not None:
        return problem
    object.__setattr__(model, LOSS_ATTR, softcap)
    forward = install_forward(model, _loss_forward)
    original = inspect.signature(type(model).forward)
    params = list(original.parameters.values())[1:]  # without self
    if "skip_logits" not in original.parameters:
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("skip_logits", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = original.replace(parameters=params)  # type: ignore[attr-defined]
    return None


def install_forward(module: nn.Module, forward: Callable[..., Any]) -> functools.partial[Any]:
    """Make ``forward(module, ...)`` ``module``'s forward (an instance attribute, which :func:`unpatch` removes).

    A ``functools.partial`` of a module-level function, where a bound method would do for the calls: a bound
    method pickles as ``getattr(module, forward.__name__)``, which no loaded module has, so a model saved
    with ``torch.save(model)`` while patched would not load again.
    """
    bound = functools.partial(forward, module)
    object.__setattr__(module, "forward", bound)
    return bound


def _lz_rope_for(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``apply_rotary_pos_emb`` through ``lz.rope`` (layerzero.patch)."""
        d = q.shape[-1]
        if (unsqueeze_dim != 1 or cos.shape[-1] != d or k.shape[-1] != d or q.dim() != 4 or k.dim() != 4
                or not (q.dtype == k.dtype == cos.dtype == sin.dtype)):
            return original(q, k, cos, sin, unsqueeze_dim)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return lz_ops.rope(q, c, s), lz_ops.rope(k, c, s)

    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _in_its_place(current: Callable[..., Any], ours: Callable[..., Any]) -> Callable[..., Any]:
    """What the modeling module's ``apply_rotary_pos_emb`` becomes: ``ours``, or a fresh instance of
    ``current``'s class running it where that is an ``nn.Module`` (transformers 5's ``use_kernelized_func``).

    Each attention module of such a model holds its own instance of that class, which pickles as "a new
    instance of ``type(modeling_module.apply_rotary_pos_emb)``": the module attribute must keep the class,
    or no model of that module saved while it is patched (patched or not) loads again.
    """
    if not isinstance(current, nn.Module):
        return ours
    try:
        twin = type(current)()
    except Exception:  # a class we cannot make again: the plain function still routes the calls
        return ours
    object.__setattr__(twin, "forward", ours)  # nn.Module.__call__ runs it, hooks and all
    object.__setattr__(twin, "__wrapped__", current)
    return twin


def _verify_rope(original: Callable[..., Any], ours: Callable[..., Any], model: nn.Module) -> str | None:
    cfg = model.config
    param = next(model.parameters())
    heads = getattr(cfg, "num_attention_heads", 4)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    g = torch.Generator(device="cpu").manual_seed(99)
    kw: dict[str, Any] = dict(device=param.device, dtype=param.dtype)
    q, k = torch.randn(2, 3, 5, d, generator=g).to(**kw), torch.randn(2, 1, 5, d, generator=g).to(**kw)
    angles = torch.rand(2, 5, d // 2, generator=g) * 6
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(**kw), angles.sin().to(**kw)
    with torch.no_grad():
        try:
            want, got = original(q, k, cos, sin), ours(q, k, cos, sin)
        except Exception as exc:  # a function we cannot probe is a function we do not patch
            return f"could not compare outputs: {type(exc).__name__}: {exc}"
    tol = 1e-5 if param.dtype in (torch.float32, torch.float64) else 2e-2
    for a, b in zip(want, got, strict=True):
        if a.shape != b.shape or not torch.allclose(a.double(), b.double(), atol=tol, rtol=tol):
            return "lz.rope computes something else than its apply_rotary_pos_emb"
    return None


def patch_rope(model: nn.Module, verify: bool = True) -> tuple[str | None, str | None]:
    """Route ``model``'s modeling module's ``apply_rotary_pos_emb`` through ``lz.rope``: (module, problem)."""
    name = type(model).__module__
    module = sys.modules.get(name)
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None or not callable(current):
        return None, f"{name} has no apply_rotary_pos_emb"
    if next(model.parameters(), torch.empty(0, device="meta")).device.type == "meta":
        return None, "parameters are on the meta device (load the weights first)"
    entry = _ROPE.get(name)
    if entry is not None and not entry[1]:
        gc.collect()  # models dropped without unpatch() may still sit in reference cycles
    if entry is not None and not entry[1]:  # every model that patched it is gone: start from the original
        setattr(module, "apply_rotary_pos_emb", entry[0])
        del _ROPE[name]
        current, entry = entry[0], None
    if entry is None:
        ours = _lz_rope_for(current)
        problem = _verify_rope(current, ours, model) if verify else None
        if problem is not None:
            return None, problem
        entry = _ROPE[name] = (current, weakref.WeakSet())
        setattr(module, "apply_rotary_pos_emb", _in_its_place(current, ours))
    entry[1].add(model)
    weakref.finalize(model, _model_gone, name)
    object.__setattr__(model, ROPE_ATTR, name)
    return name, None


def _model_gone(name: str) -> None:
    """A patched model was collected without unpatch(): when no live model uses ``name``'s rope, restore it."""
    entry = _ROPE.get(name)
    if entry is not None and not list(entry[1]):
        del _ROPE[name]
        setattr(sys.modules[name], "apply_rotary_pos_emb", entry[0])


def unpatch_causal_lm(model: nn.Module) -> int:
    """Undo :func:`patch_loss` and :func:`patch_rope` on ``model``; returns how many of the two it undid."""
    undone = 0
    if LOSS_ATTR in model.__dict__:
        object.__delattr__(model, LOSS_ATTR)
        if "forward" in model.__dict__:
            object.__delattr__(model, "forward")
        undone += 1
    name = model.__dict__.get(ROPE_ATTR)
    if name is not None:
        object.__delattr__(model, ROPE_ATTR)
        entry = _ROPE.get(name)  # None: a copy (or a loaded pickle) of a model whose patch is already undone
        if entry is not None and model in entry[1]:
            entry[1].discard(model)
            if not entry[1]:
                del _ROPE[name]
                setattr(sys.modules[name], "apply_rotary_pos_emb", entry[0])
        undone += 1
    return undone
