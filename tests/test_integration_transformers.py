"""transformers: attn_implementation="layerzero" and patch()/unpatch() on tiny random models (no downloads)."""

from __future__ import annotations

import copy
import importlib
import runpy
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from doc_pages import needs_cuda, page, python_blocks  # noqa: E402
from layerzero.errors import InvalidInputError, UnsupportedModelError  # noqa: E402
from layerzero.integrations import hooks  # noqa: E402
from layerzero.integrations import transformers as lzt  # noqa: E402
from layerzero.ops.attention import attention_reference  # noqa: E402
from layerzero.runtime import get_runtime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
# Windows shorter than the prompt, so sliding-window masks really cut.
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": True, "sliding_window": 6,
                                              "max_window_layers": 1}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": 6}),
}


def _pair(name: str, device: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    cls, cfg_cls, extra = MODELS[name]
    torch.manual_seed(0)
    ref = cls(cfg_cls(**_COMMON, **extra)).to(device=device, dtype=dtype).eval()
    ref.set_attn_implementation("sdpa")
    ours = cls(cfg_cls(**_COMMON, **extra)).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(ref.state_dict())
    ours.config._attn_implementation = "layerzero"  # the config switch (set_attn_implementation works too)
    return ref, ours


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=g).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, :3] = 0  # left padding: 4-D masks with padded rows
    return ids, mask


@pytest.fixture
def seen_operations() -> Iterator[list[str]]:
    rt = get_runtime()
    seen: list[str] = []

    def hook(operation: str, ctx: object) -> None:
        seen.append(operation)

    rt.on_miss.append(hook)
    yield seen
    rt.on_miss.remove(hook)


def _check_model(name: str, device: str, dtype: torch.dtype, atol: float, tokens: bool,
                 seen: list[str]) -> None:
    ref, ours = _pair(name, device, dtype)
    ids, mask = _batch(device)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=atol, rtol=atol)
        assert any(op.startswith("attention") for op in seen), "attention did not go through layerzero"
        if tokens:
            gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            gen_ours = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            assert torch.equal(gen_ours, gen_ref)
        report = lzt.patch(ours)
        assert report.patched.keys() >= {"rms_norm", "swiglu_mlp"}
        assert len(report.patched["rms_norm"]) == 5  # 2 per layer + the final norm
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, want, atol=atol, rtol=atol)
        assert "swiglu" in seen and "rms_norm" in seen
        if tokens:
            gen_patched = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            assert torch.equal(gen_patched, gen_ref)
    assert lzt.unpatch(ours) == report.count
    assert not any("forward" in m.__dict__ for m in ours.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_model_matches_sdpa_and_generates_the_same_tokens(name: str, seen_operations: list[str]) -> None:
    _check_model(name, "cpu", torch.float32, 1e-5, True, seen_operations)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_model_matches_sdpa_on_gpu(name: str, dtype: torch.dtype, seen_operations: list[str]) -> None:
    # bf16: different (both correct) kernels round differently, and greedy ties on a random model may flip.
    _check_model(name, "cuda", dtype, 1e-4 if dtype == torch.float32 else 5e-2, dtype == torch.float32,
                 seen_operations)


def test_from_pretrained_from_config_and_set_attn_implementation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_COMMON), attn_implementation="layerzero")
    assert model.config._attn_implementation == "layerzero"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="layerzero").eval()
    assert loaded.config._attn_implementation == "layerzero"
    ids, mask = _batch("cpu")
    with torch.no_grad():
        ours = loaded(ids, attention_mask=mask).logits
        loaded.set_attn_implementation("sdpa")
        torch.testing.assert_close(ours, loaded(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_training_with_attention_dropout_runs_backward() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_COMMON, attention_dropout=0.5))
    model.set_attn_implementation("layerzero")
    model.train()
    ids, _ = _batch("cpu")
    torch.manual_seed(3)
    loss_a = model(ids, labels=ids).loss
    loss_a.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()  # no dropout in eval: deterministic
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


