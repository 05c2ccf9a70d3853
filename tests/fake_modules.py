"""Importable stand-ins for libraries that cannot be installed here (FlashAttention, xFormers, FlashInfer),
shared by the backend and residual-pair tests."""

from __future__ import annotations

import importlib.machinery
import types

__all__ = ["fake_module"]


def fake_module(name: str, **attrs: object) -> types.ModuleType:
    """A module named ``name`` with a spec (``importlib.util.find_spec`` finds it) holding ``attrs``."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod
