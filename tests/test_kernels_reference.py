"""Every registered kernel against its operation's float64 reference, generated from the registry.

Cases come from each kernel's declared dtypes and constraints: a case the spec
rejects on a representative device of its platform is not generated at all;
a case the real device rejects at run time (an older GPU, say) is skipped with
the kernel's own reasons. Ids read ``kernel-device-dtype-shape-flags``, e.g.
``torch_sdpa_flash_cpu-cpu-bfloat16-b2h8s64d64-causal``. The same cases run on
CUDA (marked ``gpu``) when a GPU is present.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.context import DTYPE_NAMES, SelectionContext
from layerzero.ops import op_for
from layerzero.ops.attention import attention_reference
from layerzero.ops.sampling import filtered_probs
from layerzero.registry import get_global_backend_registry, get_global_kernel_registry, operation_matches
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec, ReasonCode

DEVICES = (("cpu", ()), ("cuda", (pytest.mark.gpu,)))
# Reasons that depend on the exact GPU; they are decided at run time on the real device.
_HARDWARE_CODES = {ReasonCode.SM_TOO_OLD, ReasonCode.SM_TOO_NEW}
_SAMPLE_OPS = ("sample.greedy", "sample.temperature", "sample.top_k", "sample.top_p")


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _gen(device: str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, g: torch.Generator) -> torch.Tensor:
    # Drawn in float32 on the device, then cast: the same values for every dtype of a case.
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


# -- cases ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One input configuration of an operation family."""

    operation: str
    label: str  # shape and flags, used in the test id
    build: Callable[[str, torch.dtype, torch.Generator], tuple[Any, ...]]
    grad: bool = True  # whether an autograd check makes sense for it
    extra: dict[str, Any] = field(default_factory=dict)


def _attn_case(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dv: int | None = None, *, causal: bool = False,
               mask: str | None = None, window: int | None = None, scale: float | None = None) -> Case:
    dv = dv or d
    shape = f"b{b}h{hq}" + (f"kv{hkv}" if hkv != hq else "") + f"s{sq}" + (f"k{sk}" if sk != sq else "") + f"d{d}"
    shape += f"v{dv}" if dv != d else ""
    flags = [f for f in ("causal" if causal else "", f"mask_{mask}" if mask else "",
                         f"window{window}" if window else "", f"scale{scale}" if scale else "") if f]

    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        q = _randn((b, hq, sq, d), dtype, device, g)
        k = _randn((b, hkv, sk, d), dtype, device, g)
        v = _randn((b, hkv, sk, dv), dtype, device, g)
        m = None
        if mask in ("bool", "bool4d"):
            shape_m = (sq, sk) if mask == "bool" else (b, 1, sq, sk)
            m = torch.rand(shape_m, generator=g, device=device) > 0.3
            m[..., 0] = True  # no fully masked row: SDPA kernels disagree on what those return
        elif mask in ("additive", "additive4d"):
            shape_m = (sq, sk) if mask == "additive" else (b, hq, sq, sk)
            m = _randn(shape_m, dtype, device, g)
        return (q, k, v, m, causal, 0.0, scale, window)

    op = "attention.sliding_window" if window else ("attention.causal" if causal else "attention.full")
    return Case(op, "-".join([shape, *flags]) if flags else f"{shape}-full", build)


