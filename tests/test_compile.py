"""torch.compile: layerzero ops traced with no graph break, matching eager; the dispatched custom ops.

The native tracing and the opaque residual path are tested in tests/test_compile_native.py."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torch._dynamo

import layerzero as lz
from layerzero.errors import InvalidInputError
from layerzero.integrations import compile as lzc
from layerzero.ops.attention import attention_reference
from layerzero.ops.elementwise import rope_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

lzc.install()  # normally done by the import hook when torch._dynamo loads; idempotent


def _rope_tables(seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.arange(seq, dtype=torch.float64)[:, None] * inv
    full = torch.cat((freqs, freqs), -1)
    return full.cos().float(), full.sin().float()


def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = lz.rope(q, cos, sin)
    k = lz.rope(k, cos, sin)
    a = lz.attention(q, k, v, is_causal=True)
    return a, lz.rms_norm(x, w)


def _inputs(seed: int, grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"q": torch.randn(2, 4, 8, 16, generator=g), "k": torch.randn(2, 2, 8, 16, generator=g),
         "v": torch.randn(2, 2, 8, 16, generator=g), "x": torch.randn(6, 32, generator=g),
         "w": torch.rand(32, generator=g) + 0.5}
    t["cos"], t["sin"] = _rope_tables(8, 16)
    if grad:
        for name in ("q", "k", "v", "x", "w"):
            t[name].requires_grad_()
    return t


def _reference(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    q = rope_reference(t["q"], t["cos"], t["sin"])
    k = rope_reference(t["k"], t["cos"], t["sin"])
    a = attention_reference(q, k, t["v"].double(), is_causal=True)
    x = t["x"].double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * t["w"].double()
    return a, n


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_public_ops_are_substituted_and_eager_functions_are_untouched() -> None:
    assert set(lzc.installed()) >= {"attention", "rms_norm", "layer_norm", "rope", "swiglu", "gelu", "silu"}
    # Dynamo gets a stand-in; the eager function object (and so the eager hot path) is the original one.
    assert lz.attention is lzc.ORIGINALS["attention"] and lz.rms_norm is lzc.ORIGINALS["rms_norm"]
    assert lz.rope is lzc.ORIGINALS["rope"]
    for name in ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "gelu", "silu"):
        schema = getattr(torch.ops.layerzero, name).default._schema
        assert not schema.is_mutable, name


def test_block_traces_as_one_graph_of_pytorch_ops() -> None:
    t = _inputs(0)
    explanation = torch._dynamo.explain(_block)(*t.values())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = [str(n.target) for n in explanation.graphs[0].graph.nodes if n.op == "call_function"]
    assert not any("layerzero" in t for t in targets), targets  # PyTorch's kernels are traced as PyTorch code
    assert any("scaled_dot_product_attention" in t for t in targets) and any("rms_norm" in t for t in targets)


def test_block_inside_a_policy_scope_traces_as_one_graph_of_layerzero_ops() -> None:
    t = _inputs(0)
    with lz.lock("rms_norm", "torch_rms_norm"):  # a live scope: the dispatched ops read it at run time
        explanation = torch._dynamo.explain(_block)(*t.values())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = [str(n.target) for n in explanation.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("layerzero.rope.default") == 2
    assert "layerzero.attention.default" in targets and "layerzero.rms_norm.default" in targets


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager_and_reference(backend: str) -> None:
    t = _inputs(1)
    eager = _block(*t.values())
    compiled = torch.compile(_block, fullgraph=True, backend=backend)(*t.values())
    for got, want, ref in zip(compiled, eager, _reference(t), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    t2 = _inputs(2)  # new values, same shapes: no recompilation needed, still right
    again = torch.compile(_block, fullgraph=True, backend=backend)(*t2.values())
    torch.testing.assert_close(again[0].double(), _reference(t2)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_backward_matches_eager(backend: str) -> None:
    t_eager, t_comp = _inputs(3, grad=True), _inputs(3, grad=True)
    a, n = _block(*t_eager.values())
    (a.square().sum() + (n * torch.linspace(-1, 1, n.shape[-1])).sum()).backward()
    a, n = torch.compile(_block, fullgraph=True, backend=backend)(*t_comp.values())
    (a.square().sum() + (n * torch.linspace(-1, 1, n.shape[-1])).sum()).backward()
    for name in ("q", "k", "v", "x", "w"):
        torch.testing.assert_close(t_comp[name].grad, t_eager[name].grad, atol=1e-5, rtol=1e-5)


def test_bshd_layout_mask_and_scale_under_compile() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 6, 4, 8, generator=g) for _ in range(3))  # BSHD
    mask = torch.rand(6, 6, generator=g) > 0.3
    mask[:, 0] = True

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lz.attention(q, k, v, attn_mask=mask, scale=0.2, layout="BSHD")

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    want = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=0.2)
    torch.testing.assert_close(got.double(), want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_activations_and_layer_norm_compile_without_breaks() -> None:
    g = torch.Generator().manual_seed(5)
    x, gate, w, b = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g), torch.rand(24), torch.randn(24)

    def fn(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lz.layer_norm(lz.swiglu(gate, x) + lz.gelu(x, "tanh") + lz.silu(x), w, b)

    explanation = torch._dynamo.explain(fn)(x, gate, w, b)
    assert explanation.graph_break_count == 0
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, gate, w, b)
    h = gate.double() * torch.sigmoid(gate.double()) * x.double()
    xd = x.double()
    h = h + 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))) + xd * torch.sigmoid(xd)
    want = torch.nn.functional.layer_norm(h, (24,), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["attention_gqa_causal", "attention_mask", "rms_norm", "rms_norm_no_weight",
                                  "layer_norm", "rope", "swiglu", "gelu", "silu"])
def test_opcheck(case: str) -> None:
    g = torch.Generator().manual_seed(6)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_()

    cos, sin = _rope_tables(8, 16)
    cases = {
        "attention_gqa_causal": (lzc.attention_op, (r(1, 4, 8, 16), r(1, 2, 8, 16), r(1, 2, 8, 16), None, True,
                                                    0.0, None, None, "attention.causal", None)),
        "attention_mask": (lzc.attention_op, (r(1, 2, 8, 16), r(1, 2, 8, 16), r(1, 2, 8, 16), torch.randn(8, 8),
                                              False, 0.0, 0.3, None, "attention.full", None)),
        "rms_norm": (lzc.rms_norm_op, (r(3, 16), r(16), 1e-6)),
        "rms_norm_no_weight": (lzc.rms_norm_op, (r(3, 16), None, 1e-6)),
        "layer_norm": (lzc.layer_norm_op, (r(3, 16), r(16), None, 1e-5)),
        "rope": (lzc.rope_op, (r(1, 2, 8, 16), cos, sin, False)),
        "swiglu": (lzc.swiglu_op, (r(3, 16), r(3, 16))),
        "gelu": (lzc.gelu_op, (r(3, 16), "none")),
        "silu": (lzc.silu_op, (r(3, 16),)),
    }
    op, args = cases[case]
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_dropout_backward_reuses_the_forward_dropout_mask() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g).requires_grad_() for _ in range(3))
    seed = torch.tensor([1234])
    out1 = lzc.attention_op(q, k, v, None, False, 0.5, None, None, "attention.full", seed)
    out2 = lzc.attention_op(q, k, v, None, False, 0.5, None, None, "attention.full", seed)
    torch.testing.assert_close(out1, out2)  # the seed fixes the dropout mask
    assert not torch.allclose(out1, lz.attention(q, k, v))  # ... and dropout happened
    grad_out = torch.randn(out1.shape, generator=g)
    got = torch.autograd.grad(out1, (q, k, v), grad_out)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(1234)
        ref_out = lz.attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(ref_out, out1)
    want = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_fake_implementation_validates_with_layerzero_errors() -> None:
    q, k, v = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return lz.attention(q, k, v)

    with pytest.raises(Exception, match=r"query heads \(3\) must be divisible by key/value heads \(2\)"):
        torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)


def test_a_mask_that_does_not_broadcast_is_layerzeros_error_when_traced() -> None:
    """The mask's shape check compares ints: ``torch.broadcast_shapes`` raised Dynamo's TorchRuntimeError from the
    fake call, past validation's own ``except``, so a traced call named no layerzero error."""
    q = k = v = torch.randn(2, 4, 8, 16)
    mask = torch.zeros(5, 8, dtype=torch.bool)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lz.attention(q, k, v, attn_mask=mask)

    with pytest.raises(lz.errors.InvalidInputError, match=r"attn_mask of shape \(5, 8\) does not broadcast"):
        torch.compile(fn, backend="eager")(q, k, v, mask)
    ok = torch.ones(8, 8, dtype=torch.bool).tril()
    torch.testing.assert_close(torch.compile(fn, backend="eager")(q, k, v, ok),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=ok))


