"""SelectionContext (frozen, hashable, built by hand or from tensors) and KernelSpec (validated, with a
reason for every declared constraint)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from layerzero import InvalidInputError, KernelSpec, SelectionContext
from layerzero.spec import Reason, ReasonCode
from layerzero.context import bucket_pow2, dtype_from_name


def noop(*args: object) -> None:
    return None


# -- SelectionContext ---------------------------------------------------------------------------

def test_keyword_construction_as_the_seed_shows() -> None:
    ctx = SelectionContext(batch_size=8, seq_len=2048, dtype=torch.float16, device="cpu", is_causal=True)
    assert (ctx.batch_size, ctx.seq_len_q, ctx.seq_len_k, ctx.seq_len) == (8, 2048, 2048, 2048)
    assert ctx.dtype is torch.float16 and ctx.dtype_name == "float16"
    assert ctx.platform == "cpu" and ctx.device == torch.device("cpu") and ctx.is_causal
    assert ctx.sm == 0 and ctx.compute_capability is None


@pytest.mark.parametrize("device", ["cuda:1", torch.device("cuda", 1)])
def test_device_as_string_or_torch_device(device: str | torch.device) -> None:
    ctx = SelectionContext(device=device, compute_capability=90)
    assert (ctx.platform, ctx.device_index, ctx.compute_capability, ctx.sm) == ("cuda", 1, (9, 0), 90)
    assert ctx.device == torch.device("cuda", 1)


def test_dtype_by_name() -> None:
    for name in ("bfloat16", "bf16", "torch.bfloat16"):
        assert SelectionContext(dtype=name).dtype is torch.bfloat16
    assert dtype_from_name(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        SelectionContext(dtype="float7")


def test_frozen_slotted_hashable() -> None:
    a = SelectionContext(device="cuda", compute_capability=(8, 0), dtype=torch.float16, batch_size=2, seq_len=64)
    b = SelectionContext(device="cuda", compute_capability=(8, 0), dtype="float16", batch_size=2, seq_len_q=64,
                         seq_len_k=64)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.replace(batch_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.batch_size = 3  # type: ignore[misc]
    assert not hasattr(a, "__dict__")


def test_derived_fields_and_defaults() -> None:
    ctx = SelectionContext(num_heads=32, head_dim=128)
    assert ctx.num_kv_heads == 32 and ctx.head_dim_v == 128 and not ctx.is_gqa and not ctx.is_mqa
    assert SelectionContext(num_heads=32, num_kv_heads=8).is_gqa
    mqa = SelectionContext(num_heads=32, num_kv_heads=1)
    assert mqa.is_mqa and not mqa.is_gqa
    assert ctx.mask_kind == "none" and ctx.dropout_p == 0.0 and ctx.tp_size == 1 and ctx.is_contiguous


def test_replace_bucketed_and_to_dict() -> None:
    ctx = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch_size=5,
                           seq_len=1000, num_tokens=3)
    b = ctx.bucketed()
    assert (b.batch_size, b.seq_len_q, b.seq_len_k, b.num_tokens) == (8, 1024, 1024, 4)
    assert [bucket_pow2(n) for n in (None, 0, 1, 2, 5, 64, 65)] == [None, 0, 1, 2, 8, 64, 128]
    moved = ctx.replace(device="cpu")
    assert moved.platform == "cpu" and moved.compute_capability is None  # CPU has no capability
    d = ctx.to_dict()
    json.dumps(d)
    assert d["dtype"] == "bfloat16" and d["device"] == "cuda" and d["sm"] == 90 and d["seq_len"] == 1000


def test_from_attention_bhsd_and_bshd() -> None:
    q = torch.randn(2, 8, 16, 64)
    k = torch.randn(2, 2, 24, 64)
    v = torch.randn(2, 2, 24, 32)
    ctx = SelectionContext.from_attention(q, k, v, is_causal=True, layout="BHSD")
    assert (ctx.batch_size, ctx.num_heads, ctx.num_kv_heads, ctx.seq_len_q, ctx.seq_len_k) == (2, 8, 2, 16, 24)
    assert (ctx.head_dim, ctx.head_dim_v, ctx.layout, ctx.is_causal, ctx.is_gqa) == (64, 32, "BHSD", True, True)
    assert not ctx.requires_grad and ctx.mask_kind == "none"
    bshd = SelectionContext.from_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BSHD")
    assert (bshd.num_heads, bshd.seq_len_q, bshd.seq_len_k, bshd.layout) == (8, 16, 24, "BSHD")
    masked = SelectionContext.from_attention(q, k, v, attn_mask=torch.zeros(16, 24, dtype=torch.bool))
    assert masked.mask_kind == "bool"
    assert SelectionContext.from_attention(q, k, v, attn_mask=torch.zeros(16, 24)).mask_kind == "additive"
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape, last-dim stride != 1
    assert not SelectionContext.from_attention(strided, k, v).is_contiguous


def test_from_attention_requires_grad_follows_grad_mode() -> None:
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k = v = torch.randn(1, 2, 4, 8)
    assert SelectionContext.from_attention(q, k, v).requires_grad
    with torch.no_grad():
        assert not SelectionContext.from_attention(q, k, v).requires_grad


def test_from_rows() -> None:
    ctx = SelectionContext.from_rows(torch.randn(2, 3, 128, dtype=torch.float16))
    assert (ctx.hidden_size, ctx.num_tokens, ctx.batch_size, ctx.dtype) == (128, 6, 2, torch.float16)
    assert SelectionContext.from_rows(torch.randn(4, 8), interleaved=True).interleaved


# -- KernelSpec -------------------------------------------------------------------------------------

def test_only_identity_and_impl_are_required_and_defaults_are_permissive() -> None:
    spec = KernelSpec("custom_anything", "rms_norm", "custom", noop)
    assert spec.priority == 50 and spec.supports_autograd and spec.causal_alignment == "upper_left"
    ctx = SelectionContext(device="cuda", compute_capability=(7, 0), dtype=torch.float64, batch_size=10**6,
                           seq_len=10**6, num_heads=64, num_kv_heads=8, head_dim=999, is_causal=True,
                           mask_kind="additive", dropout_p=0.5, requires_grad=True, deterministic=True,
                           is_contiguous=False, cuda_graph_capturing=True, compiling=True)
    assert spec.check(ctx) == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kernel_id": "Bad-Id"}, "kernel_id must be snake_case, got 'Bad-Id'"),
    ({"operation": "Attention"}, "operation must be a dotted lower-case name, got 'Attention'"),
    ({"impl": 42}, "impl of 'custom_x' must be callable, got int"),
    ({"priority": 1001}, "priority of 'custom_x' must be in 0..1000, got 1001"),
    ({"causal_alignment": "middle"}, "causal_alignment must be 'upper_left' or 'lower_right', got 'middle'"),
])
def test_spec_validation(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = dict(kernel_id="custom_x", operation="rms_norm", backend="custom", impl=noop)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KernelSpec(**base)  # type: ignore[arg-type]


def test_spec_is_frozen_hashable_and_normalises_sets() -> None:
    a = KernelSpec("custom_x", "attention", "custom", noop, dtypes=["float16", torch.bfloat16], layouts=["BHSD"])
    b = KernelSpec("custom_x", "attention", "custom", noop, dtypes={torch.bfloat16, torch.float16},
                   layouts=frozenset({"BHSD"}))
    assert a.dtypes == frozenset({torch.float16, torch.bfloat16}) and isinstance(a.layouts, frozenset)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.priority = 1  # type: ignore[misc]
    d = a.to_dict()
    json.dumps(d)
    assert d["dtypes"] == ["bfloat16", "float16"] and "impl" not in d


_CUDA80 = dict(device="cuda", compute_capability=(8, 0))


@pytest.mark.parametrize(("spec_kw", "ctx_kw", "code", "message"), [
    ({"platforms": {"cuda"}}, {"device": "cpu"}, ReasonCode.PLATFORM_MISMATCH, "device is cpu, kernel runs on cuda"),
    ({"min_compute_capability": (8, 0)}, {"device": "cuda", "compute_capability": (7, 5)}, ReasonCode.SM_TOO_OLD,
     "needs compute capability >= 8.0, this GPU has 7.5"),
    ({"min_compute_capability": (8, 0)}, {"device": "cuda", "compute_capability": None}, ReasonCode.SM_TOO_OLD,
     "needs compute capability >= 8.0, this GPU's is unknown"),
    ({"max_compute_capability": (9, 0)}, {"device": "cuda", "compute_capability": (10, 0)}, ReasonCode.SM_TOO_NEW,
     "supports compute capability <= 9.0, this GPU has 10.0"),
    ({"dtypes": {torch.float16, torch.bfloat16}}, {"dtype": torch.float32}, ReasonCode.DTYPE_UNSUPPORTED,
     "dtype=float32 (supported: bfloat16, float16)"),
    ({"head_dim_min": 16}, {"head_dim": 8}, ReasonCode.HEAD_DIM_TOO_SMALL, "head_dim=8 < 16 minimum"),
    ({"head_dim_max": 256}, {"head_dim": 320}, ReasonCode.HEAD_DIM_TOO_LARGE, "head_dim=320 > 256 supported"),
    ({"head_dim_multiple": 8}, {"head_dim": 36}, ReasonCode.HEAD_DIM_ALIGNMENT,
     "head_dim=36 is not a multiple of 8 (pad the head dimension)"),
    ({"head_dim_v_equal": True}, {"head_dim": 64, "head_dim_v": 32}, ReasonCode.HEAD_DIM_MISMATCH,
     "value head_dim=32 differs from query/key head_dim=64"),
    ({"max_seq_len": 4096}, {"seq_len_q": 16, "seq_len_k": 8192}, ReasonCode.SEQ_LEN_TOO_LONG,
     "seq_len=8192 > 4096 supported"),
    ({"max_batch_size": 64}, {"batch_size": 65}, ReasonCode.BATCH_TOO_LARGE, "batch_size=65 > 64 supported"),
    ({"max_hidden_size": 8192}, {"hidden_size": 16384}, ReasonCode.HIDDEN_TOO_LARGE,
     "hidden_size=16384 > 8192 supported"),
    ({"supports_gqa": False}, {"num_heads": 32, "num_kv_heads": 8}, ReasonCode.GQA_UNSUPPORTED,
     "grouped-query attention (num_heads=32, num_kv_heads=8) is not supported"),
    ({"supports_mqa": False}, {"num_heads": 32, "num_kv_heads": 1}, ReasonCode.MQA_UNSUPPORTED,
     "multi-query attention (num_heads=32, num_kv_heads=1) is not supported"),
    ({"mask_kinds": {"none"}}, {"mask_kind": "bool"}, ReasonCode.MASK_UNSUPPORTED, "mask=bool (supported: none)"),
    ({"supports_causal": False}, {"is_causal": True}, ReasonCode.CAUSAL_UNSUPPORTED, "is_causal=True is not supported"),
    ({"causal_alignment": "lower_right"}, {"is_causal": True, "seq_len_q": 1, "seq_len_k": 10},
     ReasonCode.CAUSAL_ALIGNMENT, "causal mask is aligned lower-right, which differs from SDPA's upper-left "
     "when seq_len_q=1 != seq_len_k=10"),
    ({}, {"window": 128}, ReasonCode.WINDOW_UNSUPPORTED, "sliding window=128 is not supported"),
    ({"supports_dropout": False}, {"dropout_p": 0.1}, ReasonCode.DROPOUT_UNSUPPORTED,
     "dropout_p=0.1 > 0 is not supported"),
    ({"layouts": {"BHSD"}}, {"layout": "BSHD"}, ReasonCode.LAYOUT_UNSUPPORTED, "layout=BSHD (supported: BHSD)"),
    ({"requires_contiguous": True}, {"is_contiguous": False}, ReasonCode.NOT_CONTIGUOUS,
     "inputs are not contiguous in the last dimension (call .contiguous())"),
    ({"supports_autograd": False}, {"requires_grad": True}, ReasonCode.GRAD_UNSUPPORTED,
     "inputs require grad and this kernel has no backward"),
    ({"deterministic": False}, {"deterministic": True}, ReasonCode.NOT_DETERMINISTIC,
     "torch.use_deterministic_algorithms(True) is on and this kernel is not deterministic"),
    ({"cuda_graph_safe": False}, {"cuda_graph_capturing": True}, ReasonCode.CUDA_GRAPH_UNSAFE,
     "a CUDA graph is being captured and this kernel is not capture-safe"),
    ({"compile_safe": False}, {"compiling": True}, ReasonCode.COMPILE_UNSAFE,
     "torch.compile is tracing and this kernel is not compile-safe"),
    ({"supports_interleaved": False}, {"interleaved": True}, ReasonCode.VARIANT_UNSUPPORTED,
     "rope variant interleaved is not supported by this kernel"),
    ({"approximations": {"none"}}, {"approximate": "tanh"}, ReasonCode.VARIANT_UNSUPPORTED,
     "approximate='tanh' (supported: none)"),
])
def test_each_constraint_gives_one_readable_reason(spec_kw: dict[str, object], ctx_kw: dict[str, object], code: str,
                                                   message: str) -> None:
    spec = KernelSpec("custom_x", "attention", "custom", noop, **spec_kw)  # type: ignore[arg-type]
    reasons = spec.check(SelectionContext(**ctx_kw))  # type: ignore[arg-type]
    assert [(r.code, r.message) for r in reasons] == [(code, message)]
    assert str(reasons[0]) == message
    assert reasons[0].to_dict() == {"code": code, "message": message}
    assert spec.check(SelectionContext(**_CUDA80)) == []  # a plain context inside every constraint


def test_constraints_that_are_fine_give_no_reason() -> None:
    spec = KernelSpec("custom_x", "attention", "custom", noop, platforms={"cuda"}, min_compute_capability=(8, 0),
                      dtypes={torch.float16}, head_dim_max=256, head_dim_multiple=8, mask_kinds={"none"},
                      causal_alignment="lower_right", supports_gqa=False)
    ok = SelectionContext(device="cuda", compute_capability=(8, 0), dtype=torch.float16, head_dim=128, num_heads=8,
                          is_causal=True, seq_len=64)
    assert spec.check(ok) == []
    # every failing constraint is reported, not just the first
    bad = ok.replace(dtype=torch.float32, head_dim=300, num_kv_heads=2, seq_len_q=1)
    assert [r.code for r in spec.check(bad)] == [ReasonCode.DTYPE_UNSUPPORTED, ReasonCode.HEAD_DIM_TOO_LARGE,
                                                 ReasonCode.HEAD_DIM_ALIGNMENT, ReasonCode.GQA_UNSUPPORTED,
                                                 ReasonCode.CAUSAL_ALIGNMENT]


def test_extra_check_reasons_are_appended() -> None:
    def only_even_batches(ctx: SelectionContext) -> list[Reason]:
        if ctx.batch_size and ctx.batch_size % 2:
            return [Reason(ReasonCode.CUSTOM, f"batch_size={ctx.batch_size} is odd")]
        return []

    spec = KernelSpec("custom_x", "rms_norm", "custom", noop, extra_check=only_even_batches)
    assert spec.check(SelectionContext(batch_size=4)) == []
    assert [str(r) for r in spec.check(SelectionContext(batch_size=3))] == ["batch_size=3 is odd"]


def test_tolerance_for() -> None:
    spec = KernelSpec("custom_x", "rms_norm", "custom", noop, tolerance={"float16": (1e-2, 1e-2)})
    assert spec.tolerance_for(torch.float16) == (1e-2, 1e-2)
    assert spec.tolerance_for(torch.bfloat16) == (1.6e-2, 1.6e-2)  # default for the dtype
    assert spec.tolerance_for(torch.float64) == (1e-9, 1e-9)


@pytest.mark.parametrize("kwargs, problem", [
    ({"batch_size": "8"}, "batch_size must be an int >= 0 or None, got '8'"),
    ({"head_dim": -1}, "head_dim must be an int >= 0 or None, got -1"),
    ({"seq_len": 2.5}, "seq_len must be an int >= 0 or None, got 2.5"),
    ({"compute_capability": (9,)}, "compute_capability must be (major, minor), an int like 90, or None, got (9,)"),
    ({"dtype": "float61"}, "dtype: unknown dtype 'float61'"),
    ({"device": "tpu"}, "device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 'tpu'"),
    ({"is_causal": "false"}, "is_causal must be a bool, got 'false'"),
    ({"layout": "bhsd"}, "layout must be one of None, 'BHSD', 'BSHD', got 'bhsd'"),
    ({"dropout_p": 1.0}, "dropout_p must be a number in [0, 1), got 1.0"),
    ({"window": 0}, "window must be an int >= 1 or None, got 0"),
    ({"tp_size": 2, "tp_rank": 2}, "tp_size must be an int >= 1 and tp_rank an int in [0, tp_size), got 2 and 2"),
])
def test_a_bad_context_value_is_named(kwargs: dict, problem: str) -> None:
    """A value of the wrong type reached selection's comparisons as a bare TypeError (``'>' not supported between
    'str' and 'int'``), an IndexError or torch's RuntimeError; ``is_causal="false"`` read as True."""
    with pytest.raises(InvalidInputError, match=re.escape(problem)):
        SelectionContext(**kwargs)