ATTENTION_CASES = [
    _attn_case(2, 8, 8, 64, 64, 64),                          # prefill
    _attn_case(2, 8, 8, 64, 64, 64, causal=True),
    _attn_case(2, 8, 8, 1, 64, 64),                           # decode
    _attn_case(2, 8, 8, 1, 64, 64, causal=True),              # upper-left: the one query sees key 0 only
    _attn_case(2, 4, 4, 16, 48, 32),                          # cross attention, Sq != Sk
    _attn_case(2, 4, 4, 48, 16, 32, causal=True),             # causal with Sq > Sk (upper-left)
    _attn_case(2, 4, 4, 16, 48, 32, causal=True),             # causal with Sq < Sk (upper-left)
    _attn_case(2, 8, 2, 32, 32, 64, causal=True),             # GQA
    _attn_case(1, 8, 1, 32, 32, 64),                          # MQA
    _attn_case(2, 4, 4, 32, 32, 64, mask="bool"),
    _attn_case(2, 4, 4, 32, 32, 64, mask="bool4d"),
    _attn_case(2, 4, 4, 32, 32, 64, mask="additive"),
    _attn_case(2, 4, 4, 32, 32, 64, mask="additive4d"),
    _attn_case(1, 4, 4, 64, 64, 32, causal=True, window=16),
    _attn_case(2, 4, 4, 32, 32, 40),                          # head_dim a multiple of 8, not a power of 2
    _attn_case(2, 4, 4, 32, 32, 20),                          # head_dim not a multiple of 8
    _attn_case(2, 4, 4, 32, 32, 64, 32),                      # value head_dim != query head_dim
    _attn_case(2, 4, 4, 32, 32, 64, scale=0.3),
]


def _rows_case(operation: str, shape: tuple[int, ...], *, weight: bool = True, bias: bool = True) -> Case:
    label = "x".join(map(str, shape)) + ("" if weight else "-noweight") + ("" if bias or operation != "layer_norm"
                                                                             else "-nobias")

    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        x = _randn(shape, dtype, device, g) * 2 + 0.5
        w = (_randn(shape[-1:], dtype, device, g) * 0.5 + 1.0) if weight else None
        if operation == "rms_norm":
            return (x, w, 1e-6)
        b = _randn(shape[-1:], dtype, device, g) if bias else None
        return (x, w, b, 1e-5)

    return Case(operation, label, build)


def _rope_case(shape: tuple[int, ...], interleaved: bool, half_table: bool) -> Case:
    b, h, s, d = shape
    label = f"b{b}h{h}s{s}d{d}-{'interleaved' if interleaved else 'halves'}-cos{d // 2 if half_table else d}"

    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        x = _randn(shape, dtype, device, g)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        freqs = torch.arange(s, dtype=torch.float64, device=device)[:, None] * inv  # (s, d/2)
        if not half_table:
            freqs = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
        return (x, freqs.cos().to(dtype), freqs.sin().to(dtype), interleaved)

    return Case("rope", label, build, extra={"interleaved": interleaved})


def _unary_case(operation: str, shape: tuple[int, ...], approximate: str | None = None) -> Case:
    label = "x".join(map(str, shape)) + (f"-{approximate}" if approximate else "")

    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        x = _randn(shape, dtype, device, g) * 3
        if operation == "swiglu":
            return (x, _randn(shape, dtype, device, g))
        if operation == "geglu":
            return (x, _randn(shape, dtype, device, g), approximate)
        if operation == "gelu":
            return (x, approximate)
        return (x,)

    return Case(operation, label, build, extra={"approximate": approximate or "none"})


def _sample_case(operation: str, rows: int, vocab: int) -> Case:
    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        logits = _randn((rows, vocab), dtype, device, g) * 3
        temperature = 0.0 if operation == "sample.greedy" else 0.8
        top_k = 20 if operation in ("sample.top_k", "sample.top_p") else None
        top_p = 0.7 if operation == "sample.top_p" else None
        return (logits, temperature, top_k, top_p, _gen(device, 1234))

    return Case(operation, f"{operation.split('.')[1]}-r{rows}v{vocab}", build, grad=False)


def _ce_case(rows: int, vocab: int, reduction: str, smoothing: float = 0.0) -> Case:
    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        logits = _randn((rows, vocab), dtype, device, g) * 3
        target = torch.randint(0, vocab, (rows,), generator=g, device=device)
        target[::5] = -100
        return (logits, target, -100, smoothing, reduction)

    return Case("cross_entropy", f"r{rows}v{vocab}-{reduction}" + (f"-ls{smoothing}" if smoothing else ""), build)


