"""``lz.attention``'s variants: ``softcap`` (Gemma 2), ``sinks`` (GPT-OSS), ``alibi_slopes`` (FlashAttention's ALiBi).

The float64 reference is checked against the definitions and against transformers' own eager attention of
Gemma 2 and GPT-OSS; every kernel that declares a variant is checked against the reference on fresh random
inputs (alone and combined, causal, GQA, windows, masks, float32 / bfloat16 / float16); selection, the plan
keys and guards, autograd and the library adapters (against fakes of FlashAttention and FlashInfer) follow.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.backends import flash_attn as fa_backend
from layerzero.backends import flashinfer as fi_backend
from layerzero.backends import flex
from layerzero.errors import InvalidInputError
from layerzero.ops.attention import ATTENTION, attention_reference
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec, ReasonCode
from layerzero.tensor_helpers import alibi_bias
from test_backends_attention import fakes  # noqa: F401  (the fixture)

SM90 = dict(device="cuda", compute_capability=(9, 0))
VARIANTS = {
    "softcap": dict(softcap=True),
    "sinks": dict(sinks=True),
    "alibi": dict(alibi=True),
    "alibi-per-batch": dict(alibi=True, per_batch=True),
    "all": dict(softcap=True, sinks=True, alibi=True),
}
# (hq, hkv, sq, sk, causal, window, mask)
SHAPES = {
    "mha": (4, 4, 9, 9, False, None, None),
    "causal-gqa": (8, 2, 12, 12, True, None, None),
    "window-mqa": (4, 1, 13, 13, True, 4, None),
    "cross": (4, 2, 5, 11, False, None, None),
    "decode": (4, 2, 1, 17, False, None, None),
    "bool-mask": (4, 2, 7, 9, False, None, "bool"),
    "additive-mask": (4, 4, 7, 7, False, None, "additive"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_case(shape: str, variant: str, dtype: torch.dtype, device: str = "cpu") -> tuple[Any, ...]:
    """Fresh canonical arguments (BHSD) with the variant's tensors: 11 arguments."""
    hq, hkv, sq, sk, causal, window, mask_kind = SHAPES[shape]
    want = VARIANTS[variant]
    g = torch.Generator().manual_seed(_seed(shape, variant, str(dtype)))
    b = 2

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(b, hq, sq, 32) * 2, rand(b, hkv, sk, 32) * 2, rand(b, hkv, sk, 32)  # scores of a few units
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        mask[..., 0] = True
        mask = mask.to(device)
    elif mask_kind == "additive":
        mask = rand(sq, sk)
    softcap = 1.5 if want.get("softcap") else None
    sinks = (torch.randn(hq, generator=g) * 2).to(device=device, dtype=dtype) if want.get("sinks") else None
    alibi = None
    if want.get("alibi"):
        alibi = (torch.rand((b, hq) if want.get("per_batch") else (hq,), generator=g) * 0.5).to(device)
    return (q, k, v, mask, causal, 0.0, None, window, softcap, sinks, alibi)


def _ctx(args: tuple[Any, ...]) -> lz.SelectionContext:
    return ATTENTION.context("attention.full", args)


# -- the reference is the definitions -------------------------------------------------------------------------------

def test_alibi_bias_is_flash_attentions_formula() -> None:
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, 2, 4)  # query i sits at key position i + 4 - 2
    assert bias.shape == (1, 2, 2, 4)
    assert bias[0, 0].tolist() == [[-1.0, -0.5, 0.0, -0.5], [-1.5, -1.0, -0.5, 0.0]]
    assert bias[0, 1, 1].tolist() == [-0.75, -0.5, -0.25, 0.0]
    per_batch = alibi_bias(torch.tensor([[1.0], [2.0]]), 3, 3)
    assert per_batch.shape == (2, 1, 3, 3) and per_batch[1, 0, 2].tolist() == [-4.0, -2.0, -0.0]


