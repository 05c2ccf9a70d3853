"""What this machine is: CPU model and cores, RAM, GPUs with compute capability, software versions.

Read by ``lz.doctor()`` and by ``layerzero bench`` (the seed's benchmark format lists the same fields).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["hardware_info", "cpu_model"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvlink(gpus: int) -> bool | None:
    """Whether GPU 0 has an active NVLink (NVML through ``pynvml``, when installed); False without a GPU, None
    when it cannot be told."""
    if gpus == 0:
        return False
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            links = []
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    links.append(pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED)
                except pynvml.NVMLError:
                    break
            return any(links)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, no NVML, or a driver without NVLink queries
        return None


def hardware_info() -> dict[str, Any]:
    """CPU, RAM, GPUs and software versions, as the seed's benchmark format lists them."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                         "memory_gb": round(p.total_memory / 2**30, 1)})
    ram = _ram_bytes()
    return {
        "hardware": {
            "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "ram": f"{ram / 2**30:.0f}GB" if ram else "unknown",
            "gpu": gpus[0]["name"] if gpus else None,
            "gpu_count": len(gpus),
            "nvlink": _nvlink(len(gpus)),
            "gpus": gpus,
        },
        "software": {
            "os": platform.platform(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "pytorch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
    }