def _varlen_case(lens_q: list[int], lens_k: list[int], hq: int, hkv: int, d: int, **kw: Any) -> Case:
    from layerzero.ops.attention_varlen import cu_seqlens

    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        q = _randn((sum(lens_q), hq, d), dtype, device, g)
        k = _randn((sum(lens_k), hkv, d), dtype, device, g)
        v = _randn((sum(lens_k), hkv, d), dtype, device, g)
        return (q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), max(lens_q), max(lens_k),
                kw.get("is_causal", False), kw.get("scale"), kw.get("window"), kw.get("softcap"))

    flags = "-".join(f"{n}{'' if v is True else v}" for n, v in kw.items() if v) or "full"
    return Case("attention_varlen", f"q{'_'.join(map(str, lens_q))}k{'_'.join(map(str, lens_k))}h{hq}kv{hkv}d{d}-{flags}",
                build)


def _paged_case(lens: list[int], sq: int, hq: int, hkv: int, d: int, page: int, **kw: Any) -> Case:
    from layerzero.ops.attention_paged import page_table

    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        max_pages = -(-max(lens) // page) + 1
        pages = len(lens) * max_pages + 1
        q = _randn((len(lens), sq, hq, d), dtype, device, g)
        kc = _randn((pages, page, hkv, d), dtype, device, g)
        vc = _randn((pages, page, hkv, d), dtype, device, g)
        table = page_table(lens, page, max_pages, pages, torch.Generator().manual_seed(sum(lens)), device)
        return (q, kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=device), kw.get("is_causal", True),
                kw.get("scale"), kw.get("window"), kw.get("softcap"))

    flags = "-".join(f"{n}{v}" for n, v in kw.items() if v is not None) or "causal"
    return Case("attention_paged", f"b{len(lens)}q{sq}h{hq}kv{hkv}d{d}p{page}-{flags}", build, grad=False)


def _lce_case(rows: int, hidden: int, vocab: int, reduction: str, smoothing: float = 0.0, *, bias: bool = False,
              softcap: float | None = None) -> Case:
    def build(device: str, dtype: torch.dtype, g: torch.Generator) -> tuple[Any, ...]:
        h = _randn((rows, hidden), dtype, device, g)
        w = (_randn((vocab, hidden), torch.float32, device, g) * (2 / math.sqrt(hidden))).to(dtype)
        b = _randn((vocab,), dtype, device, g) if bias else None
        target = torch.randint(0, vocab, (rows,), generator=g, device=device)
        target[::5] = -100
        return (h, w, target, b, -100, smoothing, reduction, softcap)

    label = f"r{rows}h{hidden}v{vocab}-{reduction}" + (f"-ls{smoothing}" if smoothing else "") + (
        "-bias" if bias else "") + (f"-cap{softcap}" if softcap else "")
    return Case("linear_cross_entropy", label, build)