class _Attn(nn.Module):
    is_causal = True


def _qkv(hq: int = 4, hkv: int = 2, sq: int = 7, sk: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, hq, sq, 16, generator=g), torch.randn(2, hkv, sk, 16, generator=g),
            torch.randn(2, hkv, sk, 16, generator=g))


def test_attention_forward_masks_gqa_scaling_and_layout() -> None:
    q, k, v = _qkv()
    keep = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[..., 0] = True
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~keep, torch.finfo(torch.float32).min)
    for mask in (keep, additive):
        out, weights = lzt.attention_forward(_Attn(), q, k, v, mask, scaling=0.3)
        assert weights is None and out.shape == (2, 7, 4, 16) and out.is_contiguous()  # (B, S, H, D)
        want = attention_reference(q, k, v, keep, scale=0.3).transpose(1, 2)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    out, _ = lzt.attention_forward(_Attn(), q, k, v, None)  # no mask: causal, from the module
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, is_causal=True).transpose(1, 2),
                               atol=1e-5, rtol=1e-5)
    out, _ = lzt.attention_forward(_Attn(), q, k, v, None, is_causal=False)  # an encoder's call
    torch.testing.assert_close(out.double(), attention_reference(q, k, v).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_attention_forward_sliding_window_without_a_mask() -> None:
    q, k, v = _qkv(sq=9, sk=9)
    out, _ = lzt.attention_forward(_Attn(), q, k, v, None, sliding_window=4)
    want = attention_reference(q, k, v, is_causal=True, window=4).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    full = attention_reference(q, k, v, is_causal=True).transpose(1, 2)
    assert not torch.allclose(out.double(), full, atol=1e-3)  # the window really cut


def test_attention_forward_decode_step_and_position_bias() -> None:
    q, k, v = _qkv(sq=1, sk=9)
    out, _ = lzt.attention_forward(_Attn(), q, k, v, None)  # one query sees the whole cache
    torch.testing.assert_close(out.double(), attention_reference(q, k, v).transpose(1, 2), atol=1e-5, rtol=1e-5)
    q, k, v = _qkv(hkv=4)
    bias = torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(4))
    out, _ = lzt.attention_forward(_Attn(), q, k, v, None, is_causal=False, position_bias=bias)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, bias).transpose(1, 2), atol=1e-5,
                               rtol=1e-5)


def test_attention_forward_dropout_changes_the_output() -> None:
    q, k, v = _qkv()
    plain, _ = lzt.attention_forward(_Attn(), q, k, v, None)
    dropped, _ = lzt.attention_forward(_Attn(), q, k, v, None, dropout=0.5)
    assert torch.isfinite(dropped).all() and not torch.allclose(plain, dropped)


def test_attention_forward_softcap_goes_to_lz_attention() -> None:
    q, k, v = _qkv()
    out, _ = lzt.attention_forward(_Attn(), q, k, v, None, softcap=0.5)
    want = attention_reference(q, k, v, None, True, softcap=0.5).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


# -- which model classes can use "layerzero": they work, or fail at construction with a way out ----------

_HF5 = int(transformers.__version__.split(".")[0]) >= 5
_TINY = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4)
# model -> (class name, config name, config arguments, input names beyond input_ids)
_ARCH = {
    "bert": ("BertModel", "BertConfig", dict(_TINY, hidden_size=64, intermediate_size=128), ()),
    "roberta": ("RobertaModel", "RobertaConfig", dict(_TINY, hidden_size=64, intermediate_size=128), ()),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4), ("decoder_input_ids",)),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(_TINY, hidden_size=64), ()),
    "llama": ("LlamaForCausalLM", "LlamaConfig", _COMMON, ()),
}


def _arch(name: str) -> tuple[type, Any]:
    cls_name, cfg_name, kwargs, _ = _ARCH[name]
    return getattr(transformers, cls_name), getattr(transformers, cfg_name)(**kwargs)


