"""Names a ``dispatch()`` call gives: the operation, its inputs and its keyword options.

The family's kernels serve any ``family.*`` operation by prefix and each op reads its inputs by name, so a
misspelled name used to run something else without a word: ``dispatch("attention.causl", ...)`` and
``is_casual=True`` ran full (non-causal) attention, ``epsilon=0.5`` ran with the default eps, ``atn_mask=``
ran unmasked. Each is refused now, on the first call and on every cached one, naming the closest right name.
One inputs dict may still carry the inputs of several operations (the seed guide's warm-up dispatches one dict
to attention and to rms_norm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.dispatch import (
    DispatchConfig,
    DispatchMode,
    StaticDispatcherBuilder,
    create_dynamic_dispatcher,
    dispatch,
    get_global_dispatcher,
)
from layerzero.dispatch.static import create_static_dispatcher
from layerzero.errors import ConfigError, InvalidInputError, PolicyError
from layerzero.ops import OPERATIONS, OPS
from layerzero.registry import get_global_kernel_registry
from layerzero.spec import KernelSpec


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) + 0.5


def dispatchers() -> list[tuple[str, Callable[..., Any]]]:
    mvcc = create_dynamic_dispatcher(use_mvcc_cache=True)
    lru = create_dynamic_dispatcher()
    g = get_global_dispatcher()
    return [("global", g.dispatch), ("global, Python method", lambda *a, **k: type(g).dispatch(g, *a, **k)),
            ("mvcc", mvcc.dispatch), ("lru", lru.dispatch)]


QKV = {"q": rnd(1, 2, 5, 8), "k": rnd(1, 2, 5, 8), "v": rnd(1, 2, 5, 8)}


@pytest.mark.parametrize("name, dispatch", dispatchers(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_misspelled_operation_is_refused_naming_the_right_one(name: str, dispatch: Callable[..., Any]) -> None:
    dispatch("attention.causal", QKV)  # a warm dispatcher: its entries exist
    for wrong, right in (("attention.causl", "attention.causal"), ("attention.ful", "attention.full"),
                         ("rms_norm.fast", "rms_norm"), ("attention.causal.x", "attention.causal")):
        for _ in range(2):
            with pytest.raises(InvalidInputError, match=f"unknown operation '{wrong}'.*{right}"):
                dispatch(wrong, QKV if wrong.startswith("attention") else {"x": rnd(2, 8), "weight": rnd(8)})
    with pytest.raises(InvalidInputError, match="dispatch it as 'attention_paged'"):
        dispatch("attention.paged", QKV)
    for operation in ("attention", "attention.causal", "attention.full", "attention.decode", "attention.cross"):
        assert operation == "attention" or operation in OPERATIONS
        causal = operation == "attention.causal"
        torch.testing.assert_close(dispatch(operation, QKV).output,
                                   F.scaled_dot_product_attention(*QKV.values(), is_causal=causal))


def test_an_operation_a_registered_kernel_declares_is_known() -> None:
    """A kernel may declare its own operation in a known family (and operations below it)."""
    reg = get_global_kernel_registry()

    def mine(q, k, v, mask, is_causal, dropout_p, scale, window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    reg.register(KernelSpec("mine_attention", "attention.mine", "torch", mine, priority=90), replace=True)
    try:
        for operation in ("attention.mine", "attention.mine.decode"):
            r = dispatch(operation, QKV)
            assert r.kernel_id == "mine_attention"
            torch.testing.assert_close(r.output, 2 * F.scaled_dot_product_attention(*QKV.values(), is_causal=True))
        with pytest.raises(InvalidInputError, match="unknown operation 'attention.mne'.*'attention.mine'"):
            dispatch("attention.mne", QKV)
        q, k, v = QKV.values()
        torch.testing.assert_close(lz.attention(q, k, v, operation="attention.mine.decode"),
                                   2 * F.scaled_dot_product_attention(q, k, v, is_causal=True))
        with pytest.raises(InvalidInputError, match="unknown operation 'attention.mne'.*'attention.mine'"):
            lz.attention(q, k, v, operation="attention.mne")
    finally:
        reg.unregister("mine_attention")
    # a family layerzero does not know is the caller's own: its kernels decide
    with pytest.raises(lz.NoKernelError):
        dispatch("my_family.op", QKV)


def one_call(family: str) -> tuple[str, dict[str, Any]]:
    """A valid call of each family's operation, its inputs by their first names."""
    op = OPS[family]
    ctx = op.sample_contexts(family if family != "attention" else "attention.full")[0]
    args = op.make_inputs(family if family != "attention" else "attention.full", ctx,
                          torch.Generator().manual_seed(0))
    inputs = {n: a for n, a in zip(op.arg_names, args, strict=False) if isinstance(a, torch.Tensor)}
    return ("attention.full" if family == "attention" else "sample.top_k" if family == "sample" else family), inputs


