"""Selection that knows it is compiling: native kernels first for norms and activations under torch.compile
unless a compiled-mode measurement says an opaque kernel is faster; compiled and eager buckets kept apart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from layerzero.backends.torch.norms import torch_rms_norm
from layerzero.context import SelectionContext
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.selection.engine import Measurement, SelectionEngine
from layerzero.spec import KernelSpec
from layerzero.tuning.buckets import bucket_of


def _opaque_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch_rms_norm(x, weight, eps)  # a stand-in for a Triton kernel Inductor cannot see


@pytest.fixture()
def registries() -> Iterator[tuple[KernelRegistry, BackendRegistry]]:
    kernels, backends = KernelRegistry(), BackendRegistry()
    backends.register("torch", module="torch")
    backends.register("fastlib", module="torch")
    kernels.register(KernelSpec("torch_rms_norm", "rms_norm", "torch", torch_rms_norm, priority=60,
                                compile_native=True))
    kernels.register(KernelSpec("fast_rms_norm", "rms_norm", "fastlib", _opaque_rms_norm, priority=80))
    yield kernels, backends


def _ctx(compiling: bool) -> SelectionContext:
    return SelectionContext(device="cpu", dtype=torch.float16, hidden_size=4096, num_tokens=1024, batch_size=4,
                            compiling=compiling)


def test_eager_ranks_by_priority_and_compile_ranks_the_native_kernel_first(registries) -> None:  # type: ignore[no-untyped-def]
    engine = SelectionEngine(*registries)
    assert engine.select("rms_norm", _ctx(False)).selected.kernel_id == "fast_rms_norm"
    sel = engine.select("rms_norm", _ctx(True))
    assert [s.kernel_id for s in sel.ranked] == ["torch_rms_norm", "fast_rms_norm"]
    assert any("torch.compile" in r for r in sel.decision("torch_rms_norm").rules)


@pytest.mark.parametrize(("opaque_us", "winner"), [(50.0, "fast_rms_norm"), (97.0, "torch_rms_norm"),
                                                   (150.0, "torch_rms_norm")])
def test_a_compiled_measurement_decides(registries, opaque_us: float, winner: str) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []

    def measured(operation: str, ctx: SelectionContext, specs: tuple[KernelSpec, ...]) -> dict[str, Measurement]:
        seen.append(bucket_of(operation, ctx))
        return {"torch_rms_norm": Measurement(100.0, 2.0), "fast_rms_norm": Measurement(opaque_us, 2.0)}

    engine = SelectionEngine(*registries, measurements=measured)
    assert engine.select("rms_norm", _ctx(True)).selected.kernel_id == winner
    assert seen == ["n=1024;hidden=4096;grad=0;compiled=1"]


def test_an_opaque_measurement_alone_does_not_beat_the_native_kernel(registries) -> None:  # type: ignore[no-untyped-def]
    engine = SelectionEngine(*registries, measurements=lambda o, c, s: {"fast_rms_norm": Measurement(1.0)})
    assert engine.select("rms_norm", _ctx(True)).selected.kernel_id == "torch_rms_norm"


def test_compiled_and_eager_buckets_differ_for_every_family() -> None:
    att = SelectionContext(device="cpu", dtype=torch.float16, batch_size=2, seq_len=128, num_heads=8, head_dim=64)
    for operation, ctx in (("attention.causal", att), ("rms_norm", _ctx(False)), ("rope", _ctx(False))):
        eager = bucket_of(operation, ctx)
        compiled = bucket_of(operation, ctx.replace(compiling=True))
        assert not eager.endswith("compiled=1") and compiled == eager + ";compiled=1", (eager, compiled)
