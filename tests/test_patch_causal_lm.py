"""patch() on causal LMs: the loss through lz.linear_cross_entropy (no logits), rope through lz.rope.

Tiny random models from configs (no downloads), patched against an unpatched twin with the same weights:
loss and every parameter's gradient match, the ops really ran, and unpatch() restores the forward and the
modeling module's apply_rotary_pos_emb.
"""

from __future__ import annotations

import copy
import gc
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import transformers  # noqa: E402

import layerzero.ops as lz_ops  # noqa: E402
from layerzero.integrations import transformers as lzt  # noqa: E402
from layerzero.integrations.hf_causal_lm import loss_problem  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"head_dim": 16, "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0}),
}



@pytest.fixture(autouse=True)
def _collect_dropped_models() -> None:
    """Models other tests patched and dropped sit in reference cycles until a collection restores their rope."""
    gc.collect()


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    cls_name, cfg_name, extra = MODELS[name]
    cfg = getattr(transformers, cfg_name)(**_COMMON, **extra)
    cfg._attn_implementation = "eager"  # attention is not what these tests are about
    torch.manual_seed(0)
    ref = getattr(transformers, cls_name)(cfg).train()
    return ref, copy.deepcopy(ref)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 160, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that does not count
    return ids, labels


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts calls of lz.rope and lz.linear_cross_entropy (the real ops still run)."""
    calls: Counter[str] = Counter()
    for name in ("rope", "linear_cross_entropy"):
        real = getattr(lz_ops, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(lz_ops, name, counted)
    yield calls


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_loss_and_gradients_match_and_unpatch_restores(name: str, op_calls: Counter[str]) -> None:
    ref, ours = _pair(name)
    module = sys.modules[type(ours).__module__]
    original_rope = module.apply_rotary_pos_emb
    report = lzt.patch(ours)
    assert report.patched["causal_lm_loss"] == [type(ours).__name__], str(report)
    assert len(report.patched["rope"]) == 1
    assert module.apply_rotary_pos_emb is not original_rope
    op_calls.clear()  # the patch's own checks called the ops once
    ids, labels = _batch()
    want = ref(ids, labels=labels)
    got = ours(ids, labels=labels)
    assert got.logits is None  # training with labels: the logits are never made
    assert op_calls["linear_cross_entropy"] == 1 and op_calls["rope"] >= 2 * _COMMON["num_hidden_layers"]
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    want.loss.backward()
    got.loss.backward()
    wg, gg = _grads(ref), _grads(ours)
    assert wg.keys() == gg.keys()
    for key in wg:
        torch.testing.assert_close(gg[key], wg[key], atol=2e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    with torch.no_grad():  # num_items_in_batch: a sum over the micro-batch, divided by the global count
        n = torch.tensor(13)
        torch.testing.assert_close(ours(ids, labels=labels, num_items_in_batch=n).loss,
                                   ref(ids, labels=labels, num_items_in_batch=n).loss, atol=1e-5, rtol=1e-5)
        ours.eval(), ref.eval()
        evaluated = ours(ids, labels=labels)  # eval mode: logits come back, as in Liger
        torch.testing.assert_close(evaluated.logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        skipped = ours(ids, labels=labels, skip_logits=True, return_dict=False)
        plain = ref(ids, labels=labels, return_dict=False)
        assert isinstance(skipped, tuple) and len(skipped) == len(plain) and skipped[1] is None  # logits' place
        torch.testing.assert_close(skipped[0], plain[0], atol=1e-5, rtol=1e-5)
        ours.train(), ref.train()
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        alone = ours(ids, shift_labels=shifted)  # shift_labels alone: no loss, as without the patch
        assert alone.loss is None and ref(ids, shift_labels=shifted).loss is None and alone.logits is not None
    assert lzt.unpatch(ours) == report.count
    assert module.apply_rotary_pos_emb is original_rope
    assert "forward" not in ours.__dict__


def test_patched_loss_through_the_chunked_kernel() -> None:
    """The tiny vocabulary's logits are small enough for the naive kernel; the chunked one must agree too."""
    import layerzero as lz

    ref, ours = _pair("gemma2")  # softcapped
    lzt.patch(ours)
    ids, labels = _batch()
    with lz.lock("linear_cross_entropy", "torch_linear_cross_entropy_chunked"):
        got = ours(ids, labels=labels)
    want = ref(ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(ours.lm_head.weight.grad, ref.lm_head.weight.grad, atol=2e-5, rtol=1e-4)
    lzt.unpatch(ours)


def test_rope_stays_patched_while_another_patched_model_lives() -> None:
    first, second = _pair("llama")
    module = sys.modules[type(first).__module__]
    lzt.patch(first, norms=False, activations=False, mlp=False, loss=False)
    lzt.unpatch(first)  # whatever other tests left patched and dropped, this is transformers' own function now
    original = module.apply_rotary_pos_emb
    lzt.patch(first, norms=False, activations=False, mlp=False, loss=False)
    lzt.patch(second, norms=False, activations=False, mlp=False, loss=False)
    assert lzt.unpatch(first) == 1
    assert module.apply_rotary_pos_emb is not original
    assert lzt.unpatch(second) == 1
    assert module.apply_rotary_pos_emb is original


def test_models_the_loss_patch_leaves_alone_say_why() -> None:
    cfg = transformers.CohereConfig(**_COMMON)
    model = transformers.CohereForCausalLM(cfg)
    assert "changes the logits before the loss" in (loss_problem(model) or "")
    report = lzt.patch(model, norms=False, activations=False, mlp=False, rope=False)
    assert "causal_lm_loss" not in report.patched
    assert "logit_scale" in report.skipped["CohereForCausalLM (loss)"]
    assert loss_problem(nn.Linear(2, 2)) == "not a *ForCausalLM model"


def test_the_older_standard_forward_is_recognised() -> None:
    """transformers before 5.24 slices ``hidden_states[:, slice_indices, :]`` inside the LM-head line (the H200
    image's 5.17 did): that forward is the standard one too, so its loss is patched."""
    from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: F401  (named in the source read)

    from layerzero.integrations.hf_causal_lm import _forward_shape  # noqa: PLC2701  (the matcher under test)

    class Older:
        def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):  # type: ignore[no-untyped-def]
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            return CausalLMOutputWithPast(
                loss=loss,
                logits=logits,
            )

    assert _forward_shape(Older) == (False, None)


