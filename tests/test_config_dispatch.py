"""CONFIG dispatch: rules, locks, allows, denies, fallback chains, caching per shape, precedence, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import layerzero as lz
from layerzero.cli import cli
from layerzero.context import SelectionContext
from layerzero.dispatch import DispatchConfig, DispatchMode, create_config_dispatcher, create_orchestrator
from layerzero.dispatch.config_driven import ConfigDrivenDispatcher
from layerzero.errors import ConfigError, KernelNotSupportedError
from layerzero.ops.attention import attention_reference
from layerzero.policy.config_schema import load_config
from layerzero.policy.document import ConfigWarning
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.spec import KernelSpec

EPS = 1e-6


def rms_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def rows(n: int = 4, hidden: int = 32, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, hidden, generator=g), "weight": torch.randn(hidden, generator=g) + 1.5, "eps": EPS}


def qkv(batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(zip(("query", "key", "value"), (torch.randn(batch, 2, seq, 16, generator=g) for _ in range(3))))


class Custom:
    """A private registry with three recording rms_norm kernels (a failing one on request)."""

    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        self.kernels = KernelRegistry()
        self.backends = BackendRegistry()
        self.calls: list[str] = []
        for name, priority in (("custom_a", 50), ("custom_b", 40), ("custom_c", 90)):
            self.kernels.register(KernelSpec(name, "rms_norm", "custom", self._impl(name, name in failing),
                                             priority=priority))

    def _impl(self, name: str, fail: bool) -> Any:
        def impl(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
            self.calls.append(name)
            if fail:
                raise RuntimeError(f"{name} is broken")
            return F.rms_norm(x, x.shape[-1:], weight, eps)
        return impl

    def dispatcher(self, tmp_path: Path, text: str, **kw: Any) -> ConfigDrivenDispatcher:
        path = tmp_path / "kernels.yaml"
        path.write_text(text)
        return create_config_dispatcher(config_path=path, kernel_registry=self.kernels,
                                        backend_registry=self.backends, **kw)


CONFIG = """\
version: "1.0"
dispatch_rules:
  - operation: "attention.*"
    conditions: {batch_size_gte: 4, seq_len_gte: 32}
    kernel: torch_sdpa_math
    priority: 100
  - operation: rms_norm
    conditions: {hidden_size_lt: 64, dtype: float32}
    kernel: torch_rms_norm_composed
kernel_denies: ["torch_sdpa"]
fallback_chains:
  attention.causal: [torch_sdpa_gqa, torch_sdpa_flash_cpu]
