"""FlexAttention: registration, constraints, block masks, and the adapter against the reference.

FlexAttention ships with PyTorch, so the adapter runs for real here, eagerly
on the CPU (``compiled=False``); the compiled CUDA path runs in the ``gpu`` tests.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import layerzero as lz
from layerzero.backends import flex
from layerzero.ops.attention import attention_reference
from layerzero.runtime import get_runtime
from layerzero.spec import ReasonCode

SM90 = dict(device="cuda", compute_capability=(9, 0))


def _reasons(**kw: object) -> set[str]:
    base = dict(dtype="bfloat16", batch_size=1, seq_len=256, num_heads=8, head_dim=64, **SM90)
    base.update(kw)
    spec = get_runtime().kernels.get("flex_attention")
    return {r.code for r in spec.check(lz.SelectionContext(**base))}


def test_registered_and_availability_follows_triton() -> None:
    info = get_runtime().backends.info("flex")
    assert info.version == torch.__version__.split("+")[0] or info.version == torch.__version__
    if importlib.util.find_spec("triton") is None:
        assert not info.available and "triton is not installed" in info.reason
    else:
        assert info.available


def test_constraints() -> None:
    assert _reasons() == set()
    assert ReasonCode.HEAD_DIM_TOO_SMALL in _reasons(head_dim=8)
    assert ReasonCode.GQA_UNSUPPORTED in _reasons(num_heads=12, num_kv_heads=4)  # 3 per KV head
    assert _reasons(num_heads=32, num_kv_heads=8, window=128, is_causal=True) == set()
    assert ReasonCode.MASK_UNSUPPORTED in _reasons(mask_kind="additive")
    assert ReasonCode.DROPOUT_UNSUPPORTED in _reasons(dropout_p=0.1)
    assert ReasonCode.PLATFORM_MISMATCH in _reasons(device="cpu", compute_capability=None)
    assert ReasonCode.CUDA_GRAPH_UNSAFE in _reasons(cuda_graph_capturing=True)


@pytest.mark.parametrize(("hq", "hkv", "sq", "runs"), [
    (8, 1, 32, False), (8, 1, 127, False), (2, 1, 100, False), (16, 2, 32, False), (4, 1, 64, False),
    (8, 1, 16, True), (4, 1, 32, True), (16, 1, 8, True), (8, 1, 128, True), (8, 8, 100, True), (8, 1, 1, True),
])
def test_the_decoding_kernels_block_limit(hq: int, hkv: int, sq: int, runs: bool) -> None:
    """A query under 128 tokens runs FlexAttention's decoding kernel, whose block holds every query row of a KV
    head's group: more than 128 and Inductor has no kernel (the H100 cases of scripts/gpu_flex_probe.py)."""
    reasons = _reasons(num_heads=hq, num_kv_heads=hkv, seq_len_q=sq, seq_len_k=256)
    assert (ReasonCode.GQA_UNSUPPORTED not in reasons) is runs, reasons


def test_a_size_class_inductor_has_no_kernel_for_is_declined_once_and_remembered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NoValidChoicesError is a limit of Inductor's for these sizes: the call is declined (the next kernel serves
    it, nothing counted) and later calls of that size class are declined without compiling again."""
    from layerzero.errors import KernelDeclinedError

    compiles: list[int] = []

    def no_choices(*args: object) -> None:
        compiles.append(1)
        raise RuntimeError("LoweringException: NoValidChoicesError: No choices to select.")

    monkeypatch.setattr(flex, "_family_fn", lambda *a, **k: no_choices)
    monkeypatch.setattr(flex, "_declined", {})
    q, k = torch.randn(1, 8, 32, 64), torch.randn(1, 1, 32, 64)
    key = flex.family_key(q.device, q.dtype, 64, 64, False, None, 0.125)
    for _ in range(3):
        with pytest.raises(KernelDeclinedError, match="NoValidChoicesError"):
            flex.compiled_call(key, q, k, k, None, 0.125)
    assert len(compiles) == 1
    other = torch.randn(1, 8, 300, 64)  # another size class compiles on its own
    with pytest.raises(KernelDeclinedError):
        flex.compiled_call(key, other, other[:, :1], other[:, :1], None, 0.125)
    assert len(compiles) == 2


@pytest.mark.parametrize(("hq", "hkv", "sq", "sk", "causal", "window", "scale"), [
    pytest.param(4, 4, 40, 40, False, None, None, id="full"),
    pytest.param(4, 4, 40, 40, True, None, None, id="causal"),
    pytest.param(8, 2, 40, 40, True, None, 0.25, id="gqa-causal-scale"),
    pytest.param(8, 2, 40, 40, True, 9, None, id="gqa-window"),
    pytest.param(4, 4, 12, 40, True, None, None, id="causal-upper-left-cross"),
    pytest.param(8, 1, 1, 64, False, None, None, id="mqa-decode"),
])
def test_eager_adapter_matches_the_reference(hq: int, hkv: int, sq: int, sk: int, causal: bool, window: int | None,
                                             scale: float | None) -> None:
    g = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(2, hq, sq, 16, generator=g)
    k = torch.randn(2, hkv, sk, 16, generator=g)
    v = torch.randn(2, hkv, sk, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out = flex.flex_attention_kernel(q, k, v, None, causal, 0.0, scale, window, compiled=False)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, None, causal, 0.0, scale, window),
                               atol=2e-5, rtol=2e-5)


def test_block_masks_are_built_once_per_pattern() -> None:
    a = flex.block_mask_for(64, 64, True, None, torch.device("cpu"))
    assert flex.block_mask_for(64, 64, True, None, torch.device("cpu")) is a
    assert flex.block_mask_for(64, 64, True, 8, torch.device("cpu")) is not a
    full = flex.block_mask_for(64, 64, False, None, torch.device("cpu"))
    assert full is not a and full.shape[-2:] == (64, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_flex_on_cuda(dtype: torch.dtype) -> None:
    if not get_runtime().backends.is_available("flex"):
        pytest.skip(get_runtime().backends.info("flex").reason)
    for hq, hkv, sq, sk, causal, window in ((8, 2, 256, 256, True, None), (8, 8, 1, 512, False, None),
                                            (8, 2, 300, 300, True, 64), (8, 2, 512, 512, True, None)):
        q = torch.randn(2, hq, sq, 64, device="cuda", dtype=dtype)
        k = torch.randn(2, hkv, sk, 64, device="cuda", dtype=dtype)
        v = torch.randn(2, hkv, sk, 64, device="cuda", dtype=dtype)
        out = flex.flex_attention_kernel(q, k, v, None, causal, 0.0, None, window)
        ref = attention_reference(q, k, v, None, causal, 0.0, None, window)
        tol = 2.5e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(out.double(), ref, atol=4 * tol, rtol=4 * tol)
    # one family per mask kind (causal, full, window 64) for d=64 in this dtype (key[8]: variant families)
    assert len([key for key in flex._compiled if key[2] == dtype and not key[8]]) == 3