def test_models_saved_while_the_rope_is_patched_load_again() -> None:
    """transformers 5 holds a private copy of its rope function in each attention module, which pickles as
    "a new instance of the class of the modeling module's ``apply_rotary_pos_emb``": patched or not, every
    model of that module saved while the patch lives must load again, and compute what it computed."""
    import io

    patched, bystander = _pair("llama")
    report = lzt.patch(patched)
    assert {"rope", "causal_lm_loss", "rms_norm"} <= set(report.patched), str(report)
    ids, _ = _batch()
    for model in (patched, bystander):
        model.eval()
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)
    assert lzt.unpatch(patched) == report.count
    assert lzt.unpatch(loaded) == 0  # the bystander's copy


def test_the_patched_forward_keeps_the_models_signature() -> None:
    """generate() reads ``inspect.signature(model.forward)`` (logits_to_keep, attention_mask, ...): the patched
    forward shows the model's own parameters, and skip_logits."""
    import inspect

    _, model = _pair("llama")
    before = inspect.signature(model.forward).parameters
    lzt.patch(model)
    after = inspect.signature(model.forward).parameters
    assert list(after) == [*[p for p in before if p != "kwargs"], "skip_logits", "kwargs"], list(after)
    assert model._supports_logits_to_keep()
    lzt.unpatch(model)
    assert list(inspect.signature(model.forward).parameters) == list(before)
