"""Policy documents: the schema of YAML or JSON files (or dicts) with locks, allows, denies and boosts.

``lz.configure("policy.yaml")`` loads one through :func:`load_policy`::

    version: "1.0"
    locks:                                  # always run these operations on one kernel / backend
      - operation: "attention.*"
        kernel: torch_sdpa_flash
        condition: "sm >= 80 and dtype in ('float16', 'bfloat16')"
    denies:                                 # never run these
      - operation: "*"
        backends: ["xformers"]
        kernels: ["*_experimental"]
    allows:                                 # when present, only these may run (per operation)
      - operation: "rms_norm"
        backends: ["torch", "liger"]
    boosts:                                 # multiply a kernel's score (divide its measured time)
      - operation: "attention.*"
        backend: torch
        boost_factor: 2.0
        condition: "seq_len > 1024"

Every rule becomes a :class:`layerzero.policy.model.Rule` whose ``origin`` names
its place (``policy.yaml: locks[0]``), so traces say which rule fired. Validation
collects every problem with its path and raises them together as one
:class:`~layerzero.errors.PolicyError`; nothing of an invalid document is
applied. A dispatch config (:mod:`layerzero.config_file.schema`) given here is
compiled into the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from layerzero.config_file.load import read_document
from layerzero.config_file.problems import Problems, raise_problems
from layerzero.config_file.rules import boost_rule, filter_rule, lock_rule
from layerzero.config_file.schema import CONFIG_SECTIONS, validate_config
from layerzero.config_file.validate import check_keys, check_version, section_list, type_name
from layerzero.errors import PolicyError
from layerzero.policy.model import Policy, Rule
from layerzero.registry import KernelRegistry

__all__ = ["load_policy", "validate_policy", "POLICY_SECTIONS"]

POLICY_SECTIONS = ("locks", "allows", "denies", "boosts")


def validate_policy(data: Any, label: str = "dict", *, kernel_registry: KernelRegistry | None = None,
                    unknown_kernels: str = "error") -> tuple[Policy, Problems]:
    """Validate parsed policy data; returns the policy (meaningful only without errors) and the problems."""
    problems = Problems(unknown_kernels)
    if not isinstance(data, Mapping):
        problems.error("", f"a policy document must be a mapping with version: \"1.0\", got {type_name(data)}")
        return Policy(()), problems
    check_keys(data, ("version", "description", *POLICY_SECTIONS), "", problems)
    check_version(data, problems)
    if "description" in data and not isinstance(data["description"], str):
        problems.error("description", f"must be a string, got {type_name(data['description'])}")
    rules: list[Rule] = []
    for key in POLICY_SECTIONS:
        for i, entry in enumerate(section_list(data, key, problems)):
            path = f"{key}[{i}]"
            origin = f"{label}: {path}"
            if key == "locks":
                rule = lock_rule(entry, path, origin, problems, kernel_registry)
            elif key == "boosts":
                rule = boost_rule(entry, path, origin, problems, kernel_registry)
            else:
                rule = filter_rule("deny" if key == "denies" else "allow", entry, path, origin, problems,
                                   kernel_registry)
            if rule is not None:
                rules.append(rule)
    return Policy(tuple(rules)), problems


def load_policy(source: str | os.PathLike[str] | Mapping[str, Any], *, kernel_registry: KernelRegistry | None = None,
                unknown_kernels: str = "error") -> Policy:
    """Load and validate a policy document; used by ``lz.configure``.

    Args:
        source: a path (YAML or ``.json``), YAML/JSON text, or a mapping.
        kernel_registry: where named kernels are looked up (the global runtime's registry by default).
        unknown_kernels: ``"error"`` (default) or ``"warn"`` (a :class:`ConfigWarning` per unknown kernel id).

    A dispatch config (SPEC section 4: ``dispatch_rules``, ``kernel_locks``, ``fallback_chains``, ...) is
    accepted too and compiled into the same rules (see :mod:`layerzero.config_file.schema`).

    Raises:
        PolicyError: with ``.errors`` listing every problem, each prefixed by its path.

    Example:
        >>> load_policy({"version": "1.0", "denies": [{"operation": "*", "kernels": ["torch_sdpa_math"]}]})
    """
    if kernel_registry is None:
        from layerzero.runtime import get_runtime  # deferred: a lower layer; the runtime only lends its registry

        kernel_registry = get_runtime().kernels
    data, label = read_document(source, error=PolicyError)
    if isinstance(data, Mapping) and any(k in data for k in CONFIG_SECTIONS) and \
            not any(k in data for k in POLICY_SECTIONS):
        compiled, problems = validate_config(data, label, kernel_registry=kernel_registry,
                                             unknown_kernels=unknown_kernels)
        policy = compiled.policy if compiled is not None else Policy(())
    else:
        policy, problems = validate_policy(data, label, kernel_registry=kernel_registry,
                                           unknown_kernels=unknown_kernels)
    raise_problems(problems, label, "policy", PolicyError)
    return policy
