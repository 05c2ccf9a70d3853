"""The process-wide policy in force: programmatic rules plus the loaded policy document.

Programmatic rules (``lz.lock``, ``lz.prefer``, ``lz.disabled`` as plain calls)
come before the document's rules, so a call made in code wins over a file.
Every change bumps ``version`` and notifies listeners (the runtime drops
cached plans).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from layerzero.policy.model import EMPTY_POLICY, Policy, Rule

__all__ = ["PolicyState"]


class PolicyState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._api: list[Rule] = []
        self._document: Policy = EMPTY_POLICY
        self.document_source: str | None = None
        self.policy: Policy = EMPTY_POLICY
        self.version = 0
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        """Stop calling ``fn`` (a runtime that goes away takes its listener with it)."""
        self._listeners = [f for f in self._listeners if f is not fn]

    @property
    def api_rules(self) -> tuple[Rule, ...]:
        return tuple(self._api)

    @property
    def document(self) -> Policy:
        return self._document

    def add(self, rule: Rule, *, replace_same_target: bool = True) -> list[tuple[int, Rule]]:
        """Add a programmatic rule (newest first). A lock replaces an earlier lock of the same operation
        under the same condition (prefer / deny / allow: the same targets too).
        Returns the rules it replaced, with their places (:meth:`reinstate` puts them back)."""
        with self._lock:
            replaced = [(i, r) for i, r in enumerate(self._api) if _same_slot(r, rule)] if replace_same_target else []
            if replaced:
                self._api = [r for r in self._api if not _same_slot(r, rule)]
            self._api.insert(0, rule)
            self._rebuild()
            return replaced

    def reinstate(self, replaced: list[tuple[int, Rule]]) -> None:
        """Put back rules :meth:`add` replaced, at their places (an undone change leaves the policy as it was)."""
        if not replaced:
            return
        with self._lock:
            for at, rule in replaced:
                if not any(r is rule for r in self._api):
                    self._api.insert(min(at, len(self._api)), rule)
            self._rebuild()

    def remove(self, predicate: Callable[[Rule], bool]) -> int:
        with self._lock:
            before = len(self._api)
            self._api = [r for r in self._api if not predicate(r)]
            removed = before - len(self._api)
            if removed:
                self._rebuild()
            return removed

    def set_document(self, policy: Policy, source: str | None = None) -> None:
        with self._lock:
            self._document = policy
            self.document_source = source
            self._rebuild()

    def clear(self) -> None:
        with self._lock:
            self._api = []
            self._document = EMPTY_POLICY
            self.document_source = None
            self._rebuild()

    def _rebuild(self) -> None:
        self.policy = Policy(tuple(self._api) + self._document.rules)
        self.version += 1
        for fn in list(self._listeners):
            fn()


def _same_slot(a: Rule, b: Rule) -> bool:
    """Whether rule ``b`` takes ``a``'s place: the same kind and target under the same condition (a lock with
    another condition is another rule: the first whose condition holds decides)."""
    if a.kind != b.kind or a.condition_source != b.condition_source:
        return False
    if a.kind == "lock":
        return a.operation == b.operation
    if a.kind in ("prefer", "deny", "allow"):
        return a.operation == b.operation and a.backends == b.backends and a.kernels == b.kernels
    return False