@pytest.fixture
def attention_calls() -> Iterator[list[str]]:
    """The module class of every call transformers makes to the "layerzero" attention function."""
    from transformers.modeling_utils import AttentionInterface

    calls: list[str] = []

    def spy(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(module).__name__)
        return lzt.attention_forward(module, *args, **kwargs)

    AttentionInterface.register("layerzero", spy)
    yield calls
    lzt.register()


def _inputs(name: str) -> dict[str, torch.Tensor]:
    ids, mask = _batch("cpu")
    inputs = {"input_ids": ids, "attention_mask": mask}
    for extra in _ARCH[name][3]:
        inputs[extra] = ids
    return inputs


def _main_output(out: Any) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.skipif(not _HF5, reason="BERT, RoBERTa and T5 use AttentionInterface from transformers 5")
@pytest.mark.parametrize("name", ["bert", "roberta", "t5", "llama"])
def test_encoders_and_encoder_decoders_match_sdpa(name: str, attention_calls: list[str]) -> None:
    cls, config = _arch(name)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="layerzero").eval()
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        want = _main_output(ref(**_inputs(name)))
        assert attention_calls == []
        got = _main_output(ours(**_inputs(name)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layers = 6 if name == "t5" else 2  # T5: encoder self, decoder self and cross attention per layer
    assert len(attention_calls) == layers


@pytest.mark.parametrize("build", ["constructor", "from_config"])
def test_falcon_follows_its_transformers_release(build: str, attention_calls: list[str]) -> None:
    """Falcon chose its attention itself up to transformers 5.24 (construction fails, naming the class and
    sdpa); from 5.25 it goes through AttentionInterface, so "layerzero" builds, runs every layer's attention
    and matches sdpa. Which one holds is read from the installed Falcon, not from a version table."""
    cls, config = _arch("falcon")
    if lzt.uses_attention_interface(cls):
        torch.manual_seed(0)
        ref = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
        if build == "constructor":
            config._attn_implementation = "layerzero"
            ours = cls(config).eval()
        else:
            ours = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="layerzero").eval()
        ours.load_state_dict(ref.state_dict())
        with torch.no_grad():
            want = _main_output(ref(**_inputs("falcon")))
            got = _main_output(ours(**_inputs("falcon")))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert len(attention_calls) == config.num_hidden_layers
        return
    with pytest.raises(UnsupportedModelError, match=r"FalconForCausalLM .*Use attn_implementation='sdpa' for "
                                                    r"FalconForCausalLM.*includes LlamaForCausalLM") as info:
        if build == "constructor":
            config._attn_implementation = "layerzero"
            cls(config)
        else:
            transformers.AutoModelForCausalLM.from_config(config, attn_implementation="layerzero")
    assert info.value.model_class == "FalconForCausalLM" and isinstance(info.value, ValueError)
    model = cls._from_config(config, attn_implementation="sdpa")  # the way out works
    assert lzt.patch(model).count > 0  # and patch() still applies


_SILENT_MODEL = """
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


    class SilentConfig(PretrainedConfig):
        model_type = "layerzero_silent"


    class SilentAttention(nn.Module):  # computes attention itself, never through AttentionInterface
        def forward(self, x):
            return x


    class SilentModel(PreTrainedModel):
        config_class = SilentConfig
        _supports_sdpa = {sdpa}

        def __init__(self, config):
            super().__init__(config)
            self.attn = SilentAttention()
            self.post_init()
"""


@pytest.mark.parametrize("sdpa", [True, False])
def test_a_model_that_would_never_call_layerzero_fails_at_construction(
        sdpa: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers 4.57's T5 accepted the name and ran its own eager attention: a class like that one.
    name = f"layerzero_silent_model_{sdpa}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(_SILENT_MODEL.format(sdpa=sdpa)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    assert not lzt.uses_attention_interface(module.SilentModel)
    instead = "sdpa" if sdpa else "eager"
    with pytest.raises(UnsupportedModelError, match=f"SilentModel .*Use attn_implementation='{instead}'"):
        module.SilentModel(module.SilentConfig(attn_implementation="layerzero"))
    assert module.SilentModel(module.SilentConfig(attn_implementation="eager")) is not None
    monkeypatch.delitem(sys.modules, name)


@pytest.mark.skipif(not hasattr(transformers.PreTrainedModel, "set_attn_implementation"),
                    reason="transformers without set_attn_implementation")
def test_switching_a_built_model_to_layerzero_is_checked_too() -> None:
    """``model.set_attn_implementation("layerzero")`` on a built model of a class that chooses its attention
    itself: transformers only logged that it cannot switch and the model stayed on eager; it now raises as
    construction does. A model that can switch does, and runs layerzero."""
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=64, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM .*Use attn_implementation="):
        bloom.set_attn_implementation("layerzero")
    llama = LlamaForCausalLM._from_config(LlamaConfig(**_COMMON), attn_implementation="sdpa")
    llama.set_attn_implementation("layerzero")
    assert llama.config._attn_implementation == "layerzero"


def test_output_attentions_warns_once_that_no_weights_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lzt, "_WARNED", set())
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**_COMMON), attn_implementation="layerzero").eval()
    ids, _ = _batch("cpu")
    with torch.no_grad():
        with pytest.warns(UserWarning, match="computes no attention weights.*use attn_implementation='eager'"):
            out = model(ids, output_attentions=True)
        assert not any(a is not None for a in (out.attentions or ()))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*computes no attention weights")
            model(ids, output_attentions=True)  # once per process (transformers 4.x adds a warning of its own)
            model(ids)


