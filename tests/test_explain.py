"""Inspection: ``lz.explain``, ``lz.which``, ``lz.select``, ``lz.list_kernels``, ``lz.validate``, and the
core API tour in ``docs/core.md`` (every python block runs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from doc_pages import page, python_blocks
import layerzero as lz
from layerzero.errors import InvalidInputError, KernelNotFoundError, NoKernelError
from layerzero.selection import Selection, SelectionContext
from layerzero.spec import ReasonCode

CUDA_KERNELS = ("torch_sdpa_flash", "torch_sdpa_efficient", "torch_sdpa_cudnn")
DOC = page("core.md")


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(2, 4, 32, 64, generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine reports")
def test_explain_on_cpu_lists_the_cuda_kernels_with_reasons(qkv: tuple[torch.Tensor, ...]) -> None:
    exp = lz.explain(*qkv, operation="attention.causal")
    for kid in CUDA_KERNELS:
        reasons = exp.rejection_reasons[kid]
        assert reasons[0].code == ReasonCode.PLATFORM_MISMATCH
        assert str(reasons[0]) == "device is cpu, kernel runs on cuda"
    assert exp.selected_kernel in {"torch_sdpa", "torch_sdpa_flash_cpu", "torch_sdpa_gqa", "torch_sdpa_math"}
    text = str(exp)
    assert "torch_sdpa_flash: device is cpu, kernel runs on cuda [PLATFORM_MISMATCH]" in text


def test_cached_flips_after_a_call(qkv: tuple[torch.Tensor, ...]) -> None:
    before = lz.explain(*qkv, operation="attention.causal")
    assert not before.cached and "not cached yet" in str(before)
    lz.attention(*qkv, is_causal=True)
    after = lz.explain(*qkv, operation="attention.causal")
    assert after.cached and "cached plan" in str(after)
    assert not lz.explain(*qkv, operation="attention.full").cached  # another operation, another plan
    lz.get_runtime().invalidate("test")
    assert not lz.explain(*qkv, operation="attention.causal").cached


def test_candidates_are_ranked_and_the_report_is_readable(qkv: tuple[torch.Tensor, ...]) -> None:
    exp = lz.explain(*qkv, operation="attention.causal")
    ids = [k for k, _ in exp.candidates]
    assert ids[0] == exp.selected_kernel and exp.score == exp.candidates[0][1]
    scores = [s for _, s in exp.candidates]
    assert scores == sorted(scores, reverse=True)  # priorities only (no measurements here)
    assert not set(ids) & set(exp.rejection_reasons)
    assert {d.kernel_id for d in exp.trace} == set(ids) | set(exp.rejection_reasons)
    text = str(exp)
    assert text.splitlines()[0].startswith("layerzero: attention.causal(device=cpu, dtype=float32, batch_size=2")
    assert f"  selected: {exp.selected_kernel} (score " in text
    for i, kid in enumerate(ids, 1):
        assert re.search(rf"^    {i}\. {kid} \(score [\d.]+\)$", text, re.M), text
    assert "  rejected:" in text
    json.dumps(exp.to_dict())


def test_explain_shows_policy_rules_and_locks(qkv: tuple[torch.Tensor, ...]) -> None:
    with lz.lock("attention.causal", "torch_sdpa_math"):
        exp = lz.explain(*qkv, operation="attention.causal")
    assert exp.selected_kernel == "torch_sdpa_math"
    assert exp.locked_by is not None and "torch_sdpa_math" in exp.locked_by
    assert any("lock attention.causal -> torch_sdpa_math" in r for r in exp.rules_fired)
    assert "locked by: lock attention.causal -> torch_sdpa_math" in str(exp)
    assert "policy rules that fired:" in str(exp)


def test_explain_validates_its_inputs() -> None:
    with pytest.raises(InvalidInputError, match=r"attention.full: q and k head dims differ: 64 vs 32"):
        lz.explain(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32),
                   operation="attention.full")
    with pytest.raises(InvalidInputError, match=r"unknown operation 'convolution'; operations have these families"):
        lz.explain(torch.randn(2, 2), operation="convolution")


def test_explain_when_nothing_fits() -> None:
    ctx = SelectionContext(dtype=torch.int64, hidden_size=64, num_tokens=4)
    exp = lz.explain_context("rms_norm", ctx)
    assert exp.selected_kernel is None and exp.candidates == []
    assert exp.rejection_reasons and all(exp.rejection_reasons.values())
    assert str(exp).splitlines()[1].startswith("  no kernel selected: no kernel can run rms_norm(")


def test_which(qkv: tuple[torch.Tensor, ...]) -> None:
    kid = lz.which("attention.causal", *qkv)
    assert isinstance(kid, str) and kid == lz.explain(*qkv, operation="attention.causal").selected_kernel
    q, k, v = (t.transpose(1, 2) for t in qkv)
    assert lz.which("attention.causal", q, k, v, layout="BSHD") == kid  # same shapes, other layout
    x = torch.randn(4, 64)
    assert lz.which("rms_norm", x, torch.ones(64)) == "torch_rms_norm"
    assert lz.which("gelu", x, approximate="tanh") == "torch_gelu"
    assert lz.which("rope", torch.randn(1, 2, 4, 8), torch.randn(4, 8), torch.randn(4, 8),
                    interleaved=True) == "torch_rope_interleaved"
    with pytest.raises(NoKernelError, match="no kernel can run rms_norm"), lz.disabled("*"):
        lz.which("rms_norm", x)


def test_select_with_an_explicit_context() -> None:
    ctx = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.float16, batch_size=2, seq_len=256,
                           num_heads=8, head_dim=64, is_causal=True)
    sel = lz.select("attention.causal", ctx)
    assert isinstance(sel, Selection) and sel.selected is sel.ranked[0] and sel.context == ctx
    assert {d.kernel_id for d in sel.trace} == {s.kernel_id for s in lz.list_kernels("attention.causal")}
    assert "torch_sdpa_flash_cpu" in sel.rejections
    with pytest.raises(InvalidInputError, match="select\\(\\): context must be a SelectionContext, got dict"):
        lz.select("attention.causal", {"device": "cuda"})  # type: ignore[arg-type]


def test_list_kernels() -> None:
    attention = lz.list_kernels("attention*")
    ids = [s.kernel_id for s in attention]
    assert ids == sorted(ids)
    assert {"torch_sdpa", "torch_sdpa_flash", "torch_sdpa_math"} <= set(ids)
    assert all(s.operation.startswith("attention") for s in attention)
    assert [s.kernel_id for s in lz.list_kernels("torch_rms*")] == ["torch_rms_norm", "torch_rms_norm_composed"]
    assert {s.kernel_id for s in lz.list_kernels("sample.top_k")} >= {"torch_sample"}
    assert lz.list_kernels("no_such_thing*") == []
    assert len(lz.list_kernels()) == len(lz.get_global_kernel_registry())


def test_validate() -> None:
    a100 = SelectionContext(device="cuda", compute_capability=(8, 0), dtype=torch.bfloat16, batch_size=1,
                            seq_len=128, num_heads=8, head_dim=128)
    assert lz.validate("torch_sdpa_flash", a100) == (True, [])
    ok, reasons = lz.validate("torch_sdpa_flash", a100.replace(compute_capability=(7, 0), head_dim=300,
                                                               head_dim_v=300))
    assert not ok
    assert [(r.code, str(r)) for r in reasons] == [
        (ReasonCode.SM_TOO_OLD, "needs compute capability >= 8.0, this GPU has 7.0"),
        (ReasonCode.HEAD_DIM_TOO_LARGE, "head_dim=300 > 256 supported"),
        (ReasonCode.HEAD_DIM_ALIGNMENT, "head_dim=300 is not a multiple of 8 (pad the head dimension)")]
    with pytest.raises(KernelNotFoundError, match="unknown kernel 'torch_sdpa_flsh'; did you mean torch_sdpa_flash"):
        lz.validate("torch_sdpa_flsh", a100)


def test_core_doc_examples_run(tmp_path: Path) -> None:
    """Every ```python block of docs/core.md, in order, as one script in a fresh process."""
    blocks = python_blocks(DOC)
    assert len(blocks) >= 6
    script = tmp_path / "core_doc.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the outputs the doc shows are what the code prints
    out = done.stdout
    assert "needs compute capability >= 8.0, this GPU has 7.5" in out
    assert "torch_sdpa_flash ['PLATFORM_MISMATCH', 'DTYPE_UNSUPPORTED']" in out
    assert "attention.full: q and k head dims differ: 64 vs 32" in out


def test_cache_key_mirrors_every_ops_hot_path_key() -> None:
    """``inspection.cache_keys`` (used by explain, warmup and dispatch) must build the keys each op's inline
    hot path builds, or explain() lies about ``cached`` and dispatch() never shares plans with ``lz.*``."""
    from layerzero.inspection import cache_key, cache_keys
    from layerzero.ops import OPS

    rt = lz.get_runtime()
    x = torch.randn(3, 16)
    freqs = torch.randn(5, 4)
    calls = {
        "attention": ("attention.causal", (torch.randn(1, 2, 5, 8),) * 3,
                      lambda a: lz.attention(*a[:3], is_causal=True)),
        "rms_norm": ("rms_norm", (x, torch.rand(16), 1e-5), lambda a: lz.rms_norm(*a)),
        "layer_norm": ("layer_norm", (x, torch.rand(16), None, 1e-5), lambda a: lz.layer_norm(*a)),
        "rope": ("rope", (torch.randn(1, 2, 5, 8), freqs.cos(), freqs.sin(), False), lambda a: lz.rope(*a)),
        "swiglu": ("swiglu", (x, torch.randn(3, 16)), lambda a: lz.swiglu(*a)),
        "geglu": ("geglu", (x, torch.randn(3, 16), "tanh"), lambda a: lz.geglu(*a)),
        "gelu": ("gelu", (x, "tanh"), lambda a: lz.gelu(*a)),
        "silu": ("silu", (x,), lambda a: lz.silu(*a)),
        "sample": ("sample.greedy", (torch.randn(2, 10), 0.0, None, None, None), lambda a: lz.sample(*a)),
        "cross_entropy": ("cross_entropy", (torch.randn(4, 10), torch.tensor([1, 2, -100, 3]), -100, 0.0, "mean"),
                          lambda a: lz.cross_entropy(a[0], a[1])),
        "linear_cross_entropy": ("linear_cross_entropy", (torch.randn(4, 16), torch.randn(10, 16),
                                                          torch.tensor([1, 2, -100, 3]), None, -100, 0.0, "mean", None),
                                 lambda a: lz.linear_cross_entropy(*a[:3])),
    }
    from layerzero.ops.attention_paged import page_table
    from layerzero.ops.attention_varlen import cu_seqlens

    cu, pages = cu_seqlens([3, 2]), torch.randn(6, 4, 2, 8)
    calls["attention_varlen"] = ("attention_varlen", (torch.randn(5, 4, 8), torch.randn(5, 2, 8),
                                                      torch.randn(5, 2, 8), cu, cu, 3, 3, True, None, None, None),
                                 lambda a: lz.attention_varlen(*a[:7], is_causal=True))
    calls["attention_paged"] = ("attention_paged", (torch.randn(2, 1, 4, 8), pages, pages.clone(),
                                                    page_table([5, 3], 4, 2, 6),
                                                    torch.tensor([5, 3], dtype=torch.int32), True, None, None, None),
                                lambda a: lz.attention_paged(*a[:5]))
    assert set(calls) == set(OPS)
    for family, (operation, args, call) in calls.items():
        if family == "attention":
            args = (*args, None, True, 0.0, None, None)
        call(args)
        assert cache_key(operation, args) in rt.plans.data, family
        fam = cache_keys(operation, args)[0]
        if family in ("rope", "swiglu", "geglu", "sample", "cross_entropy", "linear_cross_entropy", "attention_varlen",
                      "attention_paged"):  # hot paths keying shapes only
            assert fam is None
        else:  # torch kernels with shape-free plans on a CPU with no measurements
            assert rt.plans.data[fam].family == fam, family


def test_inspection_calls_name_a_wrong_argument_type() -> None:
    """Never a bare TypeError or AttributeError from inside: ``list_kernels(5)``, ``validate(kid, 5)``."""
    with pytest.raises(lz.InvalidInputError, match="pattern must be a glob string"):
        lz.list_kernels(5)  # type: ignore[arg-type]
    with pytest.raises(lz.InvalidInputError, match="context must be a SelectionContext, got int"):
        lz.validate("torch_sdpa", 5)  # type: ignore[arg-type]


def _packed() -> tuple[torch.Tensor, ...]:
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return torch.randn(8, 2, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16), cu, cu, 5, 5


def test_aliases_name_the_kernels_of_the_operation_they_stand_for() -> None:
    """``attention.varlen`` / ``attention.paged`` (documented aliases) reached selection unresolved and matched
    the dense attention kernels by prefix: which/explain_context/select/list_kernels named dense kernels."""
    args = _packed()
    assert lz.which("attention.varlen", *args, is_causal=True) == lz.which("attention_varlen", *args, is_causal=True)
    assert {s.operation for s in lz.list_kernels("attention.paged")} == {"attention_paged"}
    varlen = lz.explain(*args, operation="attention_varlen", is_causal=True).context
    assert lz.select("attention.varlen", varlen).selected.operation == "attention_varlen"
    assert lz.explain_context("attention.varlen", varlen).selected_kernel == \
        lz.explain_context("attention_varlen", varlen).selected_kernel


def test_explain_refuses_what_the_call_refuses_and_takes_what_it_takes(qkv: tuple[torch.Tensor, ...]) -> None:
    q, k, v = qkv
    for operation, said in (("attention.causl", "unknown operation 'attention.causl'"),
                            ("rms_norm.foo", "unknown operation 'rms_norm.foo'")):
        with pytest.raises(InvalidInputError, match=said):
            lz.which(operation, q, k, v)
    with pytest.raises(InvalidInputError, match="layout must be one of"):
        lz.which("attention.full", q, k, v, layout="bshd")
    with pytest.raises(InvalidInputError, match="positional inputs"):
        lz.which("silu", q, q)
    gqa_k = k[:, :2]
    assert lz.which("attention.full", q, gqa_k, gqa_k.clone(), enable_gqa=True) == "torch_sdpa_gqa"
    with pytest.raises(InvalidInputError, match="enable_gqa"):
        lz.which("attention.full", q, gqa_k, gqa_k.clone(), enable_gqa=False)
    with pytest.raises(InvalidInputError, match="enable_gqa"):
        lz.attention(q, gqa_k, gqa_k.clone(), enable_gqa=False)


def test_explain_reports_the_plan_a_call_will_run(runtime) -> None:
    """A plan cached under grad mode keeps serving no-grad calls (the key does not carry grad): explain named a
    fresh selection's kernel; it names the cached plan's, and says what selection would choose now. Inside a
    policy scope the scope's own plans count as cached."""
    def custom_silu(x):  # type: ignore[no-untyped-def]
        return x * torch.sigmoid(x)

    lz.register_kernel(lz.KernelSpec("custom_nograd_silu", "silu", "custom", custom_silu, priority=99,
                                     supports_autograd=False))
    try:
        x = torch.randn(4, 8, requires_grad=True)
        lz.silu(x)
        with torch.no_grad():
            exp = lz.explain(x, operation="silu")
            assert exp.cached and exp.selected_kernel == "torch_silu"
            assert any("selection now would choose custom_nograd_silu" in r for r in exp.rules_fired)
    finally:
        runtime.kernels.unregister("custom_nograd_silu")
    y, w = torch.randn(4, 8), torch.rand(8) + 0.5
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        lz.rms_norm(y, w)
        assert lz.explain(y, w, operation="rms_norm").cached


def test_explain_names_samplings_operation_from_its_options() -> None:
    logits = torch.randn(4, 50)
    assert lz.which("sample", logits, temperature=0.0) == "torch_sample_greedy"
    lz.sample(logits, temperature=0.0)
    assert lz.explain(logits, operation="sample", temperature=0.0).cached
