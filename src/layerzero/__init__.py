"""layerzero: one call per operation, the fastest correct kernel on this machine.

    import layerzero as lz
    out = lz.attention(q, k, v, is_causal=True)
    y = lz.rms_norm(x, weight)
    print(lz.explain(q, k, v, operation="attention.causal"))

Selection, policy, dispatch, tuning and telemetry all share one runtime
(:func:`layerzero.runtime.get_runtime`).
"""

from __future__ import annotations

from layerzero.context import SelectionContext
from layerzero.errors import (
    ConfigError,
    InvalidInputError,
    LayerZeroError,
    NoKernelError,
    OutOfMemoryError,
    PolicyError,
    UnsupportedModelError,
)
from layerzero.registry import get_global_backend_registry, get_global_kernel_registry, register_kernel
from layerzero.spec import KernelSpec
from layerzero.ops import (
    attention,
    attention_paged,
    attention_varlen,
    cross_entropy,
    geglu,
    gelu,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    rope,
    sample,
    silu,
    swiglu,
)
from layerzero.inspection import explain, explain_context, list_kernels, select, validate, which
from layerzero.policy.api import configure, disabled, enabled, lock, prefer, unlock
from layerzero.doctor import doctor, readiness_check
from layerzero.runtime import get_runtime
from layerzero.solve import PlanTable, compile, solve, warmup
from layerzero.backends import load_builtin_backends as _load_builtin_backends
from layerzero import dispatch, tuning  # the dispatch package loads its dispatchers lazily

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # operations
    "attention", "attention_varlen", "attention_paged", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "gelu",
    "silu", "sample", "cross_entropy", "linear_cross_entropy",
    # inspection
    "explain", "explain_context", "which", "select", "list_kernels", "validate",
    # policy
    "lock", "unlock", "prefer", "disabled", "enabled", "configure",
    # system
    "doctor", "readiness_check", "get_runtime", "solve", "compile", "warmup", "PlanTable",
    # your own kernels
    "KernelSpec", "SelectionContext", "register_kernel",
    # the errors callers catch (the rest: layerzero.errors)
    "LayerZeroError", "InvalidInputError", "NoKernelError", "OutOfMemoryError", "ConfigError", "PolicyError",
    "UnsupportedModelError",
]

#: Names that left the top level: each still works for one release, with a DeprecationWarning naming its home.
_MOVED: dict[str, str] = {
    **dict.fromkeys(("Reason", "ReasonCode"), "layerzero.spec"),
    **dict.fromkeys(("KernelRegistry", "BackendRegistry"), "layerzero.registry"),
    "install_plan_table": "layerzero.solve",
    "Explanation": "layerzero.inspection",
    **dict.fromkeys(("KernelNotFoundError", "KernelNotSupportedError", "KernelExecutionError",
                     "AllKernelsFailedError", "ConditionError", "PlanMismatchError", "CaptureError",
                     "SelectionDivergenceError", "PerfDBError"), "layerzero.errors"),
}


def __getattr__(name: str) -> object:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'layerzero' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"layerzero.{name} is deprecated; import it from {home} (it leaves the top level in the next "
                  f"release)", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)


_load_builtin_backends(get_global_kernel_registry(), get_global_backend_registry())

# Integrations (layerzero/integrations, layerzero/distributed.py): record every selected context for
# layerzero.distributed, and set up torch.compile / transformers support when those libraries are imported
# (post-import hooks: importing layerzero imports neither torch._dynamo nor transformers).
from layerzero.distributed import track as _track_decisions
from layerzero.integrations import install_import_hooks as _install_import_hooks

_track_decisions(get_runtime())
_install_import_hooks()
