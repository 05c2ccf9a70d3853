"""The public operations (``lz.attention``, ``lz.rms_norm``, ...) against float64 references, the
layouts and causal semantics of attention, and bad input on both the slow and the cached path."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.errors import InvalidInputError
from layerzero.ops import op_for
from layerzero.ops.attention import attention_reference
from layerzero.ops.sampling import filtered_probs
from layerzero.runtime import get_runtime

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def g() -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(20240601)
    return gen


def rnd(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def close_to_reference(out: torch.Tensor, ref: torch.Tensor, operation: str, *tensors: Any, **kw: Any) -> None:
    """Compare with the tolerance the selected kernel declares for this dtype."""
    kid = lz.which(operation, *tensors, **kw)
    atol, rtol = lz.get_global_kernel_registry().get(kid).tolerance_for(out.dtype)
    torch.testing.assert_close(out.double(), ref.to(out.device).double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{operation} via {kid}: {m}")


# -- every op against its reference ----------------------------------------------------------------

ATTENTION_CALLS = [
    # (id, q shape, kv heads, kv seq, kwargs)
    ("full", (2, 8, 32, 64), 8, 32, {}),
    ("causal", (2, 8, 32, 64), 8, 32, {"is_causal": True}),
    ("cross", (2, 4, 8, 32), 4, 40, {}),
    ("decode", (4, 8, 1, 64), 8, 96, {"operation": "attention.decode"}),
    ("gqa", (2, 8, 16, 32), 2, 16, {"is_causal": True}),
    ("mqa", (2, 8, 16, 32), 1, 16, {}),
    ("scale", (1, 2, 16, 32), 2, 16, {"scale": 0.25}),
    ("window", (1, 4, 64, 32), 4, 64, {"is_causal": True, "window": 8, "operation": "attention.sliding_window"}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("qshape", "hkv", "sk", "kw"), [pytest.param(*c[1:], id=c[0]) for c in ATTENTION_CALLS])
def test_attention_matches_reference(g: torch.Generator, device: str, dtype: torch.dtype, qshape: tuple[int, ...],
                                     hkv: int, sk: int, kw: dict[str, Any]) -> None:
    b, _, _, d = qshape
    q = rnd(g, *qshape, dtype=dtype, device=device)
    k = rnd(g, b, hkv, sk, d, dtype=dtype, device=device)
    v = rnd(g, b, hkv, sk, d, dtype=dtype, device=device)
    out = lz.attention(q, k, v, **kw)
    ref = attention_reference(q, k, v, None, kw.get("is_causal", False), 0.0, kw.get("scale"), kw.get("window"))
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    operation = kw.get("operation") or ("attention.causal" if kw.get("is_causal") else "attention.full")
    opts = {k_: v_ for k_, v_ in kw.items() if k_ != "operation"}
    close_to_reference(out, ref, operation, q, k, v, **opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "additive4d"])
def test_attention_with_masks(g: torch.Generator, device: str, mask_kind: str) -> None:
    q, k, v = (rnd(g, 2, 4, 16, 32, device=device) for _ in range(3))
    if mask_kind == "bool":
        mask = torch.rand(16, 16, generator=g).to(device) > 0.4
        mask[:, 0] = True
    elif mask_kind == "additive":
        mask = rnd(g, 16, 16, device=device)
    else:
        mask = rnd(g, 2, 1, 16, 16, device=device)
    out = lz.attention(q, k, v, attn_mask=mask)
    close_to_reference(out, attention_reference(q, k, v, mask), "attention.full", q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_norms_match_reference(g: torch.Generator, device: str, weight: bool, dtype: torch.dtype) -> None:
    x = rnd(g, 3, 5, 128, dtype=dtype, device=device) * 3 + 1
    w = (rnd(g, 128, dtype=dtype, device=device) * 0.3 + 1) if weight else None
    b = rnd(g, 128, dtype=dtype, device=device) if weight else None
    out = lz.rms_norm(x, w, eps=1e-5)
    close_to_reference(out, op_for("rms_norm").reference("rms_norm", (x, w, 1e-5)), "rms_norm", x, w, eps=1e-5)
    out = lz.layer_norm(x, w, b)
    close_to_reference(out, op_for("layer_norm").reference("layer_norm", (x, w, b, 1e-5)), "layer_norm", x, w, b)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("table", ["head_dim", "half"])
def test_rope_matches_reference(g: torch.Generator, device: str, interleaved: bool, table: str) -> None:
    x = rnd(g, 2, 4, 12, 32, device=device)
    freqs = torch.arange(12, dtype=torch.float64)[:, None] / (10000 ** (torch.arange(0, 32, 2) / 32))
    if table == "head_dim":
        freqs = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    cos, sin = freqs.cos().float().to(device), freqs.sin().float().to(device)
    out = lz.rope(x, cos, sin, interleaved=interleaved)
    ref = op_for("rope").reference("rope", (x, cos, sin, interleaved))
    close_to_reference(out, ref, "rope", x, cos, sin, interleaved=interleaved)
    # a rotation keeps each pair's norm
    pairs = (lambda t: t.unflatten(-1, (-1, 2))) if interleaved else (lambda t: torch.stack(t.chunk(2, -1), -1))
    torch.testing.assert_close(pairs(out).norm(dim=-1), pairs(x).norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_activations_match_reference(g: torch.Generator, device: str) -> None:
    x, up = rnd(g, 4, 256, device=device) * 3, rnd(g, 4, 256, device=device)
    close_to_reference(lz.swiglu(x, up), op_for("swiglu").reference("swiglu", (x, up)), "swiglu", x, up)
    close_to_reference(lz.silu(x), op_for("silu").reference("silu", (x,)), "silu", x)
    for approximate in ("none", "tanh"):
        ref = op_for("gelu").reference("gelu", (x, approximate))
        close_to_reference(lz.gelu(x, approximate=approximate), ref, "gelu", x, approximate=approximate)
    assert not torch.equal(lz.gelu(x), lz.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("device", DEVICES)
def test_sampling(g: torch.Generator, device: str) -> None:
    logits = rnd(g, 16, 500, device=device) * 4
    assert torch.equal(lz.sample(logits, temperature=0.0), logits.argmax(-1))
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    for kw in ({"top_k": 5}, {"top_p": 0.5}, {"top_k": 50, "top_p": 0.9}, {}):
        ids = lz.sample(logits, temperature=0.7, generator=gen, **kw)
        assert ids.dtype == torch.int64 and ids.shape == (16,)
        probs = filtered_probs(logits, 0.7, kw.get("top_k"), kw.get("top_p"))
        assert bool((probs.gather(-1, ids[:, None]) > 0).all()), kw
    # a fixed generator makes sampling reproducible
    a = lz.sample(logits, temperature=1.0, top_k=10, generator=torch.Generator(device=device).manual_seed(5))
    b = lz.sample(logits, temperature=1.0, top_k=10, generator=torch.Generator(device=device).manual_seed(5))
    assert torch.equal(a, b)


# -- attention layouts and causal semantics --------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_bhsd_bshd_round_trip(g: torch.Generator, device: str, hkv: int) -> None:
    q = rnd(g, 2, 24, 4, 32, device=device)  # BSHD
    k = rnd(g, 2, 24, hkv, 32, device=device)
    v = rnd(g, 2, 24, hkv, 32, device=device)
    out = lz.attention(q, k, v, is_causal=True, layout="BSHD")
    assert out.shape == q.shape  # BSHD in, BSHD out
    bhsd = lz.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(out, bhsd.transpose(1, 2))
    again = lz.attention(q, k, v, is_causal=True, layout="BSHD")  # the cached path keeps the layout
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("sq", "sk"), [(4, 12), (12, 4), (1, 9)])
def test_is_causal_is_upper_left_like_sdpa(g: torch.Generator, device: str, sq: int, sk: int) -> None:
    q = rnd(g, 2, 4, sq, 16, device=device)
    k = rnd(g, 2, 4, sk, 16, device=device)
    v = rnd(g, 2, 4, sk, 16, device=device)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(lz.attention(q, k, v, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    # upper-left: query i sees keys 0..i, so with one query only key 0 matters
    if sq == 1:
        torch.testing.assert_close(lz.attention(q, k, v, is_causal=True)[..., 0, :], v[..., 0, :])
    lower_right = F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq))
    assert not torch.allclose(expected, lower_right)


# -- bad input ------------------------------------------------------------------------------------

Q = (2, 8, 16, 64)


def _bad_attention() -> list[Any]:
    t = torch.randn
    q = t(*Q)
    return [
        pytest.param((q, t(2, 8, 16, 32), t(2, 8, 16, 32)), {}, r"q and k head dims differ: 64 vs 32",
                     id="head-dims"),
        pytest.param((q, t(*Q, dtype=torch.float64), t(*Q, dtype=torch.float64)), {},
                     r"q, k and v must share a dtype, got torch.float32, torch.float64", id="dtypes"),
        pytest.param((q, t(*Q, device="meta"), t(*Q)), {}, r"q, k and v must be on one device, got cpu, meta, cpu",
                     id="devices"),
        pytest.param((t(8, 16, 64), t(8, 16, 64), t(8, 16, 64)), {}, r"q must be 4-D .* got 3-D", id="rank"),
        pytest.param(([1.0], q, q), {}, r"q must be a torch.Tensor, got list", id="non-tensor-q"),
        pytest.param((q, q, "v"), {}, r"v must be a torch.Tensor, got str", id="non-tensor-v"),
        pytest.param((q, t(2, 3, 16, 64), t(2, 3, 16, 64)), {},
                     r"query heads \(8\) must be divisible by key/value heads \(3\)", id="hq-not-divisible"),
        pytest.param((q, q, q), {"attn_mask": t(5, 16)},
                     r"attn_mask of shape \(5, 16\) does not broadcast to "
                     r"\(batch, heads, seq_q, seq_k\)=\(2, 8, 16, 16\)",
                     id="mask-shape"),
        pytest.param((q, q, q), {"attn_mask": torch.ones(16, 16, dtype=torch.int32)},
                     r"attn_mask must be bool or torch.float32, got torch.int32", id="mask-dtype"),
        pytest.param((q, q, q), {"attn_mask": torch.ones(16, 16, dtype=torch.bool), "is_causal": True},
                     r"attn_mask and is_causal=True cannot be combined", id="mask-and-causal"),
        pytest.param((q, q, q), {"layout": "SBHD"}, r"layout must be one of \('BHSD', 'BSHD'\), got 'SBHD'",
                     id="layout"),
        pytest.param((q, q, q), {"dropout_p": 1.5}, r"dropout_p must be in \[0, 1\), got 1.5", id="dropout"),
        pytest.param((q, q, q), {"window": 0}, r"window must be a positive int or None, got 0", id="window"),
        pytest.param((q, t(3, 8, 16, 64), t(3, 8, 16, 64)), {}, r"batch sizes differ: q=2, k=3, v=3", id="batch"),
    ]


@pytest.mark.parametrize(("args", "kw", "match"), _bad_attention())
def test_bad_attention_input(args: tuple[Any, ...], kw: dict[str, Any], match: str) -> None:
    operation = "attention.causal" if kw.get("is_causal") else "attention.full"
    with pytest.raises(InvalidInputError, match=match) as ei:
        lz.attention(*args, **kw)
    text = str(ei.value)
    assert text.startswith(f"{operation}: ")
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, lz.LayerZeroError)
    if all(isinstance(a, torch.Tensor) for a in args):
        assert re.search(r"q=Tensor\(shape=\(\d+(, \d+)*\), dtype=float32, device=cpu\)", text), text


@pytest.mark.parametrize(("call", "match"), [
    pytest.param(lambda: lz.rms_norm(torch.randn(4, 8), torch.randn(7)),
                 r"rms_norm: weight must have shape \(8,\) to match x's last dimension, got \(7,\)", id="rms-weight"),
    pytest.param(lambda: lz.rms_norm(torch.randn(4, 8), eps=0.0), r"rms_norm: eps must be a positive number, got 0.0",
                 id="rms-eps"),
    pytest.param(lambda: lz.rms_norm(torch.randn(4, 8), eps=-1e-6), r"eps must be a positive number, got -1e-06",
                 id="rms-negative-eps"),
    pytest.param(lambda: lz.rms_norm([1.0, 2.0]), r"rms_norm: x must be a torch.Tensor, got list", id="rms-x"),
    pytest.param(lambda: lz.rms_norm(torch.ones(4, 8, dtype=torch.int64)), r"x must be floating point, got torch.int64",
                 id="rms-int"),
    pytest.param(lambda: lz.layer_norm(torch.randn(4, 8), torch.randn(8), torch.randn(8, device="meta")),
                 r"layer_norm: bias is on meta, x on cpu", id="ln-device"),
    pytest.param(lambda: lz.layer_norm(torch.randn(4, 8), eps="small"), r"eps must be a positive number, got 'small'",
                 id="ln-eps"),
    pytest.param(lambda: lz.rope(torch.randn(2, 4, 8, 7), torch.randn(8, 7), torch.randn(8, 7)),
                 r"rope: x must be \(\.\.\., seq, head_dim\) with an even head_dim, got \(2, 4, 8, 7\)", id="rope-odd"),
    pytest.param(lambda: lz.rope(torch.randn(2, 4, 8, 16), torch.randn(8, 5), torch.randn(8, 5)),
                 r"cos/sin last dimension must be head_dim=16 or head_dim/2=8, got 5", id="rope-table"),
    pytest.param(lambda: lz.swiglu(torch.randn(4, 8), torch.randn(4, 9)),
                 r"swiglu: gate and up shapes differ: \(4, 8\) vs \(4, 9\)", id="swiglu-shapes"),
    pytest.param(lambda: lz.gelu(torch.randn(4), approximate="fast"),
                 r"gelu: approximate must be 'none' or 'tanh', got 'fast'", id="gelu-approx"),
    pytest.param(lambda: lz.silu(3.0), r"silu: x must be a torch.Tensor, got float", id="silu-x"),
    pytest.param(lambda: lz.sample(torch.randn(2, 10), temperature=1.0, top_k=0),
                 r"sample.top_k: top_k must be a positive int or None, got 0", id="sample-topk"),
    pytest.param(lambda: lz.sample(torch.randn(2, 10), temperature=1.0, top_p=1.5),
                 r"sample.top_p: top_p must be in \(0, 1\] or None, got 1.5", id="sample-topp"),
])
def test_bad_input_of_other_ops(call: Any, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        call()


def test_bad_input_on_the_cached_path() -> None:
    """A first good call caches a plan; bad inputs sharing its cache key still get InvalidInputError."""
    breakers = get_runtime().breakers
    q = torch.randn(*Q)
    lz.attention(q, q, q)
    assert lz.explain(q, q, q, operation="attention.full").cached
    failures = {kid: b.failures for kid, b in breakers.all().items()}
    # v is not part of the key: wrong batch, dtype, heads, non-tensor
    for v, match in ((torch.randn(3, 8, 16, 64), r"batch sizes differ: q=2, k=2, v=3"),
                     (torch.randn(*Q, dtype=torch.float64), r"q, k and v must share a dtype"),
                     (torch.randn(2, 4, 16, 64), r"k and v must agree on heads"),
                     ("v", r"v must be a torch.Tensor, got str")):
        with pytest.raises(InvalidInputError, match=match) as ei:
            lz.attention(q, q, v)
        assert str(ei.value).startswith("attention.full: ")
    with pytest.raises(InvalidInputError, match=r"scale must be a (finite )?number or None, got 'big'"):
        lz.attention(q, q, q, scale="big")  # type: ignore[arg-type]

    x, w = torch.randn(4, 8), torch.randn(8)
    lz.rms_norm(x, w)
    with pytest.raises(InvalidInputError, match=r"weight must have shape \(8,\) .* got \(5,\)"):
        lz.rms_norm(x, torch.randn(5))
    with pytest.raises(InvalidInputError, match=r"eps must be a positive number, got 'x'"):
        lz.rms_norm(x, w, eps="x")  # type: ignore[arg-type]
    lz.swiglu(x, x)
    with pytest.raises(InvalidInputError, match=r"gate and up shapes differ"):
        lz.swiglu(x, torch.randn(4, 9))
    # bad input is the caller's fault: no kernel's breaker counts it
    assert {kid: b.failures for kid, b in breakers.all().items() if b.failures != failures.get(kid, 0)} == {}


def test_zero_sized_and_nan_free_contracts() -> None:
    with pytest.raises(InvalidInputError, match="empty attention inputs"):
        lz.attention(torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 8))
    with pytest.raises(InvalidInputError, match="x needs a non-empty last dimension"):
        lz.rms_norm(torch.randn(4, 0))
    with pytest.raises(InvalidInputError, match="dropout_p must be in"):
        lz.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), dropout_p=math.nan)


def test_value_sequence_length_mismatch_on_the_cached_path() -> None:
    """v's shape is part of the cache key: PyTorch's CPU flash kernel does not check seq_len_k == seq_len_v."""
    q = torch.randn(*Q)
    lz.attention(q, q, q)
    with pytest.raises(InvalidInputError, match="k and v must agree on heads and sequence length"):
        # a view into a larger buffer, so that the kernel's over-read stays inside allocated memory
        lz.attention(q, q, torch.randn(2, 8, 16, 64)[:, :, :12])


def test_negative_eps_on_the_cached_path() -> None:
    """eps is part of the norms' cache key, so a new eps is validated on its first call."""
    x, w = torch.randn(4, 8), torch.randn(8)
    lz.rms_norm(x, w)
    with pytest.raises(InvalidInputError, match="eps must be a positive number"):
        lz.rms_norm(x, w, eps=-1.0)


