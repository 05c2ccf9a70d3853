"""Forward-with-residuals / backward pairs of the FlashAttention-2, FlashAttention-3 and xFormers kernels.

None of these libraries installs on a CPU-only machine, so the pairs run against fakes placed in
``sys.modules`` that implement the libraries' real low-level functions (signatures as in
Dao-AILab/flash-attention ``flash_attn/flash_attn_interface.py`` and ``hopper/flash_attn_interface.py``,
facebookresearch/xformers ``xformers/ops/fmha/__init__.py``): the forwards compute attention in float64 and
return the true log-sum-exp in the library's layout (xFormers' CUTLASS one padded to a multiple of 32);
the backwards compute the gradients from the ``out`` and ``lse`` they are handed (P = exp(scores - lse),
dS = P * (dP - rowsum(dO * O))), so a wrong residual gives wrong gradients. Each fake counts its calls.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo

import layerzero as lz
from layerzero.backends import flash_attn_pairs as pairs
from layerzero.backends import xformers as xf
from layerzero.errors import KernelNotSupportedError
from layerzero.integrations import compile as lzc
from layerzero.ops.attention import attention_reference
from layerzero.spec import KernelSpec
from fake_modules import fake_module as _module
from lower_right import lower_right

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
lzc.install()

CALLS: Counter[str] = Counter()


# -- attention math the fakes share (BHSD, float64) --------------------------------------------------------

def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, keep: torch.Tensor | None, softcap: float,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked scores of (B, H, S, D) q and k, and d(scores)/d(q k^T) (the softcap's tanh derivative)."""
    raw = (q @ k.transpose(-2, -1)) * scale
    slope = torch.ones_like(raw)
    if softcap > 0:
        t = torch.tanh(raw / softcap)
        raw, slope = softcap * t, 1 - t * t
    if bias is not None:
        raw = raw + bias
    return (raw if keep is None else raw.masked_fill(~keep, -math.inf)), slope


def _fwd(q, k, v, scale, keep, softcap=0.0, bias=None):  # type: ignore[no-untyped-def]
    s, _ = _scores(q.double(), k.double(), scale, keep, softcap, bias)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.double(), lse


def _bwd(dout, q, k, v, out, lse, scale, keep, softcap=0.0, bias=None):  # type: ignore[no-untyped-def]
    """Gradients from the given ``out`` and ``lse`` (FlashAttention's backward equations, no autograd)."""
    q64, k64 = q.double(), k.double()
    s, slope = _scores(q64, k64, scale, keep, softcap, bias)
    p = torch.exp(s - lse.double()[..., None])  # the saved lse, not a recomputed one
    do, o = dout.double(), out.double()
    dv = p.transpose(-2, -1) @ do
    ds = p * (do @ v.double().transpose(-2, -1) - (do * o).sum(-1, keepdim=True)) * slope * scale
    return ds @ k64, ds.transpose(-2, -1) @ q64, dv


def _alibi(slopes: torch.Tensor | None, b: int, sq: int, sk: int) -> torch.Tensor | None:
    if slopes is None:
        return None
    dist = (torch.arange(sq).view(-1, 1) + sk - sq - torch.arange(sk).view(1, -1)).abs().double()
    return -(slopes.expand(b, -1) if slopes.dim() == 1 else slopes).double()[:, :, None, None] * dist


