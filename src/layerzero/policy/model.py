"""The policy model selection consumes: rules (lock / allow / deny / boost / prefer) and a Policy.

Policies are data. A :class:`Rule` names an operation glob, the kernels or
backends it targets (globs), an optional compiled condition over the context,
and where it came from (``lz.lock()``, ``policy.yaml: locks[0]``) so traces can
say which rule fired. A :class:`Policy` is an ordered tuple of rules with a
stable digest; earlier rules win where rules conflict (scoped rules come first,
then programmatic calls, then the document in force).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerzero.context import SelectionContext
from layerzero.spec import KernelSpec

__all__ = ["Rule", "Policy", "EMPTY_POLICY", "condition_env", "RULE_KINDS"]

RULE_KINDS = ("lock", "allow", "deny", "boost", "prefer")

ConditionFn = Callable[[Mapping[str, Any]], bool]


def condition_env(ctx: SelectionContext, operation: str, spec: KernelSpec | None = None) -> dict[str, Any]:
    """The names a condition may use: every context field, ``sm``, ``seq_len``, ``operation``,
    and ``backend`` / ``kernel`` when the rule is judged for one kernel."""
    env = ctx.to_dict()
    env["operation"] = operation
    env["backend"] = spec.backend if spec is not None else None
    env["kernel"] = spec.kernel_id if spec is not None else None
    return env


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy rule.

    Args:
        kind: ``lock``, ``allow``, ``deny``, ``boost`` or ``prefer``.
        operation: operation glob (``"attention.*"``); ``"*"`` for all.
        kernels / backends: globs of kernel ids / backend names this rule targets.
        factor: boost factor (``boost``): scores are multiplied, measured times divided.
        priority: the priority a ``prefer`` rule gives its backend's kernels.
        condition: compiled predicate over :func:`condition_env`; ``None`` means always.
        condition_source: the condition's text, for traces.
        origin: where the rule came from, for traces and logs.
    """

    kind: str
    operation: str = "*"
    kernels: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    factor: float = 1.0
    priority: int | None = None
    condition: ConditionFn | None = field(default=None, compare=False, repr=False)
    condition_source: str | None = None
    origin: str = "api"

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"Rule.kind must be one of {RULE_KINDS}, got {self.kind!r}")

    def matches_operation(self, operation: str) -> bool:
        pat = self.operation
        return pat == "*" or pat == operation or fnmatch.fnmatchcase(operation, pat) or operation.startswith(pat + ".")

    def targets(self, spec: KernelSpec) -> bool:
        if self.kernels and any(fnmatch.fnmatchcase(spec.kernel_id, k) for k in self.kernels):
            return True
        if self.backends and any(fnmatch.fnmatchcase(spec.backend, b) for b in self.backends):
            return True
        return False

    def holds(self, env: Mapping[str, Any]) -> bool:
        return self.condition is None or bool(self.condition(env))

    def describe(self) -> str:
        what = ", ".join([*self.kernels, *(f"backend {b}" for b in self.backends)]) or "-"
        extra = ""
        if self.kind == "boost":
            short = f"{self.factor:g}"  # exact where :g rounds (1.5000001): the policy digest is made of these lines
            extra = f" x{short if float(short) == self.factor else repr(self.factor)}"
        elif self.kind == "prefer":
            extra = f" priority={self.priority}"
        cond = f" if {self.condition_source}" if self.condition_source else ""
        return f"{self.kind} {self.operation} -> {what}{extra}{cond} ({self.origin})"


@dataclass(frozen=True, slots=True)
class Policy:
    """An ordered set of rules. ``digest`` identifies it across processes and ranks."""

    rules: tuple[Rule, ...] = ()
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            text = "\n".join(r.describe() for r in self.rules)
            object.__setattr__(self, "digest", hashlib.sha256(text.encode()).hexdigest()[:16])

    def __bool__(self) -> bool:
        return bool(self.rules)

    def for_operation(self, operation: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.matches_operation(operation))

    def __add__(self, other: Policy) -> Policy:
        """``scoped + global``: rules of ``self`` come first and win conflicts."""
        if not other.rules:
            return self
        if not self.rules:
            return other
        return Policy(self.rules + other.rules)

    def to_list(self) -> list[str]:
        return [r.describe() for r in self.rules]


EMPTY_POLICY = Policy(())
