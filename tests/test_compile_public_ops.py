"""torch.compile over every public operation: a stand-in for each, so repeated calls never recompile.

Without a stand-in Dynamo traces the eager hot path and guards on the plan cache and the per-plan call counter:
every call then recompiles (until the recompile limit, after which the frame runs eagerly). That is what made
a patched model's compiled training step slow (its loss goes through ``lz.linear_cross_entropy``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch._dynamo

import layerzero as lz
from layerzero.integrations import compile as lzc
from layerzero.ops import OPS, op_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

lzc.install()

_NAMES = sorted(OPS)


@contextmanager
def _no_recompiles() -> Iterator[None]:
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = saved


def _operation(name: str) -> str:
    return "attention.causal" if name == "attention" else name


def _call(name: str, seed: int, ctx_index: int = 0) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``lz.<name>`` and keyword arguments for it, from the op's own input generator."""
    op = op_for(name)
    ctx = op.sample_contexts(_operation(name))[ctx_index]
    args = op.make_inputs(_operation(name), ctx, torch.Generator().manual_seed(seed))
    fn = getattr(lz, name)
    params = inspect.signature(fn).parameters
    return fn, {k: v for k, v in zip(op.arg_names, args) if k in params}


def test_every_public_operation_has_a_compile_stand_in() -> None:
    assert set(lzc.installed()) == set(OPS), "an operation without a stand-in traces the eager hot path"
    assert set(lzc.CUSTOM_OPS) == set(OPS)


@pytest.mark.parametrize("name", _NAMES)
def test_repeated_compiled_calls_never_recompile_and_match_eager(name: str) -> None:
    torch._dynamo.reset()
    fn, kw = _call(name, 1)
    greedy = {"temperature": 0.0} if name == "sample" else {}  # greedy sampling: comparable with eager
    compiled = torch.compile(lambda **k: fn(**k), backend="eager")
    compiled(**{**kw, **greedy})
    with _no_recompiles():
        for seed in (2, 3):  # fresh inputs of the same shapes: the same graph
            _, kw = _call(name, seed)
            kw.update(greedy)
            got, want = compiled(**kw), fn(**kw)
            torch.testing.assert_close(got, want)
    explained = torch._dynamo.explain(lambda **k: fn(**k))(**kw)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_packed_attention_trains_like_eager() -> None:
    torch._dynamo.reset()
    fn, kw = _call("attention_varlen", 4)
    for key in ("q", "k", "v"):
        kw[key] = kw[key].detach().requires_grad_()
    compiled = torch.compile(lambda **k: fn(**k), backend="aot_eager")
    out = compiled(**kw)
    grads = torch.autograd.grad(out.square().sum(), [kw["q"], kw["k"], kw["v"]])
    want = torch.autograd.grad(fn(**kw).square().sum(), [kw["q"], kw["k"], kw["v"]])
    torch.testing.assert_close(out, fn(**kw))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)


def test_compiled_sampling_with_a_generator_is_reproducible() -> None:
    torch._dynamo.reset()
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(lambda g: lz.sample(logits, 0.8, top_k=10, generator=g), backend="eager")
    a = compiled(torch.Generator().manual_seed(7))
    b = compiled(torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (4,)
    top = logits.topk(10, dim=-1).indices
    assert bool((top == a[:, None]).any(-1).all()), "a token outside the top 10 was drawn"


def test_compiled_linear_cross_entropy_training_matches_eager_without_recompiles() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(8)
    weight = (torch.randn(96, 16, generator=g) / 4).requires_grad_()

    def step(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lz.linear_cross_entropy(hidden, weight, target)

    compiled = torch.compile(step, backend="aot_eager")
    for i in range(3):
        hidden = torch.randn(24, 16, generator=g).requires_grad_()
        target = torch.randint(0, 96, (24,), generator=g)
        target[::5] = -100
        with _no_recompiles() if i else contextmanager(lambda: iter([None]))():
            loss = compiled(hidden, target)
        got = torch.autograd.grad(loss, [hidden, weight])
        ref_loss = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T, target)
        want = torch.autograd.grad(ref_loss, [hidden, weight])
        torch.testing.assert_close(loss.double(), ref_loss.double(), atol=1e-5, rtol=1e-5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_patched_model_compiled_training_steps_do_not_recompile() -> None:
    transformers = pytest.importorskip("transformers")
    from layerzero.integrations.transformers import patch

    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, attn_implementation="layerzero")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    model.train()
    losses = []
    for i in range(3):
        with _no_recompiles() if i else contextmanager(lambda: iter([None]))():
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)
    assert losses[0] == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-5)


def test_under_compile_the_loss_over_a_large_vocabulary_is_the_unpatched_models_code() -> None:
    from layerzero.context import SelectionContext

    rt = lz.get_runtime()
    big = dict(device="cpu", dtype=torch.float32, num_tokens=4096, batch_size=4096, hidden_size=32000, head_dim=2048,
               requires_grad=True)
    eager = rt.select("linear_cross_entropy", SelectionContext(**big))
    compiled = rt.select("linear_cross_entropy", SelectionContext(**big, compiling=True))
    assert eager.ranked[0].kernel_id == "torch_linear_cross_entropy_chunked"  # eager: never the full logits
    assert compiled.ranked[0].kernel_id == "torch_linear_cross_entropy_naive"  # compiled: lm_head + CE, as unpatched


