"""The process-wide policy in force: programmatic rules plus the loaded policy document.

Programmatic rules (``lz.lock``, ``lz.prefer``, ``lz.disabled`` as plain calls)
come before the document's rules, so a call made in code wins over a file.
Every change bumps ``version`` and notifies listeners (the runtime drops
cached plans).
"""

from __future__ import annotations

from collections.abc import Callable

from layerzero import forksafe
from layerzero.policy.model import EMPTY_POLICY, Policy, Rule

__all__ = ["PolicyState", "UNDO_DEPTH"]

#: How many process-wide rules one rule keeps behind it, to put back when it is undone (newest first).
UNDO_DEPTH = 16


class PolicyState:
    def __init__(self) -> None:
        self._lock = forksafe.lock(self)
        self._api: list[Rule] = []
        # id(rule) -> the rules it replaced, with their places: they come back when it is withdrawn, unless their
        # own change was withdrawn first (a rule replaced twice over is held by the one that replaced it)
        self._held: dict[int, list[tuple[int, Rule]]] = {}
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
        Returns the rules it replaced, with their places (:meth:`withdraw` puts them back)."""
        with self._lock:
            replaced = [(i, r) for i, r in enumerate(self._api) if _same_slot(r, rule)] if replace_same_target else []
            if replaced:
                self._api = [r for r in self._api if not _same_slot(r, rule)]
                self._held[id(rule)] = list(replaced)
                self._trim_history(rule)
            self._api.insert(0, rule)
            self._rebuild()
            return replaced

    def _trim_history(self, rule: Rule) -> None:
        """Keep at most :data:`UNDO_DEPTH` rules behind ``rule``: a lock re-applied without undo (a server setting
        it at every request) would hold every earlier one for good."""
        at = rule
        for _ in range(UNDO_DEPTH):
            held = self._held.get(id(at))
            if not held:
                return
            at = held[0][1]
        self._drop(at)

    def _drop(self, rule: Rule) -> None:
        """Forget what ``rule`` replaced, and what those replaced, for good."""
        todo = [rule]
        while todo:
            for _, r in self._held.pop(id(todo.pop()), []):
                todo.append(r)

    def withdraw(self, rule: Rule) -> None:
        """Undo :meth:`add` of ``rule``: remove it and put back, at their places, the rules it replaced that are
        still in force. When a later rule replaced ``rule`` already, that one holds ``rule``'s replaced rules
        instead (undoing two locks in either order leaves neither)."""
        with self._lock:
            mine = self._held.pop(id(rule), [])
            if any(r is rule for r in self._api):
                self._api = [r for r in self._api if r is not rule]
                for at, back in mine:
                    if not any(r is back for r in self._api):
                        self._api.insert(min(at, len(self._api)), back)
            else:
                for held in self._held.values():
                    for n, (at, r) in enumerate(held):
                        if r is rule:
                            held[n:n + 1] = mine
                            break
            self._rebuild()

    def remove(self, predicate: Callable[[Rule], bool]) -> int:
        with self._lock:
            before = len(self._api)
            gone = [r for r in self._api if predicate(r)]
            self._api = [r for r in self._api if not predicate(r)]
            for r in gone:  # removed for good (``lz.unlock``): what they replaced does not come back either
                self._drop(r)
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
            self._held = {}
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
