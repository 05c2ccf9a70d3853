"""Programmatic policy: ``lz.lock``, ``lz.unlock``, ``lz.prefer``, ``lz.disabled``, ``lz.enabled``, ``lz.configure``.

Each works as a plain call (process-wide, until undone) and as a context
manager (scoped to the current thread / asyncio task through a ContextVar and
restored on exit)::

    lz.lock("attention.causal", "torch_sdpa_flash")        # process-wide
    with lz.lock("attention.causal", "torch_sdpa_math"):   # only inside the block
        ...

When the call is written directly in a ``with`` statement nothing is applied
process-wide, not even briefly: the call looks at the instruction its caller
executes next.
"""

from __future__ import annotations

import dis
import fnmatch
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from layerzero.config_file.validate import backend_problem, could_serve
from layerzero.errors import PolicyError
from layerzero.policy.model import Policy, Rule
from layerzero.policy.scope import SCOPE, Scope

__all__ = ["lock", "unlock", "prefer", "disabled", "enabled", "configure", "PolicyChange", "current_policy"]

_WITH_OPS = {op for op in ("BEFORE_WITH", "SETUP_WITH", "LOAD_SPECIAL") if op in dis.opmap}


def _in_with_statement(depth: int = 2) -> bool:
    """True when the caller ``depth`` frames up will enter our return value as a context manager."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return False
    code = frame.f_code.co_code
    i = frame.f_lasti + 2
    # Skip CACHE entries that follow a CALL instruction.
    cache = dis.opmap.get("CACHE", 0)
    while i < len(code) and code[i] == cache:
        i += 2
    return i < len(code) and dis.opname[code[i]] in _WITH_OPS


def _rt() -> Any:
    from layerzero.runtime import get_runtime

    return get_runtime()


class PolicyChange:
    """A policy change: already in force process-wide after a plain call, or scoped inside ``with``."""

    def __init__(self, describe: str, apply_global: Callable[[], None], undo_global: Callable[[], None],
                 scoped: Callable[[Policy], Policy], *, in_with: bool, hide: Callable[[Rule], bool] | None = None
                 ) -> None:
        self.describe = describe
        self._apply = apply_global
        self._undo = undo_global
        self._scoped = scoped
        self._hide = hide  # process-wide rules this change lifts inside its block (unlock / enabled)
        self._applied = False
        if not in_with:
            apply_global()
            self._applied = True

    def __enter__(self) -> PolicyChange:
        if self._applied:  # used as `c = lz.lock(...); with c:` - make it scoped instead
            self._undo()
            self._applied = False
        parent = SCOPE.get()
        base = parent.policy if parent is not None else Policy(())
        policy = self._scoped(base)
        hides = parent.hides if parent is not None else ()
        if self._hide is not None:
            hides = (*hides, self._hide)
        SCOPE.set(Scope(policy, {}, parent, hides, owner=self))
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        # The innermost scope this change opened in this thread / task, and what was in force before it. The
        # scope, not a token kept on self, knows its change: the same object entered again (nested, or by
        # another thread while this one is inside) closes its own block.
        scope = SCOPE.get()
        while scope is not None and scope.owner is not self:
            scope = scope.parent
        if scope is not None:
            SCOPE.set(scope.parent)

    def undo(self) -> None:
        """Undo a process-wide change made by a plain call."""
        if self._applied:
            self._undo()
            self._applied = False

    def __repr__(self) -> str:
        return f"<layerzero policy change: {self.describe}>"


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_backend(call: str, backend: Any) -> str:
    """A backend name or glob some registered kernel has (a rule on a misspelled one matches nothing)."""
    _check_str("backend", backend)
    problem = backend_problem(backend, _rt().kernels)
    if problem is not None:
        raise PolicyError(f"{call}(): {problem}")
    return backend


def _change(rule: Rule, describe: str) -> PolicyChange:
    state = _rt().policy

    def apply() -> None:
        state.add(rule)

    def undo() -> None:  # the lock this one replaced comes back (`c = lz.lock(...); with c:` undoes it)
        state.withdraw(rule)

    return PolicyChange(describe, apply, undo, lambda base: Policy((rule,) + base.rules),
                        in_with=_in_with_statement(3))


def lock(operation: str, kernel: str | None = None, *, backend: str | None = None,
         condition: str | None = None) -> PolicyChange:
    """Always run ``operation`` (a glob) on ``kernel`` (or the best kernel of ``backend``).

    A kernel that cannot run a call's inputs raises ``KernelNotSupportedError`` with its reasons
    rather than silently choosing another; other eligible kernels stay as runtime fallbacks.

    Example:
        >>> lz.lock("attention.causal", "torch_sdpa_flash")
        >>> with lz.lock("rms_norm", backend="torch"): ...
    """
    _check_str("operation", operation)
    if (kernel is None) == (backend is None):
        raise PolicyError("lock() takes exactly one of kernel= or backend=")
    cond, src = _compile_condition(condition, "lock")
    if kernel is not None:
        _check_str("kernel", kernel)
        spec = _rt().kernels.get(kernel)  # unknown ids fail now, with suggestions
        if not could_serve(spec.operation, operation):  # as a policy document's lock is checked
            raise PolicyError(f"lock({operation!r}, {kernel!r}): kernel {kernel!r} implements {spec.operation!r}, "
                              f"not {operation!r}")
    else:
        _check_backend("lock", backend)
    rule = Rule("lock", operation, (kernel,) if kernel else (), (backend,) if backend else (),
                condition=cond, condition_source=src, origin="lz.lock()")
    return _change(rule, f"lock {operation} -> {kernel or 'backend ' + str(backend)}")


def unlock(operation: str) -> PolicyChange:
    """Remove process-wide ``lz.lock`` calls for ``operation``; scoped, ignores outer locks for it."""
    _check_str("operation", operation)
    state = _rt().policy
    removed: list[Rule] = []

    def apply() -> None:
        removed.extend(r for r in state.api_rules if r.kind == "lock" and r.operation == operation)
        state.remove(lambda r: r.kind == "lock" and r.operation == operation)

    def undo() -> None:
        for r in reversed(removed):
            state.add(r)
        removed.clear()

    def is_lock(r: Rule) -> bool:
        return r.kind == "lock" and r.operation == operation

    def scoped(base: Policy) -> Policy:
        return Policy(tuple(r for r in base.rules if not is_lock(r)))

    return PolicyChange(f"unlock {operation}", apply, undo, scoped, in_with=_in_with_statement(2), hide=is_lock)


def prefer(backend: str, priority: int = 100, *, operation: str = "*", condition: str | None = None) -> PolicyChange:
    """Give every kernel of ``backend`` the priority ``priority`` (0..1000) for ``operation``.

    Measured times from the performance database still decide between kernels when present;
    use ``lz.lock`` to force a choice.
    """
    _check_backend("prefer", backend)
    _check_str("operation", operation)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 1000:
        raise PolicyError(f"prefer(): priority must be an int between 0 and 1000, got {priority!r}")
    cond, src = _compile_condition(condition, "prefer")
    rule = Rule("prefer", operation, (), (backend,), priority=priority, condition=cond, condition_source=src,
                origin="lz.prefer()")
    return _change(rule, f"prefer {backend} priority={priority}")


def disabled(backend: str, *, operation: str = "*") -> PolicyChange:
    """Deny every kernel of ``backend`` (a glob) for ``operation``."""
    _check_backend("disabled", backend)
    _check_str("operation", operation)
    rule = Rule("deny", operation, (), (backend,), origin="lz.disabled()")
    return _change(rule, f"disable {backend}")


def enabled(backend: str, *, operation: str = "*") -> PolicyChange:
    """Undo ``lz.disabled(backend)``; as a context manager, lifts outer disables inside the block.

    It lifts every ``lz.disabled(backend, operation=...)`` whose operation ``operation`` (a glob) covers: the
    default ``"*"`` lifts them all; ``operation="rms_norm"`` lifts a ``disabled(..., operation="rms_norm")``
    but not a ``disabled(...)`` of every operation (that rule is one, it cannot be lifted for one operation)."""
    _check_backend("enabled", backend)
    _check_str("operation", operation)
    state = _rt().policy
    removed: list[Rule] = []

    def match(r: Rule) -> bool:
        return (r.kind == "deny" and r.backends == (backend,) and fnmatch.fnmatchcase(r.operation, operation)
                and r.origin == "lz.disabled()")

    def apply() -> None:
        removed.extend(r for r in state.api_rules if match(r))
        state.remove(match)

    def undo() -> None:
        for r in reversed(removed):
            state.add(r)
        removed.clear()

    def scoped(base: Policy) -> Policy:
        return Policy(tuple(r for r in base.rules if not match(r)))

    return PolicyChange(f"enable {backend}", apply, undo, scoped, in_with=_in_with_statement(2), hide=match)


def configure(source: str | Path | Mapping[str, Any] | None) -> PolicyChange:
    """Load a policy document (YAML/JSON path or dict with ``version: "1.0"``) and put it in force.

    It replaces the document in force; ``lz.configure({"version": "1.0"})`` or ``lz.configure(None)``
    clears it. Invalid documents raise ``PolicyError`` listing every error with its path.
    """
    from layerzero.config_file.policy_document import load_policy  # deferred: keeps `import layerzero` free of YAML

    policy = load_policy(source) if source is not None else Policy(())
    label = str(source) if isinstance(source, (str, Path)) else "dict"
    state = _rt().policy
    previous: list[tuple[Policy, str | None]] = []

    def apply() -> None:
        previous.append((state.document, state.document_source))
        state.set_document(policy, label)

    def undo() -> None:
        if previous:
            doc, src = previous.pop()
            state.set_document(doc, src)

    def scoped(base: Policy) -> Policy:  # the block's document first: it wins, as an inner lz.lock does
        return Policy(policy.rules + base.rules)

    return PolicyChange(f"configure {label}", apply, undo, scoped, in_with=_in_with_statement(2))


def current_policy() -> Policy:
    """The policy in force for this thread / task (scoped rules first)."""
    return _rt().current_policy()


def _compile_condition(condition: str | None, where: str) -> tuple[Any, str | None]:
    if condition is None:
        return None, None
    from layerzero.policy.conditions import compile_condition  # deferred: only calls with a condition need it

    # Locks are judged once per call; prefer rules per candidate kernel (backend / kernel are known).
    return compile_condition(condition, per_kernel=where != "lock", where=f"lz.{where}()"), condition
