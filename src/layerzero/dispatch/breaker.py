"""Deprecated location: the circuit breakers live in :mod:`layerzero.runtime.breaker` (the runtime owns them)."""

from __future__ import annotations

from layerzero.runtime.breaker import BreakerBoard, CircuitBreaker, CircuitBreakerConfig, CircuitState, CircuitStats

__all__ = ["CircuitState", "CircuitBreakerConfig", "CircuitBreaker", "CircuitStats", "BreakerBoard"]
