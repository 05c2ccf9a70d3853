"""FlexAttention's compiled families on the CPU: many shapes and mask kinds stay within Dynamo's recompile
limit, and a family that cannot compile is rejected with a reason instead of running unfused.

The families compile with ``aot_eager`` here (Dynamo's guards and recompiles are the same as with
Inductor, which takes tens of seconds per graph on a small CPU); ``tests/test_backends_flex.py`` runs
the Inductor kernels on CUDA."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo

from layerzero.backends import flex
from layerzero.context import SelectionContext
from layerzero.ops.attention import attention_reference
from layerzero.spec import ReasonCode


@pytest.fixture(autouse=True)
def _aot_eager_families() -> Iterator[None]:
    saved = flex.COMPILE_BACKEND[0]
    flex.COMPILE_BACKEND[0] = "aot_eager"
    flex._compiled.clear(), flex._seen.clear(), flex._failed.clear()
    torch._dynamo.reset()
    yield
    flex.COMPILE_BACKEND[0] = saved
    flex._compiled.clear(), flex._seen.clear(), flex._failed.clear()
    torch._dynamo.reset()


def _run(b: int, h: int, sq: int, sk: int, causal: bool, window: int | None, bshd: bool = False) -> None:
    g = torch.Generator().manual_seed(sq * 7 + sk)
    q = torch.randn(b, sq, h, 16, generator=g).transpose(1, 2) if bshd else torch.randn(b, h, sq, 16, generator=g)
    k, v = torch.randn(b, h // 2, sk, 16, generator=g), torch.randn(b, h // 2, sk, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention_kernel(q, k, v, None, causal, 0.0, None, window)
    ref = attention_reference(q, k, v, None, causal, 0.0, None, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_many_shapes_and_mask_kinds_stay_compiled_within_the_recompile_limit() -> None:
    shapes = [(1, 2, 16, 16), (2, 4, 40, 40), (3, 4, 100, 100), (2, 2, 129, 129), (1, 4, 200, 200),
              (2, 4, 256, 256), (4, 2, 300, 300), (1, 2, 1, 77), (2, 2, 1, 500), (2, 4, 64, 333)]
    for causal, window in ((True, None), (False, None), (True, 24)):
        for b, h, sq, sk in shapes:
            if causal and sq != sk:
                continue
            _run(b, h, sq, sk, causal, window)
    assert not flex._failed
    assert {key[5] for key in flex._compiled} == {"causal", "full", "window"}
    for fn in flex._compiled.values():  # per (family, size class): far from the recompile limit (8)
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__)
        assert len(entries) == 1, len(entries)  # compiled with dynamic sizes from the first call


def test_a_family_at_its_recompile_limit_is_rejected_not_run_unfused() -> None:
    with torch._dynamo.config.patch(recompile_limit=1):
        _run(2, 4, 16, 16, True, None)
        with pytest.raises(Exception, match="Hard failure"):
            _run(3, 4, 40, 40, True, None, bshd=True)  # the same size class, other strides: a second graph
    ctx = SelectionContext(device="cpu", dtype=torch.float32, batch_size=2, seq_len=40, num_heads=4,
                           num_kv_heads=2, head_dim=16, is_causal=True)
    reasons = [r for r in flex._check(ctx) if r.code == ReasonCode.COMPILE_UNSAFE]
    assert reasons and "recompile limit" in reasons[0].message and "rather than run unfused" in reasons[0].message
    with pytest.raises(RuntimeError, match="recompile limit"):
        _run(2, 4, 16, 16, True, None)  # the family stays rejected, even for a shape it compiled
