"""transformers' continuous batching (``generate_batch``) on attn_implementation="layerzero".

Each step's new tokens of every request come as one packed row whose keys are each request's cache then its
new tokens; layerzero attends per request with ``lz.attention_varlen`` (bottom-right causal). The greedy
tokens must equal transformers' own ``"sdpa"`` continuous batching, and the padded layouts of a
static-shape step are checked against the float64 reference of each request alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")

from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import layerzero as lz  # noqa: E402,F401  (registers "layerzero")
import layerzero.ops as lz_ops  # noqa: E402
from layerzero.integrations import transformers_packed as packed  # noqa: E402
from layerzero.ops.attention_varlen import cu_seqlens, varlen_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[1, 5, 7, 9], [3, 4], [8, 9, 10, 11, 12, 13], [2]]


def _generate(impl: str, model_class: type = LlamaForCausalLM, config_class: type = LlamaConfig,
              **extra: Any) -> dict[str, list[int]]:
    """Greedy tokens of transformers' continuous batching for PROMPTS on a tiny random model."""
    torch.manual_seed(0)
    model = model_class(config_class(**_CONFIG, **extra)).eval()
    model.set_attn_implementation(impl)
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(inputs=PROMPTS, generation_config=config, progress_bar=False)
    return {k: list(v.generated_tokens) for k, v in out.items()}


def test_generate_batch_with_layerzero_equals_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    varlen_calls: list[tuple[int, int]] = []
    real = lz_ops.attention_varlen

    def spy(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        varlen_calls.append((q.shape[0], k.shape[0]))
        return real(q, k, *args, **kwargs)

    want = _generate("sdpa")
    monkeypatch.setattr(lz_ops, "attention_varlen", spy)
    got = _generate("layerzero")
    assert got == want
    assert any(k > q for q, k in varlen_calls)  # decode steps: each request's cache is read


def test_a_sliding_window_model_equals_sdpa() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    extra = dict(sliding_window=3, use_sliding_window=True, max_window_layers=0)
    assert (_generate("layerzero", Qwen2ForCausalLM, Qwen2Config, **extra)
            == _generate("sdpa", Qwen2ForCausalLM, Qwen2Config, **extra))


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 2])
def test_a_padded_step_attends_per_request_bottom_right(sinks: bool, window: int | None) -> None:
    """A static-shape step pads queries and keys after the last request (the offsets plateau): each request
    is attended alone, bottom-right causal, and the padding rows never reach a request's output."""
    lens_q, lens_k = [2, 1, 3], [5, 1, 7]
    pad_q, pad_k = 3, 4
    g = torch.Generator().manual_seed(0)
    tq, tk = sum(lens_q) + pad_q, sum(lens_k) + pad_k
    q = torch.randn(1, 4, tq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, tk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, tk, 8, generator=g, dtype=torch.float64)
    kwargs = {"cu_seq_lens_q": cu_seqlens(lens_q), "cu_seq_lens_k": cu_seqlens(lens_k), "write_index": [],
              "read_index": []}
    layout = packed.packed_layout(q, k, None, kwargs)
    assert layout is not None and layout[0][-1] == tq and layout[1][-1] == tk
    assert packed.packed_layout(q, k, None, kwargs) is layout  # once per step: the layers share it
    s = torch.zeros(4, dtype=torch.float64) if sinks else None  # a zero sink logit: one more softmax term
    out = packed.packed_attention(q, k, v, layout, 0.0, None, True, window, sinks=s)
    real = sum(lens_q)
    flat = [t[0].transpose(0, 1)[:n] for t, n in ((q, real), (k, sum(lens_k)), (v, sum(lens_k)))]
    want = varlen_reference(*flat, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k), True, None,
                            window, None)
    if sinks:  # softmax over the keys and one zero logit: the output shrinks by sum(exp) / (sum(exp) + 1)
        ref = []
        for b in range(len(lens_q)):
            oq, ok = sum(lens_q[:b]), sum(lens_k[:b])
            qs, ks, vs = flat[0][oq:oq + lens_q[b]], flat[1][ok:ok + lens_k[b]], flat[2][ok:ok + lens_k[b]]
            ks, vs = ks.repeat_interleave(2, 1), vs.repeat_interleave(2, 1)
            scores = torch.einsum("qhd,khd->hqk", qs, ks) / 8 ** 0.5
            i = torch.arange(lens_q[b])[:, None] + lens_k[b] - lens_q[b]
            j = torch.arange(lens_k[b])[None, :]
            keep = (j <= i) & ((j > i - window) if window else True)
            scores = scores.masked_fill(~keep, float("-inf"))
            weights = torch.exp(scores) / (torch.exp(scores).sum(-1, keepdim=True) + 1.0)
            ref.append(torch.einsum("hqk,khd->qhd", weights, vs))
        want = torch.cat(ref)
    torch.testing.assert_close(out[0, :real], want)
