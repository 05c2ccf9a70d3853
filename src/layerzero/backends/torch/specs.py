"""The torch backend's specs and ``register()``: PyTorch's own kernels, registered whenever torch imports.

The kernels live by kind (:mod:`.attention`, :mod:`.norms`, :mod:`.elementwise`,
:mod:`.losses`, :mod:`.sampling`), their hot-path specializations in
:mod:`.fast`, the attention constraints in :mod:`.attention_specs`; this module
declares the rest and registers them all, in a fixed order.
"""

from __future__ import annotations

import dataclasses

from layerzero.backends.torch.attention_specs import attention_specs
from layerzero.backends.torch.capabilities import FLOATS, HAS_RMS_NORM
from layerzero.backends.torch.elementwise import (
    torch_geglu,
    torch_gelu,
    torch_rope,
    torch_rope_interleaved,
    torch_silu,
    torch_swiglu,
)
from layerzero.backends.torch.fast import layer_norm_specialize, rms_norm_specialize
from layerzero.backends.torch.linear_losses import (
    naive_logits_limit,
    torch_linear_cross_entropy_chunked,
    torch_linear_cross_entropy_naive,
)
from layerzero.backends.torch.losses import torch_cross_entropy
from layerzero.backends.torch.norms import (
    torch_layer_norm,
    torch_layer_norm_composed,
    torch_rms_norm,
    torch_rms_norm_composed,
)
from layerzero.backends.torch.sampling import torch_sample, torch_sample_greedy, torch_sample_gumbel
from layerzero.backends.torch.varlen import varlen_specs
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

__all__ = ["register", "TORCH_KERNEL_IDS", "KERNEL_IDS", "BACKENDS"]


