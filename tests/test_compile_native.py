"""torch.compile: PyTorch's own kernels traced natively, other kernels as one opaque node with a real backward,
and the trace-time choice guarded on the runtime's version (a policy change recompiles)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd

import layerzero as lz
from layerzero.backends.torch.attention import flash_cpu_backward, flash_cpu_fake, flash_cpu_forward
from layerzero.backends.torch.attention_specs import FLASH_CPU_PAIR
from layerzero.integrations import compile as lzc
from layerzero.ops.attention import attention_reference
from layerzero.spec import KernelSpec, ResidualPair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

lzc.install()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    torch._dynamo.reset()
    lz.get_runtime().reset()
    yield
    torch._dynamo.reset()
    lz.get_runtime().reset()


class Graphs:
    """A Dynamo backend that keeps each Dynamo graph and each AOT forward/backward graph it compiles."""

    def __init__(self) -> None:
        self.dynamo: list[torch.fx.GraphModule] = []
        self.aot: list[torch.fx.GraphModule] = []

        def keep(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
            self.aot.append(gm)
            return gm.forward

        self._aot = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.dynamo.append(gm)
        return self._aot(gm, example_inputs)

    @staticmethod
    def targets(gm: torch.fx.GraphModule) -> list[str]:
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _op_counts(fn: Callable[[], Any]) -> Counter[str]:
    """How often each aten / layerzero op ran during ``fn()`` (the profiler, which leaves Dynamo alone)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return Counter({e.key: e.count for e in prof.key_averages()})