@pytest.mark.parametrize("family", sorted(OPS))
@pytest.mark.parametrize("name, dispatch", dispatchers()[::2], ids=lambda x: x if isinstance(x, str) else "")
def test_a_keyword_the_operation_does_not_read_is_refused(family: str, name: str,
                                                          dispatch: Callable[..., Any]) -> None:
    """Every family: a keyword option it does not read, even another op's, is refused cold and warm, with the
    closest name it takes; an input no op reads is refused; an input another op reads rides along."""
    operation, inputs = one_call(family)
    opts = {"top_k": 3} if family == "sample" else {}
    first = dispatch(operation, inputs, **opts)
    op = OPS[family]
    last = op.arg_names[-1]
    for _ in range(2):
        with pytest.raises(InvalidInputError, match=f"unknown input or option '{last}x' \\(did you mean '{last}'"):
            dispatch(operation, inputs, **opts, **{last + "x": 1})
        with pytest.raises(InvalidInputError, match="unknown input or option 'no_such_input'"):
            dispatch(operation, {**inputs, "no_such_input": rnd(2)}, **opts)
        other = "cu_seqlens_q" if family != "attention_varlen" else "eps"
        if other not in op.arg_names:
            with pytest.raises(InvalidInputError, match=f"unknown input or option '{other}'"):
                dispatch(operation, inputs, **opts, **{other: 1})
    if family != "sample":  # sampling draws: the same answer only with the same generator state
        extra = {"cos": rnd(3)} if family != "rope" else {"eps": 1e-6}  # another op's input rides along
        torch.testing.assert_close(dispatch(operation, {**inputs, **extra}, **opts).output, first.output)


@pytest.mark.parametrize("name, dispatch", dispatchers(), ids=lambda x: x if isinstance(x, str) else "")
def test_the_misspellings_that_changed_answers(name: str, dispatch: Callable[..., Any]) -> None:
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    x, w = rnd(4, 16), rnd(16)
    for _ in range(3):  # cold, then warm: the hot path never serves a name the full path refuses
        torch.testing.assert_close(dispatch("attention.full", QKV, is_causal=True).output,
                                   F.scaled_dot_product_attention(*QKV.values(), is_causal=True))
        with pytest.raises(InvalidInputError, match="'is_casual' \\(did you mean 'is_causal'"):
            dispatch("attention.full", QKV, is_casual=True)
        with pytest.raises(InvalidInputError, match="'atn_mask' \\(did you mean 'attn_mask'"):
            dispatch("attention.full", {**QKV, "atn_mask": mask})
        torch.testing.assert_close(dispatch("rms_norm", {"x": x, "weight": w}, eps=0.5).output,
                                   F.rms_norm(x, (16,), w, 0.5))
        with pytest.raises(InvalidInputError, match="'epsilon' \\(did you mean 'eps'"):
            dispatch("rms_norm", {"x": x, "weight": w}, epsilon=0.5)
        with pytest.raises(InvalidInputError, match="is_causal=False contradicts the operation"):
            dispatch("attention.causal", QKV, is_causal=False)
        torch.testing.assert_close(dispatch("attention.causal", QKV, is_causal=True).output,
                                   F.scaled_dot_product_attention(*QKV.values(), is_causal=True))


