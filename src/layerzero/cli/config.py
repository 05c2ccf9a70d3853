"""``layerzero config validate FILE`` and ``layerzero config fields``.

``validate`` checks a dispatch config (``dispatch_rules``, ``kernel_locks``,
``fallback_chains``, ...) or a policy document (``locks``, ``allows``,
``denies``, ``boosts``) exactly as loading it would, against this machine's
kernel registry, and prints every error with its path. Exit codes: 0 valid
(a summary is printed), 1 any error, 2 usage error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

__all__ = ["register", "config_group", "validate_file"]


def validate_file(path: str, *, unknown_kernels: str = "error") -> dict[str, Any]:
    """Validate ``path`` and return a report: ``file``, ``kind``, ``valid``, ``errors``, ``warnings``, ``summary``."""
    from layerzero.errors import ConfigError
    from layerzero.policy.config_schema import CONFIG_SECTIONS, validate_config
    from layerzero.policy.document import POLICY_SECTIONS, read_document, validate_policy
    from layerzero.runtime import get_runtime

    report: dict[str, Any] = {"file": path, "kind": "config", "valid": False, "errors": [], "warnings": [],
                              "summary": {}}
    try:
        data, label = read_document(Path(path), error=ConfigError)  # a Path is always read as a file
    except ConfigError as err:
        report["errors"] = list(err.errors)
        return report
    registry = get_runtime().kernels
    is_policy = isinstance(data, Mapping) and any(k in data for k in POLICY_SECTIONS) and \
        not any(k in data for k in CONFIG_SECTIONS)
    if is_policy:
        report["kind"] = "policy"
        policy, problems = validate_policy(data, label, kernel_registry=registry, unknown_kernels=unknown_kernels)
        if not problems.errors:
            counts = {kind: sum(1 for r in policy.rules if r.kind == kind) for kind in ("lock", "allow", "deny", "boost")}
            report["summary"] = {"rules": len(policy.rules), **counts, "digest": policy.digest}
    else:
        compiled, problems = validate_config(data, label, kernel_registry=registry, unknown_kernels=unknown_kernels)
        if compiled is not None:
            kinds = [r.kind for r in compiled.policy.rules]
            report["summary"] = {
                "dispatch_rules": len(compiled.rules), "locks": kinds.count("lock"), "allows": kinds.count("allow"),
                "denies": kinds.count("deny"), "fallback_chains": len(compiled.fallback_chains),
                "policy_rules": len(kinds), "digest": compiled.digest,
            }
    report["errors"] = list(problems.errors)
    report["warnings"] = list(problems.warnings)
    report["valid"] = not problems.errors
    return report


def _text(report: dict[str, Any]) -> str:
    lines: list[str] = []
    name, kind = report["file"], report["kind"]
    if report["valid"]:
        s = report["summary"]
        if kind == "policy":
            body = (f"{_n(s['rules'], 'rule')}: {_n(s['lock'], 'lock')}, {_n(s['allow'], 'allow')}, "
                    f"{_n(s['deny'], 'deny', 'denies')}, {_n(s['boost'], 'boost')}")
        else:
            body = (f"{_n(s['dispatch_rules'], 'dispatch rule')}, {_n(s['locks'], 'lock')}, "
                    f"{_n(s['allows'], 'allow')}, {_n(s['denies'], 'deny', 'denies')}, "
                    f"{_n(s['fallback_chains'], 'fallback chain')}")
        lines.append(f"{name}: valid {kind} ({body}; digest {s['digest']})")
    else:
        n = len(report["errors"])
        lines.append(f"{name}: invalid {kind} ({n} error{'s' if n != 1 else ''}):")
        lines.extend(_indent(e) for e in report["errors"])
    if report["warnings"]:
        lines.append(f"warnings ({len(report['warnings'])}):")
        lines.extend(_indent(w) for w in report["warnings"])
    return "\n".join(lines)


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


@click.group("config")
def config_group() -> None:
    """Check config and policy files."""


@config_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.option("--warn-unknown-kernels", is_flag=True, help="Report kernel ids this machine does not know as "
                                                           "warnings instead of errors.")
@click.pass_context
def validate_command(ctx: click.Context, file: str, as_json: bool, warn_unknown_kernels: bool) -> None:
    """Validate FILE (YAML or JSON): every error with its path; exit 1 on any error."""
    report = validate_file(file, unknown_kernels="warn" if warn_unknown_kernels else "error")
    click.echo(json.dumps(report, indent=2) if as_json else _text(report))
    if not report["valid"]:
        ctx.exit(1)


@config_group.command("fields")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def fields_command(as_json: bool) -> None:
    """The fields conditions may use, with their types."""
    from layerzero.policy.conditions import describe_fields

    rows = describe_fields()
    if as_json:
        click.echo(json.dumps([{"name": n, "type": t, "description": d} for n, t, d in rows], indent=2))
        return
    width = max(len(n) for n, _, _ in rows)
    twidth = max(len(t) for _, t, _ in rows)
    for name, kind, doc in rows:
        click.echo(f"{name:<{width}}  {kind:<{twidth}}  {doc}")


def register(cli: click.Group) -> None:
    """Add the ``config`` group to the ``layerzero`` command group."""
    cli.add_command(config_group)