def _specs() -> list[KernelSpec]:
    tol16 = {"float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2), "float32": (2e-5, 2e-5), "float64": (1e-9, 1e-9)}
    # On CUDA, float32 SDPA kernels may use TF32-free paths but different summation orders.
    tol_attn = {"float16": (4e-3, 4e-3), "bfloat16": (2.5e-2, 2.5e-2), "float32": (1e-4, 1e-4),
                "float64": (1e-9, 1e-9)}
    # The loss sums H-long products in the input dtype (bf16 logits round at 2**-8) and V-long softmaxes.
    tol_lce = {"float16": (5e-3, 5e-3), "bfloat16": (3e-2, 3e-2), "float32": (1e-5, 1e-5), "float64": (1e-9, 1e-9)}
    specs = attention_specs(tol_attn)
    specs += [
        KernelSpec("torch_rms_norm", "rms_norm", "torch", torch_rms_norm, priority=60, dtypes=FLOATS,
                   tolerance=tol16, specialize=rms_norm_specialize, shape_free=True,
                   description="torch.rms_norm (fused on CPU and CUDA)"),
        KernelSpec("torch_rms_norm_composed", "rms_norm", "torch", torch_rms_norm_composed, priority=20,
                   dtypes=FLOATS, tolerance=tol16,
                   description="x * rsqrt(mean(x^2) + eps) * weight in float32 (HF LlamaRMSNorm arithmetic)"),
        KernelSpec("torch_layer_norm", "layer_norm", "torch", torch_layer_norm, priority=60, dtypes=FLOATS,
                   tolerance=tol16, specialize=layer_norm_specialize, shape_free=True,
                   description="torch.layer_norm"),
        KernelSpec("torch_layer_norm_composed", "layer_norm", "torch", torch_layer_norm_composed, priority=20,
                   dtypes=FLOATS, tolerance=tol16,
                   description="layer norm composed in float32 (float64 for float64 inputs)"),
        KernelSpec("torch_rope", "rope", "torch", torch_rope, priority=50, dtypes=FLOATS,
                   supports_interleaved=False, tolerance=tol16, description="rotate-half RoPE (GPT-NeoX / Llama)"),
        KernelSpec("torch_rope_interleaved", "rope", "torch", torch_rope_interleaved, priority=50, dtypes=FLOATS,
                   supports_interleaved=True, tolerance=tol16, description="interleaved-pair RoPE (GPT-J)"),
        KernelSpec("torch_swiglu", "swiglu", "torch", torch_swiglu, priority=50, dtypes=FLOATS, tolerance=tol16,
                   description="F.silu(gate) * up"),
        KernelSpec("torch_cross_entropy", "cross_entropy", "torch", torch_cross_entropy, priority=50,
                   dtypes=FLOATS, tolerance=tol16,
                   description="F.cross_entropy (in half precision a large sum overflows as it does in PyTorch: "
                               "upcast the logits)"),
        KernelSpec("torch_linear_cross_entropy_chunked", "linear_cross_entropy", "torch",
                   torch_linear_cross_entropy_chunked, priority=50, dtypes=FLOATS, tolerance=tol_lce,
                   description="token chunks of logits in float32, gradients folded in chunk by chunk (the logits "
                               "never exist whole)"),
        KernelSpec("torch_linear_cross_entropy_naive", "linear_cross_entropy", "torch",
                   torch_linear_cross_entropy_naive, priority=60, dtypes=FLOATS, tolerance=tol_lce,
                   extra_check=naive_logits_limit,
                   description="F.cross_entropy(F.linear(hidden, weight, bias).float()): the full logits, for small "
                               "ones only (there one matmul beats chunks of them)"),
        KernelSpec("torch_geglu", "geglu", "torch", torch_geglu, priority=50, dtypes=FLOATS,
                   approximations={"none", "tanh"}, tolerance=tol16, description="F.gelu(gate) * up"),
        KernelSpec("torch_gelu", "gelu", "torch", torch_gelu, priority=50, dtypes=FLOATS,
                   approximations={"none", "tanh"}, tolerance=tol16, shape_free=True, description="F.gelu"),
        KernelSpec("torch_silu", "silu", "torch", torch_silu, priority=50, dtypes=FLOATS, tolerance=tol16,
                   shape_free=True, description="F.silu"),
        KernelSpec("torch_sample_greedy", "sample.greedy", "torch", torch_sample_greedy, priority=60,
                   dtypes=FLOATS, supports_autograd=False, description="argmax over the vocabulary"),
        KernelSpec("torch_sample", "sample", "torch", torch_sample, priority=50, dtypes=FLOATS,
                   supports_autograd=False,
                   description="temperature, top-k and top-p filtering, then torch.multinomial"),
        KernelSpec("torch_sample_gumbel", "sample.temperature", "torch", torch_sample_gumbel, priority=40,
                   dtypes=FLOATS, supports_autograd=False,
                   description="Gumbel-max sampling (temperature only): one pass, no sort"),
    ]
    # PyTorch's own code: under torch.compile Dynamo traces it, so Inductor fuses it with its neighbours. The
    # packed and paged kernels read their lengths on the host (a loop per sequence): they stay opaque.
    return [s if s.compile_native else dataclasses.replace(s, compile_native=True) for s in specs] + \
        varlen_specs(tol_attn)


TORCH_KERNEL_IDS: tuple[str, ...] = tuple(s.kernel_id for s in _specs())


def register(kernels: KernelRegistry, backends: BackendRegistry) -> list[KernelSpec]:
    """Register the torch backend and its kernels (idempotent)."""
    backends.register("torch", module="torch", pip="pip install torch")
    out = []
    for spec in _specs():
        if spec.kernel_id not in kernels:
            out.append(kernels.register(spec))
    if not HAS_RMS_NORM and "torch_rms_norm" in kernels:  # torch < 2.4 has no fused rms_norm: keep the composed one
        kernels.unregister("torch_rms_norm")
    return out


# The layerzero.backends.base.Backend contract: the backend names register() declares, and its kernels.
BACKENDS: tuple[str, ...] = ("torch",)
KERNEL_IDS: tuple[str, ...] = TORCH_KERNEL_IDS