def test_one_dict_with_the_inputs_of_several_operations() -> None:
    """The seed guide's warm-up: each operation takes its own inputs from the shared dict."""
    x, w = rnd(1, 5, 8), rnd(8)
    both = {"query": QKV["q"], "key": QKV["k"], "value": QKV["v"], "x": x, "weight": w}
    d = get_global_dispatcher()
    for _ in range(2):
        torch.testing.assert_close(d.dispatch("attention.causal", both).output,
                                   F.scaled_dot_product_attention(*QKV.values(), is_causal=True))
        torch.testing.assert_close(d.dispatch("rms_norm", both).output, F.rms_norm(x, (8,), w, 1e-6))


def test_a_static_table_naming_an_unknown_operation_fails_at_build() -> None:
    cfg = DispatchConfig(mode=DispatchMode.STATIC, static_kernel_map={"attention.causl": "torch_sdpa",
                                                                      "rms_norm": "torch_rms_norm"})
    with pytest.raises(ConfigError, match="unknown operation 'attention.causl'; did you mean 'attention.causal'"):
        create_static_dispatcher(config=cfg)

    def kernel(x, weight, eps):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    d = StaticDispatcherBuilder().with_kernel(kernel, operation="rms_norm", default=True).build()
    x, w = rnd(2, 8), rnd(8)
    torch.testing.assert_close(d.dispatch("rms_norm", {"x": x, "weight": w}).output, F.rms_norm(x, (8,), w, 1e-6))
    with pytest.raises(InvalidInputError, match="'epsilon'"):
        d.dispatch("rms_norm", {"x": x, "weight": w}, epsilon=0.5)


def test_lz_lock_refuses_a_kernel_of_another_operation() -> None:
    with pytest.raises(PolicyError, match="kernel 'torch_sdpa' implements 'attention', not 'rms_norm'"):
        lz.lock("rms_norm", "torch_sdpa")
    x, w = rnd(2, 8), rnd(8)
    torch.testing.assert_close(lz.rms_norm(x, w), F.rms_norm(x, (8,), w, 1e-6))  # nothing was stored
    with lz.lock("attention.*", "torch_sdpa"):  # a glob the kernel can serve
        assert lz.which("attention.causal", *QKV.values()) == "torch_sdpa"


@pytest.mark.parametrize("operation", ["attention.causl", "attention.bogus", "attention.ful", "attention.paged"])
def test_lz_attention_refuses_an_operation_name_it_does_not_know(operation: str) -> None:
    """``lz.attention(operation=...)`` checks the name as dispatch() does: before a valid call and after it."""
    q, k, v = QKV.values()
    for _ in range(2):
        with pytest.raises(InvalidInputError, match=f"unknown operation '{operation}'|explain's spelling"):
            lz.attention(q, k, v, operation=operation)
        lz.attention(q, k, v, operation="attention.decode")  # a built-in name runs (and is cached)
    torch.testing.assert_close(lz.attention(q, k, v, operation="attention.causal"),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_the_names_module_lists_every_family() -> None:
    from layerzero.ops.names import FAMILIES

    assert FAMILIES == tuple(OPS)


def test_dispatch_takes_sdpas_enable_gqa_as_lz_attention_does() -> None:
    import pytest as _pytest

    import layerzero as lz
    from layerzero.dispatch import dispatch
    from layerzero.errors import InvalidInputError

    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    want = lz.attention(q, k, k.clone(), enable_gqa=True)
    got = dispatch("attention.full", {"q": q, "k": k, "v": k.clone()}, enable_gqa=True).output
    torch.testing.assert_close(got, want)
    with _pytest.raises(InvalidInputError, match="enable_gqa=False"):
        dispatch("attention.full", {"q": q, "k": k, "v": k.clone(), "enable_gqa": False})