class Block(torch.nn.Module):
    """A small pre-norm transformer block written with lz.* ops (GQA attention, RMSNorm, SwiGLU MLP)."""

    def __init__(self, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, hidden // heads
        self.norm1 = torch.nn.Parameter(torch.rand(hidden) + 0.5)
        self.norm2 = torch.nn.Parameter(torch.rand(hidden) + 0.5)
        self.q = torch.nn.Linear(hidden, hidden, bias=False)
        self.kv = torch.nn.Linear(hidden, 2 * kv_heads * self.d, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = torch.nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        n = lz.rms_norm(x, self.norm1)
        q = self.q(n).view(b, s, self.heads, self.d)
        k, v = self.kv(n).view(b, s, 2, self.kv_heads, self.d).unbind(2)
        a = lz.attention(q, k, v, is_causal=True, layout="BSHD").reshape(b, s, h)
        x = x + self.o(a)
        gate, up = self.gate_up(lz.rms_norm(x, self.norm2)).chunk(2, dim=-1)
        return x + self.down(lz.swiglu(gate.contiguous(), up.contiguous()))


def _model(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(Block() for _ in range(layers)))


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _compiled_step(backend: Any) -> Callable[[torch.nn.Module, torch.Tensor], None]:
    """A training step whose forward and loss are compiled (fullgraph), then the compiled backward."""
    loss = torch.compile(_loss, backend=backend, fullgraph=True)
    return lambda model, x: loss(model, x).backward()


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    _loss(model, x).backward()


def test_native_kernels_are_traced_as_pytorch_code_not_custom_ops() -> None:
    graphs = Graphs()
    model = _model(1)
    x = torch.randn(2, 8, 32)
    _compiled_step(graphs)(model, x)
    dynamo = [t for g in graphs.dynamo for t in Graphs.targets(g)]
    aot = [t for g in graphs.aot for t in Graphs.targets(g)]
    assert not any("layerzero" in t for t in dynamo + aot), dynamo
    assert any("rms_norm" in t for t in dynamo), dynamo  # torch.rms_norm, which AOT decomposes (rsqrt, mean)
    assert any("scaled_dot_product" in t for t in aot) and any("rsqrt" in t for t in aot), aot
    assert any("silu" in t for t in aot), aot  # torch_swiglu traced: silu and mul, which Inductor fuses


def test_compiled_training_step_matches_eager() -> None:
    x = torch.randn(2, 8, 32)
    eager, compiled = _model(), _model()
    _step(eager, x)
    _compiled_step("inductor")(compiled, x)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def _attention_kernel_calls(counts: Counter[str]) -> tuple[int, int]:
    """(forward, backward) calls of the fused SDPA kernels (``aten::_scaled_dot_product_*``)."""
    ops = [(op, n) for op, n in counts.items() if op.startswith("aten::_scaled_dot_product_")]
    return sum(n for op, n in ops if "backward" not in op), sum(n for op, n in ops if "backward" in op)


def _assert_each_attention_forward_runs_once(backend: str, device: str, dtype: torch.dtype) -> None:
    layers = 2
    model = _model(layers).to(device, dtype)
    x = torch.randn(2, 64, 32, device=device, dtype=dtype)
    step = _compiled_step(backend)
    step(model, x)  # compile outside the profiler
    counts = _op_counts(lambda: step(model, x))
    assert _attention_kernel_calls(counts) == (layers, layers), counts
    assert not any("layerzero" in op for op in counts), counts


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_runs_each_attention_forward_once(backend: str) -> None:
    _assert_each_attention_forward_runs_once(backend, "cpu", torch.float32)


@pytest.mark.gpu
def test_compiled_training_step_runs_each_attention_forward_once_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _assert_each_attention_forward_runs_once("inductor", "cuda", torch.bfloat16)


def test_policy_change_between_calls_recompiles_and_uses_the_new_choice() -> None:
    graphs = Graphs()
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return lz.rms_norm(x, w) * 2

    compiled = torch.compile(fn, backend=graphs, fullgraph=True)
    want = fn(x, w)
    torch.testing.assert_close(compiled(x, w), want)
    assert any("rms_norm" in t for t in Graphs.targets(graphs.dynamo[-1]))
    with_fused = len(graphs.dynamo)
    lz.lock("rms_norm", "torch_rms_norm_composed")
    try:
        torch.testing.assert_close(compiled(x, w), want, atol=1e-6, rtol=1e-5)
        assert len(graphs.dynamo) == with_fused + 1  # the policy change recompiled
        composed = Graphs.targets(graphs.dynamo[-1])
        assert not any("rms_norm" in t for t in composed) and any("rsqrt" in t for t in composed), composed
        compiled(x, w)
        assert len(graphs.dynamo) == with_fused + 1  # ... once: the new graph is cached
    finally:
        lz.unlock("rms_norm")
    compiled(x, w)
    assert any("rms_norm" in t for t in Graphs.targets(graphs.dynamo[-1]))


def test_a_live_policy_scope_runs_the_dispatched_op_which_obeys_it() -> None:
    graphs = Graphs()
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return lz.rms_norm(x, w)

    compiled = torch.compile(fn, backend=graphs, fullgraph=True)
    compiled(x, w)
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        torch.testing.assert_close(compiled(x, w), fn(x, w))
        assert "layerzero.rms_norm.default" in Graphs.targets(graphs.dynamo[-1])
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"


def test_many_batch_sizes_compile_twice_at_most() -> None:
    graphs = Graphs()
    model = _model(1)
    compiled = torch.compile(model, backend=graphs, fullgraph=True)
    for b in (1, 2, 3, 5, 8, 13, 21, 34):
        compiled(torch.randn(b, 8, 32))
    assert len(graphs.dynamo) <= 2  # static first, then dynamic: the choice is the same for every batch size


# -- a kernel Inductor cannot see: one opaque node, forward once, real backward ---------------------------

CALLS: Counter[str] = Counter()


def _counted_forward(*args: Any) -> Any:
    CALLS["forward"] += 1
    return flash_cpu_forward(*args)


def _counted_backward(*args: Any) -> Any:
    CALLS["backward"] += 1
    return flash_cpu_backward(*args)


def _plain(*args: Any) -> Any:
    CALLS["plain"] += 1
    return flash_cpu_forward(*args)[0]


@pytest.fixture()
def opaque_kernel() -> Iterator[str]:
    rt = lz.get_runtime()
    rt.backends.register("testopaque", module="torch")
    spec = KernelSpec("test_opaque_flash_cpu", "attention", "testopaque", _plain, priority=90,
                      platforms={"cpu"}, dtypes={torch.float32}, mask_kinds={"none"}, supports_dropout=False,
                      head_dim_v_equal=True, residual_pair=ResidualPair(_counted_forward, _counted_backward,
                                                                        flash_cpu_fake))
    rt.kernels.register(spec)
    CALLS.clear()
    try:
        yield spec.kernel_id
    finally:
        rt.kernels.unregister(spec.kernel_id)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_opaque_kernel_is_one_node_with_a_real_backward(opaque_kernel: str, backend: str) -> None:
    layers = 2
    x = torch.randn(2, 8, 32)
    eager, compiled = _model(layers), _model(layers)
    with lz.lock("attention*", "torch_sdpa_math"):
        _step(eager, x)
    graphs = Graphs() if backend == "aot_eager" else None
    step = _compiled_step(graphs or backend)
    step(compiled, x)
    CALLS.clear()
    compiled.zero_grad()
    step(compiled, x)
    assert CALLS == Counter(forward=layers, backward=layers), CALLS  # no recomputed forward, no eager call
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)
    if graphs is not None:
        fw = Graphs.targets(graphs.aot[0])
        assert fw.count("layerzero.kernel_attention.default") == layers, fw
        assert not any(t.startswith("layerzero.attention") for g in graphs.aot for t in Graphs.targets(g))


def test_kernel_attention_op_passes_opcheck() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 8, 16, generator=g).requires_grad_() for _ in range(3))
    rt = lz.get_runtime()
    assert rt.kernels.find("torch_sdpa_flash_cpu").residual_pair is FLASH_CPU_PAIR
    args = ("torch_sdpa_flash_cpu", q, k, v, None, True, 0.0, None, None)
    result = torch.library.opcheck(lzc.kernel_attention_op, args)
    assert set(result.values()) == {"SUCCESS"}, result
    out = lzc.kernel_attention_op(*args)[0]
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_a_patched_transformers_model_under_compile_traces_the_native_path() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu")
    model = torch.nn.Sequential(LlamaRMSNorm(32, eps=1e-6), LlamaMLP(config))
    x = torch.randn(2, 8, 32)
    want = model(x)
    from layerzero.integrations.transformers import patch

    patched = patch(model)
    assert patched.count >= 2, str(patched)  # the norm and the SwiGLU MLP
    graphs = Graphs()
    got = torch.compile(model, backend=graphs, fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    targets = [t for g in graphs.dynamo for t in Graphs.targets(g)]
    assert not any("layerzero" in t for t in targets), targets
    assert any("rms_norm" in t for t in targets) and any("silu" in t for t in targets), targets


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "rope", "swiglu", "geglu", "gelu", "silu", "cross_entropy"])
def test_table_built_row_ops_pass_opcheck(name: str) -> None:
    """The dispatched row-wise ops are built from one table (dispatched_rows.ROW_OPS): each passes
    torch.library.opcheck (schema, fake, autograd registration) on inputs that need grad."""
    from layerzero.integrations.compile import dispatched_rows as rows

    g = torch.Generator().manual_seed(3)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_()

    x = t(3, 8)
    args = {"rms_norm": (x, t(8), 1e-6), "layer_norm": (x, t(8), t(8), 1e-5),
            "rope": (t(1, 2, 3, 8), torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), False),
            "swiglu": (x, t(3, 8)), "geglu": (x, t(3, 8), "tanh"), "gelu": (x, "none"), "silu": (x,),
            "cross_entropy": (t(4, 10), torch.tensor([1, 2, 3, -100]), -100, 0.0, "mean")}[name]
    torch.library.opcheck(getattr(rows, f"{name}_op"), args)
