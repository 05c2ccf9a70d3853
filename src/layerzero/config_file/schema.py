"""The dispatch config file (SPEC section 4): its schema, validation, and compilation into policy rules.

A config file steers selection for config-driven and hot-reload dispatchers
(and for ``lz.*`` when passed to ``lz.configure``)::

    version: "1.0"
    defaults:
      default_priority: 50            # priority of dispatch_rules that give none
      fallback_kernel: torch_sdpa_math  # ranked last wherever it can run
    dispatch_rules:
      - operation: "attention.*"
        conditions: {batch_size_gte: 8, dtype: [float16, bfloat16], platform: cuda}
        kernel: torch_sdpa_flash
        priority: 100
      - operation: "attention.*"
        conditions: "seq_len > 8192"  # a condition expression works too
        kernel: torch_sdpa_efficient
        priority: 90
    kernel_locks: {attention.prefill: torch_sdpa_flash}
    kernel_denies: ["*_experimental"]
    kernel_allows: ["torch_*"]
    fallback_chains:
      attention.causal: [torch_sdpa_flash, torch_sdpa_efficient, torch_sdpa]

Condition keys are a field name (a list value means ``in``, anything else
``==``) or a field name with a suffix: ``_eq _ne _gt _gte _lt _lte _in _not_in
_match``. Values are type-checked against the field (``sm_gte: "x"`` is an
error). ``_match`` takes a regular expression, searched (``re.search``) in the
field's string value; to rule out catastrophic backtracking without a new
dependency the regex syntax is restricted (see :mod:`layerzero.config_file.regex_check`).

Compilation produces one :class:`~layerzero.policy.model.Policy`, so the one
selection engine does the work: ``kernel_locks`` become lock rules,
``kernel_allows`` / ``kernel_denies`` allow / deny rules, and ordering becomes
``prefer`` priorities in three bands above every kernel's own priority (0..1000):
a matching dispatch rule puts its kernel first (``2001 + priority``), then the
operation's fallback chain in order (``1001 + position from the end``), then
the other eligible kernels by their own priority, and ``fallback_kernel`` last.
Measured times can still reorder kernels on the ``lz.*`` path; config-driven
dispatchers select without them, so the file decides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from layerzero.config_file.condition_keys import compile_conditions
from layerzero.config_file.load import read_document
from layerzero.config_file.problems import Problems, raise_problems
from layerzero.config_file.rules import filter_rule, lock_rule
from layerzero.config_file.validate import (
    MAX_RULES,
    check_kernel,
    check_keys,
    check_name,
    check_number,
    check_version,
    is_glob,
    section_list,
    show,
    type_name,
)
from layerzero.errors import ConfigError
from layerzero.policy.conditions import Condition
from layerzero.policy.model import Policy, Rule
from layerzero.registry import KernelRegistry

__all__ = ["CompiledConfig", "CompiledRule", "load_config", "validate_config", "CONFIG_SECTIONS", "RULE_BAND",
           "CHAIN_BAND", "MAX_CHAIN"]

CONFIG_SECTIONS = ("defaults", "dispatch_rules", "kernel_locks", "kernel_allows", "kernel_denies", "fallback_chains")
RULE_BAND = 2001    # prefer priority of a matching dispatch rule's kernel: RULE_BAND + rule priority
CHAIN_BAND = 1001   # prefer priority of fallback-chain kernels: CHAIN_BAND + position from the end
MAX_CHAIN = 64


@dataclass(frozen=True)
class CompiledRule:
    """One dispatch rule after validation: its kernel wins when the condition holds and it can run."""

    operation: str
    kernel: str
    priority: int
    condition: Condition | None
    origin: str

    def describe(self) -> str:
        cond = f" if {self.condition.source}" if self.condition is not None else ""
        return f"{self.operation} -> {self.kernel} priority={self.priority}{cond} ({self.origin})"


@dataclass(frozen=True)
class CompiledConfig:
    """A validated config: the policy the engine applies, plus what it was made from."""

    policy: Policy
    rules: tuple[CompiledRule, ...]
    fallback_chains: Mapping[str, tuple[str, ...]]
    fallback_kernel: str | None
    default_priority: int
    source: str
    digest: str
    warnings: tuple[str, ...] = field(default=())

    def chain_for(self, operation: str) -> tuple[str, ...]:
        """The fallback chain that applies to ``operation`` (an exact key first, then the first glob)."""
        if operation in self.fallback_chains:
            return self.fallback_chains[operation]
        for glob, chain in self.fallback_chains.items():
            if Rule("prefer", glob).matches_operation(operation):
                return chain
        return ()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, "rules": [r.describe() for r in self.rules],
                "fallback_chains": {k: list(v) for k, v in self.fallback_chains.items()},
                "fallback_kernel": self.fallback_kernel, "default_priority": self.default_priority,
                "policy": self.policy.to_list(), "warnings": list(self.warnings)}


def _defaults(data: Mapping[str, Any], problems: Problems, registry: KernelRegistry | None) -> tuple[int, str | None]:
    value = data.get("defaults")
    if value is None:
        return 50, None
    if not isinstance(value, Mapping):
        problems.error("defaults", f"must be a mapping, got {type_name(value)}")
        return 50, None
    check_keys(value, ("default_priority", "fallback_kernel"), "defaults", problems)
    priority = 50
    if "default_priority" in value:
        p = check_number(value["default_priority"], "defaults.default_priority", problems, low=0, high=1000,
                         integer=True)
        priority = int(p) if p is not None else 50
    fallback = None
    if "fallback_kernel" in value:
        fallback = check_name(value["fallback_kernel"], "defaults.fallback_kernel", problems, "kernel id")
        if fallback is not None:
            check_kernel(fallback, "defaults.fallback_kernel", problems, registry)
    return priority, fallback


def _dispatch_rules(data: Mapping[str, Any], label: str, default_priority: int, problems: Problems,
                    registry: KernelRegistry | None) -> list[CompiledRule]:
    out: list[CompiledRule] = []
    for i, entry in enumerate(section_list(data, "dispatch_rules", problems)):
        path = f"dispatch_rules[{i}]"
        if not isinstance(entry, Mapping):
            problems.error(path, f"must be a mapping, got {show(entry)}")
            continue
        check_keys(entry, ("operation", "kernel", "conditions", "priority", "description", "name"), path, problems)
        for required in ("operation", "kernel"):
            if required not in entry:
                problems.error(f"{path}.{required}", "is required")
        op = check_name(entry["operation"], f"{path}.operation", problems, "operation") if "operation" in entry \
            else None
        kernel = check_name(entry["kernel"], f"{path}.kernel", problems, "kernel id") if "kernel" in entry else None
        if kernel is not None:
            if is_glob(kernel):
                problems.error(f"{path}.kernel", f"must be one kernel id, not a glob ({kernel!r})")
                kernel = None
            else:
                check_kernel(kernel, f"{path}.kernel", problems, registry, op)
        priority: Any = default_priority
        if "priority" in entry:
            priority = check_number(entry["priority"], f"{path}.priority", problems, low=0, high=1000, integer=True)
        cond = compile_conditions(entry.get("conditions"), f"{path}.conditions", problems)
        if entry.get("conditions") is not None and cond is None:
            continue
        if op is not None and kernel is not None and priority is not None:
            out.append(CompiledRule(op, kernel, int(priority), cond, f"{label}: {path}"))
    return out


def _locks(data: Mapping[str, Any], label: str, problems: Problems, registry: KernelRegistry | None) -> list[Rule]:
    value = data.get("kernel_locks")
    if value is None:
        return []
    rules: list[Rule] = []
    if isinstance(value, Mapping):
        if len(value) > MAX_RULES:
            problems.error("kernel_locks", f"has {len(value)} locks, at most {MAX_RULES} allowed")
            return []
        for op, kernel in value.items():
            path = f"kernel_locks[{op!r}]"
            entry = {"operation": op, "kernel": kernel}
            rule = lock_rule(entry, path, f"{label}: {path}", problems, registry)
            if rule is not None:
                rules.append(rule)
        return rules
    for i, entry in enumerate(section_list(data, "kernel_locks", problems)):
        rule = lock_rule(entry, f"kernel_locks[{i}]", f"{label}: kernel_locks[{i}]", problems, registry)
        if rule is not None:
            rules.append(rule)
    return rules


def _filters(data: Mapping[str, Any], key: str, kind: str, label: str, problems: Problems,
             registry: KernelRegistry | None) -> list[Rule]:
    """``kernel_allows`` / ``kernel_denies``: kernel-id globs, or policy-style entries."""
    rules: list[Rule] = []
    globs: list[str] = []
    for i, entry in enumerate(section_list(data, key, problems)):
        path = f"{key}[{i}]"
        if isinstance(entry, str):
            name = check_name(entry, path, problems, "kernel")
            if name is not None:
                check_kernel(name, path, problems, registry)
                globs.append(name)
            continue
        rule = filter_rule(kind, entry, path, f"{label}: {path}", problems, registry)
        if rule is not None:
            rules.append(rule)
    if globs:
        rules.insert(0, Rule(kind, "*", tuple(globs), (), origin=f"{label}: {key}"))
    return rules


def _chains(data: Mapping[str, Any], label: str, problems: Problems, registry: KernelRegistry | None
            ) -> dict[str, tuple[str, ...]]:
    value = data.get("fallback_chains")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.error("fallback_chains", f"must map operations to lists of kernel ids, got {type_name(value)}")
        return {}
    chains: dict[str, tuple[str, ...]] = {}
    for op, chain in value.items():
        path = f"fallback_chains[{op!r}]"
        if check_name(op, path, problems, "operation") is None:
            continue
        if not isinstance(chain, list) or not chain:
            problems.error(path, f"must be a non-empty list of kernel ids, got {show(chain)}")
            continue
        if len(chain) > MAX_CHAIN:
            problems.error(path, f"has {len(chain)} kernels, at most {MAX_CHAIN} allowed")
            continue
        ids: list[str] = []
        for i, k in enumerate(chain):
            kid = check_name(k, f"{path}[{i}]", problems, "kernel id")
            if kid is None:
                continue
            if is_glob(kid):
                problems.error(f"{path}[{i}]", f"must be one kernel id, not a glob ({kid!r})")
                continue
            if kid in ids:
                problems.error(f"{path}[{i}]", f"kernel {kid!r} is listed twice")
                continue
            check_kernel(kid, f"{path}[{i}]", problems, registry, op)
            ids.append(kid)
        chains[op] = tuple(ids)
    return chains


def _warn_allows(rules: list[Rule], problems: Problems, registry: KernelRegistry | None) -> None:
    """An unconditional allow list that leaves an operation without any kernel is almost always a mistake."""
    allows = [r for r in rules if r.kind == "allow" and r.condition is None and r.operation == "*"]
    if not allows or registry is None:
        return
    by_op: dict[str, list[Any]] = {}
    for spec in registry:
        by_op.setdefault(spec.operation, []).append(spec)
    for op, specs in sorted(by_op.items()):
        if not any(r.targets(s) for r in allows for s in specs):
            problems.warn("kernel_allows", f"no kernel of {op!r} is allowed, so {op} calls will find no kernel")


def validate_config(data: Any, label: str = "dict", *, kernel_registry: KernelRegistry | None = None,
                    unknown_kernels: str = "error") -> tuple[CompiledConfig | None, Problems]:
    """Validate parsed config data and compile it; ``(None, problems)`` when there are errors."""
    problems = Problems(unknown_kernels)
    if not isinstance(data, Mapping):
        problems.error("", f"a config must be a mapping with version: \"1.0\", got {type_name(data)}")
        return None, problems
    check_keys(data, ("version", "description", *CONFIG_SECTIONS), "", problems)
    check_version(data, problems)
    default_priority, fallback = _defaults(data, problems, kernel_registry)
    rules = _dispatch_rules(data, label, default_priority, problems, kernel_registry)
    locks = _locks(data, label, problems, kernel_registry)
    denies = _filters(data, "kernel_denies", "deny", label, problems, kernel_registry)
    allows = _filters(data, "kernel_allows", "allow", label, problems, kernel_registry)
    chains = _chains(data, label, problems, kernel_registry)
    _warn_allows(allows, problems, kernel_registry)
    if problems.errors:
        return None, problems
    prefers: list[Rule] = []
    for r in sorted(rules, key=lambda r: -r.priority):  # stable: equal priorities keep file order
        prefers.append(Rule("prefer", r.operation, (r.kernel,), (), priority=RULE_BAND + r.priority,
                            condition=r.condition, condition_source=r.condition.source if r.condition else None,
                            origin=r.origin))
    for op, chain in chains.items():
        for i, kid in enumerate(chain):
            prefers.append(Rule("prefer", op, (kid,), (), priority=CHAIN_BAND + len(chain) - 1 - i,
                                origin=f"{label}: fallback_chains[{op!r}][{i}]"))
    if fallback is not None:
        prefers.append(Rule("prefer", "*", (fallback,), (), priority=0, origin=f"{label}: defaults.fallback_kernel"))
    policy = Policy(tuple(locks + denies + allows + prefers))
    canonical = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    compiled = CompiledConfig(policy, tuple(rules), MappingProxyType(chains), fallback, default_priority, label,
                              digest, tuple(problems.warnings))
    return compiled, problems


def load_config(source: Any, *, kernel_registry: KernelRegistry | None = None,
                unknown_kernels: str = "error") -> CompiledConfig:
    """Read, validate and compile a config file (path, YAML/JSON text or mapping).

    Raises:
        ConfigError: ``.errors`` lists every problem with its path, for example
            ``dispatch_rules[0].priority: must be between 0 and 1000, got 2000``.
    """
    if kernel_registry is None:
        from layerzero.runtime import get_runtime  # deferred: a lower layer; the runtime only lends its registry

        kernel_registry = get_runtime().kernels
    data, label = read_document(source, error=ConfigError)
    compiled, problems = validate_config(data, label, kernel_registry=kernel_registry,
                                         unknown_kernels=unknown_kernels)
    raise_problems(problems, label, "config", ConfigError)
    if compiled is None:  # unreachable: raise_problems raised for the errors that leave it None
        raise ConfigError(f"{label}: invalid config", source=label)
    return compiled