FAMILY_CASES: dict[str, list[Case]] = {
    "attention_varlen": [_varlen_case([5, 1, 0, 9], [5, 1, 0, 9], 4, 4, 64, is_causal=True),
                         _varlen_case([16, 8], [24, 8], 8, 2, 64, is_causal=True),
                         _varlen_case([16, 8], [16, 8], 4, 4, 64),
                         _varlen_case([32, 12], [32, 12], 4, 2, 64, is_causal=True, window=8),
                         _varlen_case([16, 4], [16, 4], 4, 4, 64, is_causal=True, softcap=5.0)],
    "attention_paged": [_paged_case([40, 3, 17], 1, 8, 2, 64, 16), _paged_case([300, 260], 4, 4, 4, 64, 256),
                        _paged_case([40, 9], 3, 4, 4, 64, 16, window=8),
                        _paged_case([33, 20], 1, 4, 1, 64, 16, softcap=5.0),
                        _paged_case([400, 160], 160, 4, 2, 64, 128)],  # chunked prefill: two query blocks
    "attention": ATTENTION_CASES,
    "rms_norm": [_rows_case("rms_norm", (4, 64)), _rows_case("rms_norm", (2, 3, 128), weight=False),
                 _rows_case("rms_norm", (1, 4096))],
    "layer_norm": [_rows_case("layer_norm", (4, 64)), _rows_case("layer_norm", (2, 3, 128), bias=False),
                   _rows_case("layer_norm", (4, 96), weight=False, bias=False)],
    "rope": [_rope_case((2, 4, 16, 64), il, half) for il in (False, True) for half in (False, True)],
    "swiglu": [_unary_case("swiglu", (4, 256)), _unary_case("swiglu", (2, 3, 64))],
    "geglu": [_unary_case("geglu", (4, 256), "tanh"), _unary_case("geglu", (2, 3, 64), "tanh"),
              _unary_case("geglu", (4, 256), "none")],
    "gelu": [_unary_case("gelu", (4, 256), "none"), _unary_case("gelu", (4, 256), "tanh")],
    "silu": [_unary_case("silu", (4, 256)), _unary_case("silu", (2, 3, 64))],
    "sample": [_sample_case(op, 8, 1000) for op in _SAMPLE_OPS],
    "cross_entropy": [_ce_case(16, 1000, "mean"), _ce_case(4, 512, "sum", 0.1), _ce_case(12, 500, "none")],
    # 300 rows: several chunks of the chunked kernel (64 rows each at these widths)
    "linear_cross_entropy": [_lce_case(300, 32, 1000, "mean"), _lce_case(300, 64, 500, "sum", 0.1, bias=True),
                             _lce_case(200, 32, 700, "none", softcap=5.0), _lce_case(7, 16, 96, "mean", 0.2,
                                                                                    bias=True, softcap=30.0)],
}


# -- generation from the registry -----------------------------------------------------------------

def _available_kernels() -> list[KernelSpec]:
    backends = get_global_backend_registry()
    return [s for s in get_global_kernel_registry().match("*") if backends.is_available(s.backend)]


def _sketch(spec: KernelSpec, case: Case, device: str, dtype: torch.dtype) -> SelectionContext:
    """The context a case has on ``device``, built from CPU tensors (a representative sm90 for CUDA)."""
    op = op_for(case.operation)
    args = case.build("cpu", dtype, _gen("cpu", 0))
    ctx = op.context(case.operation, args)
    if device == "cuda":
        ctx = ctx.replace(device="cuda", compute_capability=(9, 0))
    return ctx


def _declared_fit(spec: KernelSpec, case: Case, device: str, dtype: torch.dtype) -> bool:
    if not operation_matches(spec.operation, case.operation):
        return False
    reasons = spec.check(_sketch(spec, case, device, dtype))
    return all(r.code in _HARDWARE_CODES for r in reasons)


def _dtypes(spec: KernelSpec) -> list[torch.dtype]:
    return sorted(spec.dtypes, key=lambda d: DTYPE_NAMES[d]) if spec.dtypes else [torch.float32]


def _platforms(spec: KernelSpec) -> list[tuple[str, tuple[Any, ...]]]:
    return [(d, marks) for d, marks in DEVICES if spec.platforms is None or d in spec.platforms]


@functools.cache
def _params() -> list[Any]:
    out = []
    for spec in _available_kernels():
        family = op_for(spec.operation).family
        for device, marks in _platforms(spec):
            for dtype in _dtypes(spec):
                for case in FAMILY_CASES.get(family, []):
                    if _declared_fit(spec, case, device, dtype):
                        pid = f"{spec.kernel_id}-{device}-{DTYPE_NAMES[dtype]}-{case.label}"
                        out.append(pytest.param(spec.kernel_id, device, dtype, case, id=pid, marks=marks))
    return out


def _run_args(kernel_id: str, device: str, dtype: torch.dtype, case: Case, seed_text: str) -> tuple[Any, ...]:
    """Fresh inputs on the real device; skip with the kernel's reasons when this device rejects them."""
    args = case.build(device, dtype, _gen(device, _seed(seed_text)))
    ctx = op_for(case.operation).context(case.operation, args)
    ok, reasons = lz.validate(kernel_id, ctx)
    if not ok:
        pytest.skip(f"{kernel_id} cannot run here: " + "; ".join(f"{r.message} [{r.code}]" for r in reasons))
    return args


