"""The compiled hot path: the cached hit of ``lz.attention``, ``lz.rms_norm`` and ``lz.layer_norm``, and the
dispatchers' cached attention hit, served by a C extension (``layerzero._accel``).

The call contracts (:mod:`layerzero.ops.contract`) define what a cached ``lz.*`` call does. For the busiest
ones the extension serves the common case of that definition without the interpreter: plain tensors (for
attention: ``q``, ``k``, ``v`` in BHSD or BSHD, a bool ``is_causal``, an int or no ``window``, a finite or no
``scale``, an optional mask, no variant, no ``operation`` name), no open policy scope, a plan in the cache whose
gate is open. It builds the same keys, runs the same shape guard and calls the kernel the same way (``plan.direct``
or ``plan.fn``; a kernel's exception goes to the executor's ``recover``). Every other call goes, arguments
unchanged, to the generated Python entry: validation, errors, first calls, fallbacks and scopes have one
home.

The extension is built by ``pip install`` where a C compiler is found (``setup.py`` marks it optional).
``LAYERZERO_PURE_PYTHON=1`` (read at import) turns it off; :func:`status` says which path runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from layerzero.environment import env_flag

__all__ = ["MISS", "status", "unavailable", "attention_hit", "norm_hit", "entry", "restore", "dispatch_method"]


class _Miss:
    """What the compiled hit returns for a call it does not serve."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()


def _load() -> tuple[Any, str]:
    """The extension module, or None and why not."""
    if env_flag("LAYERZERO_PURE_PYTHON"):
        return None, "LAYERZERO_PURE_PYTHON is set"
    import torch  # first: the extension links against torch's libc10

    try:
        from layerzero import _accel as module  # type: ignore[attr-defined]
    except ImportError as exc:  # not built (no compiler or torch headers at install time), another Python
        return None, f"the extension is not built ({exc})"
    if module.TORCH_VERSION != torch.__version__:  # it reads torch's C++ tensors: only the torch it was built for
        return None, (f"the extension was built for torch {module.TORCH_VERSION}, this is torch {torch.__version__}; "
                      f"reinstall layerzero to rebuild it")
    return module, ""


_accel, _why_not = _load()


def status() -> str:
    """``"compiled"``, or why the Python entry serves every call (``"pure Python: ..."``)."""
    return "compiled" if _accel is not None else f"pure Python: {_why_not}"


def unavailable() -> bool:
    """Whether the compiled path is missing though nobody turned it off (not built, or built for another torch)."""
    return _accel is None and not env_flag("LAYERZERO_PURE_PYTHON")


def attention_hit(runtime: Any, live: Any, op_full: str, op_causal: str) -> Callable[..., Any] | None:
    """The compiled hit for ``lz.attention`` over ``runtime``'s plan cache, or None without the extension."""
    if _accel is None:
        return None
    import torch

    return _accel.Hit(_accel.ATTENTION, runtime, live, op_full, op_causal, MISS, torch.Tensor, torch.nn.Parameter)


def norm_hit(operation: str, runtime: Any, live: Any) -> Callable[..., Any] | None:
    """The compiled hit for ``lz.rms_norm`` or ``lz.layer_norm`` (``operation``), or None without the extension."""
    if _accel is None:
        return None
    import torch

    kind = {"rms_norm": _accel.RMS_NORM, "layer_norm": _accel.LAYER_NORM}[operation]
    return _accel.Hit(kind, runtime, live, operation, operation, MISS, torch.Tensor, torch.nn.Parameter)


def entry(hit: Any, fallback: Callable[..., Any], doc: str, module: str) -> Callable[..., Any]:
    """The public function around ``hit``: a builtin with ``fallback``'s signature (``doc`` starts with it),
    known to pickle as ``module.<name>``."""
    fn = hit.entry(fallback, doc, module)
    _ENTRIES[module, fallback.__name__] = hit
    return fn


def dispatch_method(kind: str, hit: Any, method: Callable[..., Any], inputs_type: type, op_inputs_type: type,
                    result_type: type, not_timed: Any, options_marker: Any, context_marker: str,
                    cache_types: tuple[type, type]) -> Callable[..., Any] | None:
    """The compiled form of a dispatcher's ``dispatch`` method (``method``), or None without the extension.

    ``kind``: ``"select"`` (``Dispatcher.dispatch``: the plan from the runtime's cache through ``hit``'s lookup, or
    from the dispatcher's own cache) or ``"static"`` (``StaticDispatcher.dispatch``: the table's plan, ``hit``'s
    shape guard). ``hit``: lz.attention's compiled hit. Called with the dispatcher first (bind it with
    ``types.MethodType``), it serves the cached hits of the Python method's hot path and calls ``method`` with the
    same arguments for every other call; ``__wrapped__``, ``__doc__``, ``__name__`` and the signature are
    ``method``'s. ``inputs_type``, ``op_inputs_type``, ``result_type``, ``not_timed``, ``options_marker``: the
    dispatch package's AttentionInputs, OpInputs, DispatchResult, NOT_TIMED and the marker its option keys start
    with; ``context_marker``: what the keys of calls given a context hold after the operation; ``cache_types``:
    ``(PlanCache, MVCCPlanCache)``, the own caches it reads (without a TTL).
    """
    if _accel is None or hit is None:
        return None
    code = {"select": _accel.SELECT, "static": _accel.STATIC}[kind]
    return _accel.Method(code, hit, method, inputs_type, op_inputs_type,  # type: ignore[no-any-return]
                         result_type, not_timed, options_marker, context_marker, *cache_types)


#: (module name, function name) -> the compiled hit behind that public function (what unpickling looks up).
_ENTRIES: dict[tuple[str, str], Any] = {}


def restore(module: str, name: str) -> Any:
    """Unpickling ``lz.attention`` & co.: the compiled hit behind ``module.name`` (``hit_reduce`` in _accel.c).
    ``import layerzero`` (which unpickling this module's name runs first) has made every entry."""
    hit = _ENTRIES.get((module, name))
    if hit is None:
        raise ValueError(f"layerzero.accel.restore: no compiled entry {module}.{name}")
    return hit
