"""Hardware fingerprints and library versions: what a measurement is only valid for.

A kernel time measured on an H100 with driver 580 and torch 2.11 says nothing
about an A10 or about torch 2.12, so every row of the performance database is
keyed by

* the **hardware fingerprint** of the device the context runs on: device name,
  compute capability, NVIDIA driver version, CUDA version and CPU model
  (:func:`hardware_fingerprint`, stored as a short digest), and
* the **library versions** the kernel depends on: torch, plus the kernel's own
  backend library and Triton for Triton-based backends
  (:func:`library_versions`, e.g. ``"torch=2.11.0;liger=0.8.5;triton=3.6.0"``).

Both are computed once per device / backend and cached, so looking them up on
a plan-cache miss costs a dictionary read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

from layerzero import forksafe

__all__ = ["HardwareFingerprint", "hardware_fingerprint", "library_versions", "TRITON_BACKENDS"]

# Backends whose kernels are Triton programs: their speed also depends on Triton's version.
TRITON_BACKENDS: frozenset[str] = frozenset({"liger", "flex"})


@dataclass(frozen=True)
class HardwareFingerprint:
    """The hardware a measurement was taken on. ``digest`` is the key stored in the database."""

    platform: str
    device_name: str
    compute_capability: str | None
    driver_version: str | None
    cuda_version: str | None
    cpu_model: str

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["digest"] = self.digest
        return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:200]
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "unknown")[:200]


def _nvidia_driver() -> str | None:
    """The kernel-module driver version ("580.159.04"), or the CUDA driver API version when unreadable."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            head = f.readline()
        for token in head.split():
            parts = token.split(".")
            if len(parts) >= 2 and all(p.isdigit() for p in parts):
                return token
    except OSError:
        pass
    try:
        v = int(torch._C._cuda_getDriverVersion())  # e.g. 13000 for CUDA 13.0
        return f"cuda-driver-api-{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # no CUDA build, or no driver: the fingerprint says "unknown"
        return None


_hw_cache: dict[tuple[str, int | None], HardwareFingerprint] = {}
_hw_lock = forksafe.module_lock()


def hardware_fingerprint(device: str | torch.device | None = None) -> HardwareFingerprint:
    """The fingerprint of ``device`` (default: ``cuda`` when available, else ``cpu``); cached per device.

    Example:
        >>> hardware_fingerprint("cpu").digest
        '3f0c...'
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = device if isinstance(device, torch.device) else torch.device(device)
    key = (dev.type, dev.index)
    found = _hw_cache.get(key)
    if found is not None:
        return found
    with _hw_lock:
        found = _hw_cache.get(key)
        if found is None:
            found = _probe(dev)
            _hw_cache[key] = found
    return found


def _probe(dev: torch.device) -> HardwareFingerprint:
    cpu = _cpu_model()
    if dev.type == "cuda":
        try:
            if torch.cuda.is_available():
                index = dev.index if dev.index is not None else torch.cuda.current_device()
                props = torch.cuda.get_device_properties(index)
                return HardwareFingerprint("cuda", str(props.name)[:200], f"{props.major}.{props.minor}",
                                           _nvidia_driver(), torch.version.cuda, cpu)
        except Exception:  # a broken driver gives an "unknown" fingerprint, never an error
            pass
        return HardwareFingerprint("cuda", "unknown", None, None, torch.version.cuda, cpu)
    return HardwareFingerprint(dev.type, cpu, None, None, None, cpu)


_lib_cache: dict[tuple[str, str | None], str] = {}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    return _version("triton") or _version("pytorch-triton")


def library_versions(backend: str, backend_version: str | None = None) -> str:
    """The library versions a kernel of ``backend`` depends on, as one canonical string.

    Args:
        backend: the kernel's backend name (``"torch"``, ``"liger"``, ...).
        backend_version: that backend's version as the backend registry reports it.

    Example:
        >>> library_versions("liger", "0.8.5")
        'torch=2.11.0;liger=0.8.5;triton=3.6.0'
    """
    key = (backend, backend_version)
    found = _lib_cache.get(key)
    if found is not None:
        return found
    parts = [f"torch={torch.__version__}"]
    if backend != "torch":
        parts.append(f"{backend}={backend_version or '?'}")
    if backend in TRITON_BACKENDS:
        parts.append(f"triton={_triton_version() or '?'}")
    found = ";".join(parts)
    _lib_cache[key] = found
    return found
