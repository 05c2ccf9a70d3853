"""What this torch build supports, probed once at import: version, GQA, the GPU range, the cuDNN op, rms_norm.

The attention specs (:mod:`.attention_specs`) and adapters (:mod:`.attention`)
read these; nothing here imports another layerzero module.
"""

from __future__ import annotations

import torch

__all__ = ["TORCH_VERSION", "GQA_NATIVE", "MAX_SM", "CUDNN_OP", "HAS_RMS_NORM", "HALF", "FLOATS"]

HALF = frozenset({torch.float16, torch.bfloat16})
FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # an odd local build string: assume a recent torch
        return (99, 0)


TORCH_VERSION: tuple[int, int] = _version(torch.__version__)

# torch 2.5 added ``enable_gqa`` to SDPA and grouped-query support to the flash kernels
# (``check_batch_size_and_num_heads_dense<supports_gqa>``); 2.4's kernels index K/V with the
# query's head count, so GQA must not reach them there.
GQA_NATIVE = TORCH_VERSION >= (2, 5)
# ``check_flash_attention_hardware_support`` / ``check_cudnn_hardware_support`` accept
# [sm80, sm90] up to torch 2.6 and [sm80, sm121] once Blackwell builds shipped (2.7);
# ``check_mem_efficient_hardware_support`` likewise [sm50, sm90] -> [sm50, sm121].
MAX_SM: tuple[int, int] = (12, 1) if TORCH_VERSION >= (2, 7) else (9, 0)
# torch < 2.4 has no fused rms_norm: the composed kernel serves alone there.
HAS_RMS_NORM = hasattr(torch, "rms_norm")


def _cudnn_signature_ok() -> bool:
    """True when the aten cuDNN op takes ``attn_bias, compute_log_sumexp`` (torch >= 2.5).

    torch 2.4's op had another signature and no backward, so the adapter does not apply there.
    """
    try:
        schema = torch.ops.aten._scaled_dot_product_cudnn_attention.default._schema
    except (AttributeError, RuntimeError):
        return False
    return [a.name for a in schema.arguments][3:5] == ["attn_bias", "compute_log_sumexp"]


CUDNN_OP = _cudnn_signature_ok()
