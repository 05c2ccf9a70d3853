"""KernelRegistry and BackendRegistry: registration, lookup by operation and glob, change listeners,
backend availability / version / health, and the global registries the torch backend fills."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.backends.torch import TORCH_KERNEL_IDS
from layerzero.errors import KernelNotFoundError
from layerzero.registry import (
    BackendRegistry,
    KernelRegistry,
    get_global_backend_registry,
    get_global_kernel_registry,
    operation_matches,
)
from layerzero.spec import KernelSpec, ReasonCode


def noop(*args: object) -> None:
    return None


def spec(kid: str, operation: str = "rms_norm", backend: str = "custom", **kw: object) -> KernelSpec:
    return KernelSpec(kid, operation, backend, noop, **kw)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> KernelRegistry:
    return KernelRegistry()


def test_register_get_unregister(registry: KernelRegistry) -> None:
    s = registry.register(spec("custom_rms"))
    assert registry.get("custom_rms") is s and registry.find("custom_rms") is s
    assert "custom_rms" in registry and len(registry) == 1 and list(registry) == [s]
    assert registry.unregister("custom_rms") is s
    assert "custom_rms" not in registry and registry.find("custom_rms") is None


def test_unknown_ids_name_close_matches(registry: KernelRegistry) -> None:
    registry.register(spec("custom_rms_norm"))
    with pytest.raises(KernelNotFoundError, match=r"unknown kernel 'custom_rms_nrom'; did you mean custom_rms_norm\?"):
        registry.get("custom_rms_nrom")
    with pytest.raises(KernelNotFoundError, match="unknown kernel 'nothing_like_it' \\(layerzero list"):
        registry.unregister("nothing_like_it")
    assert isinstance(KernelNotFoundError("x"), LookupError)


def test_duplicate_ids(registry: KernelRegistry) -> None:
    s = registry.register(spec("custom_rms"))
    assert registry.register(s) is s  # the same spec again is a no-op
    with pytest.raises(ValueError, match="kernel 'custom_rms' is already registered \\(pass replace=True"):
        registry.register(spec("custom_rms", priority=90))
    replaced = registry.register(spec("custom_rms", priority=90), replace=True)
    assert registry.get("custom_rms") is replaced and replaced.priority == 90


def test_register_takes_only_specs(registry: KernelRegistry) -> None:
    with pytest.raises(TypeError, match="register\\(\\) takes a KernelSpec, got function"):
        registry.register(noop)  # type: ignore[arg-type]


def test_a_family_spec_serves_its_sub_operations(registry: KernelRegistry) -> None:
    fam = registry.register(spec("custom_attn", "attention"))
    causal = registry.register(spec("custom_causal", "attention.causal"))
    registry.register(spec("custom_other", "attentionx"))
    assert registry.for_operation("attention.causal") == (fam, causal)
    assert registry.for_operation("attention.full") == (fam,)
    assert registry.for_operation("attention") == (fam,)
    assert operation_matches("attention", "attention.decode") and not operation_matches("attention", "attentionx")
    assert not operation_matches("attention.causal", "attention")


def test_match_by_glob_over_ids_and_operations(registry: KernelRegistry) -> None:
    for kid, op in (("custom_b", "attention"), ("custom_a", "attention.causal"), ("fast_rms", "rms_norm")):
        registry.register(spec(kid, op))
    assert [s.kernel_id for s in registry.match("attention*")] == ["custom_a", "custom_b"]
    assert [s.kernel_id for s in registry.match("*rms*")] == ["fast_rms"]
    assert [s.kernel_id for s in registry.match("attention.causal")] == ["custom_a", "custom_b"]
    assert registry.match("nothing*") == []
    assert registry.operations() == ["attention", "attention.causal", "rms_norm"]


def test_changes_bump_the_version_and_call_listeners(registry: KernelRegistry) -> None:
    seen: list[int] = []
    registry.add_listener(lambda: seen.append(registry.version))
    registry.register(spec("custom_a"))
    registry.register(spec("custom_a"))  # unchanged: no event
    registry.unregister("custom_a")
    assert seen == [1, 2]
    # lookups made before a change are not served stale afterwards
    assert registry.for_operation("rms_norm") == ()
    registry.register(spec("custom_b"))
    assert [s.kernel_id for s in registry.for_operation("rms_norm")] == ["custom_b"]


def test_decorator_registration(registry: KernelRegistry) -> None:
    @registry.kernel(operation="rms_norm", backend="custom", priority=90, dtypes={torch.float16})
    def fused_rms(x, weight, eps):  # type: ignore[no-untyped-def]
        return x

    @registry.kernel(operation="silu", backend="custom", kernel_id="my_silu")
    def custom_silu(x):  # type: ignore[no-untyped-def]
        return x

    assert fused_rms(1, None, 0) == 1  # the function itself comes back
    s = registry.get("custom_fused_rms")  # prefixed by its backend
    assert (s.priority, s.dtypes, s.impl) == (90, frozenset({torch.float16}), fused_rms)
    assert registry.get("my_silu").impl is custom_silu


# -- backends -------------------------------------------------------------------------------------

def test_missing_library_is_unavailable_with_the_install_command() -> None:
    backends = BackendRegistry()
    backends.register("fakelib", module="layerzero_fakelib_not_installed", pip="pip install fakelib")
    info = backends.info("fakelib")
    assert not info.available and info.version is None
    assert info.reason == "python package 'layerzero_fakelib_not_installed' is not installed"
    reason = backends.unavailable_reason("fakelib")
    assert reason is not None and reason.code == ReasonCode.BACKEND_UNAVAILABLE
    assert str(reason) == ("fakelib is not available: python package 'layerzero_fakelib_not_installed' is not "
                           "installed (install with: pip install fakelib)")
    assert info.to_dict()["pip"] == "pip install fakelib"


def test_installed_library_reports_its_version() -> None:
    backends = BackendRegistry()
    backends.register("torchy", module="torch", pip="pip install torch")
    info = backends.info("torchy")
    assert info.available
    assert info.version in (torch.__version__, torch.__version__.split("+")[0])
    assert backends.unavailable_reason("torchy") is None
    assert backends.names() == ["torchy"] and [b.name for b in backends.all()] == ["torchy"]


def test_probes_and_health() -> None:
    backends = BackendRegistry()
    backends.register("needs_gpu", probe=lambda: "no CUDA device")
    backends.register("broken_probe", probe=lambda: 1 / 0)
    backends.register("fine", probe=lambda: None)
    assert backends.info("needs_gpu").reason == "no CUDA device"
    assert backends.info("broken_probe").reason == "probe failed: ZeroDivisionError: division by zero"
    assert backends.is_available("fine")
    events: list[int] = []
    backends.add_listener(lambda: events.append(backends.version))
    backends.mark_unhealthy("fine", "self-test returned NaN")
    reason = backends.unavailable_reason("fine")
    assert reason is not None and reason.code == ReasonCode.BACKEND_UNHEALTHY
    assert str(reason) == "fine is marked unhealthy: self-test returned NaN"
    backends.mark_healthy("fine")
    assert backends.unavailable_reason("fine") is None
    assert len(events) == 2


def test_an_undeclared_backend_is_a_user_backend_and_available() -> None:
    info = BackendRegistry().info("my_team")
    assert info.available and info.reason is None


# -- the global registries ------------------------------------------------------------------------

def test_global_registries_hold_the_torch_backend() -> None:
    kernels, backends = get_global_kernel_registry(), get_global_backend_registry()
    assert kernels is lz.get_global_kernel_registry() and backends is lz.get_global_backend_registry()
    assert set(TORCH_KERNEL_IDS) <= {s.kernel_id for s in kernels}
    assert all(kernels.get(k).backend == "torch" for k in TORCH_KERNEL_IDS)
    assert backends.info("torch").available
    for kid in TORCH_KERNEL_IDS:  # naming rule: ids are prefixed by their backend
        assert kid.startswith("torch_")


def test_register_kernel_call_and_decorator_on_the_global_registry() -> None:
    s = lz.register_kernel(spec("custom_global_rms"))
    try:
        assert get_global_kernel_registry().get("custom_global_rms") is s
        assert lz.register_kernel(spec("custom_global_rms", priority=80), replace=True).priority == 80
    finally:
        get_global_kernel_registry().unregister("custom_global_rms")

    @lz.register_kernel(operation="gelu", backend="custom")
    def custom_gelu_global(x, approximate):  # type: ignore[no-untyped-def]
        return x

    try:
        assert "custom_gelu_global" in get_global_kernel_registry()
    finally:
        get_global_kernel_registry().unregister("custom_gelu_global")


def test_a_health_change_during_a_probe_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe (an import: slow) that read the health before ``mark_unhealthy`` / ``mark_healthy`` must not store
    its answer after the change: it stayed until the next change, and selection memoized it (found by a
    threaded probe: about 30% of flips)."""
    import threading

    backends = BackendRegistry()
    backends.register("custom")
    reading, release = threading.Event(), threading.Event()
    probe = backends._probe

    def slow_probe(name: str):  # type: ignore[no-untyped-def]
        got = probe(name)  # reads the health now ...
        reading.set()
        release.wait(5)  # ... and answers after the change below
        return got

    monkeypatch.setattr(backends, "_probe", slow_probe)
    seen = []
    t = threading.Thread(target=lambda: seen.append(backends.info("custom").healthy))
    t.start()
    assert reading.wait(5)
    backends.mark_unhealthy("custom", "failed its self-test")
    release.set()
    t.join(5)
    assert seen == [True]  # that call's own answer, read before the change
    monkeypatch.setattr(backends, "_probe", probe)
    assert backends.info("custom").healthy is False
    assert backends.unavailable_reason("custom").code == ReasonCode.BACKEND_UNHEALTHY  # type: ignore[union-attr]
