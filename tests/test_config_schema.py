"""The dispatch config schema: every error with its path, suffix conditions, safe regexes, compilation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from layerzero.context import SelectionContext
from layerzero.errors import ConfigError
from layerzero.policy.config_schema import (
    CHAIN_BAND,
    RULE_BAND,
    compile_safe_regex,
    load_config,
    validate_config,
)
from layerzero.policy.document import ConfigWarning
from layerzero.policy.model import condition_env
from layerzero.runtime import get_runtime

CONFIG_YAML = """\
version: "1.0"
defaults:
  default_priority: 40
  fallback_kernel: torch_sdpa_math
dispatch_rules:
  - operation: "attention.*"
    conditions:
      batch_size_gte: 4
      dtype: [float32, float64]
      operation_match: "^attention\\\\.(causal|full)$"
    kernel: torch_sdpa_gqa
    priority: 100
  - operation: "attention.*"
    conditions: "seq_len > 64"
    kernel: torch_sdpa_flash_cpu
  - operation: rms_norm
    conditions: {hidden_size_lt: 64}
    kernel: torch_rms_norm_composed
    priority: 10
kernel_denies: ["*_experimental"]
fallback_chains:
  attention.causal: [torch_sdpa, torch_sdpa_flash_cpu]
"""


def ctx(**kw: Any) -> SelectionContext:
    base: dict[str, Any] = dict(dtype=torch.float32, batch_size=1, seq_len=16, num_heads=2, head_dim=16,
                                is_causal=True, layout="BHSD")
    base.update(kw)
    return SelectionContext(**base)


def ranked(policy: Any, operation: str, context: SelectionContext) -> list[str]:
    sel = get_runtime().select(operation, context, policy=policy, use_measurements=False)
    return [k.kernel_id for k in sel.ranked]


def errors_of(data: Any, **kw: Any) -> list[str]:
    compiled, problems = validate_config(data, **kw, kernel_registry=get_runtime().kernels)
    assert (compiled is None) == bool(problems.errors)
    return problems.errors


# -- errors, each with its path ----------------------------------------------------------------------------------

def test_the_documented_error_messages() -> None:
    errors = errors_of({"version": "1.0", "dispatch_rules": [
        {"operation": "attention.*", "kernel": "torch_sdpa", "priority": 2000},
        {"operation": "attention.*", "kernel": 123},
    ]})
    assert errors == ["dispatch_rules[0].priority: must be between 0 and 1000, got 2000",
                      "dispatch_rules[1].kernel: must be a string, got 123"]


def test_every_error_is_collected_with_its_path() -> None:
    errors = errors_of({
        "version": "1.1",
        "defaults": {"default_priority": -1, "fallback_kernel": "nope", "colour": 1},
        "dispatch_rules": [
            {"operation": "attention.*", "kernel": "torch_sdpa", "priority": 1.5, "conditions": {
                "sm_gte": "x", "dtype": ["fp16", "float61"], "platform_match": "(a+)+$", "foo_gt": 1,
                "batch_size_in": 8, "kernel_eq": "torch_sdpa"}},
            {"kernel": "torch_sdpa_*", "condition": "sm > 1"},
            "rule",
            {"operation": "attention.*", "kernel": "torch_sdpa", "conditions": "sm >= 80 and"},
        ],
        "kernel_locks": {"rms_norm": "torch_sdpa", "attention.decode": 7},
        "kernel_allows": [3, {"operation": "rms_norm"}],
        "kernel_denies": "torch_sdpa",
        "fallback_chains": {"rms_norm": ["torch_rms_norm", "torch_rms_norm", "acme_rms"], "silu": []},
        "extras": True,
    })
    assert errors == [
        "extras: unknown key (expected one of: version, description, defaults, dispatch_rules, kernel_locks, "
        "kernel_allows, kernel_denies, fallback_chains)",
        "version: unsupported version '1.1' (supported: 1.0)",
        "defaults.colour: unknown key (expected one of: default_priority, fallback_kernel)",
        "defaults.default_priority: must be between 0 and 1000, got -1",
        "defaults.fallback_kernel: unknown kernel 'nope' (layerzero list shows every kernel)",
        "dispatch_rules[0].priority: must be an int, got 1.5 (a float)",
        "dispatch_rules[0].conditions.sm_gte: cannot compare sm (int) with 'x' (str) using '>='",
        "dispatch_rules[0].conditions.dtype: 'float61' is not a known dtype (known: bfloat16, bool, complex128, "
        "complex64, float16, float32, float64, float8_e4m3fn, float8_e4m3fnuz, float8_e5m2, float8_e5m2fnuz, int16, "
        "int32, int64, int8, uint8)",
        "dispatch_rules[0].conditions.platform_match: a quantifier after a group is not allowed (position 4); "
        "repeat single characters or classes instead",
        "dispatch_rules[0].conditions.foo_gt: unknown condition: expected a field name, optionally with one of the "
        "suffixes _not_in, _match, _gte, _lte, _eq, _ne, _gt, _lt, _in",
        "dispatch_rules[0].conditions.batch_size_in: 'in' needs a list of values, got int",
        "dispatch_rules[1].condition: unknown key (expected one of: operation, kernel, conditions, priority, "
        "description, name); did you mean conditions?",
        "dispatch_rules[1].operation: is required",
        "dispatch_rules[1].kernel: must be one kernel id, not a glob ('torch_sdpa_*')",
        "dispatch_rules[2]: must be a mapping, got 'rule'",
        "dispatch_rules[3].conditions: condition ends where a field or a value was expected at position 12\n"
        "    sm >= 80 and\n                ^",
        "kernel_locks['rms_norm'].kernel: kernel 'torch_sdpa' implements 'attention', not 'rms_norm'",
        "kernel_locks['attention.decode'].kernel: must be a string, got 7",
        "kernel_denies: must be a list of rules, got a string",
        "kernel_allows[0]: must be a mapping, got 3 (an int)",
        "kernel_allows[1]: needs backends and/or kernels (lists of globs)",
        "fallback_chains['rms_norm'][1]: kernel 'torch_rms_norm' is listed twice",
        "fallback_chains['rms_norm'][2]: unknown kernel 'acme_rms' (layerzero list shows every kernel)",
        "fallback_chains['silu']: must be a non-empty list of kernel ids, got a list of 0 entries",
    ]


def test_load_config_raises_one_error_listing_everything(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\ndispatch_rules:\n  - {operation: rms_norm, kernel: 123, priority: 2000}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["dispatch_rules[0].kernel: must be a string, got 123",
                                 "dispatch_rules[0].priority: must be between 0 and 1000, got 2000"]
    assert str(info.value).splitlines() == [
        f"{path}: invalid config (2 errors):",
        "  dispatch_rules[0].kernel: must be a string, got 123",
        "  dispatch_rules[0].priority: must be between 0 and 1000, got 2000",
    ]
    assert isinstance(info.value, ValueError)


def test_unknown_kernels_warn_by_flag() -> None:
    data = {"version": "1.0", "dispatch_rules": [{"operation": "rms_norm", "kernel": "acme_rms_norm"}]}
    with pytest.raises(ConfigError, match=r"dispatch_rules\[0\].kernel: unknown kernel 'acme_rms_norm'"):
        load_config(data)
    with pytest.warns(ConfigWarning, match=r"dict: dispatch_rules\[0\].kernel: unknown kernel 'acme_rms_norm'"):
        compiled = load_config(data, unknown_kernels="warn")
    assert [r.kernel for r in compiled.rules] == ["acme_rms_norm"]
    with pytest.raises(ConfigError, match=r"unknown_kernels must be 'error' or 'warn'"):
        load_config(data, unknown_kernels="ignore")


def test_an_allow_list_that_starves_an_operation_is_a_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config({"version": "1.0", "kernel_allows": ["torch_sdpa*"]})
    messages = [str(w.message) for w in caught if w.category is ConfigWarning]
    assert "dict: kernel_allows: no kernel of 'rms_norm' is allowed, so rms_norm calls will find no kernel" in messages
    assert not any("'attention'" in m for m in messages)


# -- compilation: one policy, one selection engine --------------------------------------------------------------------

def test_rules_chains_and_fallback_kernel_decide_the_order(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text(CONFIG_YAML)
    compiled = load_config(path)
    policy = compiled.policy
    # no rule holds: the chain first, then the rest by priority, the fallback kernel last
    assert ranked(policy, "attention.causal", ctx()) == ["torch_sdpa", "torch_sdpa_flash_cpu", "torch_sdpa_gqa",
                                                         "torch_attention_eager", "torch_sdpa_math"]
    # rule 0 holds (batch >= 4, float32, operation matches)
    assert ranked(policy, "attention.causal", ctx(batch_size=4))[:3] == ["torch_sdpa_gqa", "torch_sdpa",
                                                                        "torch_sdpa_flash_cpu"]
    # both rules hold: priority 100 beats the default priority 40
    assert ranked(policy, "attention.causal", ctx(batch_size=4, seq_len=128))[:2] == ["torch_sdpa_gqa",
                                                                                     "torch_sdpa_flash_cpu"]
    # rule 0 does not hold for float16 (dtype not listed); rule 1 does
    assert ranked(policy, "attention.full", ctx(batch_size=8, seq_len=128, dtype=torch.float16, is_causal=False)
                  )[0] == "torch_sdpa_flash_cpu"
    # operation_match: attention.decode is not matched by the regex
    assert ranked(policy, "attention.decode", ctx(batch_size=8, is_causal=False))[0] == "torch_sdpa"
    assert ranked(policy, "rms_norm", SelectionContext(dtype=torch.float32, hidden_size=32, num_tokens=4)) == [
        "torch_rms_norm_composed", "torch_rms_norm"]
    assert ranked(policy, "rms_norm", SelectionContext(dtype=torch.float32, hidden_size=128, num_tokens=4)) == [
        "torch_rms_norm", "torch_rms_norm_composed"]
    assert compiled.chain_for("attention.causal") == ("torch_sdpa", "torch_sdpa_flash_cpu")
    assert compiled.chain_for("rms_norm") == ()
    assert [r.priority for r in compiled.rules] == [100, 40, 10]
    assert compiled.rules[0].origin == f"{path}: dispatch_rules[0]"


def test_compiled_policy_rules_carry_origins_and_bands() -> None:
    compiled = load_config(CONFIG_YAML)
    kinds = [(r.kind, r.priority, r.origin) for r in compiled.policy.rules]
    assert kinds[0] == ("deny", None, "<text>: kernel_denies")
    assert ("prefer", RULE_BAND + 100, "<text>: dispatch_rules[0]") in kinds
    assert ("prefer", CHAIN_BAND + 1, "<text>: fallback_chains['attention.causal'][0]") in kinds
    assert ("prefer", 0, "<text>: defaults.fallback_kernel") in kinds
    assert compiled.digest == load_config(CONFIG_YAML).digest
    assert compiled.digest != load_config(CONFIG_YAML.replace("priority: 100", "priority: 99")).digest


def test_kernel_locks_allows_denies_forms() -> None:
    compiled = load_config({
        "version": "1.0",
        "kernel_locks": [{"operation": "attention.causal", "kernel": "torch_sdpa_math", "condition": "seq_len > 64"}],
        "kernel_allows": [{"operation": "rms_norm", "kernels": ["torch_rms_norm_composed"]}],
        "kernel_denies": ["torch_sdpa", {"operation": "attention.full", "backends": ["torch"],
                                         "condition": "kernel == 'torch_sdpa_gqa'"}],
    })
    policy = compiled.policy
    assert ranked(policy, "attention.causal", ctx(seq_len=128))[0] == "torch_sdpa_math"
    assert ranked(policy, "attention.causal", ctx())[0] == "torch_sdpa_gqa"              # torch_sdpa denied
    assert "torch_sdpa_gqa" not in ranked(policy, "attention.full", ctx(is_causal=False))
    assert ranked(policy, "rms_norm", SelectionContext(dtype=torch.float32, hidden_size=32)) == [
        "torch_rms_norm_composed"]


@pytest.mark.parametrize("conditions, holds, fails", [
    ({"batch_size": 4}, {"batch_size": 4}, {"batch_size": 5}),
    ({"batch_size_ne": 4}, {"batch_size": 5}, {"batch_size": 4}),
    ({"batch_size_gt": 4}, {"batch_size": 5}, {"batch_size": 4}),
    ({"batch_size_gte": 4}, {"batch_size": 4}, {"batch_size": 3}),
    ({"batch_size_lt": 4}, {"batch_size": 3}, {"batch_size": 4}),
    ({"batch_size_lte": 4}, {"batch_size": 4}, {"batch_size": 5}),
    ({"batch_size_eq": 4}, {"batch_size": 4}, {"batch_size": 2}),
    ({"dtype_in": ["bf16", "float16"]}, {"dtype": torch.bfloat16}, {"dtype": torch.float32}),
    ({"dtype_not_in": ["float32"]}, {"dtype": torch.float16}, {"dtype": torch.float32}),
    ({"dtype": "fp16"}, {"dtype": torch.float16}, {"dtype": torch.bfloat16}),
    ({"sm_gte": 80, "platform": "cuda"}, {"device": "cuda", "compute_capability": 90},
     {"device": "cuda", "compute_capability": 75}),
    ({"is_causal": False}, {"is_causal": False}, {"is_causal": True}),
    ({"seq_len_q_gt": 100}, {"seq_len": 128}, {"seq_len": 16}),
    ({"head_dim_match": "^1"}, {}, {"head_dim": 64}),   # _match needs a string field: rejected below
])
def test_suffix_conditions(conditions: dict[str, Any], holds: dict[str, Any], fails: dict[str, Any]) -> None:
    data = {"version": "1.0", "dispatch_rules": [{"operation": "attention.*", "kernel": "torch_sdpa_math",
                                                  "conditions": conditions}]}
    if "head_dim_match" in conditions:
        assert errors_of(data) == ["dispatch_rules[0].conditions.head_dim_match: _match needs a string field, "
                                   "and head_dim is a int"]
        return
    cond = load_config(data).rules[0].condition
    assert cond is not None
    assert cond(condition_env(ctx(**holds), "attention.causal"))
    assert not cond(condition_env(ctx(**fails), "attention.causal"))


def test_match_searches_string_fields() -> None:
    compiled = load_config({"version": "1.0", "dispatch_rules": [
        {"operation": "*", "kernel": "torch_sdpa_math", "conditions": {"kernel_match": "math$", "operation_match":
                                                                       "causal"}}]})
    cond = compiled.rules[0].condition
    env = condition_env(ctx(), "attention.causal")
    assert cond is not None and not cond(env)               # no candidate kernel in the env
    env.update(kernel="torch_sdpa_math", backend="torch")
    assert cond(env)
    env["operation"] = "attention.full"
    assert not cond(env)
    env.update(operation="attention.causal", kernel="x" * 200 + "math")
    assert not cond(env)                                     # subjects longer than 128 characters never match


# -- regex safety -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [
    "flash", "^torch_.*_v?2$", "attention\\.(causal|full)", "[a-z]+_[0-9]*", "a{1,3}b", "(?:x|y)z", "(?P<n>ab)c",
    ".*flash.*", "x*?y", "\\d+", "a{2}", "{notaquantifier}", "[]a]+", "colou?r",
])
def test_safe_regexes_compile(pattern: str) -> None:
    assert isinstance(compile_safe_regex(pattern), re.Pattern)


@pytest.mark.parametrize("pattern, message", [
    ("(a+)+$", r"quantifier after a group is not allowed"),
    ("(a|aa)*b", r"quantifier after a group is not allowed"),
    ("(x*)*", r"quantifier after a group is not allowed"),
    ("(a)\\1", r"backreferences \(\\1\) are not allowed"),
    ("(?=x)y", r"lookarounds"),
    ("(?<!x)y", r"lookarounds"),
    ("(?i)x", r"flags"),
    ("(?(1)a|b)", r"conditionals"),
    (".*a.*b.*c", r"too many repetitions"),
    ("(a|b)" * 17, r"too many alternatives and repetitions"),   # (a|a)(a|a)... backtracks 2**n ways
    ("a{0,9999}a{0,9999}", r"too many repetitions"),
    ("*a", r"nothing to repeat"),
    ("x" * 201, r"pattern must have 1 to 200 characters"),
    ("", r"pattern must have 1 to 200 characters"),
    ("[abc", r"unterminated character class"),
    ("a\\", r"lone backslash"),
    ("a)", r"invalid regular expression"),
])
def test_dangerous_or_broken_regexes_are_rejected(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_safe_regex(pattern)


def test_json_config_file(tmp_path: Path) -> None:
    path = tmp_path / "kernels.json"
    path.write_text('{"version": "1.0", "kernel_locks": {"rms_norm": "torch_rms_norm_composed"}}')
    compiled = load_config(path)
    assert compiled.policy.to_list() == [
        f"lock rms_norm -> torch_rms_norm_composed ({path}: kernel_locks['rms_norm'])"]
    assert compiled.to_dict()["source"] == str(path)
