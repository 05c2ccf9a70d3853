"""transformers models with attention variants through attn_implementation="layerzero": Gemma 2 (attention-logit
softcapping, the ``softcap`` kwarg) and GPT-OSS (per-head attention sinks, the ``s_aux`` kwarg), tiny random
models built from their configs (no downloads), against transformers' own "eager" attention."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM  # noqa: E402

from layerzero.errors import InvalidInputError  # noqa: E402
from layerzero.integrations import transformers as lzt  # noqa: E402
from layerzero.ops.attention import attention_reference  # noqa: E402
from layerzero.runtime import get_runtime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, sliding_window=6, max_position_embeddings=256, initializer_range=0.1)
# initializer_range 0.1 and softcap 0.5: the tiny model's scores reach ~1, so the cap really bends them (with the
# default 0.02 they stay ~1e-3, where tanh is the identity); sinks ~ N(0, 2) really take probability mass.
MODELS: dict[str, tuple[type, Any]] = {
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(**_SIZES, intermediate_size=128, attn_logit_softcapping=0.5,
                                                       query_pre_attn_scalar=16)),
    "gpt_oss": (GptOssForCausalLM, lambda: GptOssConfig(**_SIZES, intermediate_size=64, num_local_experts=4,
                                                        num_experts_per_tok=2)),
}


@pytest.fixture(autouse=True)
def registered() -> None:
    lzt.register()


@pytest.fixture
def variant_calls() -> Iterator[list[tuple[str, bool, bool]]]:
    seen: list[tuple[str, bool, bool]] = []

    def hook(operation: str, ctx: Any) -> None:
        seen.append((operation, ctx.softcap, ctx.sinks))

    rt = get_runtime()
    rt.invalidate()  # every attention call of the test misses once, so the hook sees it
    rt.on_miss.append(hook)
    yield seen
    rt.on_miss.remove(hook)


def _pair(name: str, device: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    cls, config = MODELS[name]
    torch.manual_seed(0)
    ref = cls(config()).eval()
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(getattr(module, "sinks", None), nn.Parameter):
                module.sinks.normal_(0.0, 2.0)
    ref = ref.to(device=device, dtype=dtype)
    ref.set_attn_implementation("eager")
    ours = cls(config()).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation("layerzero")
    return ref, ours


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=g).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, :3] = 0  # left padding: 4-D masks with padded rows
    return ids, mask


def _check(name: str, device: str, dtype: torch.dtype, atol: float, tokens: bool,
           seen: list[tuple[str, bool, bool]]) -> None:
    ref, ours = _pair(name, device, dtype)
    ids, mask = _batch(device)
    with torch.no_grad():
        # Padded positions see no key: eager's finfo.min mask spreads them evenly over the padding, layerzero
        # (like SDPA) gives 0; their logits are never used, so only the real tokens are compared.
        real = mask.bool()
        want = ref(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real], want, atol=atol, rtol=atol)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=atol, rtol=atol)
        if tokens:
            gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), gen_ref)
    variant = (True, False) if name == "gemma2" else (False, True)
    assert seen and all(op.startswith("attention") and (cap, sink) == variant for op, cap, sink in seen)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_model_matches_eager_and_generates_the_same_tokens(name: str,
                                                                variant_calls: list[tuple[str, bool, bool]]) -> None:
    _check(name, "cpu", torch.float32, 1e-5, True, variant_calls)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_variant_matters_for_these_models(name: str) -> None:
    """Without its softcap (Gemma 2) or sinks (GPT-OSS) the tiny model's logits differ from eager's: the matching
    test above would catch a dropped variant."""
    ref, ours = _pair(name, "cpu", torch.float32)
    with torch.no_grad():
        if name == "gemma2":
            for layer in ours.model.layers:
                layer.self_attn.attn_logit_softcapping = None
        else:
            for layer in ours.model.layers:
                layer.self_attn.sinks.fill_(-1e4)  # exp(-1e4) = 0: no sink
        ids, mask = _batch("cpu")
        real = mask.bool()
        got, want = ours(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real]
        assert (got - want).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_model_matches_eager_on_gpu(name: str, dtype: torch.dtype,
                                         variant_calls: list[tuple[str, bool, bool]]) -> None:
    _check(name, "cuda", dtype, 1e-4 if dtype == torch.float32 else 5e-2, dtype == torch.float32, variant_calls)


def test_attention_forward_passes_softcap_and_s_aux() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 7, 16, generator=g) for _ in range(3))
    sinks = torch.randn(4, generator=g)
    module = nn.Module()
    module.is_causal = True
    out, weights = lzt.attention_forward(module, q, k, v, None, softcap=0.7, s_aux=sinks)
    want = attention_reference(q, k, v, None, True, softcap=0.7, sinks=sinks)
    assert weights is None
    torch.testing.assert_close(out.double(), want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_attention_forward_casts_sinks_of_another_dtype_to_float32() -> None:
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float16)
    out, _ = lzt.attention_forward(nn.Module(), q, k, v, None, is_causal=False, s_aux=sinks)
    torch.testing.assert_close(out, attention_reference(q, k, v, sinks=sinks.float()).transpose(1, 2))


def test_attention_forward_refuses_per_query_sinks() -> None:
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with pytest.raises(InvalidInputError, match="sinks \\(a sink logit per query\\) is not supported"):
        lzt.attention_forward(nn.Module(), q, k, v, None, sinks=torch.zeros(1, 2, 5, 1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_model_compiles_whole_with_its_variant_traced_as_pytorch_code(name: str) -> None:
    """torch.compile(fullgraph=True) of Gemma 2 / GPT-OSS on "layerzero": the softcap / sinks attention is
    traced as PyTorch code (no layerzero node: Inductor sees it as it sees "eager"), logits as eager's."""
    torch._dynamo.reset()
    ref, ours = _pair(name, "cpu", torch.float32)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    explanation = torch._dynamo.explain(lambda i: logits(ours, i))(ids)
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert explanation.graph_break_count == 0 and not any("layerzero" in t for t in targets)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(lambda i: logits(ours, i), fullgraph=True, backend="aot_eager")(ids)
        torch.testing.assert_close(got, logits(ref, ids), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_padded_batch_trains_with_finite_gradients(name: str) -> None:
    """Left padding: the padded rows see no key. Their softmax was NaN, zeroed after the fact, and its backward
    carried NaN into 15 of Gemma 2's parameter gradients (softcap runs on the eager-variant kernel); the loss
    was right, the step was not. Every gradient is finite now, and matches eager's on the real tokens' loss."""
    ref, ours = _pair(name, "cpu", torch.float32)
    ids, mask = _batch("cpu")
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # predicted from the last padded position (the shift): padded rows differ from eager's
    losses = []
    for model in (ref, ours):
        model.train()
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    bad = [n for n, p in ours.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (n, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if p.grad is not None and r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, atol=2e-4, rtol=2e-3, msg=n)
