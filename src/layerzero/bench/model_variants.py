"""The models and variants of ``layerzero bench --model``: a transformers config with random weights, and the
attention implementations / patches compared on it.

Every variant is a deep copy of one base model (``attn_implementation="sdpa"``; ``"eager"`` for Gemma 2, which
transformers refuses to run through SDPA), so all rows share the same weights: that reference, ``layerzero`` (``attn_implementation="layerzero"``), ``layerzero+patch``
(:func:`layerzero.integrations.transformers.patch` on top), and where liger-kernel is installed and the device
is CUDA, ``liger`` (Liger's ``apply_liger_kernel_to_<model>(rope, rms_norm, swiglu,
fused_linear_cross_entropy, model=...)``) and ``liger+layerzero`` (the same patch on a ``layerzero``-attention
copy). Liger's rope patch replaces a module-level function of transformers' modeling module, which would reach
every model of that architecture; the bench restores it right after patching and re-installs it only around
the Liger variants' own calls (:meth:`Variant.active`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerzero.errors import UnsupportedModelError

__all__ = ["MODELS", "VARIANTS", "reference_name", "variant_names", "LIGER_VARIANTS", "WORKLOADS", "MODES", "Variant", "model_config", "build_base", "build_variants",
           "liger_unavailable_reason", "check_layerzero_attention"]

MODELS = ("llama", "qwen2", "gemma2")
VARIANTS = ("sdpa", "layerzero", "layerzero+patch")  # the first is the reference: reference_name(model) names it
LIGER_VARIANTS = ("liger", "liger+layerzero")
WORKLOADS = ("prefill", "train", "decode_b1", "decode_b8")  # the order warm-ups (compilations) run in
MODES = ("eager", "compiled")

_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}


@dataclass
class Variant:
    """One row family: a model copy, how it is called per mode, and the module globals it needs in place."""

    name: str
    model: nn.Module
    calls: dict[str, nn.Module] = field(default_factory=dict)  # mode -> the model, torch.compile(model) or a twin
    globals_patch: dict[str, Any] = field(default_factory=dict)
    module: Any = None  # the transformers modeling module globals_patch applies to
    note: str = ""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Install this variant's module-level replacements (Liger's rope) for the duration of one call."""
        if not self.globals_patch:
            yield
            return
        saved = {k: getattr(self.module, k, None) for k in self.globals_patch}
        for k, v in self.globals_patch.items():
            setattr(self.module, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self.module, k, v)


def reference_name(model: str) -> str:
    """The reference variant (and its ``attn_implementation``): ``sdpa``, or ``eager`` for Gemma 2."""
    return "eager" if model == "gemma2" else "sdpa"


def variant_names(model: str, liger: bool) -> tuple[str, ...]:
    """The variants of ``model`` in row order, the reference first."""
    return (reference_name(model),) + VARIANTS[1:] + (LIGER_VARIANTS if liger else ())


def _size(model: str, device: str, quick: bool, layers: int | None) -> dict[str, Any]:
    if device.startswith("cuda"):
        size = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=32000, max_position_embeddings=4096)
        if quick:
            size["num_hidden_layers"] = 4
    elif quick:
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=256, max_position_embeddings=256)
    else:
        size = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=512, vocab_size=1024, max_position_embeddings=512)
    if layers:
        size["num_hidden_layers"] = layers
    if model == "gemma2":
        size["head_dim"] = size["hidden_size"] // size["num_attention_heads"]
    return size


def model_config(model: str, device: str, quick: bool, layers: int | None = None) -> dict[str, Any]:
    """The config fields of ``model`` for this device (``quick``: the tiny CPU config, or 4 layers on CUDA)."""
    if model not in MODELS:
        raise UnsupportedModelError(f"layerzero bench --model {model!r}: unknown model; choose one of "
                                    f"{', '.join(MODELS)}", model_class=model)
    return _size(model, device, quick, layers)


def _classes(model: str) -> tuple[type, type]:
    import transformers

    cfg_name, cls_name = _CLASSES[model]
    return getattr(transformers, cfg_name), getattr(transformers, cls_name)


