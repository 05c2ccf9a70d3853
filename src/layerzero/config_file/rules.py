"""Policy-style rule entries (``{operation, kernel | backend, condition}``) into policy rules.

Policy documents (``locks``, ``allows``, ``denies``, ``boosts``) and the
dispatch config's ``kernel_locks`` / ``kernel_allows`` / ``kernel_denies``
share these builders, so one entry means the same in both files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layerzero.config_file.problems import Problems
from layerzero.config_file.validate import (
    check_backend,
    check_condition,
    check_kernel,
    check_keys,
    check_name,
    check_name_list,
    check_number,
    is_glob,
    show,
    type_name,
)
from layerzero.policy.model import Rule
from layerzero.registry import KernelRegistry

__all__ = ["lock_rule", "filter_rule", "boost_rule"]


def lock_rule(entry: Any, path: str, origin: str, problems: Problems, registry: KernelRegistry | None) -> Rule | None:
    """``{operation, kernel | backend, condition}`` -> a lock rule."""
    if not _is_entry(entry, path, problems):
        return None
    check_keys(entry, ("operation", "kernel", "backend", "condition", "description"), path, problems)
    if "operation" not in entry:
        problems.error(f"{path}.operation", "is required (the operation glob to lock)")
    op = check_name(entry.get("operation"), f"{path}.operation", problems, "operation") if "operation" in entry else None
    kernel, backend = entry.get("kernel"), entry.get("backend")
    if (kernel is None) == (backend is None):
        problems.error(path, "needs exactly one of kernel or backend")
        return None
    if kernel is not None:
        kernel = check_name(kernel, f"{path}.kernel", problems, "kernel id")
        if kernel is not None:
            if is_glob(kernel):
                problems.error(f"{path}.kernel", f"must be one kernel id, not a glob ({kernel!r})")
                return None
            check_kernel(kernel, f"{path}.kernel", problems, registry, op)
    else:
        backend = check_name(backend, f"{path}.backend", problems, "backend")
        if backend is not None:
            check_backend(backend, f"{path}.backend", problems, registry)
    cond = check_condition(entry.get("condition"), f"{path}.condition", problems, per_kernel=False)
    if op is None or (kernel is None and backend is None):
        return None
    return Rule("lock", op, (kernel,) if kernel else (), (backend,) if backend else (), condition=cond,
                condition_source=entry.get("condition"), origin=origin)


def filter_rule(kind: str, entry: Any, path: str, origin: str, problems: Problems,
                registry: KernelRegistry | None) -> Rule | None:
    """``{operation, backends, kernels, condition}`` -> an allow or deny rule."""
    if not _is_entry(entry, path, problems):
        return None
    check_keys(entry, ("operation", "backends", "kernels", "condition", "description"), path, problems)
    op = check_name(entry.get("operation", "*"), f"{path}.operation", problems, "operation")
    if "backends" not in entry and "kernels" not in entry:
        problems.error(path, "needs backends and/or kernels (lists of globs)")
        return None
    backends = check_name_list(entry["backends"], f"{path}.backends", problems, "backend") \
        if "backends" in entry else ()
    kernels = check_name_list(entry["kernels"], f"{path}.kernels", problems, "kernel") if "kernels" in entry else ()
    for i, k in enumerate(kernels or ()):
        check_kernel(k, f"{path}.kernels[{i}]", problems, registry, op)
    for i, b in enumerate(backends or ()):
        check_backend(b, f"{path}.backends[{i}]", problems, registry)
    cond = check_condition(entry.get("condition"), f"{path}.condition", problems, per_kernel=kind == "deny")
    if op is None or backends is None or kernels is None:
        return None
    return Rule(kind, op, kernels, backends, condition=cond, condition_source=entry.get("condition"), origin=origin)


def boost_rule(entry: Any, path: str, origin: str, problems: Problems, registry: KernelRegistry | None) -> Rule | None:
    """``{operation, backend | kernel, boost_factor, condition}`` -> a boost rule."""
    if not _is_entry(entry, path, problems):
        return None
    check_keys(entry, ("operation", "kernel", "backend", "boost_factor", "condition", "description"), path, problems)
    op = check_name(entry.get("operation", "*"), f"{path}.operation", problems, "operation")
    kernel, backend = entry.get("kernel"), entry.get("backend")
    if (kernel is None) == (backend is None):
        problems.error(path, "needs exactly one of kernel or backend")
    if kernel is not None:
        kernel = check_name(kernel, f"{path}.kernel", problems, "kernel id")
        if kernel is not None:
            check_kernel(kernel, f"{path}.kernel", problems, registry, op)
    if backend is not None:
        backend = check_name(backend, f"{path}.backend", problems, "backend")
        if backend is not None:
            check_backend(backend, f"{path}.backend", problems, registry)
    factor = None
    if "boost_factor" not in entry:
        problems.error(f"{path}.boost_factor", "is required (a number > 0; 2.0 doubles the score)")
    else:
        factor = check_number(entry["boost_factor"], f"{path}.boost_factor", problems, low=0.0, high=1e6,
                              low_inclusive=False)
    cond = check_condition(entry.get("condition"), f"{path}.condition", problems, per_kernel=True)
    if op is None or factor is None or (kernel is None) == (backend is None):
        return None
    return Rule("boost", op, (kernel,) if kernel else (), (backend,) if backend else (), factor=float(factor),
                condition=cond, condition_source=entry.get("condition"), origin=origin)


def _is_entry(entry: Any, path: str, problems: Problems) -> bool:
    if not isinstance(entry, Mapping):
        problems.error(path, f"must be a mapping, got {show(entry)} ({type_name(entry)})")
        return False
    return True
