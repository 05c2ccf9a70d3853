"""``lz.doctor()`` and ``lz.readiness_check()``: what this machine has and what layerzero can use.

The report lists devices (CPU model and cores, GPUs with compute capability),
backends with versions or why they are missing (with the pip command), every
kernel and whether it can run here, and the policy in force, plus the config,
performance-database and runtime sections. Modules, each imported only by the
ones after it: ``hardware`` (the machine), ``kernels`` (which kernels can run
here), ``sections`` (config, perf DB, runtime state and problems), ``report``
(:class:`DoctorReport` and :func:`doctor`), ``readiness`` (each operation run
once and checked).
"""

from __future__ import annotations

from layerzero.doctor.hardware import cpu_model, hardware_info
from layerzero.doctor.kernels import kernel_rows
from layerzero.doctor.readiness import readiness_check
from layerzero.doctor.report import DoctorReport, doctor

__all__ = ["DoctorReport", "doctor", "readiness_check", "hardware_info", "cpu_model", "kernel_rows"]
