"""The doctor's report: what ``lz.doctor()`` collects, and how ``layerzero doctor`` prints it.

:func:`doctor` gathers the devices (:mod:`.hardware`), the backends with
versions or why they are missing (with the pip command), every kernel and
whether it can run here (:mod:`.kernels`) and the policy in force, then adds
the extra sections of :mod:`.sections` (config, performance database, runtime
state) to :attr:`DoctorReport.extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero.doctor.hardware import hardware_info
from layerzero.doctor.kernels import kernel_rows
from layerzero.doctor.sections import SECTIONS
from layerzero.runtime import get_runtime

__all__ = ["DoctorReport", "doctor"]


@dataclass
class DoctorReport:
    info: dict[str, Any]
    backends: list[dict[str, Any]]
    kernels: list[dict[str, Any]]
    policy: list[str]
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.info, "backends": self.backends, "kernels": self.kernels, "policy": self.policy,
                "warnings": self.warnings, **self.extra}

    def __str__(self) -> str:
        hw, sw = self.info["hardware"], self.info["software"]
        lines = ["layerzero doctor", "", "devices:",
                 f"  cpu: {hw['cpu']} ({hw['cpu_cores']} cores, {hw['ram']} RAM)"]
        for g in hw["gpus"]:
            lines.append(f"  cuda:{g['index']}: {g['name']} (sm {g['compute_capability']}, {g['memory_gb']} GB)")
        if not hw["gpus"]:
            lines.append("  gpu: none (CUDA kernels are rejected with reasons)")
        lines.append(f"software: python {sw['python']}, torch {sw['pytorch']}, cuda {sw['cuda']}, {sw['os']}")
        lines += ["", "backends:"]
        for b in self.backends:
            if b["available"]:
                lines.append(f"  {b['name']:<12} {b['version'] or '?':<14} available")
            else:
                hint = f" -> {b['pip']}" if b.get("pip") else ""
                lines.append(f"  {b['name']:<12} {'-':<14} missing: {b['reason']}{hint}")
        lines += ["", "kernels:"]
        for k in self.kernels:
            status = "usable here" if k["usable"] else "not usable: " + "; ".join(k["reasons"])
            lines.append(f"  {k['kernel_id']:<28} {k['operation']:<20} {k['backend']:<10} p={k['priority']:<4} {status}")
        lines += ["", "policy in force:"]
        lines.extend(f"  {r}" for r in self.policy) if self.policy else lines.append("  (none)")
        for key, value in self.extra.items():
            lines += ["", f"{key}:" if isinstance(value, (dict, list)) else f"{key}: {value}"]
            lines.extend(_nested(value, "  "))
        if self.warnings:
            lines += ["", "warnings:"] + [f"  {w}" for w in self.warnings]
        return "\n".join(lines)


def _nested(value: Any, indent: str) -> list[str]:
    """Readable lines for a dict / list section of ``DoctorReport.extra``."""
    if isinstance(value, dict):
        if not value:
            return [f"{indent}(none)"]
        out = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{indent}{k}:")
                out.extend(_nested(v, indent + "  "))
            else:
                out.append(f"{indent}{k}: {v if v not in ({}, []) else '(none)'}")
        return out
    if isinstance(value, list):
        return [f"{indent}{v}" for v in value] or [f"{indent}(none)"]
    return []


def doctor() -> DoctorReport:
    """Inspect this machine and every registered backend and kernel."""
    rt = get_runtime()
    info = hardware_info()
    backends = [b.to_dict() for b in rt.backends.all()]
    kernels = kernel_rows("*")
    warnings = []
    missing = [b["name"] for b in backends if not b["available"]]
    if missing:
        warnings.append(f"backends not installed: {', '.join(missing)} (their kernels are skipped)")
    if not torch.cuda.is_available():
        warnings.append("no CUDA device: only CPU kernels can run")
    report = DoctorReport(info, backends, kernels, rt.policy.policy.to_list(), warnings)
    for hook in SECTIONS:
        try:
            hook(report)
        except Exception as exc:  # doctor never fails because one section cannot be read
            report.warnings.append(f"{getattr(hook, '__name__', 'section')}: {type(exc).__name__}: {exc}")
    return report
