"""``lz.doctor()`` and ``lz.readiness_check()``: what this machine has and what layerzero can use.

The report lists devices (CPU model and cores, GPUs with compute capability),
backends with versions or why they are missing (with the pip command), every
kernel and whether it can run here, and the policy in force.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.runtime import get_runtime

__all__ = ["DoctorReport", "doctor", "readiness_check", "hardware_info", "cpu_model", "kernel_rows"]


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
    import layerzero.telemetry.doctor_sections  # noqa: F401  (registers the config / perf-DB / runtime sections)

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
    for hook in _doctor_hooks:
        try:
            hook(report)
        except Exception as exc:  # doctor never fails because one section cannot be read
            report.warnings.append(f"{getattr(hook, '__name__', 'section')}: {type(exc).__name__}: {exc}")
    return report


_doctor_hooks: list[Any] = []


def readiness_check(operations: tuple[str, ...] = ("attention.causal", "rms_norm"), device: str | None = None
                    ) -> dict[str, Any]:
    """Run each operation once on small random inputs through layerzero and check it against the reference.

    Returns ``{"ready": bool, "operations": {op: {"kernel": id, "ok": bool, "error": str|None}}}``.
    """
    from layerzero.ops import op_for

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rt = get_runtime()
    results: dict[str, Any] = {}
    for operation in operations:
        op = op_for(operation)
        ctx = op.sample_contexts(operation, dev)[0]
        try:
            args = op.make_inputs(operation, ctx)
            plan = rt.plan_for(op, operation, op.context(operation, args))
            rt.telemetry.record_miss()  # a call that needed selection
            out = rt.run_plan(plan, args, 0, check_output=True)
            ref = op.reference(operation, args)
            ok = True
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                atol, rtol = plan.selected.tolerance_for(out.dtype)
                ok = bool(torch.allclose(out.double(), ref, atol=atol * 4, rtol=rtol * 4))
            results[operation] = {"kernel": plan.kernel_id, "ok": ok, "error": None}
        except Exception as exc:
            results[operation] = {"kernel": None, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ready": all(r["ok"] for r in results.values()), "device": dev, "python": sys.version.split()[0],
            "operations": results}
