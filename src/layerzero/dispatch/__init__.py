"""Dispatch: configs, modes and dispatchers as the performance guide describes them."""

from __future__ import annotations

from layerzero.dispatch.breaker import CircuitBreaker, CircuitBreakerConfig, CircuitState, CircuitStats
from layerzero.dispatch.config import DispatchConfig, DispatchMode

__all__ = ["DispatchConfig", "DispatchMode", "CircuitBreaker", "CircuitBreakerConfig", "CircuitState",
           "CircuitStats"]
