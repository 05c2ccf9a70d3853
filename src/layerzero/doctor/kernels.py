"""Every registered kernel and whether it can run on this machine, or why not (``layerzero list``, the doctor)."""

from __future__ import annotations

from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.runtime import get_runtime

__all__ = ["kernel_rows"]


def _device_contexts() -> list[SelectionContext]:
    ctxs = [SelectionContext(device="cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            ctxs.append(SelectionContext(device=f"cuda:{i}"))
    return ctxs


def kernel_rows(pattern: str = "*") -> list[dict[str, Any]]:
    """One row per kernel matching ``pattern``: operation, backend, priority, usable on this machine or why not.

    "Usable" means the backend is available and the kernel runs on at least one device here.
    """
    rt = get_runtime()
    contexts = _device_contexts()
    kernels: list[dict[str, Any]] = []
    for spec in rt.kernels.match(pattern):
        reasons: list[str] = []
        usable = False
        for ctx in contexts:
            why = []
            unavailable = rt.backends.unavailable_reason(spec.backend)
            if unavailable is not None:
                why.append(str(unavailable))
            if spec.platforms is not None and ctx.platform not in spec.platforms:
                why.append(f"device is {ctx.platform}, kernel runs on {', '.join(sorted(spec.platforms))}")
            elif spec.min_compute_capability and ctx.platform == "cuda":
                cc = ctx.compute_capability
                if cc is None or cc < spec.min_compute_capability:
                    why.append(f"needs compute capability >= {spec.min_compute_capability[0]}."
                               f"{spec.min_compute_capability[1]}, {ctx.device} has {cc}")
            if not why:
                usable = True
                break
            reasons = why
        kernels.append({"kernel_id": spec.kernel_id, "operation": spec.operation, "backend": spec.backend,
                        "priority": spec.priority, "usable": usable, "reasons": [] if usable else reasons,
                        "description": spec.description})
    return kernels