def test_import_layerzero_stays_lazy_and_hooks_set_up_integrations_on_import() -> None:
    code = textwrap.dedent("""
        import sys
        import layerzero
        for name in ("torch._dynamo", "transformers", "layerzero.integrations.compile"):
            assert name not in sys.modules, f"import layerzero imported {name}"
        import torch._dynamo
        from layerzero.integrations import compile as c
        print(",".join(c.installed()))
        from transformers import modeling_utils
        print("layerzero" in modeling_utils.ALL_ATTENTION_FUNCTIONS)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["attention,rms_norm,layer_norm,rope,swiglu,geglu,gelu,silu,cross_entropy,linear_cross_entropy,"
                                    "attention_varlen,attention_paged,sample", "True"]


@pytest.mark.parametrize(("options", "said"), [
    ({"layout": "bshd"}, "layout must be one of"),
    ({"layout": "BXYZ"}, "layout must be one of"),
    ({"operation": "attention.causl"}, "unknown operation 'attention.causl'"),
])
def test_the_compiled_call_checks_what_the_eager_prologue_checks(options: dict, said: str) -> None:
    """A lowercase 'bshd' ran as BHSD under torch.compile (attention over the wrong axes), where eager refuses it."""
    q = torch.randn(1, 2, 4, 8)

    def fn(q: torch.Tensor) -> torch.Tensor:
        return lz.attention(q, q, q, **options)

    with pytest.raises(InvalidInputError, match=said):
        fn(q)
    with pytest.raises(Exception, match=said):
        torch.compile(fn, fullgraph=True, backend="eager")(q)


@pytest.mark.parametrize("name", ["silu", "rms_norm", "swiglu", "cross_entropy"])
def test_dynamic_true_breaks_the_graph_once_and_never_recompiles(name: str) -> None:
    """torch.compile(dynamic=True) makes the hidden size symbolic, which the trace-time choice needs: the call
    graph-breaks (documented). Dynamo then used to compile the eager entry as a frame of its own, guarded on the
    plan cache's call counter: a recompile at every call, up to the recompile limit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    calls = {"silu": (lambda x: lz.silu(x), lambda n: (torch.randn(n, 64),)),
             "rms_norm": (lambda x, w: lz.rms_norm(x, w), lambda n: (torch.randn(n, 64), torch.rand(64))),
             "swiglu": (lambda g, u: lz.swiglu(g, u), lambda n: (torch.randn(n, 64), torch.randn(n, 64))),
             "cross_entropy": (lambda z, t: lz.cross_entropy(z, t),
                               lambda n: (torch.randn(n, 50), torch.randint(0, 50, (n,))))}
    fn, make = calls[name]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="eager", dynamic=True)
    for n in (4, 4, 4, 7, 9, 4, 12, 5, 6, 8, 10, 11):
        args = make(n)
        torch.testing.assert_close(compiled(*args), fn(*args))
    assert counters["stats"]["unique_graphs"] <= 1, dict(counters["stats"])
    torch._dynamo.reset()