def _bshd_in(*ts: torch.Tensor, hq: int) -> list[torch.Tensor]:
    """BSHD (GQA: fewer heads) -> BHSD with the heads repeated, as the kernels expand them."""
    return [t.transpose(1, 2).repeat_interleave(hq // t.shape[2], dim=1) for t in ts]


def _fold(g: torch.Tensor, h: int) -> torch.Tensor:
    """A (B, Hq, S, D) gradient summed over each group of query heads onto its (B, S, h, D) kv head."""
    b, hq, s, d = g.shape
    return g.reshape(b, h, hq // h, s, d).sum(2).transpose(1, 2)


# -- FlashAttention-2 (flash_attn >= 2.7) and FlashAttention-3 (late 2025) fakes -------------------------

def fa2_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,  # type: ignore[no-untyped-def]
                softcap, alibi_slopes, return_softmax):
    """flash_attn.flash_attn_interface._flash_attn_forward: (out, softmax_lse, S_dmask, rng_state), BSHD."""
    CALLS["fa2_forward"] += 1
    assert dropout_p == 0.0 and not return_softmax and q.shape[-1] % 8 == 0 and isinstance(softmax_scale, float)
    qh, kh, vh = _bshd_in(q, k, v, hq=q.shape[2])
    keep = lower_right(q.shape[1], k.shape[1], causal, window_size_left, window_size_right)
    out, lse = _fwd(qh, kh, vh, softmax_scale, keep, softcap, _alibi(alibi_slopes, q.shape[0], q.shape[1], k.shape[1]))
    rng = torch.tensor([1234, 0], dtype=torch.int64)
    return out.transpose(1, 2).to(q.dtype), lse.float(), torch.empty(0, dtype=q.dtype), rng


def fa2_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,  # type: ignore[no-untyped-def]
                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    """..._flash_attn_backward: writes dq, dk, dv (BSHD, kv heads for dk/dv), returns softmax_d."""
    CALLS["fa2_backward"] += 1
    assert rng_state is not None and rng_state.tolist() == [1234, 0], "rng_state is not the forward's"
    assert softmax_lse.dtype == torch.float32 and softmax_lse.shape == q.shape[:1] + (q.shape[2], q.shape[1])
    hq = q.shape[2]
    qh, kh, vh, doh, oh = _bshd_in(q, k, v, dout, out, hq=hq)
    keep = lower_right(q.shape[1], k.shape[1], causal, window_size_left, window_size_right)
    gq, gk, gv = _bwd(doh, qh, kh, vh, oh, softmax_lse, softmax_scale, keep, softcap,
                      _alibi(alibi_slopes, q.shape[0], q.shape[1], k.shape[1]))
    dq.copy_(gq.transpose(1, 2))
    dk.copy_(_fold(gk, k.shape[2]))
    dv.copy_(_fold(gv, v.shape[2]))
    return torch.empty(q.shape[0], hq, q.shape[1])


def fa3_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,  # type: ignore[no-untyped-def]
                cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                max_seqlen_k=None, page_table=None, kv_batch_idx=None, leftpad_k=None, rotary_cos=None,
                rotary_sin=None, seqlens_rotary=None, q_descale=None, k_descale=None, v_descale=None,
                softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0,
                softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=1, pack_gqa=None,
                sm_margin=0):
    """hopper flash_attn_interface._flash_attn_forward: (out, softmax_lse, out_accum, softmax_lse_accum)."""
    CALLS["fa3_forward"] += 1
    assert k_new is None and cu_seqlens_q is None and page_table is None
    out, lse, *_ = fa2_forward(q, k, v, 0.0, softmax_scale, causal, window_size_left, window_size_right, softcap,
                               None, False)
    CALLS["fa2_forward"] -= 1
    return out, lse, torch.empty(0), torch.empty(0)


def fa3_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,  # type: ignore[no-untyped-def]
                 sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
                 softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
                 deterministic=False, sm_margin=0):
    CALLS["fa3_backward"] += 1
    fa2_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, 0.0, softmax_scale, is_causal, window_size_left,
                 window_size_right, softcap, None, deterministic, torch.tensor([1234, 0]))
    CALLS["fa2_backward"] -= 1
    return torch.empty(0)


# -- xFormers fakes -------------------------------------------------------------------------------------

class LowerTriangularMask:
    """xformers.ops.fmha.attn_bias.LowerTriangularMask: causal, upper-left aligned."""


def _xf_heads(t: torch.Tensor) -> torch.Tensor:
    """BMHK or BMGHK -> (B, G*H, M, K)."""
    return (t if t.dim() == 4 else t.flatten(2, 3)).transpose(1, 2)


def xf_forward(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):  # type: ignore[no-untyped-def]
    """memory_efficient_attention_forward_requires_grad: (out, lse), lse [B, (G,) H, M padded to 32] (CUTLASS)."""
    CALLS["xf_forward"] += 1
    if p != 0.0:
        raise NotImplementedError("dropout is not supported on the non-autograd API.")
    m, n = query.shape[1], key.shape[1]
    keep = (torch.arange(n)[None] <= torch.arange(m)[:, None]) if isinstance(attn_bias, LowerTriangularMask) else None
    s = query.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _fwd(_xf_heads(query), _xf_heads(key), _xf_heads(value), s, keep)
    pad = -m % 32
    lse = torch.nn.functional.pad(lse.float(), (0, pad), value=math.inf).reshape(*query.shape[:1], *query.shape[2:-1], m + pad)
    return out.transpose(1, 2).reshape(*query.shape[:-1], value.shape[-1]).to(query.dtype), lse