def build_base(model: str, fields: dict[str, Any], device: str, dtype: torch.dtype, seed: int = 0,
               attn: str = "sdpa") -> nn.Module:
    """The ``attn`` model with random weights (seeded), in ``dtype`` on ``device``, in eval mode."""
    import layerzero.integrations.transformers  # noqa: F401  (registers attn_implementation="layerzero")

    cfg_cls, model_cls = _classes(model)
    config = cfg_cls(**fields, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        base = model_cls(config)
    return base.to(dtype).eval()


def check_layerzero_attention(model: str, dtype: torch.dtype = torch.float32) -> None:
    """Build the tiny config with ``attn_implementation="layerzero"`` and run one forward on the CPU.

    Raises :class:`~layerzero.errors.UnsupportedModelError` with transformers' or layerzero's reason when
    either refuses (Gemma 2's attention softcapping until layerzero supports it).
    """
    from layerzero.errors import LayerZeroError

    fields = _size(model, "cpu", True, None)
    try:
        probe = build_base(model, fields, "cpu", dtype, attn="layerzero")
        with torch.no_grad():
            probe(input_ids=torch.zeros(1, 4, dtype=torch.long))
    except (LayerZeroError, ValueError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"layerzero bench --model {model}: attn_implementation='layerzero' is refused "
                                    f"for {_CLASSES[model][1]}: {exc}", model_class=_CLASSES[model][1]) from exc


def liger_unavailable_reason(device: str) -> str | None:
    """Why the Liger rows cannot run here, or None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not device.startswith("cuda"):
        return "Liger's kernels are Triton kernels for CUDA; this run is on the CPU"
    return None


def apply_liger(model_name: str, model: nn.Module, **parts: bool) -> tuple[Any, dict[str, Any]]:
    """Liger's own patch on ``model`` (``parts`` switches rope, rms_norm, swiglu, fused_linear_cross_entropy off);
    returns the modeling module and the globals it replaced (restored here)."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{model_name}")
    module = sys.modules[type(model).__module__]  # transformers' modeling module, imported with the class
    before = dict(vars(module))
    cls_forward = type(model).forward
    options = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True, **parts}
    apply(cross_entropy=False, model=model, **options)
    after = dict(vars(module))
    changed = {k: v for k, v in after.items() if before.get(k) is not v}
    for k in changed:
        if k in before:
            setattr(module, k, before[k])
        else:
            delattr(module, k)
    if type(model).forward is not cls_forward:  # a class-level forward would reach every model: keep it per instance
        object.__setattr__(model, "forward", type(model).forward.__get__(model))
        type(model).forward = cls_forward
    return module, changed


def _variant(name: str, base: nn.Module, model_name: str) -> Variant:
    from layerzero.integrations.transformers import patch

    model = base if name == reference_name(model_name) else copy.deepcopy(base)
    if name in ("layerzero", "layerzero+patch", "liger+layerzero"):
        model.set_attn_implementation("layerzero")
    variant = Variant(name, model)
    if name == "layerzero+patch":
        report = patch(model)
        skipped = "; ".join(f"skipped {n}: {why}" for n, why in sorted(report.skipped.items()))
        variant.note = f"patch(): {report.count} modules" + (f"; {skipped}" if skipped else "")
    if name.startswith("liger"):
        variant.module, variant.globals_patch = apply_liger(model_name, model)
        variant.note = "Liger: rope, rms_norm, swiglu, fused_linear_cross_entropy"
    return variant


def _compiled(model: nn.Module, scope: str) -> nn.Module:
    """``torch.compile(model)``, or (``scope="layers"``) a copy whose decoder layers are each compiled: one graph
    serves every layer, so compiling takes a fraction of the whole model's time (no fusion across layers)."""
    if scope == "model":
        return torch.compile(model)
    twin = copy.deepcopy(model)
    layers = getattr(getattr(twin, getattr(twin, "base_model_prefix", "model"), twin), "layers", None)
    if layers is None:
        raise ValueError(f"compile scope 'layers': {type(model).__name__} has no decoder layers list")
    for layer in layers:
        layer.compile()
    return twin


def build_variants(model_name: str, base: nn.Module, names: tuple[str, ...], modes: tuple[str, ...],
                   compile_scope: str = "model") -> tuple[list[Variant], dict[str, str]]:
    """The variants in ``names`` (the reference first: ``base`` itself), each with a call per mode.

    Returns the variants and, per variant that could not be built, the reason (the bench reports it as
    skipped).
    """
    variants: list[Variant] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            variant = _variant(name, base, model_name)
        except Exception as exc:  # a third-party patch that fails is a skipped row with its reason, not a crash
            if name == reference_name(model_name):
                raise
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        for mode in modes:
            variant.calls[mode] = _compiled(variant.model, compile_scope) if mode == "compiled" else variant.model
        variants.append(variant)
    return variants, skipped
