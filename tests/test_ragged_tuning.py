"""Tuning buckets, grids, measured selection and policies for lz.attention_varlen and lz.attention_paged."""

from __future__ import annotations


import pytest
import torch

import layerzero as lz
from layerzero.ops import op_for
from layerzero.tuning import grids
from layerzero.tuning.buckets import bucket_of
from layerzero.tuning.tuner import Tuner

RAGGED = ("attention_varlen", "attention_paged")



def _ctx(operation: str, **kw: object) -> lz.SelectionContext:
    base = dict(device="cpu", dtype="float32", batch_size=3, seq_len_q=100, seq_len_k=100, num_heads=8,
                num_kv_heads=2, head_dim=64, is_causal=True, num_tokens=240)
    if operation == "attention_paged":
        base.update(seq_len_q=1, seq_len_k=512, hidden_size=16, num_tokens=3)
    return lz.SelectionContext(**{**base, **kw})


@pytest.mark.parametrize("operation", RAGGED)
def test_buckets_keep_what_changes_the_kernel_apart(operation: str) -> None:
    ctx = _ctx(operation)
    bucket = bucket_of(operation, ctx)
    assert bucket_of(operation.replace("_", "."), ctx) == bucket  # the dotted alias is the same operation
    assert "h=8;hkv=2;d=64" in bucket and "causal=1" in bucket and "softcap=0" in bucket
    for change in ({"head_dim": 128}, {"num_kv_heads": 8}, {"is_causal": False}, {"window": 64},
                   {"softcap": True}, {"batch_size": 9}, {"seq_len_k": 4096}):
        assert bucket_of(operation, ctx.replace(**change)) != bucket, change
    # What varies call to call within one bucket: the packed token count, the length within a power of two.
    assert bucket_of(operation, ctx.replace(num_tokens=ctx.num_tokens + 7, batch_size=4)) == bucket
    if operation == "attention_paged":
        assert "page=16" in bucket and bucket_of(operation, ctx.replace(hidden_size=256)) != bucket


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("operation", ["attention_varlen", "attention.paged"])
def test_grid_contexts_are_the_buckets_their_calls_land_in(operation: str, device: str) -> None:
    """Each grid context's bucket is the bucket of the call made from it: measurements reach real calls."""
    contexts = grids.grid(operation, "default", device=device)
    assert contexts and all(c.is_causal for c in contexts)
    op = op_for(operation)
    for ctx in contexts:
        small = ctx.replace(device="meta")  # build the call without allocating it
        args = op.make_inputs(operation, small)
        called = op.context(operation, args)
        assert bucket_of(operation, called) == bucket_of(operation, ctx), ctx
    if device == "cpu":
        assert grids.contexts_for_shapes(operation, ["b=2,s=64,h=4,kv=2,d=32"], device="cpu",
                                         dtypes=(torch.float32,))[0].is_causal


def test_tuned_measurements_drive_the_calls_selection(attached) -> None:
    plan = {o: grids.grid(o, "quick", device="cpu") for o in ("attention.varlen", "attention.paged")}
    report = Tuner(attached).tune(plan)
    assert {b.operation for b in report.buckets} == set(RAGGED)  # stored under the names calls look up
    assert {r["operation"] for r in attached.rows()} == set(RAGGED)
    for b in report.buckets:
        args = op_for(b.operation).make_inputs(b.operation, b.context)
        exp = lz.explain(*args, operation=b.operation)
        assert exp.selected_kernel == b.selected
        assert exp.trace[0].measured_source.startswith("perf-db"), exp.trace[0]


@pytest.mark.parametrize("operation", RAGGED)
def test_locks_and_denies_reach_both_ops(operation: str) -> None:
    op = op_for(operation)
    args = op.make_inputs(operation, _ctx(operation, seq_len_q=16 if operation == "attention_varlen" else 1,
                                          seq_len_k=16 if operation == "attention_varlen" else 64))
    call = getattr(lz, operation)
    want = op.reference(operation, args)
    other = "torch_varlen_sdpa" if operation == "attention_varlen" else "torch_paged_sdpa"
    n = 7 if operation == "attention_varlen" else 5  # the positional arguments, before is_causal
    with lz.lock(operation, other):
        assert lz.which(operation, *args[:n]) == other
        torch.testing.assert_close(call(*args[:n], is_causal=True).double(), want, atol=1e-5, rtol=1e-5)
    with lz.disabled("torch", operation=operation), pytest.raises(lz.NoKernelError):
        call(*args[:n], is_causal=True)
    default = lz.which(operation, *args[:n])
    if operation == "attention_paged":  # conditions see the decode's fields (the page size is hidden_size)
        with lz.lock(operation, "torch_paged_sdpa", condition="seq_len_q == 1 and hidden_size == 16"):
            assert lz.which(operation, *args[:n]) == "torch_paged_sdpa" != default
        with lz.lock(operation, "torch_paged_sdpa", condition="hidden_size == 256"):
            assert lz.which(operation, *args[:n]) == default
