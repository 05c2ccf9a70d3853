"""Policy: rules (lock / allow / deny / boost / prefer), scoped overrides, documents and conditions."""

from __future__ import annotations

from layerzero.policy.model import EMPTY_POLICY, Policy, Rule

__all__ = ["Policy", "Rule", "EMPTY_POLICY"]