def _assert_close(out: torch.Tensor, ref: torch.Tensor, spec: KernelSpec, dtype: torch.dtype, what: str,
                  scale: float = 1.0) -> None:
    atol, rtol = spec.tolerance_for(dtype)
    torch.testing.assert_close(out.detach().double(), ref.detach().to(out.device).double(),
                               atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{spec.kernel_id} {what} differs from the float64 reference: {m}")


# -- forward against the reference ----------------------------------------------------------------

_FORWARD = [p for p in _params() if p.values[3].operation not in _SAMPLE_OPS]


def test_every_available_kernel_has_cases() -> None:
    covered = {p.values[0] for p in _params()}
    missing = [s.kernel_id for s in _available_kernels() if s.kernel_id not in covered]
    assert not missing, f"kernels with no generated reference case: {missing}"


@pytest.mark.parametrize(("kernel_id", "device", "dtype", "case"), _FORWARD)
def test_kernel_matches_float64_reference(kernel_id: str, device: str, dtype: torch.dtype, case: Case) -> None:
    spec = get_global_kernel_registry().get(kernel_id)
    op = op_for(case.operation)
    args = _run_args(kernel_id, device, dtype, case, f"{kernel_id}-{case.label}")
    with torch.no_grad():
        out = spec.impl(*args)
    assert op.check_output(case.operation, args, out) is None
    ref = op.reference(case.operation, args)
    assert ref.dtype == torch.float64
    _assert_close(out, ref, spec, dtype, case.label)


_SPECIALIZED = [p for p in _FORWARD if get_global_kernel_registry().get(p.values[0]).specialize is not None]


@pytest.mark.parametrize(("kernel_id", "device", "dtype", "case"), _SPECIALIZED)
def test_specialized_kernel_matches_float64_reference(kernel_id: str, device: str, dtype: torch.dtype,
                                                      case: Case) -> None:
    """What a plan runs: the spec's specialization for the call's context (constants bound, fewer arguments
    to PyTorch), and its ``direct`` form that the ops call without an adapter frame."""
    spec = get_global_kernel_registry().get(kernel_id)
    op = op_for(case.operation)
    args = _run_args(kernel_id, device, dtype, case, f"{kernel_id}-{case.label}-special")
    _, fn = spec.specialize(op.context(case.operation, args))
    ref = op.reference(case.operation, args)
    with torch.no_grad():
        outs = {"specialized": fn(*args)}
        direct = getattr(fn, "direct", None)
        if direct is not None:
            if op.family == "attention":
                if args[6] is None:  # lz.attention calls direct(q, k, v) only without a scale
                    outs["direct"] = direct(*args[:3])
            elif op.family == "rms_norm":
                outs["direct"] = direct(args[0], fn.const, args[1], args[2])
            else:
                outs["direct"] = direct(args[0], fn.const, args[1], args[2], args[3])
    for what, out in outs.items():
        assert op.check_output(case.operation, args, out) is None, what
        _assert_close(out, ref, spec, dtype, f"{case.label} ({what})")


_ATTENTION_KERNELS = [s for s in _available_kernels() if op_for(s.operation).family == "attention"]
_BSHD_CASE = _attn_case(2, 4, 4, 32, 32, 64, causal=True)


def _bshd_params() -> list[Any]:
    out = []
    for spec in _ATTENTION_KERNELS:
        for device, marks in _platforms(spec):
            dtype = _dtypes(spec)[-1]  # float32 where declared, else bfloat16 / float16
            if torch.float32 in (spec.dtypes or {torch.float32}):
                dtype = torch.float32
            if _declared_fit(spec, _BSHD_CASE, device, dtype):
                out.append(pytest.param(spec.kernel_id, device, dtype,
                                        id=f"{spec.kernel_id}-{device}-{DTYPE_NAMES[dtype]}-bshd", marks=marks))
    return out


@pytest.mark.parametrize(("kernel_id", "device", "dtype"), _bshd_params())
def test_bshd_layout_through_lz_attention(kernel_id: str, device: str, dtype: torch.dtype) -> None:
    """``lz.attention(layout="BSHD")`` with each kernel locked: BSHD out, values of the BHSD reference."""
    spec = get_global_kernel_registry().get(kernel_id)
    q, k, v, _, _, _, _, _ = _run_args(kernel_id, device, dtype, _BSHD_CASE, f"{kernel_id}-bshd")
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # real BSHD tensors
    breaker = get_runtime().breakers.get(kernel_id)
    failures = breaker.failures
    with lz.lock("attention.*", kernel_id):
        assert lz.which("attention.causal", qs, ks, vs, layout="BSHD") == kernel_id
        out = lz.attention(qs, ks, vs, is_causal=True, layout="BSHD")
    assert breaker.failures == failures, f"{kernel_id} failed and the call fell back: {breaker.last_failure}"
    assert out.shape == qs.shape
    ref = attention_reference(q, k, v, None, True).transpose(1, 2)
    _assert_close(out, ref, spec, dtype, "BSHD output")


# -- autograd -----------------------------------------------------------------------------------------

def _grad_dtype(spec: KernelSpec) -> torch.dtype:
    declared = spec.dtypes or {torch.float32}
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        if dt in declared:
            return dt
    raise AssertionError(f"{spec.kernel_id} declares no float dtype")


_GRAD_CASES: dict[str, list[Case]] = {
    "attention": [_attn_case(2, 4, 4, 16, 16, 32, causal=True), _attn_case(2, 4, 4, 8, 24, 32),
                  _attn_case(2, 8, 2, 16, 16, 32, causal=True), _attn_case(2, 4, 4, 16, 16, 32, mask="additive")],
    "rms_norm": [_rows_case("rms_norm", (4, 64))],
    "layer_norm": [_rows_case("layer_norm", (4, 64))],
    "rope": [_rope_case((1, 2, 8, 32), il, False) for il in (False, True)],
    "swiglu": [_unary_case("swiglu", (4, 64))],
    "geglu": [_unary_case("geglu", (4, 64), "tanh"), _unary_case("geglu", (4, 64), "none")],
    "gelu": [_unary_case("gelu", (4, 64), "none"), _unary_case("gelu", (4, 64), "tanh")],
    "silu": [_unary_case("silu", (4, 64))],
    "cross_entropy": [_ce_case(8, 256, "mean"), _ce_case(8, 256, "none", 0.1)],
    "linear_cross_entropy": [_lce_case(150, 16, 300, "mean", 0.1, bias=True),
                             _lce_case(150, 16, 300, "none", bias=True, softcap=4.0),
                             _lce_case(150, 16, 300, "sum", softcap=4.0)],
}


def _grad_params() -> list[Any]:
    out = []
    for spec in _available_kernels():
        if not spec.supports_autograd:
            continue
        family = op_for(spec.operation).family
        dtype = _grad_dtype(spec)
        for device, marks in _platforms(spec):
            for case in _GRAD_CASES.get(family, []):
                if _declared_fit(spec, case, device, dtype):
                    pid = f"{spec.kernel_id}-{device}-{DTYPE_NAMES[dtype]}-{case.label}-grad"
                    out.append(pytest.param(spec.kernel_id, device, dtype, case, id=pid, marks=marks))
    return out


def _with_grad(args: tuple[Any, ...], family: str) -> tuple[tuple[Any, ...], list[int]]:
    """Mark the differentiable tensor inputs (not masks, not rope tables) as requiring grad."""
    skip = {"attention": {3}, "rope": {1, 2}}.get(family, set())
    out, idx = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in skip:
            a = a.detach().clone().requires_grad_(True)
            idx.append(i)
        out.append(a)
    return tuple(out), idx


@pytest.mark.parametrize(("kernel_id", "device", "dtype", "case"), _grad_params())
def test_kernel_gradients_match_float64_reference(kernel_id: str, device: str, dtype: torch.dtype,
                                                  case: Case) -> None:
    spec = get_global_kernel_registry().get(kernel_id)
    op = op_for(case.operation)
    family = op.family
    args = case.build(device, dtype, _gen(device, _seed(f"{kernel_id}-{case.label}-grad")))
    args, idx = _with_grad(args, family)
    ctx = op.context(case.operation, args)
    assert ctx.requires_grad
    ok, reasons = lz.validate(kernel_id, ctx)
    if not ok:
        pytest.skip(f"{kernel_id} cannot train here: " + "; ".join(str(r) for r in reasons))
    out = spec.impl(*args)
    ref_args = tuple(a.detach().double().requires_grad_(True) if i in idx else a for i, a in enumerate(args))
    ref = op.reference(case.operation, ref_args)
    upstream = _randn(tuple(out.shape), torch.float64, device, _gen(device, 7))
    grads = torch.autograd.grad(out, [args[i] for i in idx], upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [ref_args[i] for i in idx], upstream)
    for i, g, rg in zip(idx, grads, ref_grads, strict=True):
        # Gradients sum over more terms than outputs: allow a few times the forward tolerance.
        _assert_close(g, rg, spec, dtype, f"gradient of input {op.arg_names[i]}", scale=8.0)


_LZ_GRAD_DEVICES = [pytest.param(d, marks=m, id=d) for d, m in DEVICES]


@pytest.mark.parametrize("device", _LZ_GRAD_DEVICES)
def test_lz_attention_rms_norm_layer_norm_gradients(device: str) -> None:
    """The gradients of the public ops (default selection) match the float64 reference's."""
    g = _gen(device, 11)
    dtype = torch.float32
    q, k, v = (_randn((2, 4, 16, 32), dtype, device, g).requires_grad_(True) for _ in range(3))
    out = lz.attention(q, k, v, is_causal=True)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, None, True)
    up = _randn(tuple(out.shape), torch.float64, device, g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up.float()), torch.autograd.grad(ref, (q64, k64, v64), up),
                    strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)

    x = _randn((4, 64), dtype, device, g).requires_grad_(True)
    w = (_randn((64,), dtype, device, g) + 1).requires_grad_(True)
    b = _randn((64,), dtype, device, g).requires_grad_(True)
    for name, fn, params in (("rms_norm", lambda: lz.rms_norm(x, w), (x, w)),
                             ("layer_norm", lambda: lz.layer_norm(x, w, b), (x, w, b))):
        out = fn()
        p64 = tuple(t.detach().double().requires_grad_(True) for t in params)
        ref = op_for(name).reference(name, (*p64, 1e-6) if name == "rms_norm" else (*p64, 1e-5))
        up = _randn(tuple(out.shape), torch.float64, device, g)
        for a, r in zip(torch.autograd.grad(out, params, up.float()), torch.autograd.grad(ref, p64, up), strict=True):
            torch.testing.assert_close(a.double(), r, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture
def no_backward_rms_kernel():
    """A top-priority rms_norm kernel without a backward (it computes the right values, in no_grad)."""
    calls: list[bool] = []

    def custom_rms_nograd(x, weight, eps):  # type: ignore[no-untyped-def]
        calls.append(True)
        with torch.no_grad():
            out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return out * weight if weight is not None else out

    spec = lz.register_kernel(KernelSpec("custom_rms_nograd", "rms_norm", "custom", custom_rms_nograd, priority=999,
                                         supports_autograd=False))
    try:
        yield spec, calls
    finally:
        get_global_kernel_registry().unregister(spec.kernel_id)


def test_kernel_without_autograd_is_never_selected_when_grad_is_required(no_backward_rms_kernel) -> None:
    spec, calls = no_backward_rms_kernel
    g = _gen("cpu", 3)
    x = _randn((4, 32), torch.float32, "cpu", g)
    w = _randn((32,), torch.float32, "cpu", g) + 1
    assert lz.which("rms_norm", x, w) == spec.kernel_id
    lz.rms_norm(x, w)  # caches a plan for this key with the no-backward kernel
    assert calls

    xg = x.clone().requires_grad_(True)
    exp = lz.explain(xg, w, operation="rms_norm")
    assert exp.selected_kernel != spec.kernel_id
    assert [r.code for r in exp.rejection_reasons[spec.kernel_id]] == [ReasonCode.GRAD_UNSUPPORTED]

    calls.clear()
    out = lz.rms_norm(xg, w)  # same cache key as the cached no-backward plan
    assert not calls, "the kernel without a backward ran for an input that requires grad"
    assert out.grad_fn is not None
    (gx,) = torch.autograd.grad(out.sum(), xg)
    x64 = x.double().requires_grad_(True)
    ref = op_for("rms_norm").reference("rms_norm", (x64, w.double(), 1e-6))
    torch.testing.assert_close(gx.double(), torch.autograd.grad(ref.sum(), x64)[0], atol=1e-4, rtol=1e-4)

    with torch.no_grad():  # grad mode off: the fast kernel is fine again
        lz.rms_norm(xg, w)
    assert calls


# -- sampling -------------------------------------------------------------------------------------

_SAMPLING = [p for p in _params() if p.values[3].operation in _SAMPLE_OPS]


@pytest.mark.parametrize(("kernel_id", "device", "dtype", "case"), _SAMPLING)
def test_sampling_kernel_against_reference(kernel_id: str, device: str, dtype: torch.dtype, case: Case) -> None:
    """Greedy is exact; sampled tokens always lie inside the reference distribution's support."""
    spec = get_global_kernel_registry().get(kernel_id)
    op = op_for(case.operation)
    args = _run_args(kernel_id, device, dtype, case, f"{kernel_id}-{case.label}")
    out = spec.impl(*args)
    assert op.check_output(case.operation, args, out) is None
    ref = op.reference(case.operation, args)
    if case.operation == "sample.greedy":
        assert torch.equal(out, ref.to(out.device))
        return
    for _ in range(20):
        p = ref.to(out.device).gather(-1, out.unsqueeze(-1)).squeeze(-1)
        assert bool((p > 0).all()), f"{kernel_id} sampled a token outside the reference support: {out.tolist()}"
        out = spec.impl(*args)


def _stat_params() -> list[Any]:
    return [p for p in _SAMPLING if p.values[3].operation != "sample.greedy"
            and p.values[2] in (torch.float32, torch.float16)]


@pytest.mark.parametrize(("kernel_id", "device", "dtype", "case"), _stat_params())
def test_sampling_distribution_matches_reference(kernel_id: str, device: str, dtype: torch.dtype,
                                                 case: Case) -> None:
    """20,000 draws from one row (fixed generator): every frequency within 0.02 of the reference
    probability (about six standard deviations)."""
    spec = get_global_kernel_registry().get(kernel_id)
    g = _gen(device, _seed(f"{kernel_id}-{case.label}-stats"))
    row = (_randn((1, 12), dtype, device, g) * 1.5)
    n = 20_000
    logits = row.expand(n, 12).contiguous()
    _, temperature, top_k, top_p, _ = case.build(device, dtype, _gen(device, 0))
    top_k = None if top_k is None else 5
    top_p = None if top_p is None else 0.8
    ctx = op_for(case.operation).context(case.operation, (logits, temperature, top_k, top_p, None))
    ok, reasons = lz.validate(kernel_id, ctx)
    if not ok:
        pytest.skip("; ".join(str(r) for r in reasons))
    tokens = spec.impl(logits, temperature, top_k, top_p, _gen(device, 99))
    freq = torch.bincount(tokens.cpu(), minlength=12).double() / n
    probs = filtered_probs(row.cpu(), temperature, top_k, top_p)[0]
    assert float((freq - probs).abs().max()) < 0.02, f"{kernel_id}: {freq.tolist()} vs {probs.tolist()}"
    assert bool((freq[probs == 0] == 0).all())
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)