def test_the_dispatched_custom_ops_lower_under_inductor() -> None:
    """The default backend: Inductor lowers an op it does not know through ``FallbackKernel.create(kernel, ...)``;
    an op argument named ``kernel`` collided with it, so every dispatched op (sampling always, packed attention,
    the row ops inside a policy scope) failed to compile ("got multiple values for argument 'kernel'")."""
    torch._dynamo.reset()
    logits = torch.randn(4, 50)
    got = torch.compile(lambda l: lz.sample(l, 0.0), fullgraph=True)(logits)
    assert torch.equal(got, logits.argmax(-1))
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    with lz.lock("rms_norm", backend="torch"):
        got = torch.compile(lambda x, w: lz.rms_norm(x, w), fullgraph=True)(x, w)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
    fn, kw = _call("attention_varlen", 1)
    torch.testing.assert_close(torch.compile(lambda **k: fn(**k), fullgraph=True)(**kw), fn(**kw))


def test_scopes_kept_alive_after_their_block_cost_one_recompile() -> None:
    """Graphs guarded on the number of live scope objects: each exception kept with its traceback holds its
    scope, so every iteration recompiled until the recompile limit (FailOnRecompileLimitHit with fullgraph).
    They guard on whether any scope is alive now."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    frames = []

    def counting(gm: Any, example_inputs: Any) -> Any:  # a backend that counts the graphs it is given
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x, w: lz.rms_norm(x, w), backend=counting, fullgraph=True)
    kept = []
    for _ in range(12):
        try:
            with lz.lock("rms_norm", "liger_rms_norm"):
                lz.rms_norm(x, w)
        except lz.LayerZeroError as exc:  # liger cannot run on the CPU: kept, with the scope its frames hold
            kept.append(exc)
        torch.testing.assert_close(compiled(x, w), torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
    assert len(frames) <= 2, len(frames)
    kept.clear()
    gc.collect()


def test_dynamic_scalars_of_the_dispatched_ops_are_validated_by_their_example() -> None:
    """With automatic dynamic shapes a changing max_seqlen (a packed training loop) or top_k becomes a SymInt;
    the fake implementation's validation wanted an int and raised InvalidInputError('... got s68') on the
    second call. It validates the value the graph was traced with."""
    from layerzero.ops.attention_varlen import cu_seqlens

    torch._dynamo.reset()
    packed = torch.compile(lambda q, cu, m: lz.attention_varlen(q, q, q, cu, cu, m, m, is_causal=True),
                           backend="aot_eager")
    for lens in ([5, 3], [7, 2], [4, 4, 4]):
        cu, q = cu_seqlens(lens), torch.randn(sum(lens), 4, 32)
        torch.testing.assert_close(packed(q, cu, max(lens)),
                                   lz.attention_varlen(q, q, q, cu, cu, max(lens), max(lens), is_causal=True))
    sample = torch.compile(lambda logits, k: lz.sample(logits, temperature=0.0, top_k=k), backend="aot_eager")
    logits = torch.randn(4, 50)
    for k in (5, 10, 20):
        assert torch.equal(sample(logits, k), logits.argmax(-1))


@pytest.mark.parametrize("option", ["scale", "softcap", "dropout_p", "window"])
def test_an_attention_option_taking_a_second_value_still_compiles_fullgraph(option: str) -> None:
    """A float option that takes a second value in the process (a second model with another head size, Gemma 2's
    softcap) becomes a symbolic float under automatic dynamic: the validation's math.isfinite and the choice's
    constant arguments failed with fullgraph=True ("torch.* op returned non-Tensor")."""
    torch._dynamo.reset()
    q, k = torch.randn(2, 4, 32, 16), torch.randn(2, 4, 32, 16)
    v = torch.ones(2, 4, 32, 16) if option == "dropout_p" else torch.randn(2, 4, 32, 16)
    values = {"scale": (0.25, 0.3, 0.4), "softcap": (5.0, 3.0, 7.5), "dropout_p": (0.0, 0.3, 0.6),
              "window": (2, 3, 5)}[option]
    spreads = []
    for value in values:
        class Layer(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.value = value

            def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return lz.attention(q, k, v, is_causal=True, **{option: self.value})

        out = torch.compile(Layer(), backend="eager", fullgraph=True)(q, k, v)
        if option == "dropout_p":  # v of ones: the output is 1 on average, spread by the dropout applied
            assert abs(out.mean().item() - 1.0) < 0.05
            spreads.append(out.std().item())
        else:
            torch.testing.assert_close(out, lz.attention(q, k, v, is_causal=True, **{option: value}))
    if option == "dropout_p":
        assert spreads[0] < 1e-6 < spreads[1] < spreads[2]


def test_under_compile_a_scale_no_float_holds_is_refused_as_in_eager() -> None:
    """finite_number's traced form compared with inf, which 10**400 passes: the compiled call ended in a
    TorchRuntimeError from a fake tensor; it now compares with FLOAT_MAX, as the contract guards do."""
    torch._dynamo.reset()
    q = torch.randn(1, 2, 4, 8)
    compiled = torch.compile(lambda q, s: lz.attention(q, q, q, scale=s), backend="eager")
    for bad in (10**400, float("inf")):
        with pytest.raises(lz.errors.InvalidInputError, match="scale must be a finite number or None"):
            compiled(q, bad)
    torch.testing.assert_close(compiled(q, 0.5), lz.attention(q, q, q, scale=0.5))


def test_compiled_attention_takes_enable_gqa() -> None:
    torch._dynamo.reset()
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    compiled = torch.compile(lambda q, k, v: lz.attention(q, k, v, enable_gqa=True), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    refused = torch.compile(lambda q, k, v: lz.attention(q, k, v, enable_gqa=False), backend="aot_eager")
    with pytest.raises(Exception, match="enable_gqa=False"):
        refused(q, k, v)