def xf_backward(grad, output, lse, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):  # type: ignore[no-untyped-def]
    """memory_efficient_attention_backward: (dq, dk, dv) in the inputs' shapes; lse may be padded or not."""
    CALLS["xf_backward"] += 1
    if p != 0.0:
        raise NotImplementedError("dropout is not supported on the non-autograd API.")
    m, n = query.shape[1], key.shape[1]
    assert lse.shape[:-1] == (query.shape[0], *query.shape[2:-1]) and lse.shape[-1] >= m
    keep = (torch.arange(n)[None] <= torch.arange(m)[:, None]) if isinstance(attn_bias, LowerTriangularMask) else None
    s = query.shape[-1] ** -0.5 if scale is None else scale
    heads = _xf_heads(query).shape[1]
    gq, gk, gv = _bwd(_xf_heads(grad), _xf_heads(query), _xf_heads(key), _xf_heads(value), _xf_heads(output),
                      lse[..., :m].reshape(query.shape[0], heads, m), s, keep)
    back = [g.transpose(1, 2).reshape(t.shape).to(t.dtype) for g, t in ((gq, query), (gk, key), (gv, value))]
    return tuple(back)


def _not_on_this_path(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("memory_efficient_attention (the autograd API) is not what the pair calls")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    mods = {
        "flash_attn": _module("flash_attn"),
        "flash_attn.flash_attn_interface": _module("flash_attn.flash_attn_interface", _flash_attn_forward=fa2_forward,
                                                   _flash_attn_backward=fa2_backward),
        "flash_attn_interface": _module("flash_attn_interface", _flash_attn_forward=fa3_forward,
                                        _flash_attn_backward=fa3_backward),
        "xformers": _module("xformers"),
        "xformers.ops": _module("xformers.ops", memory_efficient_attention=_not_on_this_path),
        "xformers.ops.fmha": _module("xformers.ops.fmha", memory_efficient_attention_forward_requires_grad=xf_forward,
                                     memory_efficient_attention_backward=xf_backward),
        "xformers.ops.fmha.attn_bias": _module("xformers.ops.fmha.attn_bias", LowerTriangularMask=LowerTriangularMask),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    caches = (pairs.load_interface, xf.load_fmha, xf.load_library)
    for c in caches:
        c.cache_clear()
    CALLS.clear()
    lz.get_runtime().backends.refresh()
    yield
    for c in caches:
        c.cache_clear()
    monkeypatch.undo()
    lz.get_runtime().backends.refresh()  # availability seen with the fakes must not outlive them


# -- the pairs against the float64 reference ------------------------------------------------------------

CASES = {  # name: (hq, hkv, sq, sk, d, is_causal, window, softcap, alibi)
    "mha": (4, 4, 12, 20, 16, False, None, None, False),
    "gqa_causal": (4, 2, 16, 16, 16, True, None, None, False),
    "mqa_window": (4, 1, 16, 16, 8, False, 5, None, False),
    "softcap": (4, 2, 16, 16, 16, True, None, 3.0, False),
    "alibi": (4, 2, 10, 10, 16, True, None, None, True),
    "head_dim_20": (2, 2, 9, 9, 20, True, None, None, False),
}
PAIRS = {"fa2": (pairs.FA2_PAIR, set(CASES)),
         "fa3": (pairs.FA3_PAIR, {"mha", "gqa_causal", "mqa_window", "softcap"}),
         "xformers": (xf.XFORMERS_PAIR, {"mha", "gqa_causal"})}


def _inputs(case: str, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    hq, hkv, sq, sk, d, causal, window, softcap, alibi = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, s, d, generator=g) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    slopes = torch.rand(hq, generator=g) if alibi else None
    args = (q, k, v, None, causal, 0.0, 0.3 if case == "mha" else None, window)
    if softcap is not None or alibi:
        args = (*args, softcap, None, slopes)
    return args, dict(is_causal=causal, scale=args[6], window=window, softcap=softcap, alibi_slopes=slopes)


def _reference_grads(args: tuple[Any, ...], kw: dict[str, Any], grad: torch.Tensor) -> list[torch.Tensor]:
    q, k, v = (t.double().requires_grad_() for t in args[:3])
    out = attention_reference(q, k, v, **kw)
    return list(torch.autograd.grad(out, (q, k, v), grad.double()))


@pytest.mark.usefixtures("fakes")
@pytest.mark.parametrize("name,case", [(n, c) for n, (_, cs) in PAIRS.items() for c in CASES if c in cs])
def test_pair_matches_the_float64_reference_and_its_fake(name: str, case: str) -> None:
    pair = PAIRS[name][0]
    args, kw = _inputs(case)
    out, residuals = pair.forward(*args)
    torch.testing.assert_close(out.double(), attention_reference(*args[:3], **kw), atol=1e-5, rtol=1e-5)
    assert out.shape == args[0].shape[:3] + (args[2].shape[-1],)
    fake = pair.fake(*args)
    assert [(r.shape, r.dtype) for r in residuals] == [(f.shape, f.dtype) for f in fake]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = pair.backward(grad, args, out.contiguous(), residuals)
    for got, want, t in zip(grads[:3], _reference_grads(args, kw, grad), args[:3], strict=True):
        assert got.shape == t.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("fakes")
@pytest.mark.parametrize("name", list(PAIRS))
def test_backward_reads_the_saved_log_sum_exp(name: str) -> None:
    pair = PAIRS[name][0]
    args, kw = _inputs("gqa_causal")
    out, residuals = pair.forward(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    wrong = (residuals[0] + 0.5, *residuals[1:])
    dq = pair.backward(grad, args, out.contiguous(), wrong)[0]
    assert not torch.allclose(dq.double(), _reference_grads(args, kw, grad)[0], atol=1e-3)


def test_xformers_pair_declines_dropout() -> None:
    ctx = lz.SelectionContext(device="cuda", dtype="float16", batch_size=1, seq_len=64, num_heads=4, head_dim=64,
                              dropout_p=0.1)
    (reason,) = xf.XFORMERS_PAIR.check(ctx)  # type: ignore[misc]
    assert reason.code == "DROPOUT_UNSUPPORTED" and "residual API" in reason.message
    assert xf.XFORMERS_PAIR.check(ctx.replace(dropout_p=0.0)) == []  # type: ignore[misc]
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(KernelNotSupportedError, match="no dropout"):
        xf.xformers_forward(q, q, q, None, False, 0.1, None, None)


# -- under torch.compile: one forward and one backward per attention call ------------------------------

@pytest.fixture
def fresh() -> Iterator[None]:
    torch._dynamo.reset()
    lz.get_runtime().reset()
    yield
    torch._dynamo.reset()
    lz.get_runtime().reset()


def _cpu_copy(kid: str) -> Iterator[str]:
    """A CPU-selectable copy of a registered CUDA spec (same pair), locked for attention."""
    rt = lz.get_runtime()
    real = rt.kernels.find(kid)
    assert real is not None and real.residual_pair is not None and real.compile_safe
    rt.backends.register("testpairs", module="torch")
    spec = KernelSpec(f"test_{kid}", "attention", "testpairs", real.impl, priority=99, platforms={"cpu"},
                      dtypes={torch.float32}, mask_kinds={"none"}, supports_window=real.supports_window,
                      supports_gqa=True, supports_dropout=False, residual_pair=real.residual_pair)
    rt.kernels.register(spec)
    lz.lock("attention*", spec.kernel_id)
    try:
        yield spec.kernel_id
    finally:
        lz.unlock("attention*")
        rt.kernels.unregister(spec.kernel_id)


FORWARDS = {"flash_attn_v2_attention": "fa2", "flash_attn_v3_attention": "fa3", "xformers_attention": "xf"}


def _layers(q: torch.Tensor, kv: list[torch.Tensor], causal: bool, window: int | None,
            attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    x = q
    for k, v in zip(kv[::2], kv[1::2], strict=True):
        x = attend(x, k, v, is_causal=causal, window=window) * 0.5 + x
    return x.square().mean()


@pytest.mark.usefixtures("fakes", "fresh")
@pytest.mark.parametrize("kid,causal,window", [("flash_attn_v2_attention", True, None),
                                               ("flash_attn_v2_attention", False, 4),
                                               ("flash_attn_v3_attention", True, None),
                                               ("xformers_attention", True, None)])
def test_compiled_training_step_runs_the_forward_once_and_the_pair_backward(kid: str, causal: bool,
                                                                           window: int | None) -> None:
    layers, g = 2, torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 16, 16, generator=g).requires_grad_()
    kv = [torch.randn(2, 2, 16, 16, generator=g).requires_grad_() for _ in range(2 * layers)]

    def reference(x, k, v, is_causal, window):  # type: ignore[no-untyped-def]
        return attention_reference(x, k, v, is_causal=is_causal, window=window).float()

    want = torch.autograd.grad(_layers(q, kv, causal, window, reference), [q, *kv])
    step = torch.compile(lambda q, kv: _layers(q, kv, causal, window, lz.attention), backend="aot_eager",
                         fullgraph=True)
    for copy in _cpu_copy(kid):
        step(q, kv)  # compile
        CALLS.clear()
        got = torch.autograd.grad(step(q, kv), [q, *kv])
        name = FORWARDS[kid]
        assert CALLS == Counter({f"{name}_forward": layers, f"{name}_backward": layers}), CALLS
        assert copy.startswith("test_")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def fa2_6_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,  # type: ignore[no-untyped-def]
                  return_softmax):
    """flash_attn 2.6's signature: window_size as a tuple; returns (out, q, k, v, out_padded, lse, S, rng)."""
    out, lse, s_dmask, rng = fa2_forward(q, k, v, dropout_p, softmax_scale, causal, *window_size, softcap,
                                         alibi_slopes, return_softmax)
    return out, q, k, v, out, lse, s_dmask, rng


def fa2_6_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,  # type: ignore[no-untyped-def]
                   window_size, softcap, alibi_slopes, deterministic, rng_state=None):
    fa2_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, *window_size,
                 softcap, alibi_slopes, deterministic, rng_state)
    return dq, dk, dv, torch.empty(0)


