"""Kernel and backend registries.

``KernelRegistry`` holds :class:`~layerzero.spec.KernelSpec` values by id and
answers "which kernels implement this operation". ``BackendRegistry`` knows
each backend library: whether it imports, its version, its health, and the
pip command that would add it. Both carry a ``version`` counter and change
listeners, which the runtime uses to drop cached plans the moment a kernel is
registered or removed.

A kernel's ``operation`` serves that operation and every operation below it:
a spec for ``"attention"`` serves ``attention.causal`` and ``attention.decode``.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from layerzero import forksafe
from layerzero.errors import KernelNotFoundError
from layerzero.spec import KernelSpec, Reason, ReasonCode

__all__ = [
    "KernelSpec",
    "KernelRegistry",
    "BackendRegistry",
    "BackendInfo",
    "get_global_kernel_registry",
    "get_global_backend_registry",
    "register_kernel",
    "operation_matches",
]


def operation_matches(spec_operation: str, operation: str) -> bool:
    """True when a kernel declared for ``spec_operation`` serves ``operation``."""
    return operation == spec_operation or operation.startswith(spec_operation + ".")


Listener = Callable[[], None]


class KernelRegistry:
    """Kernels by id. Thread-safe for writers; readers see immutable snapshots."""

    def __init__(self) -> None:
        self._lock = forksafe.lock(self)
        self._specs: dict[str, KernelSpec] = {}
        self._by_op: dict[str, tuple[KernelSpec, ...]] = {}
        self._listeners: list[Listener] = []
        self.version = 0

    # -- writers ----------------------------------------------------------
    def register(self, spec: KernelSpec, *, replace: bool = False) -> KernelSpec:
        """Add a kernel; it takes part in selection at once (cached plans are dropped)."""
        if not isinstance(spec, KernelSpec):
            raise TypeError(f"register() takes a KernelSpec, got {type(spec).__name__}")
        with self._lock:
            if spec.kernel_id in self._specs and not replace:
                existing = self._specs[spec.kernel_id]
                if existing == spec and existing.impl is spec.impl:
                    return existing
                raise ValueError(f"kernel {spec.kernel_id!r} is already registered (pass replace=True to replace it)")
            self._specs[spec.kernel_id] = spec
            self._changed()
        return spec

    def unregister(self, kernel_id: str) -> KernelSpec:
        """Remove a kernel by id and return its spec."""
        with self._lock:
            try:
                spec = self._specs.pop(kernel_id)
            except KeyError:
                raise KernelNotFoundError(self._unknown(kernel_id)) from None
            self._changed()
        return spec

    def kernel(self, *, operation: str, backend: str = "custom", kernel_id: str | None = None,
               priority: int = 50, **constraints: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`register`.

        Example:
            >>> @registry.kernel(operation="rms_norm", backend="custom", priority=90)
            ... def my_rms_norm(x, weight, eps): ...
        """

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            kid = kernel_id or (fn.__name__ if fn.__name__.startswith(backend + "_") else f"{backend}_{fn.__name__}")
            self.register(KernelSpec(kid, operation, backend, fn, priority=priority, **constraints))
            return fn

        return wrap

    def add_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        """Stop calling ``fn`` (a runtime that goes away takes its listener with it)."""
        with self._lock:
            self._listeners = [f for f in self._listeners if f is not fn]

    def _changed(self) -> None:
        self.version += 1
        self._by_op = {}
        for fn in list(self._listeners):
            fn()

    # -- readers ----------------------------------------------------------
    def get(self, kernel_id: str) -> KernelSpec:
        """The spec with this id; ``KernelNotFoundError`` names the close matches."""
        try:
            return self._specs[kernel_id]
        except KeyError:
            raise KernelNotFoundError(self._unknown(kernel_id)) from None

    def find(self, kernel_id: str) -> KernelSpec | None:
        return self._specs.get(kernel_id)

    def __contains__(self, kernel_id: object) -> bool:
        return kernel_id in self._specs

    def __iter__(self) -> Iterator[KernelSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def for_operation(self, operation: str) -> tuple[KernelSpec, ...]:
        """Kernels serving ``operation``, in registration order."""
        cache = self._by_op
        found = cache.get(operation)
        if found is None:
            found = tuple(s for s in list(self._specs.values()) if operation_matches(s.operation, operation))
            cache[operation] = found
        return found

    def match(self, pattern: str = "*") -> list[KernelSpec]:
        """Kernels whose id or operation matches the glob ``pattern``, sorted by id."""
        return sorted(
            (s for s in self._specs.values()
             if fnmatch.fnmatchcase(s.kernel_id, pattern) or fnmatch.fnmatchcase(s.operation, pattern)
             or operation_matches(s.operation, pattern)),
            key=lambda s: s.kernel_id,
        )

    def operations(self) -> list[str]:
        return sorted({s.operation for s in self._specs.values()})

    def _unknown(self, kernel_id: str) -> str:
        import difflib

        close = difflib.get_close_matches(str(kernel_id), list(self._specs), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown kernel {kernel_id!r}{hint} (layerzero list shows every kernel)"


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What layerzero knows about one backend library."""

    name: str
    available: bool
    version: str | None
    reason: str | None = None
    pip: str | None = None
    healthy: bool = True
    health_reason: str | None = None

    def unavailable_reason(self) -> Reason | None:
        if not self.available:
            hint = f" (install with: {self.pip})" if self.pip else ""
            return Reason(ReasonCode.BACKEND_UNAVAILABLE, f"{self.name} is not available: {self.reason}{hint}")
        if not self.healthy:
            return Reason(ReasonCode.BACKEND_UNHEALTHY, f"{self.name} is marked unhealthy: {self.health_reason}")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "version": self.version, "reason": self.reason,
                "pip": self.pip, "healthy": self.healthy, "health_reason": self.health_reason}


class BackendRegistry:
    """Backends by name, probed lazily: a missing library is a reason, never an import error."""

    def __init__(self) -> None:
        self._lock = forksafe.lock(self)
        self._probes: dict[str, tuple[str | None, str | None, Callable[[], str | None] | None]] = {}
        self._infos: dict[str, BackendInfo] = {}
        self._health: dict[str, str | None] = {}
        self._listeners: list[Listener] = []
        self.version = 0

    def register(self, name: str, *, module: str | None = None, pip: str | None = None,
                 probe: Callable[[], str | None] | None = None) -> None:
        """Declare a backend.

        Args:
            name: backend name used in kernel specs (``"liger"``).
            module: importable module whose presence makes the backend available.
            pip: the install command shown when it is missing.
            probe: optional extra check returning ``None`` when usable, else a reason string.
        """
        with self._lock:
            self._probes[name] = (module, pip, probe)
            self._infos.pop(name, None)
            self._changed()

    def info(self, name: str) -> BackendInfo:
        """Availability, version and health of ``name`` (probed once, then cached).

        A probe is slow (an import); a change made meanwhile (``mark_healthy``, ``register``) has dropped what it
        read, so its answer is kept only when no change came between (it is still this call's answer)."""
        info = self._infos.get(name)
        if info is None:
            version = self.version
            info = self._probe(name)
            with self._lock:
                if self.version == version:
                    self._infos[name] = info
        return info

    def is_available(self, name: str) -> bool:
        return self.info(name).available

    def unavailable_reason(self, name: str) -> Reason | None:
        return self.info(name).unavailable_reason()

    def names(self) -> list[str]:
        return sorted(self._probes)

    def all(self) -> list[BackendInfo]:
        return [self.info(n) for n in self.names()]

    def mark_unhealthy(self, name: str, reason: str) -> None:
        """Take a backend out of selection (for example after a failed self-test)."""
        with self._lock:
            self._health[name] = reason
            self._infos.pop(name, None)
            self._changed()

    def mark_healthy(self, name: str) -> None:
        with self._lock:
            self._health.pop(name, None)
            self._infos.pop(name, None)
            self._changed()

    def refresh(self) -> None:
        """Forget cached probes (after installing a library into a running process)."""
        with self._lock:
            self._infos.clear()
            self._changed()

    def add_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        """Stop calling ``fn`` (a runtime that goes away takes its listener with it)."""
        with self._lock:
            self._listeners = [f for f in self._listeners if f is not fn]

    def _changed(self) -> None:
        self.version += 1
        for fn in list(self._listeners):
            fn()

    def _probe(self, name: str) -> BackendInfo:
        health = self._health.get(name)
        healthy = name not in self._health
        if name not in self._probes:  # a user kernel's own backend: its code is right there
            return BackendInfo(name, True, None, None, None, healthy, health)
        module, pip, probe = self._probes[name]
        version = None
        if module is not None:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return BackendInfo(name, False, None, f"python package {module!r} is not installed", pip, healthy, health)
            version = _dist_version(module)
        if probe is not None:
            try:
                why = probe()
            except Exception as exc:  # a probe must never break selection
                why = f"probe failed: {type(exc).__name__}: {exc}"
            if why:
                return BackendInfo(name, False, version, why, pip, healthy, health)
        return BackendInfo(name, True, version, None, pip, healthy, health)


_DIST_NAMES = {"liger_kernel": "liger-kernel", "flash_attn": "flash-attn", "flash_attn_interface": "flash-attn-3",
               "flashinfer": "flashinfer-python", "xformers": "xformers", "torch": "torch",
               "transformer_engine": "transformer-engine"}


def _dist_version(module: str) -> str | None:
    top = module.split(".")[0]
    for dist in (_DIST_NAMES.get(top, top), top):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if top == "torch":
        import torch

        return torch.__version__
    return None


_kernel_registry = KernelRegistry()
_backend_registry = BackendRegistry()


def get_global_kernel_registry() -> KernelRegistry:
    """The process-wide kernel registry used by ``lz.*`` and the global dispatcher."""
    return _kernel_registry


def get_global_backend_registry() -> BackendRegistry:
    """The process-wide backend registry."""
    return _backend_registry


def register_kernel(spec: KernelSpec | None = None, /, **kwargs: Any) -> Any:
    """Register a user kernel in the global registry, as a call or a decorator.

    Example:
        >>> lz.register_kernel(KernelSpec("custom_rms", "rms_norm", "custom", fn))
        >>> @lz.register_kernel(operation="rms_norm", backend="custom", priority=90)
        ... def custom_rms(x, weight, eps): ...
    """
    if spec is not None:
        return _kernel_registry.register(spec, replace=bool(kwargs.get("replace", False)))
    return _kernel_registry.kernel(**kwargs)