"""


def test_rules_decide_per_shape_and_results_are_correct(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text(CONFIG)
    d = create_config_dispatcher(config_path=str(path))
    assert d.mode is DispatchMode.CONFIG
    small = rows(hidden=32)
    r = d.dispatch("rms_norm", small)
    torch.testing.assert_close(r.output.double(), rms_ref(small["x"], small["weight"]), atol=1e-5, rtol=1e-5)
    assert (r.kernel_id, r.mode) == ("torch_rms_norm_composed", "config")
    assert d.dispatch("rms_norm", rows(hidden=128)).kernel_id == "torch_rms_norm"
    big = qkv(batch=4, seq=32)
    r = d.dispatch("attention.causal", big)
    assert r.kernel_id == "torch_sdpa_math"
    ref = attention_reference(big["query"], big["key"], big["value"], is_causal=True)
    torch.testing.assert_close(r.output.double(), ref, atol=1e-5, rtol=1e-5)
    assert d.dispatch("attention.causal", qkv()).kernel_id == "torch_sdpa_gqa"         # the chain's first
    assert d.dispatch("attention.full", qkv()).kernel_id == "torch_sdpa_gqa"           # torch_sdpa denied: 68 next
    assert lz.which("attention.full", *qkv().values()) == "torch_sdpa"                 # lz.* is unaffected


def test_rules_are_evaluated_once_per_shape(tmp_path: Path) -> None:
    c = Custom()
    d = c.dispatcher(tmp_path, 'version: "1.0"\ndispatch_rules:\n'
                               '  - {operation: rms_norm, kernel: custom_a, conditions: {hidden_size_lt: 64}}\n')
    selections = d.runtime.telemetry.selections
    results = [d.dispatch("rms_norm", rows(seed=i)) for i in range(5)]
    assert [r.cached for r in results] == [False, True, True, True, True]
    assert {r.kernel_id for r in results} == {"custom_a"}
    assert selections == {("rms_norm", "custom_a"): 1}          # one selection (rule evaluation) for 5 calls
    assert d.dispatch("rms_norm", rows(hidden=128)).kernel_id == "custom_c"   # a new shape, the rule fails
    assert selections == {("rms_norm", "custom_a"): 1, ("rms_norm", "custom_c"): 1}
    assert d.plan_cache.stats()[0] == 2


def test_fallback_chain_decides_the_fallback_order(tmp_path: Path) -> None:
    c = Custom(failing=("custom_a",))
    d = c.dispatcher(tmp_path, 'version: "1.0"\nfallback_chains:\n  rms_norm: [custom_a, custom_b, custom_c]\n')
    data = rows()
    r = d.dispatch("rms_norm", data)
    assert (r.kernel_id, r.fallback_used, r.attempts) == ("custom_b", True, 2)
    torch.testing.assert_close(r.output.double(), rms_ref(data["x"], data["weight"]), atol=1e-5, rtol=1e-5)
    assert c.calls == ["custom_a", "custom_b"]                  # custom_c (priority 90) comes after the chain
    sel = d.select("rms_norm", SelectionContext(dtype=torch.float32, hidden_size=32, num_tokens=4))
    assert [k.kernel_id for k in sel.ranked] == ["custom_a", "custom_b", "custom_c"]


def test_locks_allows_denies_in_config(tmp_path: Path) -> None:
    c = Custom()
    d = c.dispatcher(tmp_path, 'version: "1.0"\nkernel_denies: [custom_c]\n')
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_a"
    d = c.dispatcher(tmp_path, 'version: "1.0"\nkernel_allows: [custom_b]\n')
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"
    d = c.dispatcher(tmp_path, 'version: "1.0"\nkernel_locks: {rms_norm: custom_b}\nkernel_denies: [custom_b]\n')
    assert d.dispatch("rms_norm", rows()).kernel_id == "custom_b"   # a lock decides before deny/allow


def test_code_beats_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm_composed}\n')
    d = create_config_dispatcher(config_path=path)
    assert d.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm_composed"
    with lz.lock("rms_norm", "torch_rms_norm"):
        assert d.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm"
    assert d.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm_composed"
    lz.lock("rms_norm", "torch_rms_norm")                        # process-wide: drops the dispatcher's plans
    assert d.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm"
    lz.unlock("rms_norm")
    assert d.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm_composed"
    lz.configure({"version": "1.0", "locks": [{"operation": "rms_norm", "kernel": "torch_rms_norm"}]})
    assert d.dispatch("rms_norm", rows()).kernel_id == "torch_rms_norm_composed"   # the file beats lz.configure


def test_lock_that_cannot_run_names_the_config_rule(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {attention.causal: torch_sdpa_flash}\n')
    d = create_config_dispatcher(config_path=path)
    with pytest.raises(KernelNotSupportedError, match=r"kernels.yaml: kernel_locks\['attention.causal'\].*"
                                                      r"device is cpu, kernel runs on cuda"):
        d.dispatch("attention.causal", qkv())


def test_a_plan_from_a_replaced_config_is_never_cached(tmp_path: Path) -> None:
    c = Custom()
    d = c.dispatcher(tmp_path, 'version: "1.0"\nkernel_locks: {rms_norm: custom_a}\n')
    new = load_config('version: "1.0"\nkernel_locks: {rms_norm: custom_b}\n', kernel_registry=c.kernels)
    swapped: list[bool] = []

    def swap_during_the_first_call(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        if not swapped:
            swapped.append(d._swap(new))   # a reload lands while this call (on the old config) runs
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    c.kernels.register(KernelSpec("custom_a", "rms_norm", "custom", swap_during_the_first_call, priority=50),
                       replace=True)
    first = d.dispatch("rms_norm", rows())
    assert (first.kernel_id, swapped) == ("custom_a", [True])   # the call finished on the config it started with
    second = d.dispatch("rms_norm", rows())
    assert (second.kernel_id, second.cached) == ("custom_b", False)
    assert d.dispatch("rms_norm", rows()).cached


def test_explicit_context_is_judged_by_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text(CONFIG)
    d = create_config_dispatcher(config_path=path)
    ctx = SelectionContext(dtype=torch.float32, batch_size=8, seq_len=64, num_heads=2, head_dim=16, is_causal=True,
                           layout="BHSD")
    assert d.dispatch("attention.causal", qkv(), context=ctx).kernel_id == "torch_sdpa_math"


def test_config_path_from_dispatch_config_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text(CONFIG)
    c = Custom()
    with warnings.catch_warnings(record=True) as caught:   # this registry has none of the torch kernels
        warnings.simplefilter("always")
        d = create_config_dispatcher(kernel_registry=c.kernels, backend_registry=c.backends, unknown_kernels="warn",
                                     config=DispatchConfig(mode=DispatchMode.CONFIG, config_path=str(path)))
    assert len(caught) == 5 and all(w.category is ConfigWarning for w in caught)
    assert "dispatch_rules[0].kernel: unknown kernel 'torch_sdpa_math'" in str(caught[0].message)
    assert d.compiled.source == str(path)
    monkeypatch.setenv("LAYERZERO_CONFIG", str(path))
    assert create_config_dispatcher().compiled.digest == d.compiled.digest
    monkeypatch.delenv("LAYERZERO_CONFIG")
    with pytest.raises(ConfigError, match=r"needs a config: pass config_path=\.\.\., set DispatchConfig.config_path"):
        create_config_dispatcher()


def test_invalid_or_missing_config_fails_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\ndispatch_rules:\n  - {operation: rms_norm, kernel: 123, priority: 2000}\n')
    with pytest.raises(ConfigError) as info:
        create_config_dispatcher(config_path=path)
    assert info.value.errors == ["dispatch_rules[0].kernel: must be a string, got 123",
                                 "dispatch_rules[0].priority: must be between 0 and 1000, got 2000"]
    with pytest.raises(ConfigError, match=r"missing.yaml: file not found"):
        create_config_dispatcher(config_path=tmp_path / "missing.yaml")


def test_orchestrator_routes_config_mode(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm_composed}\n')
    o = create_orchestrator(DispatchConfig(mode=DispatchMode.CONFIG, config_path=str(path)))
    r = o.dispatch("rms_norm", rows())
    assert (r.kernel_id, r.mode) == ("torch_rms_norm_composed", "config")


def test_mvcc_cache_option(tmp_path: Path) -> None:
    c = Custom()
    d = c.dispatcher(tmp_path, 'version: "1.0"\nkernel_locks: {rms_norm: custom_b}\n', use_mvcc_cache=True)
    assert [d.dispatch("rms_norm", rows()).cached for _ in range(3)] == [False, True, True]
    assert type(d.plan_cache).__name__ == "MVCCPlanCache"


# -- the CLI -----------------------------------------------------------------------------------------------------

def test_cli_config_validate_errors_and_summary(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('version: "1.0"\ndispatch_rules:\n  - {operation: "attention.*", kernel: 123, priority: 2000}\n')
    runner = CliRunner()
    res = runner.invoke(cli, ["config", "validate", str(bad)])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"{bad}: invalid config (2 errors):",
        "  dispatch_rules[0].kernel: must be a string, got 123",
        "  dispatch_rules[0].priority: must be between 0 and 1000, got 2000",
    ]
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG)
    res = runner.invoke(cli, ["config", "validate", str(good)])
    assert res.exit_code == 0, res.output
    digest = load_config(good).digest
    assert res.output.strip() == (f"{good}: valid config (2 dispatch rules, 0 locks, 0 allows, 1 deny, "
                                  f"1 fallback chain; digest {digest})")
    res = runner.invoke(cli, ["config", "validate", "--json", str(bad)])
    report = json.loads(res.output)
    assert (res.exit_code, report["valid"], report["kind"], len(report["errors"])) == (1, False, "config", 2)


def test_cli_validates_policy_documents_and_unknown_kernel_flag(tmp_path: Path) -> None:
    doc = tmp_path / "policy.yaml"
    doc.write_text('version: "1.0"\nlocks:\n  - {operation: rms_norm, kernel: acme_rms}\n'
                   'boosts:\n  - {backend: torch, boost_factor: 2}\n')
    runner = CliRunner()
    res = runner.invoke(cli, ["config", "validate", str(doc)])
    assert res.exit_code == 1
    assert "locks[0].kernel: unknown kernel 'acme_rms'" in res.output
    res = runner.invoke(cli, ["config", "validate", "--warn-unknown-kernels", str(doc)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith(f"{doc}: valid policy (2 rules: 1 lock, 0 allows, 0 denies, 1 boost")
    assert "warnings (1):" in res.output
    res = runner.invoke(cli, ["config", "validate", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1 and "file not found" in res.output
    res = runner.invoke(cli, ["config", "fields"])
    assert res.exit_code == 0 and res.output.splitlines()[0].split()[:2] == ["platform", "str"]