def test_attention_forward_rejects_head_mask() -> None:
    q, k, v = _qkv()
    with pytest.raises(InvalidInputError, match="head_mask is not supported"):
        lzt.attention_forward(_Attn(), q, k, v, None, head_mask=torch.ones(4))


@pytest.mark.skipif(_HF5, reason="transformers 4.x only (CI runs 5.x; checked by hand on 4.57)")
@pytest.mark.parametrize("name", ["bert", "roberta", "t5", "falcon"])
def test_transformers_4_classes_with_their_own_attention_fail_at_construction(name: str) -> None:
    cls, config = _arch(name)
    with pytest.raises(UnsupportedModelError, match=f"{cls.__name__} .*Use attn_implementation="):
        cls._from_config(config, attn_implementation="layerzero")


@pytest.mark.skipif(_HF5, reason="transformers 4.x only (CI runs 5.x; checked by hand on 4.57)")
def test_transformers_4_llama_matches_sdpa(attention_calls: list[str]) -> None:
    cls, config = _arch("llama")
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="layerzero").eval()
    ours.load_state_dict(ref.state_dict())
    ids, mask = _batch("cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
        assert len(attention_calls) == 2
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                           ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))


class GemmaLikeRMSNorm(nn.Module):
    """An RMSNorm by name whose arithmetic differs (``1 + weight``): patch() must leave it alone."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_patch_verifies_each_module_class_and_unpatch_restores() -> None:
    model = nn.Sequential(nn.LayerNorm(32), nn.GELU(approximate="tanh"), nn.SiLU(), GemmaLikeRMSNorm(32),
                          transformers.activations.GELUActivation(), nn.Linear(32, 32))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x)
        report = lzt.patch(model)
        assert report.patched == {"layer_norm": ["0"], "gelu": ["1", "4"], "silu": ["2"]}
        assert list(report.skipped) == ["3"] and "computes something else" in report.skipped["3"]
        assert "3 modules" not in str(report) and "skipped 3: GemmaLikeRMSNorm" in str(report)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        assert lzt.patch(model).count == 0  # already patched: nothing to do
    assert lzt.unpatch(model) == 4
    assert all("forward" not in m.__dict__ for m in model)


def test_registered_with_sdpa_style_masks() -> None:
    assert lzt.is_registered()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ALL_MASK_ATTENTION_FUNCTIONS["layerzero"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def test_post_import_hook_runs_after_the_module_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "layerzero_hook_probe_module"
    (tmp_path / f"{name}.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    seen: list[int] = []
    hooks.when_imported(name, lambda m: seen.append(m.VALUE))
    assert name in hooks.pending() and seen == []
    importlib.import_module(name)
    assert seen == [42] and name not in hooks.pending()
    hooks.when_imported(name, lambda m: seen.append(m.VALUE + 1))  # already imported: runs at once
    assert seen == [42, 43]
    monkeypatch.delitem(sys.modules, name)


def test_a_failing_hook_never_breaks_the_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    name = "layerzero_hook_probe_failing"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    hooks.when_imported(name, lambda m: 1 / 0)
    assert importlib.import_module(name).VALUE == 1
    assert "setting up the integration for layerzero_hook_probe_failing failed: ZeroDivisionError" in caplog.text
    monkeypatch.delitem(sys.modules, name)


def test_compiled_model_has_no_graph_break() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_COMMON)).eval()
    model.set_attn_implementation("layerzero")
    lzt.patch(model)
    ids, _ = _batch("cpu")

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        compiled = torch.compile(logits, fullgraph=True, backend=backend)  # fullgraph: a break would raise
        torch.testing.assert_close(compiled(ids), logits(ids), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1
    targets = {getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes if n.op == "call_function"}
    # PyTorch's kernels are traced as PyTorch code (Inductor fuses them), not as layerzero custom ops
    assert not any("layerzero" in t for t in targets), targets
    assert {"scaled_dot_product_attention", "rms_norm", "silu"} <= targets, targets
    torch._dynamo.reset()


# -- docs/integrations.md: every python example runs ---------------------------------------------

_DOC = page("integrations.md")


def _doc_blocks(cuda: bool) -> list[str]:
    return [b for b in python_blocks(_DOC) if needs_cuda(b) == cuda]


def _run_blocks(blocks: list[str], tmp_path: Path) -> None:
    assert blocks
    for i, code in enumerate(blocks):
        path = tmp_path / f"example_{i}.py"
        path.write_text(code)
        runpy.run_path(str(path), run_name="__main__")


def test_readme_examples_run(tmp_path: Path) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    _run_blocks(_doc_blocks(cuda=False), tmp_path)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_readme_cuda_examples_run(tmp_path: Path) -> None:
    _run_blocks(_doc_blocks(cuda=True), tmp_path)


def test_compiled_model_follows_the_sequence_length_in_one_graph_per_kind() -> None:
    """transformers' causal flag is ``q_len > 1``: a SymBool once the length is dynamic. The stand-in used to hand
    it to the trace-time kernel choice, which takes constants, so the second length failed under fullgraph (and
    broke the graph without it); now it is guarded, as SDPA's flag is."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_COMMON)).eval()
    model.set_attn_implementation("layerzero")
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for length in (12, 5, 9, 7):
            ids = torch.randint(1, _COMMON["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2, len(graphs)  # the first length, then one dynamic graph for the rest
    torch._dynamo.reset()


def test_a_module_that_picks_attention_classes_from_its_own_table_is_refused(tmp_path, monkeypatch) -> None:
    """transformers 4.x's AltCLIP, GIT and SAM mention ALL_ATTENTION_FUNCTIONS but build some attention modules
    from a table of their own keyed by the implementation's name: "layerzero" ended in a bare KeyError."""
    import importlib

    from layerzero.errors import UnsupportedModelError

    (tmp_path / "lz_mixed_model.py").write_text(
        "from torch import nn\n"
        "ALL_ATTENTION_FUNCTIONS = {}\n"
        "class MixedSelfAttention(nn.Module):\n    pass\n"
        "MIXED_SELF_ATTENTION_CLASSES = {\"eager\": MixedSelfAttention}\n"
        "class MixedModel(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("lz_mixed_model")
    assert not lzt.uses_attention_interface(module.MixedModel)
    with pytest.raises(UnsupportedModelError, match="MixedModel .* chooses its attention itself"):
        lzt.check_model_class(module.MixedModel)
