"""Post-import hooks: set up an integration when its library is imported, never before.

``import layerzero`` must stay cheap, so it never imports ``torch._dynamo``
(over a second) or ``transformers`` itself. Instead :func:`when_imported`
runs a callback right after a module finishes importing, or at once when it
is already in ``sys.modules``. ``layerzero/__init__.py`` uses it for:

- ``torch._dynamo``: :func:`layerzero.integrations.compile.install` (Dynamo
  traces stand-ins for ``lz.attention`` & co.);
- ``transformers.modeling_utils``: :func:`layerzero.integrations.transformers.register`
  (``attn_implementation="layerzero"``).

The hook is one small finder at the front of ``sys.meta_path``; it answers
only for the watched names, finds their real spec with the other finders,
and wraps that spec's loader so the callback runs after the module body.
Once every watched module has loaded it removes itself. A failing callback is
logged and never breaks the user's import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from layerzero import forksafe

__all__ = ["when_imported", "pending"]

log = logging.getLogger("layerzero")

_callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = forksafe.module_lock(reentrant=True)


def _run(name: str, module: ModuleType, callbacks: Sequence[Callable[[ModuleType], None]]) -> None:
    for cb in callbacks:
        try:
            cb(module)
        except Exception as exc:  # an integration must never break the user's import
            log.warning("layerzero: setting up the integration for %s failed: %s: %s", name,
                        type(exc).__name__, exc)


class _Finder(importlib.abc.MetaPathFinder):
    """Answers only for watched module names; everything else goes to the next finder."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _callbacks:
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module: ModuleType) -> None:
            exec_module(module)
            with _lock:
                callbacks = _callbacks.pop(fullname, [])
                if not _callbacks:
                    _remove_finder()
            _run(fullname, module, callbacks)

        loader.exec_module = exec_then_hook  # this loader instance serves this one import only
        return spec


_FINDER = _Finder()


def _remove_finder() -> None:
    try:
        sys.meta_path.remove(_FINDER)
    except ValueError:
        pass


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(module)`` once ``name`` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        _run(name, module, [callback])
        return
    with _lock:
        _callbacks.setdefault(name, []).append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def pending() -> list[str]:
    """Module names still watched (their integration has not been set up yet)."""
    with _lock:
        return sorted(_callbacks)
