"""Locks a forked child gets back unlocked.

``os.fork()`` copies every lock as it is at that instant: one that another thread held (registering a kernel,
storing a plan, counting a breaker failure) stays held in the child, where that thread does not exist, and the
child's first call that takes it hangs for good. Servers that import, then fork workers (gunicorn, a
``multiprocessing`` pool with the fork start method) while threads of the parent dispatch hit exactly that.

Every layerzero lock is made here: :func:`lock` for a lock an object keeps in an attribute (the object is held
weakly), :func:`module_lock` for a module's own. In the child, each live one is reinitialized, unlocked, in
place (``_at_fork_reinit``: what the standard library does for its own locks), so code that holds a reference
to the lock keeps working. What the lock protected may be halfway through a change in the child, as for any
forked state; every structure here stays usable (a cache entry may be missing, never corrupt).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["lock", "module_lock"]

_owned: dict[tuple[int, str], weakref.ref[Any]] = {}
_modules: list[Any] = []


def lock(owner: object, attr: str = "_lock", *, reentrant: bool = False) -> Any:
    """A new lock (``threading.RLock`` when ``reentrant``) that ``owner`` keeps as ``owner.<attr>``; reinitialized
    in a forked child while ``owner`` is alive."""
    made = threading.RLock() if reentrant else threading.Lock()
    key = (id(owner), attr)
    _owned[key] = weakref.ref(owner, lambda _ref, key=key: _owned.pop(key, None))
    return made


def module_lock(*, reentrant: bool = False) -> Any:
    """A new module-level lock, reinitialized in every forked child."""
    made = threading.RLock() if reentrant else threading.Lock()
    _modules.append(made)
    return made


def _reinit_in_child() -> None:
    for (_, attr), ref in list(_owned.items()):
        owner = ref()
        held = getattr(owner, attr, None) if owner is not None else None
        if held is not None and hasattr(held, "_at_fork_reinit"):
            held._at_fork_reinit()
    for held in _modules:
        held._at_fork_reinit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_in_child)