def test_reference_sinks_and_softcap_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 1, 4, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 3, 4, generator=g,
                                                                               dtype=torch.float64)
    s = (q @ k.transpose(-1, -2))[0, 0, 0] / 2.0  # scale 1/sqrt(4)
    sink = torch.tensor([0.7], dtype=torch.float64)
    p = s.exp() / (s.exp().sum() + sink.exp())
    got = attention_reference(q, k, v, sinks=sink)[0, 0, 0]
    torch.testing.assert_close(got, p @ v[0, 0])
    capped = torch.tanh(s / 0.3) * 0.3
    got = attention_reference(q, k, v, softcap=0.3)[0, 0, 0]
    torch.testing.assert_close(got, torch.softmax(capped, -1) @ v[0, 0])


def _hf_module(hq: int, hkv: int, sinks: torch.Tensor | None = None) -> Any:
    module = torch.nn.Module()
    module.num_key_value_groups = hq // hkv
    module.training = False
    if sinks is not None:
        module.sinks = sinks
    return module


def test_reference_matches_transformers_gemma2_and_gpt_oss_eager() -> None:
    pytest.importorskip("transformers")
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    causal = torch.zeros(6, 6, dtype=torch.float64).masked_fill(torch.ones(6, 6).triu(1).bool(), -math.inf)
    out, _ = gemma2_eager(_hf_module(4, 2), q, k, v, causal[None, None], scaling=0.3, softcap=2.0)
    torch.testing.assert_close(out, attention_reference(q, k, v, None, True, 0.0, 0.3, softcap=2.0).transpose(1, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    out, _ = gpt_oss_eager(_hf_module(4, 2, sinks), q, k, v, causal[None, None], scaling=0.3)
    torch.testing.assert_close(out, attention_reference(q, k, v, None, True, 0.0, 0.3, sinks=sinks).transpose(1, 2))


# -- every kernel with a variant against the reference ----------------------------------------------------------------

def _flex_eager(*args: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        return flex.flex_attention_kernel(*args, compiled=False)


CPU_KERNELS = ("torch_attention_eager", "torch_sdpa_gqa", "torch_sdpa_math", "flex_attention")


def _impl(kernel: str) -> Any:
    return _flex_eager if kernel == "flex_attention" else get_runtime().kernels.get(kernel).impl


# flex runs eagerly here, in float32 and without an explicit mask (it takes none); compiled bf16/fp16 on the GPU
REFERENCE_CASES = [pytest.param(kernel, variant, shape, dtype, id=f"{kernel}-{variant}-{shape}-{name}")
                   for kernel in CPU_KERNELS for variant in VARIANTS for shape in SHAPES
                   for name, dtype in DTYPES.items()
                   if kernel != "flex_attention" or (dtype == torch.float32 and SHAPES[shape][6] is None)]


@pytest.mark.parametrize(("kernel", "variant", "shape", "dtype"), REFERENCE_CASES)
def test_kernel_matches_the_float64_reference(kernel: str, variant: str, shape: str, dtype: torch.dtype) -> None:
    spec = get_runtime().kernels.get(kernel)
    args = make_case(shape, variant, dtype)
    ctx = _ctx(args).replace(device="cuda", compute_capability=(9, 0)) if kernel == "flex_attention" else _ctx(args)
    reasons = [r for r in spec.check(ctx) if r.code == ReasonCode.VARIANT_UNSUPPORTED or kernel != "flex_attention"]
    if reasons:
        assert kernel in ("torch_sdpa_gqa", "torch_sdpa_math") and "softcap" in str(reasons[0])  # SDPA: no softcap
        return
    out = _impl(kernel)(*args)
    atol, rtol = spec.tolerance_for(dtype)
    torch.testing.assert_close(out.double(), attention_reference(*args), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kernel", ["torch_attention_eager", "torch_sdpa_gqa", "flex_attention"])
def test_gradients_match_the_reference_including_the_sinks(kernel: str) -> None:
    args = list(make_case("causal-gqa", "sinks", torch.float64))
    if kernel == "torch_attention_eager":
        args[8] = 1.5
    # FlexAttention has no backward on the CPU for q, k, v; the sinks' gradient (through its lse) it has
    leaves = [args[i].requires_grad_() for i in ((9,) if kernel == "flex_attention" else (0, 1, 2, 9))]
    out = _impl(kernel)(*args)
    grads = torch.autograd.grad((out * out).sum(), leaves)
    ref = attention_reference(*args)
    want = torch.autograd.grad((ref * ref).sum(), leaves)
    tol = 1e-5 if kernel == "flex_attention" else 1e-7  # flex's lse is float32 whatever the inputs
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got, exp, atol=tol, rtol=tol)


def test_sdpa_sinks_need_an_extra_key_and_a_fully_masked_row_gives_zero() -> None:
    q, k, v, *_ = make_case("mha", "sinks", torch.float32)
    sinks = torch.full((4,), 3.0)
    nobody = torch.zeros(9, 9, dtype=torch.bool)
    nobody[:, 0] = True
    nobody[4] = False  # query 4 sees no key: only its sink, so its output is 0
    for kernel in ("torch_sdpa_gqa", "torch_sdpa_math", "torch_attention_eager"):
        out = _impl(kernel)(q, k, v, nobody, False, 0.0, None, None, None, sinks, None)
        assert out.shape == q.shape and torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
        torch.testing.assert_close(out.double(), attention_reference(q, k, v, nobody, sinks=sinks), atol=2e-5,
                                   rtol=2e-5)


# -- lz.attention: selection, explain, keys and guards ----------------------------------------------------------------

def test_selection_on_the_cpu_and_why_sdpa_is_rejected_for_softcap() -> None:
    q, k, v, *_ = make_case("causal-gqa", "all", torch.float32)
    assert lz.which("attention.causal", q, k, v, softcap=30.0) == "torch_attention_eager"
    assert lz.which("attention.causal", q, k, v, sinks=torch.zeros(8)) == "torch_sdpa_gqa"
    assert lz.which("attention.causal", q, k, v, alibi_slopes=torch.ones(8)) == "torch_sdpa_gqa"
    exp = lz.explain(q, k, v, operation="attention.causal", softcap=30.0)
    text = str(exp)
    assert "torch_sdpa" in exp.rejection_reasons and "softcap is not supported" in text
    assert "tanh(scores / softcap) * softcap" in str(exp.rejection_reasons["torch_sdpa"])


def test_fused_gpu_kernels_that_declare_each_variant() -> None:
    def ranked(**variants: bool) -> set[str]:
        ctx = lz.SelectionContext(dtype="bfloat16", batch_size=2, seq_len=256, num_heads=8, num_kv_heads=2,
                                  head_dim=64, is_causal=True, **SM90, **variants)
        sel = lz.select("attention.causal", ctx)
        out = set()
        for spec in get_runtime().kernels.for_operation("attention.causal"):
            if not any(r.code == ReasonCode.VARIANT_UNSUPPORTED for r in spec.check(ctx)):
                out.add(spec.kernel_id)
        assert sel.trace
        return out

    assert ranked(softcap=True) == {"torch_attention_eager", "flex_attention", "flash_attn_v2_attention",
                                    "flash_attn_v3_attention", "flashinfer_prefill", "flashinfer_batch_prefill",
                                    "flashinfer_decode"}
    assert ranked(sinks=True) == {"torch_attention_eager", "torch_sdpa_gqa", "torch_sdpa_math", "flex_attention"}
    assert ranked(alibi=True) == {"torch_attention_eager", "torch_sdpa_gqa", "torch_sdpa_math", "flex_attention",
                                  "flash_attn_v2_attention"}
    assert "xformers_attention" not in ranked(softcap=True) | ranked(sinks=True) | ranked(alibi=True)


@pytest.fixture
def fresh() -> Any:
    rt = get_runtime()
    rt.invalidate()
    yield rt
    rt.invalidate()


def test_softcap_value_is_not_keyed_but_used(fresh: Any) -> None:
    q, k, v, *_ = make_case("causal-gqa", "softcap", torch.float32)
    for cap in (5.0, 0.5, 2):
        torch.testing.assert_close(lz.attention(q, k, v, is_causal=True, softcap=cap).double(),
                                   attention_reference(q, k, v, None, True, softcap=cap), atol=2e-5, rtol=2e-5)
    sinks = torch.randn(8)
    for s in (sinks, sinks * 3):
        torch.testing.assert_close(lz.attention(q, k, v, is_causal=True, sinks=s).double(),
                                   attention_reference(q, k, v, None, True, sinks=s), atol=2e-5, rtol=2e-5)


def test_variant_calls_have_their_own_family_keys(fresh: Any) -> None:
    q, k, v, *_ = make_case("mha", "sinks", torch.float32)
    plain = lz.attention(q, k, v)
    with_sinks = lz.attention(q, k, v, sinks=torch.full((4,), 5.0))
    assert not torch.allclose(plain, with_sinks)
    fams = {key if not isinstance(key[0], tuple) else key[0] for key in fresh.plans.data}
    assert len({f for f in fams if f[0] == "attention.full"}) == 2
    assert torch.equal(lz.attention(q, k, v), plain)  # the plain plan is untouched


def test_a_warm_variant_plan_never_takes_values_validation_refuses(fresh: Any) -> None:
    q, k, v, *_ = make_case("mha", "sinks", torch.float32)
    lz.attention(q, k, v, sinks=torch.zeros(4))  # warm: a family plan with sinks of 4 heads
    q8 = torch.randn(2, 8, 9, 32)
    with pytest.raises(InvalidInputError, match=r"sinks must have shape \(8,\) \(the query heads\), got \(4,\)"):
        lz.attention(q8, torch.randn(2, 8, 9, 32), torch.randn(2, 8, 9, 32), sinks=torch.zeros(4))
    lz.attention(q, k, v, softcap=1.0)
    with pytest.raises(InvalidInputError, match="softcap must be a finite positive number or None, got nan"):
        lz.attention(q, k, v, softcap=float("nan"))


def test_eight_argument_kernels_still_run_calls_without_variants(fresh: Any) -> None:
    calls = []

    def mine(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
        calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale=scale)

    reg = get_runtime().kernels
    reg.register(KernelSpec("eight_arg_attention", "attention", "custom", mine, priority=999))
    try:
        q, k, v, *_ = make_case("mha", "softcap", torch.float32)
        lz.attention(q, k, v)
        assert calls == [1]
        out = lz.attention(q, k, v, softcap=1.0)  # rejected for the variant: another kernel runs it
        assert calls == [1]
        torch.testing.assert_close(out.double(), attention_reference(q, k, v, softcap=1.0), atol=2e-5, rtol=2e-5)
        sel = lz.select("attention.full", _ctx((q, k, v, None, False, 0.0, None, None, 1.0, None, None)))
        assert [r.code for r in sel.rejections["eight_arg_attention"]] == [ReasonCode.VARIANT_UNSUPPORTED]
    finally:
        reg.unregister("eight_arg_attention")


def test_bshd_layout_with_variants() -> None:
    args = make_case("causal-gqa", "all", torch.float32)
    q, k, v = (t.transpose(1, 2) for t in args[:3])
    out = lz.attention(q, k, v, is_causal=True, layout="BSHD", softcap=args[8], sinks=args[9],
                       alibi_slopes=args[10])
    torch.testing.assert_close(out.transpose(1, 2).double(), attention_reference(*args), atol=2e-5, rtol=2e-5)


# -- the library adapters, against fakes of their documented semantics --------------------------------------------

def _bshd_case(hq: int, hkv: int, sq: int, sk: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, sq, 64, generator=g) * 2, torch.randn(2, hkv, sk, 64, generator=g) * 2,
            torch.randn(2, hkv, sk, 64, generator=g))


@pytest.mark.usefixtures("fakes")
@pytest.mark.parametrize(("sq", "sk", "causal"), [(16, 16, True), (5, 13, False), (1, 20, False)])
@pytest.mark.parametrize("variant", ["softcap", "alibi", "alibi-per-batch", "softcap+alibi"])
def test_flash_attn_2_softcap_and_alibi(variant: str, sq: int, sk: int, causal: bool) -> None:
    q, k, v = _bshd_case(8, 2, sq, sk)
    softcap = 1.5 if "softcap" in variant else None
    alibi = None
    if "alibi" in variant:
        alibi = torch.rand(2, 8) if variant.endswith("per-batch") else torch.rand(8)
    out = fa_backend.flash_attn_v2_attention(q, k, v, None, causal, 0.0, None, None, softcap, None, alibi)
    want = attention_reference(q, k, v, None, causal, 0.0, None, None, softcap, None, alibi)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("fakes")
def test_flash_attn_3_and_flashinfer_softcap() -> None:
    q, k, v = _bshd_case(8, 2, 16, 16)
    want = attention_reference(q, k, v, None, True, softcap=1.5)
    out = fa_backend.flash_attn_v3_attention(q, k, v, None, True, 0.0, None, None, 1.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    out = fi_backend.flashinfer_batch_prefill(q, k, v, None, True, 0.0, None, None, 1.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    one = fi_backend.flashinfer_prefill(q[:1], k[:1], v[:1], None, True, 0.0, None, None, 1.5)
    torch.testing.assert_close(one.double(), want[:1], atol=1e-5, rtol=1e-5)
    qd = q[:, :, -1:]
    out = fi_backend.flashinfer_decode(qd, k, v, None, False, 0.0, None, None, 1.5)
    torch.testing.assert_close(out.double(), attention_reference(qd, k, v, softcap=1.5), atol=1e-5, rtol=1e-5)
    plain = fi_backend.flashinfer_decode(qd, k, v, None, False, 0.0, None, None)  # another planned wrapper
    torch.testing.assert_close(plain.double(), attention_reference(qd, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("fakes")
def test_gpu_selection_with_the_libraries_installed_prefers_flash_attention_for_softcap() -> None:
    ctx = lz.SelectionContext(dtype="bfloat16", batch_size=2, seq_len=256, num_heads=8, num_kv_heads=2,
                              head_dim=64, is_causal=True, softcap=True, **SM90)
    sel = lz.select("attention.causal", ctx)
    assert sel.selected.kernel_id == "flash_attn_v3_attention"
    sel = lz.select("attention.causal", ctx.replace(softcap=False, alibi=True))
    assert sel.selected.kernel_id == "flash_attn_v2_attention"
    assert any("alibi_slopes are not supported" in str(r) for r in sel.rejections["flash_attn_v3_attention"])


# -- on the GPU -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_flex_variants_on_cuda(variant: str, dtype: torch.dtype) -> None:
    if not get_runtime().backends.is_available("flex"):
        pytest.skip(get_runtime().backends.info("flex").reason)
    for shape in ("mha", "causal-gqa", "window-mqa", "decode"):
        args = make_case(shape, variant, dtype, "cuda")
        q, k, v = (torch.nn.functional.pad(t, (0, 32)) for t in args[:3])  # head_dim 64 (flex needs >= 16)
        args = (q, k, v, *args[3:])
        out = flex.flex_attention_kernel(*args)
        tol = 2.5e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(out.double(), attention_reference(*args), atol=4 * tol, rtol=4 * tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lz_attention_variants_on_cuda(variant: str, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        args = make_case(shape, variant, dtype, "cuda")
        q, k, v, mask, causal, _, _, window, softcap, sinks, alibi = args
        out = lz.attention(q, k, v, attn_mask=mask, is_causal=causal, window=window, softcap=softcap, sinks=sinks,
                           alibi_slopes=alibi)
        kernel = lz.which("attention", q, k, v, attn_mask=mask, is_causal=causal, window=window, softcap=softcap,
                          sinks=sinks, alibi_slopes=alibi)
        atol, rtol = get_runtime().kernels.get(kernel).tolerance_for(dtype)
        torch.testing.assert_close(out.double(), attention_reference(*args), atol=2 * atol, rtol=2 * rtol,
                                   msg=lambda m, kernel=kernel, shape=shape: f"{kernel} {shape}: {m}")


def test_cli_explain_takes_the_variants(capsys: pytest.CaptureFixture[str]) -> None:
    from layerzero.cli import main

    args = ["explain", "--op", "attention.causal", "--shape", "q=1,8,128,64", "--device", "cuda", "--sm", "90",
            "--variant", "softcap", "--variant", "sinks", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '"softcap": true' in out and '"sinks": true' in out and '"alibi": false' in out
    assert '"selected_kernel": "torch_attention_eager"' in out or '"selected_kernel": "flex_attention"' in out
    assert "softcap is not supported" in out and "sinks are not supported" in out


@pytest.mark.parametrize("softcap", [5.0, None], ids=["softcap+sinks+alibi", "sinks+alibi"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_variants_under_torch_compile_match_eager_with_gradients(softcap: float | None, backend: str) -> None:
    """softcap, sinks and ALiBi through torch.compile(fullgraph=True): traced as PyTorch code (the native
    kernel selected at trace time, no layerzero node for Inductor to stop at), no graph break, the same output
    and the same gradients for q and sinks as the eager call."""
    from layerzero.integrations import compile as lzc

    assert "attention" in lzc.install()  # lz.attention's signature (with the variants) matches its stand-in

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 5, 16, generator=g, requires_grad=True)
    k, v = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    sinks = torch.randn(4, generator=g, requires_grad=True)
    slopes = torch.rand(4, generator=g)

    def f(q: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
        return lz.attention(q, k, v, is_causal=True, softcap=softcap, sinks=sinks, alibi_slopes=slopes)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(q, sinks)
    targets = [str(n.target) for gr in explanation.graphs for n in gr.graph.nodes if n.op == "call_function"]
    assert explanation.graph_break_count == 0 and not any("layerzero" in t for t in targets), targets
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out_c = compiled(q, sinks)
    out_e = f(q, sinks)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    gq_c, gs_c = torch.autograd.grad(out_c.square().sum(), (q, sinks))
    gq_e, gs_e = torch.autograd.grad(out_e.square().sum(), (q, sinks))
    torch.testing.assert_close(gq_c, gq_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs_c, gs_e, atol=1e-5, rtol=1e-5)
    want = attention_reference(q.double(), k.double(), v.double(), is_causal=True, softcap=softcap,
                               sinks=sinks.double(), alibi_slopes=slopes.double())
    torch.testing.assert_close(out_c.double(), want, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_variants_inside_a_policy_scope_run_the_dispatched_op_under_compile() -> None:
    q = torch.randn(1, 2, 4, 8)

    def f(q: torch.Tensor) -> torch.Tensor:
        return lz.attention(q, q, q, is_causal=True, softcap=3.0)

    torch._dynamo.reset()
    with lz.lock("attention*", "torch_attention_eager"):
        explanation = torch._dynamo.explain(f)(q)
        targets = [str(n.target) for gr in explanation.graphs for n in gr.graph.nodes if n.op == "call_function"]
        assert "layerzero.attention.default" in targets
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q), f(q))
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", [{"softcap": 50.0}, {"alibi_slopes": torch.tensor([0.5, 0.25])}])
def test_a_row_that_sees_no_key_has_finite_gradients(variant: dict) -> None:
    """The eager-variant kernel zeroed such a row after a NaN softmax; the backward carried the NaN on."""
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 0, :] = False
    out = lz.attention(q, k, v, attn_mask=mask, **variant)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    out[..., 1:, :].sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("mask", [None, "additive"])
def test_float64_alibi_holds_the_float64_tolerance(mask: str | None) -> None:
    """The ALiBi bias was built in float32 and cast: slopes that are not powers of two then missed float64's
    1e-9 tolerance by 300x (3e-7)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 7, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 4, 3, 8, dtype=torch.float64, generator=g) for _ in range(2))
    slopes = torch.rand(4, generator=g)
    extra = torch.randn(7, 3, dtype=torch.float64, generator=g) if mask else None
    i, j = torch.arange(7, dtype=torch.float64)[:, None], torch.arange(3, dtype=torch.float64)[None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) - slopes.double().view(1, 4, 1, 1) * (i + 3 - 7 - j).abs()
    want = torch.softmax(scores + (0 if extra is None else extra), -1) @ v
    got = lz.attention(q, k, v, alibi_slopes=slopes, attn_mask=extra)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
