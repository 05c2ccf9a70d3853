"""Deprecated location: :class:`DispatchConfig` and :class:`DispatchMode` live in :mod:`layerzero.runtime.config`
(the runtime owns its config). ``from layerzero.dispatch import DispatchConfig`` stays the documented spelling."""

from __future__ import annotations

from layerzero.runtime.config import ENV_VARS, DispatchConfig, DispatchMode

__all__ = ["DispatchConfig", "DispatchMode", "ENV_VARS"]
