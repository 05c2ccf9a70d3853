"""HuggingFace transformers: the ``"layerzero"`` attention implementation, and module patching.

Importing this module (``import layerzero`` does it for you as soon as
``transformers.modeling_utils`` is imported) registers ``"layerzero"`` in
transformers' ``AttentionInterface`` (4.48+ / 5.x) and, where transformers
builds masks centrally (``AttentionMaskInterface``, 4.53+), gives it the same
boolean masks as ``"sdpa"``. Then::

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="layerzero")
    model.config._attn_implementation = "layerzero"       # or switch a loaded model
    model.set_attn_implementation("layerzero")            # transformers 5.x

route attention through :func:`layerzero.attention`, with the masks (4-D
boolean or additive), GQA (key/value heads passed as they are), sliding
windows, dropout and scaling transformers passes, returning ``(B, S, H, D)``
like transformers' own ``sdpa_attention_forward``. A padding-free packed batch
(``DataCollatorWithFlattening``) runs :func:`layerzero.attention_varlen` per
sequence (:mod:`layerzero.integrations.transformers_packed`).

Not every model class looks its attention function up in that interface: some
pick their own attention classes (Falcon on 5.x and 4.x; BERT, RoBERTa and T5
on 4.x), so the name would fail deep inside transformers or, worse, be accepted
and never reach layerzero. :func:`register` therefore wraps
``PreTrainedModel._check_and_adjust_attn_implementation`` (transformers' own
per-model check, run at construction; the wrapper calls it unchanged and only
looks further when it answers ``"layerzero"``): a class whose module defines an
attention ``nn.Module`` but never uses ``ALL_ATTENTION_FUNCTIONS`` (transformers'
own heuristic, ``_can_set_attn_implementation``) raises
:class:`~layerzero.errors.UnsupportedModelError` naming the class and what to
use instead. ``output_attentions=True`` warns once: no weights come back.

:func:`patch` swaps norm and activation modules (Llama/Qwen2/Mistral-style
RMSNorm, ``nn.LayerNorm``, SiLU / GELU activations, SwiGLU MLPs) to layerzero
ops by giving each matching module instance a layerzero ``forward``; every
module class is checked numerically against its own forward once before it is
patched (a look-alike with other arithmetic, such as Gemma's ``1 + weight``
RMSNorm, is left alone and reported). On a ``*ForCausalLM`` it also routes the training loss through
``lz.linear_cross_entropy`` (no logits) and ``apply_rotary_pos_emb`` through ``lz.rope``
(:mod:`layerzero.integrations.hf_causal_lm`). :func:`unpatch` restores all of it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import layerzero.ops as lz_ops
from layerzero.integrations import transformers_batching
from layerzero.integrations.lean_mlp import LeanSwiGLUMLP, lean_applies
from layerzero.integrations.hf_causal_lm import (LOSS_ATTR, ROPE_ATTR, install_forward, patch_loss, patch_rope,
                                                 unpatch_causal_lm)
from layerzero.errors import InvalidInputError, LayerZeroError, UnsupportedModelError
from layerzero.integrations.transformers_packed import packed_attention, packed_layout

__all__ = ["register", "is_registered", "attention_forward", "uses_attention_interface", "check_model_class", "patch",
           "unpatch", "PatchReport", "ATTN_NAME"]

ATTN_NAME = "layerzero"
_PATCH_ATTR = "_layerzero_patch"
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """One warning per process and key, like transformers' ``logger.warning_once`` on its sdpa path."""
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------

def _position_bias_mask(bias: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor,
                        k: torch.Tensor) -> torch.Tensor:
    """Fold a learned position bias into one additive mask (as transformers' sdpa path does)."""
    lowest = torch.finfo(q.dtype).min
    if mask is None:
        if not is_causal:
            return bias.to(q.dtype)
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        return torch.where(keep, bias, lowest).to(q.dtype)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, lowest).to(q.dtype)
    return (bias + mask).to(q.dtype)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by :func:`layerzero.attention`.

    Args:
        module: the attention module (``is_causal`` is read from it when not passed).
        query / key / value: ``(batch, heads, seq, head_dim)``; key/value may have fewer heads (GQA).
        attention_mask: ``None``, or a 4-D boolean (True = attend) or additive mask.
        dropout, scaling: attention dropout probability and softmax scale.
        is_causal: overrides ``module.is_causal``.
        kwargs: ``sliding_window``, ``position_bias``, ``softcap`` (Gemma 2's attention-logit softcapping)
            and ``s_aux`` (GPT-OSS's per-head attention sinks), which go to :func:`layerzero.attention` as
            ``softcap`` and ``sinks``; a padding-free packed row (``cu_seq_lens_*`` / ``max_length_*``, or
            restarting ``position_ids``) runs ``lz.attention_varlen`` per sequence
            (:mod:`layerzero.integrations.transformers_packed`); ``sinks`` (a per-query sink logit in some
            models) and ``head_mask`` are not supported; ``output_attentions=True`` warns once.

    Returns:
        ``(output, None)`` with output ``(batch, seq, heads, head_dim)``, contiguous.
    """
    if kwargs.get("sinks") is not None:
        raise InvalidInputError(
            "attention (transformers attn_implementation='layerzero'): sinks (a sink logit per query) is not "
            "supported, only GPT-OSS's per-head s_aux; use attn_implementation='eager' for this model")
    if kwargs.get("head_mask") is not None:
        raise InvalidInputError(
            "attention (transformers attn_implementation='layerzero'): head_mask is not supported (it would be "
            "ignored); use attn_implementation='eager' to mask heads")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions",
                   "attn_implementation='layerzero' computes no attention weights: with output_attentions=True the "
                   "model returns none (empty or None attentions); use attn_implementation='eager' for them")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sinks = kwargs.get("s_aux")
    if sinks is not None and sinks.dtype not in (torch.float32, query.dtype):
        sinks = sinks.float()
    layout = packed_layout(query, key, attention_mask, kwargs)
    if layout is not None:  # a padding-free packed row: attended per sequence (transformers_packed)
        sliding = kwargs.get("sliding_window")
        window = int(sliding) if causal and sliding else None
        return packed_attention(query, key, value, layout, float(dropout), scaling, bool(causal), window,
                                kwargs.get("softcap"), sinks), None
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 4 and mask.shape[-1] != kv_len:
            mask = mask[:, :, :, :kv_len]
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
    # As in transformers' sdpa path: the causal flag only when no mask was built, never for one query.
    causal = bool(causal) and mask is None and bool(q_len > 1)  # a plain bool: q_len is a SymInt under dynamic shapes
    window = None
    sliding = kwargs.get("sliding_window")
    if causal and sliding and q_len == kv_len and kv_len > int(sliding):
        window = int(sliding)  # the mask builder skipped the mask; the window still applies
    if causal and kv_len > q_len:  # prefill into an empty static cache: the rest is masked anyway
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    bias = kwargs.get("position_bias")
    if bias is not None:
        mask = _position_bias_mask(bias[..., : key.shape[2]], mask, causal, query, key)
        causal, window = False, None
    out = lz_ops.attention(query, key, value, attn_mask=mask, is_causal=causal, dropout_p=float(dropout),
                           scale=scaling, window=window, softcap=kwargs.get("softcap"), sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def _sdpa_mask() -> Callable[..., Any] | None:
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # transformers < 4.53 builds masks per model (custom names get 4-D masks)
        return None
    try:
        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    except KeyError:
        return None


_ATTENTION_MODULE = re.compile(r"^class \w*Attention\w*\((?:torch\.)?nn\.Module\):", re.MULTILINE)
_ATTENTION_CLASS_TABLE = re.compile(r"^[A-Za-z_0-9]*ATTENTION_CLASSES\s*=\s*\{", re.M)
# Models named in the error, when their class passes on the installed transformers (module, class).
_KNOWN_GOOD = (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
               ("gemma", "GemmaForCausalLM"), ("gpt2", "GPT2LMHeadModel"), ("bert", "BertModel"),
               ("roberta", "RobertaModel"), ("t5", "T5ForConditionalGeneration"), ("falcon", "FalconForCausalLM"))


@functools.cache
def uses_attention_interface(cls: type) -> bool:
    """Whether ``cls``'s attention modules look their function up in ``ALL_ATTENTION_FUNCTIONS``.

    transformers' own heuristic (``PreTrainedModel._can_set_attn_implementation``): when the class's module
    defines an ``*Attention*(nn.Module)``, it must use ``ALL_ATTENTION_FUNCTIONS``; a module without one
    (a composite model, a subclass in user code) and a module without readable source count as yes.
    """
    module = sys.modules.get(cls.__module__)
    try:
        code = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return True
    if _ATTENTION_CLASS_TABLE.search(code):  # attention classes picked by name from a table of the module's own
        return False  # (transformers 4.x's AltCLIP, GIT, SAM): "layerzero" is no key of it (a bare KeyError)
    return _ATTENTION_MODULE.search(code) is None or "ALL_ATTENTION_FUNCTIONS" in code


def _supported_examples() -> list[str]:
    found = []
    for module_name, class_name in _KNOWN_GOOD:
        try:
            module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        except Exception:  # an older transformers without this model, or one that fails to import
            continue
        cls = getattr(module, class_name, None)
        if cls is not None and uses_attention_interface(cls):
            found.append(class_name)
    return found


def check_model_class(cls: type) -> None:
    """Raise :class:`UnsupportedModelError` when ``attn_implementation="layerzero"`` cannot reach ``cls``'s attention.

    Called for every model built with ``"layerzero"`` (see :func:`register`); callable directly too.
    """
    if uses_attention_interface(cls):
        return
    import transformers

    instead = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    examples = ", ".join(_supported_examples()) or "none of the usual ones"
    raise UnsupportedModelError(
        f"attn_implementation={ATTN_NAME!r}: {cls.__name__} ({cls.__module__}) chooses its attention itself instead "
        f"of through transformers' AttentionInterface, so layerzero would never run its attention. Use "
        f"attn_implementation={instead!r} for {cls.__name__} (layerzero.integrations.transformers.patch(model) "
        f"works without it). layerzero supports models whose attention goes through "
        f"AttentionInterface; on transformers {transformers.__version__} that includes {examples}.",
        model_class=cls.__name__)


_CHECKED = "_layerzero_checks_models"


def _install_model_check() -> None:
    """Wrap transformers' per-model attention check so an unsupported class fails at construction (idempotent)."""
    from transformers.modeling_utils import PreTrainedModel

    for method in ("_check_and_adjust_attn_implementation", "get_correct_attn_implementation"):
        original = PreTrainedModel.__dict__.get(method)
        if original is not None:
            break
    else:  # an older transformers: nothing to hook; the model's own code decides
        return
    if getattr(original, _CHECKED, False):
        return

    @functools.wraps(original)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        chosen = original(self, *args, **kwargs)
        if chosen == ATTN_NAME:
            check_model_class(type(self))
        return chosen

    setattr(checked, _CHECKED, True)
    setattr(PreTrainedModel, method, checked)
    setter = PreTrainedModel.__dict__.get("set_attn_implementation")
    if setter is not None and not getattr(setter, _CHECKED, False):
        # On a built model of a class that chooses its attention itself, transformers only logs that it cannot
        # switch (the check above never runs) and the model stays as it was: refuse "layerzero" out loud there.
        @functools.wraps(setter)
        def set_checked(self: Any, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
            if attn_implementation == ATTN_NAME:
                check_model_class(type(self))
            return setter(self, attn_implementation, *args, **kwargs)

        setattr(set_checked, _CHECKED, True)
        setattr(PreTrainedModel, "set_attn_implementation", set_checked)


def register(name: str = ATTN_NAME) -> None:
    """Register ``name`` as a transformers attention implementation (idempotent).

    Also makes models whose attention cannot reach layerzero fail at construction with
    :class:`~layerzero.errors.UnsupportedModelError` (see :func:`check_model_class`).
    """
    from transformers import modeling_utils

    interface = getattr(modeling_utils, "AttentionInterface", None)
    if interface is not None:
        interface.register(name, attention_forward)
    elif isinstance(getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None), dict):  # 4.48-4.51: a plain dict
        modeling_utils.ALL_ATTENTION_FUNCTIONS[name] = attention_forward
    else:
        import transformers

        raise LayerZeroError(f"attn_implementation={name!r} needs transformers >= 4.48 (attention functions "
                             f"registered by name); this is transformers {transformers.__version__}. "
                             "layerzero.integrations.transformers.patch() works on it.")
    mask_fn = _sdpa_mask()
    if mask_fn is not None:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(name, mask_fn)
    _install_model_check()
    transformers_batching.install(name)


def is_registered(name: str = ATTN_NAME) -> bool:
    """True when transformers knows the ``name`` attention implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return name in ALL_ATTENTION_FUNCTIONS


# ---------------------------------------------------------------------------------------------------
# module patching
# ---------------------------------------------------------------------------------------------------

def _rms_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w.dtype != hidden_states.dtype:  # transformers' own arithmetic decides the mixed-dtype result
        return type(self).forward(self, hidden_states)
    return lz_ops.rms_norm(hidden_states, w, self._layerzero_eps)


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w is not None and w.dtype != x.dtype:
        return type(self).forward(self, x)
    return lz_ops.layer_norm(x, w, self.bias, self.eps)


def _silu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return lz_ops.silu(x)


def _gelu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return lz_ops.gelu(x, self._layerzero_approximate)


def _swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if lean_applies(self, x):  # training: keep gate and up, recompute their product in the backward
        return LeanSwiGLUMLP.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
    return self.down_proj(lz_ops.swiglu(self.gate_proj(x), self.up_proj(x)))


_GELU_EXACT = {"GELUActivation", "GELU"}
_GELU_TANH = {"GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation", "GELUPytorchTanh",
              "GELUTanhActivation"}
_SILU = {"SiLU", "SiLUActivation", "SwishActivation"}


def _eps_of(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _match(module: nn.Module) -> tuple[str, Callable[..., torch.Tensor], dict[str, Any]] | None:
    """(kind, forward, extra attributes) when layerzero has an op for this module."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) == 1:
            return "layer_norm", _layer_norm_forward, {}
        return None
    if name.lower().endswith("rmsnorm"):
        w = getattr(module, "weight", None)
        eps = _eps_of(module)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and eps is not None:
            return "rms_norm", _rms_forward, {"_layerzero_eps": eps}
        return None
    if name in _SILU:
        return "silu", _silu_forward, {}
    if name in _GELU_EXACT or name in _GELU_TANH:
        approximate = getattr(module, "approximate", "none" if name in _GELU_EXACT else "tanh")
        if approximate not in ("none", "tanh"):
            return None
        return "gelu", _gelu_forward, {"_layerzero_approximate": approximate}
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(module, "act_fn", None)
        if act is not None and type(act).__name__ in _SILU:
            return "swiglu_mlp", _swiglu_mlp_forward, {}
    return None


def _probe_input(module: nn.Module, kind: str) -> torch.Tensor | None:
    param = next(module.parameters(), None)
    if param is not None and param.device.type == "meta":
        return None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if kind in ("rms_norm", "layer_norm"):
        hidden = module.weight.shape[0] if getattr(module, "weight", None) is not None else module.normalized_shape[0]
    elif kind == "swiglu_mlp":
        hidden = module.gate_proj.in_features
    else:
        hidden = 64
    gen = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(3, hidden, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _verify(module: nn.Module, kind: str, forward: Callable[..., torch.Tensor]) -> str | None:
    """None when the layerzero forward matches the module's own forward on a random input, else why not."""
    x = _probe_input(module, kind)
    if x is None:
        return "parameters are on the meta device (load the weights first)"
    with torch.no_grad():
        try:
            want = type(module).forward(module, x)
            got = forward(module, x)
        except Exception as exc:  # a module we cannot probe is a module we do not patch
            return f"could not compare outputs: {type(exc).__name__}: {exc}"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "its forward returns something else than a tensor of the input's shape"
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(x.dtype, 3e-2)
    err = (want.double() - got.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    if not math.isfinite(err) or err > tol * scale:
        return f"its forward computes something else (max difference {err:.3g} on a random input)"
    return None


@dataclass
class PatchReport:
    """What :func:`patch` did: module names patched per kind, and modules skipped with the reason."""

    patched: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.patched.values())

    def __str__(self) -> str:
        lines = [f"layerzero.patch: {self.count} modules and functions now run layerzero ops"]
        for kind, names in sorted(self.patched.items()):
            lines.append(f"  {kind}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        for name, reason in sorted(self.skipped.items()):
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


def _patch_causal_lms(model: nn.Module, report: PatchReport, loss: bool, rope: bool, verify: bool) -> None:
    """The loss and rope parts of :func:`patch` (:mod:`layerzero.integrations.hf_causal_lm`), per causal LM."""
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("ForCausalLM"):
            continue
        label = name or type(module).__name__
        if loss and LOSS_ATTR not in module.__dict__:
            problem = patch_loss(module, verify)
            if problem is None:
                report.patched.setdefault("causal_lm_loss", []).append(label)
            else:
                report.skipped[f"{label} (loss)"] = f"{type(module).__name__}: {problem}"
        if rope and ROPE_ATTR not in module.__dict__:
            where, problem = patch_rope(module, verify)
            if where is not None:
                report.patched.setdefault("rope", []).append(f"{where}.apply_rotary_pos_emb")
            else:
                report.skipped[f"{label} (rope)"] = f"{type(module).__name__}: {problem}"


def patch(model: nn.Module, *, norms: bool = True, activations: bool = True, mlp: bool = True,
          loss: bool = True, rope: bool = True, verify: bool = True) -> PatchReport:
    """Make ``model``'s norm, activation and SwiGLU-MLP modules, its loss and its RoPE run layerzero ops.

    Args:
        model: any ``nn.Module`` (a transformers model or a part of one).
        norms: RMSNorm-like modules and ``nn.LayerNorm`` -> ``lz.rms_norm`` / ``lz.layer_norm``.
        activations: SiLU / GELU modules -> ``lz.silu`` / ``lz.gelu``.
        mlp: ``gate_proj``/``up_proj``/``down_proj`` MLPs with a SiLU ``act_fn`` -> ``lz.swiglu``; when training,
            one node that keeps ``gate`` and ``up`` and recomputes their product for ``down_proj``'s gradient
            (:mod:`layerzero.integrations.lean_mlp`: a third less MLP activation memory).
        loss: a ``*ForCausalLM``'s loss -> ``lz.linear_cross_entropy`` from the hidden states (no logits
            when training with labels; see :mod:`layerzero.integrations.hf_causal_lm`).
        rope: its modeling module's ``apply_rotary_pos_emb`` -> ``lz.rope`` (process-wide for that module
            while a patched model lives).
        verify: compare each module class's output with its own forward once before patching it.

    Returns:
        A :class:`PatchReport`; :func:`unpatch` undoes it.

    Example:
        >>> report = patch(model); print(report)
    """
    wanted = {"rms_norm": norms, "layer_norm": norms, "silu": activations, "gelu": activations,
              "swiglu_mlp": mlp}
    report = PatchReport()
    _patch_causal_lms(model, report, loss, rope, verify)
    verdicts: dict[tuple[type, str, Any], str | None] = {}
    for name, module in model.named_modules():
        if getattr(module, _PATCH_ATTR, None) is not None:
            continue
        found = _match(module)
        if found is None or not wanted[found[0]]:
            continue
        kind, forward, extra = found
        label = name or type(module).__name__
        for attr, value in extra.items():
            object.__setattr__(module, attr, value)
        if verify:
            vkey = (type(module), kind, tuple(sorted(extra.items())))
            if vkey not in verdicts:
                verdicts[vkey] = _verify(module, kind, forward)
            problem = verdicts[vkey]
            if problem is not None:
                for attr in extra:
                    object.__delattr__(module, attr)
                report.skipped[label] = f"{type(module).__name__}: {problem}"
                continue
        install_forward(module, forward)
        object.__setattr__(module, _PATCH_ATTR, kind)
        report.patched.setdefault(kind, []).append(label)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every module :func:`patch` changed (and the loss and rope); returns how many were restored."""
    restored = 0
    for module in model.modules():
        restored += unpatch_causal_lm(module)
        if getattr(module, _PATCH_ATTR, None) is None:
            continue
        for attr in ("forward", _PATCH_ATTR, "_layerzero_eps", "_layerzero_approximate"):
            if attr in module.__dict__:
                object.__delattr__(module, attr)
        restored += 1
    return restored


register()
