"""transformers' padding-free packed batches on attn_implementation="layerzero" run lz.attention_varlen."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM  # noqa: E402

import layerzero.ops as lz_ops  # noqa: E402
from layerzero.integrations import transformers_packed as packed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
LENGTHS = (5, 1, 9)


@pytest.fixture
def operations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The layerzero ops the integration calls (the real ops run; their names are recorded)."""
    seen: list[str] = []
    for name in ("attention", "attention_varlen"):
        real = getattr(lz_ops, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(lz_ops, name, spy)
    yield seen


def _model(dtype: torch.dtype = torch.float64, **extra: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_CONFIG, **extra)).to(dtype).eval()


def _sequences(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=gen) for n in LENGTHS]


def _alone(model: LlamaForCausalLM, seqs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])


def _packed_inputs(seqs: list[torch.Tensor], flash_kwargs: bool) -> dict[str, object]:
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collate([{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels")
    return dict(batch)


def _assert_each_sequence_alone(model: Any, seqs: list[torch.Tensor], inputs: dict[str, object],
                                operations: list[str]) -> None:
    """The packed batch's logits are each sequence's alone, every layer through lz.attention_varlen."""
    want = _alone(model, seqs)
    operations.clear()
    with torch.no_grad():
        got = model(**inputs).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert operations == ["attention_varlen"] * _CONFIG["num_hidden_layers"]


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_each_sequence_alone(flash_kwargs: bool, operations: list[str]) -> None:
    model = _model(attn_implementation="layerzero")
    seqs = _sequences()
    inputs = _packed_inputs(seqs, flash_kwargs)
    assert inputs["input_ids"].shape == (1, sum(LENGTHS))
    assert ("cu_seq_lens_q" in inputs) is flash_kwargs
    _assert_each_sequence_alone(model, seqs, inputs, operations)


def test_cu_seq_lens_alone_keep_the_sequences_apart() -> None:
    # Without position_ids transformers builds no packed mask (positions 0..total-1): the keywords decide.
    model = _model(attn_implementation="layerzero")
    seqs = _sequences(2)
    inputs = _packed_inputs(seqs, True)
    inputs.pop("position_ids")
    with torch.no_grad():
        got = model(**inputs).logits[0]
        sdpa = _model(attn_implementation="sdpa")(**inputs).logits[0]
    first = LENGTHS[0]
    torch.testing.assert_close(got[:first], _alone(model, seqs[:1]))  # the first sequence starts at position 0
    assert not torch.allclose(got[first:], sdpa[first:])  # sdpa lets the later sequences see the earlier ones


def test_packed_float32_matches_sdpa_with_transformers_mask() -> None:
    # Without a cache transformers builds the packed (block-diagonal) mask for sdpa (with one, a plain causal one).
    seqs = _sequences(3)
    inputs = {**_packed_inputs(seqs, False), "use_cache": False}
    ours, ref = _model(torch.float32, attn_implementation="layerzero"), _model(torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_a_padding_mask_keeps_the_dense_path(operations: list[str]) -> None:
    model = _model(attn_implementation="layerzero")
    inputs = _packed_inputs(_sequences(), False)
    # The caller's padding mask (the last token padded): one sequence as on transformers' flash path, no packing.
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, -1] = 0
    with torch.no_grad():
        got = model(**inputs).logits
        want = _model(attn_implementation="sdpa")(**inputs).logits
    torch.testing.assert_close(got, want)
    assert operations == ["attention"] * _CONFIG["num_hidden_layers"]


@pytest.mark.parametrize("opt", [False, True])
def test_left_padding_with_position_ids_from_the_mask_matches_sdpa(opt: bool, operations: list[str]) -> None:
    """Left padding with ``position_ids = mask.cumsum(-1) - 1`` (OPT builds exactly these itself): the pads read
    -1, -1, -1 then 0, so the last pad stepped into the first real token's sequence and the real tokens attended
    to it (logits off by 0.28 on OPT). A pad before a real token of its sequence keeps the dense path."""
    from transformers import AutoModelForCausalLM, OPTConfig

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if opt:
        cfg: Any = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=64, pad_token_id=1)
        extra: dict[str, Any] = {}
    else:
        cfg, extra = LlamaConfig(**_CONFIG), {"position_ids": mask.cumsum(-1) - 1}
    models = {}
    for impl in ("sdpa", "layerzero"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    models["layerzero"].load_state_dict(models["sdpa"].state_dict())
    with torch.no_grad():
        got = models["layerzero"](input_ids=ids, attention_mask=mask, **extra).logits
        want = models["sdpa"](input_ids=ids, attention_mask=mask, **extra).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])
    assert "attention_varlen" not in operations


def test_training_with_dropout_masks_the_sequences_apart() -> None:
    model = _model(attention_dropout=0.5, attn_implementation="layerzero").train()
    seqs = _sequences()
    inputs = _packed_inputs(seqs, True)
    model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[0], _alone(model, seqs))


@pytest.mark.parametrize("window", [None, 3])
def test_block_diagonal_mask_is_the_per_sequence_causal_mask(window: int | None) -> None:
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    mask = packed.block_diagonal_mask(cu, 7, True, window)[0, 0]
    for i in range(7):
        for j in range(7):
            same = (i < 3) == (j < 3)
            inside = j <= i and (window is None or j > i - window)
            assert bool(mask[i, j]) == (same and inside), (i, j)