def fa2_3_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, return_softmax):  # type: ignore[no-untyped-def]
    """flash_attn 2.3: no alibi_slopes, no softcap."""
    return fa2_6_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, 0.0, None, return_softmax)


@pytest.mark.usefixtures("fakes")
def test_older_flash_attn_signatures_are_read_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = sys.modules["flash_attn.flash_attn_interface"]
    monkeypatch.setattr(mod, "_flash_attn_forward", fa2_6_forward)
    monkeypatch.setattr(mod, "_flash_attn_backward", fa2_6_backward)
    pairs.load_interface.cache_clear()
    args, kw = _inputs("softcap")
    out, residuals = pairs.FA2_PAIR.forward(*args)
    torch.testing.assert_close(out.double(), attention_reference(*args[:3], **kw), atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    dq = pairs.FA2_PAIR.backward(grad, args, out.contiguous(), residuals)[0]
    torch.testing.assert_close(dq.double(), _reference_grads(args, kw, grad)[0], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(mod, "_flash_attn_forward", fa2_3_forward)
    pairs.load_interface.cache_clear()
    with pytest.raises(KernelNotSupportedError, match="takes no softcap"):
        pairs.FA2_PAIR.forward(*args)
    plain, kw = _inputs("gqa_causal")
    torch.testing.assert_close(pairs.FA2_PAIR.forward(*plain)[0].double(), attention_reference(*plain[:3], **kw),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("fresh")
def test_flashinfer_is_inference_only_and_compiled_training_says_so() -> None:
    """FlashInfer has no backward, so no pair: locked for a compiled training step, the call fails clearly."""
    rt = lz.get_runtime()
    real = rt.kernels.find("flashinfer_prefill")
    assert real is not None and real.residual_pair is None and not real.supports_autograd
    rt.backends.register("testpairs", module="torch")
    spec = KernelSpec("test_flashinfer", "attention", "testpairs", real.impl, priority=99, platforms={"cpu"},
                      dtypes={torch.float32}, mask_kinds={"none"}, supports_autograd=False, compile_safe=False)
    rt.kernels.register(spec)
    lz.lock("attention*", spec.kernel_id)
    try:
        q = torch.randn(1, 2, 8, 16, requires_grad=True)
        step = torch.compile(lambda q: lz.attention(q, q, q, is_causal=True).sum(), backend="aot_eager",
                             fullgraph=True)
        with pytest.raises(KernelNotSupportedError, match="inputs require grad and this kernel has no backward"):
            step(q).backward()
    finally:
        lz.unlock("attention*")
        rt.kernels.unregister(spec.kernel_id)