def test_dropout_is_applied_as_sdpa_does(g: torch.Generator) -> None:
    """Dropout rescales kept weights by 1/(1-p): the mean over many draws approaches the output without it;
    kernels without dropout (the CPU flash kernel) are not chosen for it."""
    q, k, v = (rnd(g, 1, 2, 8, 16) for _ in range(3))
    exp = lz.explain(q, k, v, dropout_p=0.3, operation="attention.full")
    assert [r.code for r in exp.rejection_reasons["torch_sdpa_flash_cpu"]] == ["DROPOUT_UNSUPPORTED"]
    plain = lz.attention(q, k, v)
    torch.manual_seed(0)
    draws = torch.stack([lz.attention(q, k, v, dropout_p=0.3) for _ in range(1000)])
    assert not torch.allclose(draws[0], plain)
    torch.testing.assert_close(draws.mean(0), plain, atol=0.1, rtol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(lz.attention(q, k, v, dropout_p=0.3), draws[0])  # reproducible with the seed


def test_enable_gqa_reads_as_in_sdpa() -> None:
    """Code written for ``F.scaled_dot_product_attention(..., enable_gqa=True)`` runs unchanged (it raised a plain
    TypeError); ``enable_gqa=False`` refuses k/v with fewer heads, as SDPA does; left out, GQA runs (layerzero's
    default). Cold, warm, through the compiled entry and the Python one."""
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    from layerzero.ops.attention import ATTENTION

    entries = [lz.attention, ATTENTION.calls.python_entry]
    for entry in entries:
        for _ in range(2):
            torch.testing.assert_close(entry(q, k, v, enable_gqa=True), want)
            torch.testing.assert_close(entry(q, k, v), want)
            with pytest.raises(lz.InvalidInputError, match=r"query heads \(8\) differ from key/value heads \(2\)"):
                entry(q, k, v, enable_gqa=False)
            with pytest.raises(lz.InvalidInputError, match="enable_gqa must be a bool or None"):
                entry(q, k, v, enable_gqa="yes")
            same = torch.randn(1, 2, 4, 16)
            torch.testing.assert_close(entry(same, k, v, enable_gqa=False),
                                       torch.nn.functional.scaled_dot_product_attention(same, k, v))
            torch.testing.assert_close(entry(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BSHD",
                                             enable_gqa=True), want.transpose(1, 2))