def test_every_problem_of_a_context_is_named_at_once() -> None:
    with pytest.raises(InvalidInputError) as info:
        SelectionContext(batch_size="8", head_dim="64", is_causal="yes")
    assert str(info.value).count("must be") == 3
    ctx = SelectionContext(device="cuda:1", compute_capability=90, dtype="bf16", batch_size=0, is_causal=1)
    assert ctx.sm == 90 and ctx.is_causal is True and ctx.device == torch.device("cuda", 1)


def test_contexts_from_tensors_equal_the_validated_constructors() -> None:
    """from_rows / from_attention skip the constructor's checks (their values come from tensors and validated
    arguments); they must still fill every field as the constructor does."""
    import dataclasses

    from layerzero.context import _TRUSTED_NAMES

    fields = {f.name for f in dataclasses.fields(SelectionContext)}
    assert fields - _TRUSTED_NAMES == {"platform", "device_index", "compute_capability", "dtype"}
    x = torch.randn(7, 64)
    assert SelectionContext.from_rows(x, interleaved=True, head_dim=64) == SelectionContext(
        device="cpu", dtype=torch.float32, hidden_size=64, num_tokens=7, batch_size=7, interleaved=True, head_dim=64,
        deterministic=torch.are_deterministic_algorithms_enabled())
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    assert SelectionContext.from_attention(q, k, k, is_causal=True, scale=1, window=3) == SelectionContext(
        device="cpu", dtype=torch.float32, batch_size=2, seq_len_q=8, seq_len_k=8, num_heads=4, num_kv_heads=2,
        head_dim=16, layout="BHSD", is_causal=True, scale=1.0, window=3,
        deterministic=torch.are_deterministic_algorithms_enabled())
    with pytest.raises(TypeError, match="unexpected keyword"):
        SelectionContext.from_rows(x, hidden=3)