def test_packed_layout_from_position_ids_and_keywords() -> None:
    q = torch.randn(1, 4, 6, 8)
    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    cu_q, cu_k, max_q, max_k = packed.packed_layout(q, q, None, {"position_ids": pos})
    assert cu_q.tolist() == [0, 3, 4, 6] and cu_q.dtype == torch.int32 and (max_q, max_k) == (3, 3)
    assert packed.packed_layout(q, q, None, {"position_ids": torch.arange(6)[None]}) is None  # one sequence
    two = q.expand(2, -1, -1, -1)
    cu_2, _, max_2, _ = packed.packed_layout(two, two, None, {"position_ids": pos})  # (1, L) ids, 2 rows
    assert cu_2.tolist() == [0, 3, 4, 6, 9, 10, 12] and max_2 == 3  # every row starts a sequence
    plain = torch.arange(6).expand(2, 6)
    assert packed.packed_layout(two, two, None, {"position_ids": plain}) is None  # an ordinary batch: dense
    assert packed.packed_layout(q, torch.randn(1, 4, 9, 8), None, {"position_ids": pos}) is None  # a cache
    given = {"cu_seq_lens_q": torch.tensor([0, 2, 6]), "cu_seq_lens_k": [0, 2, 6], "max_length_q": torch.tensor(4)}
    cu_q, cu_k, max_q, max_k = packed.packed_layout(q, q, None, given)
    assert cu_k.dtype == torch.int32 and cu_k.tolist() == [0, 2, 6] and (max_q, max_k) == (4, 4)


def test_compiled_packed_batch_has_no_graph_break_and_matches_eager() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    model = _model(torch.float32, attn_implementation="layerzero")
    inputs = {**_packed_inputs(_sequences(), False), "use_cache": False}

    def logits(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    with torch.no_grad():
        eager = logits(inputs["input_ids"], inputs["position_ids"])
        compiled = torch.compile(logits, fullgraph=True, backend="eager")  # fullgraph: a break would raise
        torch.testing.assert_close(compiled(inputs["input_ids"], inputs["position_ids"]), eager,
                                   rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


ROWS = ((5, 1, 9), (7, 8))  # two packed rows of 15 tokens (a packing collator's batch)


def _rows(seed: int = 4) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    seqs = [[torch.randint(0, 128, (n,), generator=gen) for n in row] for row in ROWS]
    ids = torch.stack([torch.cat(row) for row in seqs])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    return {"input_ids": ids, "position_ids": pos}, [s for row in seqs for s in row]


def test_packed_rows_match_each_sequence_alone(operations: list[str]) -> None:
    model = _model(attn_implementation="layerzero")
    inputs, seqs = _rows()
    want = _alone(model, seqs)
    operations.clear()
    with torch.no_grad():
        got = model(**inputs, use_cache=False).logits  # (2, 15, vocab)
    torch.testing.assert_close(got.reshape(-1, got.shape[-1]), want, rtol=1e-9, atol=1e-9)
    assert operations == ["attention_varlen"] * _CONFIG["num_hidden_layers"]
    ref = _model(attn_implementation="sdpa")  # transformers' packed mask per row, on sdpa
    with torch.no_grad():
        torch.testing.assert_close(got, ref(**inputs, use_cache=False).logits, rtol=1e-9, atol=1e-9)


def test_packed_rows_with_dropout_run_a_block_diagonal_mask_per_row(operations: list[str]) -> None:
    model = _model(attention_dropout=0.5, attn_implementation="layerzero").train()
    inputs, seqs = _rows(5)
    model(**inputs, use_cache=False).logits.sum().backward()
    assert set(operations) == {"attention"}
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.0
    cu = torch.tensor([0, 5, 6, 15, 22, 30], dtype=torch.int32)
    q = torch.randn(2, 4, 15, 8, dtype=torch.float64)
    mask = packed.block_diagonal_mask(cu, 30, True, None, rows=2)
    assert mask.shape == (2, 1, 15, 15)
    assert bool(mask[1, 0, 7, 6]) is False and bool(mask[1, 0, 8, 7]) is True  # row 1: sequences 7 + 8
    got = packed.packed_attention(q, q, q, (cu, cu, 9, 9), 0.5, None, True, None, sinks=torch.zeros(4))
    assert got.shape == (2, 15, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, use_cache=False).logits.reshape(30, -1), _alone(model, seqs))


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_a_sliding_window_model_keeps_packed_sequences_apart(flash_kwargs: bool, operations: list[str]) -> None:
    """Mistral with a window shorter than the packed row: transformers' sliding-window mask for the row does not
    keep the sequences apart (its sdpa and eager paths mix them); layerzero attends per sequence, as the flash
    path does and as the docs promise, with the window inside each sequence."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**_CONFIG, sliding_window=3)).to(torch.float64).eval()
    model.set_attn_implementation("layerzero")
    seqs = _sequences(5)
    inputs = _packed_inputs(seqs, flash_kwargs)
    _assert_each_sequence_alone(model, seqs, inputs, operations)
