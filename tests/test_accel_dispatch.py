"""The dispatchers' compiled hot path (``layerzero._accel.Method``, the compiled form of ``Dispatcher.dispatch`` and
``StaticDispatcher.dispatch`` bound to each dispatcher that can use it) against the Python methods it stands in
front of.

* Differential: for a grid of dispatchers (the global orchestrator, dynamic ones timed, untimed and with an MVCC
  cache, static ones timed and untimed) and calls (input names, ranks, GQA, dtypes, BSHD, options in every order,
  unhashable and odd-typed options, wrong names, non-tensors, subclasses, invalid shapes), the compiled method
  answers exactly as the Python one: the same output, kernel, flags and timing kind, or the same error, and the
  same call counts.
* It serves the plain cached call (the Python method is not entered), takes no reference it does not give back,
  hands a kernel's exception to the dispatcher's detour (the failure contract), leaves a blocked gate, a runtime
  change and a policy scope to Python, is bound only where it can serve (not over a subclass's own ``dispatch``),
  carries the Python method's name, signature and docstring, and leaves torch.compile the Python method to trace.
"""

from __future__ import annotations

import copy
import gc
import inspect
import itertools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero import accel
from layerzero.dispatch import (
    Dispatcher,
    StaticDispatcher,
    StaticDispatcherBuilder,
    create_config_dispatcher,
    create_dynamic_dispatcher,
    create_hot_reload_dispatcher,
    get_global_dispatcher,
)
from layerzero.dispatch.result import NOT_TIMED, DispatchResult
from layerzero.errors import LayerZeroError
from layerzero.ops.attention import ATTENTION
from layerzero.runtime import get_runtime

COMPILED = "dispatch" in vars(create_dynamic_dispatcher())  # the compiled form, bound per dispatcher
needs_compiled = pytest.mark.skipif(not COMPILED, reason=f"compiled hot path not in use: {accel.status()}")


def _kernel(q: Any, k: Any, v: Any, attn_mask: Any = None, is_causal: bool = False, dropout_p: float = 0.0,
            scale: Any = None, window: Any = None) -> Any:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def _static(timed: bool) -> StaticDispatcher:
    return (StaticDispatcherBuilder().with_kernel(_kernel, operation="attention.full", default=True)
            .with_kernel(_kernel, operation="attention.causal")
            .with_config(enable_telemetry=True, record_timing=timed).build())


def _dispatchers() -> list[tuple[str, Callable[[], Dispatcher]]]:
    config = get_runtime().config
    return [("global", get_global_dispatcher),
            ("dynamic", lambda: create_dynamic_dispatcher()),
            ("dynamic-untimed", lambda: create_dynamic_dispatcher(config=config.replace(record_timing=False))),
            ("dynamic-mvcc", lambda: create_dynamic_dispatcher(use_mvcc_cache=True)),
            ("config", lambda: create_config_dispatcher(config_path={"version": "1.0"})),
            ("config-mvcc", lambda: create_config_dispatcher(config_path={"version": "1.0"}, use_mvcc_cache=True)),
            ("static", lambda: _static(True)),
            ("static-untimed", lambda: _static(False))]


_SELECTING = [d for d in _dispatchers() if not d[0].startswith("static")]


class Sub(torch.Tensor):
    """A tensor subclass: left to Python."""


def _inputs() -> Iterator[tuple[str, dict[str, Any], str]]:
    """(label, inputs, layout the tensors are in)."""
    g = torch.Generator().manual_seed(5)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = r(1, 4, 3, 8), r(1, 4, 5, 8), r(1, 4, 5, 8)
    yield "bhsd", {"q": q, "k": k, "v": v}, "BHSD"
    yield "long names", {"query": q, "key": k, "value": v}, "BHSD"
    yield "gqa", {"q": r(2, 8, 4, 16), "k": r(2, 2, 6, 16), "v": r(2, 2, 6, 16)}, "BHSD"
    yield "bf16", {"q": r(1, 2, 3, 8, dtype=torch.bfloat16), "k": r(1, 2, 3, 8, dtype=torch.bfloat16),
                   "v": r(1, 2, 3, 8, dtype=torch.bfloat16)}, "BHSD"
    yield "bshd", {"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2)}, "BSHD"
    yield "other shape", {"q": r(1, 4, 7, 8), "k": r(1, 4, 9, 8), "v": r(1, 4, 9, 8)}, "BHSD"
    yield "v apart", {"q": q, "k": k, "v": r(1, 4, 6, 8)}, "BHSD"
    yield "head dims apart", {"q": q, "k": r(1, 4, 5, 4), "v": r(1, 4, 5, 4)}, "BHSD"
    yield "3-d", {"q": q[0], "k": k[0], "v": v[0]}, "BHSD"
    yield "zero query", {"q": r(1, 4, 0, 8), "k": k, "v": v}, "BHSD"
    yield "subclass", {"q": q.as_subclass(Sub), "k": k, "v": v}, "BHSD"
    yield "not a tensor", {"q": q, "k": k, "v": [1.0]}, "BHSD"
    yield "other names", {"x": q, "k": k, "v": v}, "BHSD"
    yield "four inputs", {"q": q, "k": k, "v": v, "attn_mask": None}, "BHSD"
    yield "param", {"q": torch.nn.Parameter(q), "k": k, "v": v}, "BHSD"


def _options(layout: str) -> list[dict[str, Any]]:
    base: list[dict[str, Any]] = [{}, {"is_causal": True}, {"is_causal": False}, {"is_causal": 1}, {"scale": 0.5},
                                  {"scale": 1}, {"dropout_p": 0.0}, {"is_causal": True, "scale": 0.25},
                                  {"scale": 0.25, "is_causal": True}, {"scale": [1]}, {"window": 2}]
    if layout == "BSHD":
        return [{"layout": "BSHD", **o} for o in base] + [{**o, "layout": "BSHD"} for o in base[1:3]]
    return base + [{"layout": "BHSD"}]


def _answer(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        r = fn(*args, **kwargs)
    except (LayerZeroError, TypeError, RuntimeError, ValueError, KeyError) as exc:
        return ("raised", type(exc).__name__, str(exc))
    assert type(r) is DispatchResult
    timed = r.stamps is not NOT_TIMED
    if timed:
        assert len(r.stamps) == 6 and 0 < r.stamps[0] <= r.stamps[1] <= r.stamps[3] <= r.stamps[4] <= r.stamps[5]
    return ("ok", r.output, r.kernel_id, r.operation, r.fallback_used, r.attempts, r.cached, r.mode, timed)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0] or a[2:] != b[2:]:
        return False
    x, y = a[1], b[1]
    return a[0] == "raised" or (type(x) is type(y) and x.shape == y.shape and x.stride() == y.stride()
                                and torch.equal(x, y))


def _calls(d: Dispatcher) -> int:
    return sum(s.calls for s in list(d.runtime.telemetry.kernels.values()))


def _python(d: Dispatcher) -> Callable[..., Any]:
    """d's Python dispatch method (what the compiled one stands in front of), bound."""
    return type(d).dispatch.__get__(d)  # type: ignore[attr-defined, no-any-return]


@needs_compiled
@pytest.mark.parametrize("name,factory", _dispatchers(), ids=[n for n, _ in _dispatchers()])
def test_compiled_and_python_dispatch_answer_alike(name: str, factory: Callable[[], Dispatcher]) -> None:
    """Every call of the grid through both methods, after the Python one made it once: the same answers, counts."""
    d = factory()
    py = _python(d)
    for (label, inputs, layout), operation in itertools.product(_inputs(), ["attention.full", "attention.causal"]):
        for options in _options(layout):
            _answer(py, operation, inputs, **options)
            for _ in range(2):
                before = _calls(d)
                expected = _answer(py, operation, inputs, **options)
                counted_py, before = _calls(d) - before, _calls(d)
                got = _answer(d.dispatch, operation, inputs, **options)
                counted_c = _calls(d) - before
                where = (name, label, operation, options)
                assert _same(got, expected), (where, got[:1] + got[2:], expected[:1] + expected[2:])
                assert counted_c == counted_py, (where, counted_c, counted_py)



def _op_calls() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(label, operation, inputs) of the operations with call contracts besides attention, good and bad."""
    g = torch.Generator().manual_seed(9)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    x, w, b = r(3, 16), r(16), r(16)
    yield "rms", "rms_norm", {"x": x, "weight": w}
    yield "rms names", "rms_norm", {"input": x, "w": w}
    yield "rms no weight", "rms_norm", {"x": x}
    yield "rms weight None", "rms_norm", {"x": x, "weight": None}
    yield "rms eps input", "rms_norm", {"x": x, "weight": w, "eps": 1e-5}
    yield "rms 3-d", "rms_norm", {"x": r(2, 3, 16), "weight": w}
    yield "rms bf16", "rms_norm", {"x": x.bfloat16(), "weight": w.bfloat16()}
    yield "rms param", "rms_norm", {"x": x, "weight": torch.nn.Parameter(w)}
    yield "rms x param", "rms_norm", {"x": torch.nn.Parameter(x), "weight": w}
    yield "rms subclass", "rms_norm", {"x": x.as_subclass(Sub), "weight": w}
    yield "rms wrong width", "rms_norm", {"x": x, "weight": r(8)}
    yield "rms not a tensor", "rms_norm", {"x": [1.0, 2.0], "weight": w}
    yield "rms extra", "rms_norm", {"x": x, "weight": w, "bias": b}
    yield "layer norm", "layer_norm", {"x": x, "weight": w, "bias": b}
    yield "layer norm no bias", "layer_norm", {"x": x, "weight": w}
    yield "silu", "silu", {"x": x}
    yield "gelu", "gelu", {"x": x}
    yield "swiglu", "swiglu", {"gate": x, "up": r(3, 16)}
    yield "swiglu apart", "swiglu", {"gate": x, "up": r(3, 8)}
    yield "rope", "rope", {"x": r(1, 2, 4, 8), "cos": r(4, 8), "sin": r(4, 8)}
    yield "cross entropy", "cross_entropy", {"logits": r(4, 10), "target": torch.tensor([1, 2, 3, 4])}


@needs_compiled
@pytest.mark.parametrize("name,factory", _SELECTING, ids=[n for n, _ in _SELECTING])
def test_compiled_and_python_dispatch_answer_alike_for_contract_ops(name: str, factory: Callable[[], Dispatcher]
                                                                    ) -> None:
    """The operations with call contracts (OpInputs entries: the norms through their compiled lookup, the rest
    through the contract's Python lookup), good and bad calls, each name set in turn: the same answers, counts."""
    d = factory()
    py = _python(d)
    calls = list(_op_calls())
    for label, operation, inputs in calls + calls:  # twice: each entry met again after other name sets
        _answer(py, operation, inputs)
        for _ in range(2):
            before = _calls(d)
            expected = _answer(py, operation, inputs)
            counted_py, before = _calls(d) - before, _calls(d)
            got = _answer(d.dispatch, operation, inputs)
            counted_c = _calls(d) - before
            assert _same(got, expected), ((name, label), got[:1] + got[2:], expected[:1] + expected[2:])
            assert counted_c == counted_py, ((name, label), counted_c, counted_py)


@needs_compiled
@pytest.mark.parametrize("name,factory", _SELECTING, ids=[n for n, _ in _SELECTING])
def test_the_compiled_method_serves_cached_contract_op_calls(name: str, factory: Callable[[], Dispatcher]) -> None:
    """``dispatch("rms_norm", {"x": x, "weight": w})`` (the seed's warm-up example) and the other contract ops are
    answered without entering the Python method once their names are known, with PyTorch's output."""
    d = factory()
    x, w, b = torch.randn(4, 32), torch.rand(32) + 0.5, torch.randn(32)
    cases = [("rms_norm", {"x": x, "weight": w}, torch.nn.functional.rms_norm(x, (32,), w, 1e-6)),
             ("layer_norm", {"x": x, "weight": w, "bias": b}, torch.nn.functional.layer_norm(x, (32,), w, b, 1e-5)),
             ("silu", {"x": x}, torch.nn.functional.silu(x))]
    for operation, inputs, expected in cases:
        assert not _served(d.dispatch, operation, inputs)  # the first call learns the names
        d.dispatch(operation, inputs)
        assert _served(d.dispatch, operation, inputs), operation
        r = d.dispatch(operation, inputs)
        torch.testing.assert_close(r.output, expected)
        assert r.cached and r.attempts == 1 and not r.fallback_used and r.operation == operation
    assert not _served(d.dispatch, "rms_norm", {"input": x, "weight": w})  # another name set: mapped in full
    assert not _served(d.dispatch, "rms_norm", {"x": x, "weight": None})


@needs_compiled
@pytest.mark.parametrize("name,factory", _SELECTING, ids=[n for n, _ in _SELECTING])
def test_calls_given_a_context_answer_alike_and_are_served(name: str, factory: Callable[[], Dispatcher]) -> None:
    """``dispatch(op, inputs, context=ctx)`` (the seed's "batch context building": one context reused across
    operations), positional or by keyword, with options, another context object, ``context=None``, a context given
    twice: the compiled method answers as the Python one and serves the cached calls itself."""
    d = factory()
    py = _python(d)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    ctx = lz.SelectionContext(batch_size=1, seq_len=5, dtype=torch.float32, device="cpu")
    other = lz.SelectionContext(batch_size=1, seq_len=5, dtype=torch.float32, device="cpu")
    attn, norm = {"q": q, "k": k, "v": v}, {"x": x, "weight": w}
    cases: list[tuple[str, dict[str, Any], tuple[Any, ...], dict[str, Any]]] = [
        ("attention.causal", attn, (), {"context": ctx}), ("attention.full", attn, (ctx,), {}),
        ("attention.full", attn, (), {"context": ctx, "is_causal": True}),
        ("attention.full", attn, (), {"is_causal": True, "context": ctx}), ("rms_norm", norm, (), {"context": ctx}),
        ("rms_norm", norm, (ctx,), {}), ("silu", {"x": x}, (), {"context": ctx}),
        ("attention.causal", attn, (), {"context": other}), ("attention.causal", attn, (), {"context": None}),
        ("attention.causal", attn, (ctx,), {"context": ctx}), ("rms_norm", norm, (), {"context": "not one"})]
    for operation, inputs, extra, kw in cases + cases:
        _answer(py, operation, inputs, *extra, **kw)
        for _ in range(2):
            before = _calls(d)
            expected = _answer(py, operation, inputs, *extra, **kw)
            counted_py, before = _calls(d) - before, _calls(d)
            got = _answer(d.dispatch, operation, inputs, *extra, **kw)
            assert _same(got, expected), ((name, operation, kw), got[:1] + got[2:], expected[:1] + expected[2:])
            assert _calls(d) - before == counted_py
    for operation, inputs, extra, kw in cases[:7]:
        assert _served(d.dispatch, operation, inputs, *extra, **kw), (name, operation, kw)
    torch.testing.assert_close(d.dispatch("attention.causal", attn, context=ctx).output,
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


@needs_compiled
def test_the_exact_key_memo_follows_every_invalidation(tmp_path: Any) -> None:
    """The compiled path remembers the exact-key plan it found last (own caches, calls given a context); every
    change that moves the cache makes the next call read it again: an invalidation, a reload with other rules,
    another context, other shapes, a kernel's exception."""
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    inputs = {"q": q, "k": k, "v": v}
    mvcc = create_dynamic_dispatcher(use_mvcc_cache=True)
    for _ in range(3):
        mvcc.dispatch("attention.full", inputs)
    assert _served(mvcc.dispatch, "attention.full", inputs) and mvcc.dispatch("attention.full", inputs).cached
    mvcc.invalidate()
    assert not mvcc.dispatch("attention.full", inputs).cached  # a miss: the memo went with the cache's version
    assert mvcc.dispatch("attention.full", inputs).cached
    wide = {"q": torch.randn(1, 4, 3, 16), "k": torch.randn(1, 4, 5, 16), "v": torch.randn(1, 4, 5, 16)}
    assert not mvcc.dispatch("attention.full", wide).cached  # other shapes: another key
    torch.testing.assert_close(mvcc.dispatch("attention.full", wide).output,
                               torch.nn.functional.scaled_dot_product_attention(*wide.values()))
    ctx, other = lz.SelectionContext(dtype=torch.float32), lz.SelectionContext(dtype=torch.float32)
    gd = get_global_dispatcher()
    gd.dispatch("attention.full", inputs, context=ctx)
    assert gd.dispatch("attention.full", inputs, context=ctx).cached
    assert not gd.dispatch("attention.full", inputs, context=other).cached  # another context: its own plan
    gd.runtime.plans.invalidate()
    assert not gd.dispatch("attention.full", inputs, context=ctx).cached
    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {attention.full: torch_sdpa_math}\n')
    with create_hot_reload_dispatcher(config_path=path, start_watching=False) as hot:
        for _ in range(3):
            assert hot.dispatch("attention.full", inputs).kernel_id == "torch_sdpa_math"
        assert _served(hot.dispatch, "attention.full", inputs)
        path.write_text('version: "1.0"\nkernel_locks: {attention.full: torch_sdpa_gqa}\n')
        assert hot.reload()
        assert hot.dispatch("attention.full", inputs).kernel_id == "torch_sdpa_gqa"  # the new rules, at once
    mvcc.dispatch("attention.full", inputs)
    entry = mvcc._fast["attention.full"]  # type: ignore[attr-defined]
    assert entry.cmemo is not None
    plan = entry.cmemo[0][5]
    real = plan.direct

    def broken(*args: Any) -> Any:
        raise RuntimeError("kernel failed")

    plan.direct = broken
    try:
        r = mvcc.dispatch("attention.full", inputs)
        assert entry.cmemo is None  # a kernel's exception: the next call reads the cache again
    finally:
        plan.direct = real
    torch.testing.assert_close(r.output, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # the norms' entries remember theirs too
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    norm = {"x": x, "weight": w}
    for _ in range(3):
        mvcc.dispatch("rms_norm", norm)
    op_entry = mvcc._fast["rms_norm"]  # type: ignore[attr-defined]
    assert op_entry.cmemo is not None and mvcc.dispatch("rms_norm", norm).cached
    mvcc.invalidate()
    assert not mvcc.dispatch("rms_norm", norm).cached
    assert not mvcc.dispatch("rms_norm", {"x": torch.randn(4, 64), "weight": torch.rand(64)}).cached
    assert not gd.dispatch("rms_norm", norm, context=other).cached
    assert gd.dispatch("rms_norm", norm, context=other).cached
    with pytest.raises(LayerZeroError, match="weight must have x's dtype"):  # another weight dtype: not the memo's
        mvcc.dispatch("rms_norm", {"x": x, "weight": w.double()})
    mvcc.dispatch("rms_norm", norm)
    nplan = op_entry.cmemo[0][5]
    real_direct, real_fn = nplan.direct, nplan.fn
    nplan.direct = nplan.fn = broken
    try:
        r = mvcc.dispatch("rms_norm", norm)
        assert op_entry.cmemo is None
    finally:
        nplan.direct, nplan.fn = real_direct, real_fn
    torch.testing.assert_close(r.output, torch.nn.functional.rms_norm(x, (32,), w, 1e-6))


@needs_compiled
def test_the_memo_keeps_two_shapes_an_entry_alternates() -> None:
    """A server alternating prefill and decode shapes (or two contexts) on one entry finds both plans in the memo:
    alternating calls leave it as it is (no cache read, nothing remembered again); a third shape pushes the oldest
    out; every answer is the right one."""
    def attn(sq: int, skv: int) -> dict[str, torch.Tensor]:
        return {"q": torch.randn(1, 4, sq, 8), "k": torch.randn(1, 4, skv, 8), "v": torch.randn(1, 4, skv, 8)}

    prefill, decode, third = attn(6, 6), attn(1, 7), attn(2, 9)
    mvcc = create_dynamic_dispatcher(use_mvcc_cache=True)
    for _ in range(3):
        for inputs in (prefill, decode):
            mvcc.dispatch("attention.full", inputs)
    entry = mvcc._fast["attention.full"]  # type: ignore[attr-defined]
    memo = entry.cmemo
    assert len(memo) == 2 and memo[0][4] != memo[1][4]  # two signatures
    for _ in range(4):
        for inputs in (prefill, decode):
            r = mvcc.dispatch("attention.full", inputs)
            assert r.cached
            torch.testing.assert_close(r.output, torch.nn.functional.scaled_dot_product_attention(*inputs.values()))
    assert entry.cmemo is memo  # both stood: served from the memo, nothing remembered again
    mvcc.dispatch("attention.full", third)
    mvcc.dispatch("attention.full", third)
    assert len(entry.cmemo) == 2 and entry.cmemo[1] is memo[0] and entry.cmemo[0][4] not in (memo[0][4], memo[1][4])
    torch.testing.assert_close(mvcc.dispatch("attention.full", prefill).output,
                               torch.nn.functional.scaled_dot_product_attention(*prefill.values()))
    # two contexts on one norm entry
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    gd = get_global_dispatcher()
    ctx, other = lz.SelectionContext(dtype=torch.float32), lz.SelectionContext(dtype=torch.float32)
    for _ in range(2):
        for c in (ctx, other):
            gd.dispatch("rms_norm", {"x": x, "weight": w}, context=c)
    op_memo = gd._fast["rms_norm"].cmemo  # type: ignore[attr-defined]
    assert {e[2] for e in op_memo} == {ctx, other}
    for c in (ctx, other, ctx, other):
        r = gd.dispatch("rms_norm", {"x": x, "weight": w}, context=c)
        assert r.cached
        torch.testing.assert_close(r.output, torch.nn.functional.rms_norm(x, (32,), w, 1e-6))
    assert gd._fast["rms_norm"].cmemo is op_memo  # type: ignore[attr-defined]


@needs_compiled
@pytest.mark.parametrize("cache", ["shared", "mvcc", "lru"])
def test_a_failing_contract_op_kernel_goes_to_the_detour(cache: str) -> None:
    """A norm kernel's exception on the compiled path goes where ``_hot_op`` sends it (``_hot_op_detour``): the same
    answer, the same failure counted."""
    answers = []
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    inputs = {"x": x, "weight": w}
    for compiled in (True, False):
        own = get_runtime().config.replace(cache_size=9999)  # a runtime of its own: each round starts afresh
        d = (create_dynamic_dispatcher(config=own) if cache == "shared"
             else create_dynamic_dispatcher(config=own, use_mvcc_cache=True) if cache == "mvcc"
             else create_config_dispatcher(config_path={"version": "1.0"}, config=own))
        d.dispatch("rms_norm", inputs)
        d.dispatch("rms_norm", inputs)
        plan = (d.runtime.plans.data if cache == "shared" else None)
        plan = (lz.ops.RMS_NORM.calls.lookup(plan, "rms_norm", x, w, 1e-6)[0] if plan is not None
                else d.plan_cache.get(lz.ops.RMS_NORM.calls.keys("rms_norm", x, w, 1e-6)[1]))
        kid = plan.kernels[0].kernel_id
        failures = d.get_circuit_stats(kid).failures

        def broken(*args: Any) -> Any:
            raise RuntimeError("norm kernel failed")

        real = plan.direct, plan.fn
        plan.direct = plan.fn = broken
        try:
            answer = _answer(d.dispatch if compiled else _python(d), "rms_norm", inputs)
        finally:
            plan.direct, plan.fn = real
        answers.append((answer[:1] + answer[2:], d.get_circuit_stats(kid).failures - failures))
        torch.testing.assert_close(d.dispatch("rms_norm", inputs).output, torch.nn.functional.rms_norm(x, (32,), w, 1e-6))
    assert answers[0] == answers[1], answers
    assert answers[0][0][0] == "ok"
    if cache != "shared":  # an own cache's exact-shape plan: counted, and its fallback served the call
        assert answers[0][1] == 1 and answers[0][0][3]


PYTHON_CODES = {Dispatcher.dispatch.__code__, StaticDispatcher.dispatch.__code__}


def _served(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Whether ``fn(*args, **kwargs)`` was answered without entering a Python dispatch method."""
    entered: list[bool] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in PYTHON_CODES:
            entered.append(True)

    sys.setprofile(profile)
    try:
        fn(*args, **kwargs)
    except Exception:
        pass
    finally:
        sys.setprofile(None)
    return not entered


def _plain() -> tuple[dict[str, Any], dict[str, Any]]:
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    return {"q": q, "k": k, "v": v}, {"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2)}


@needs_compiled
@pytest.mark.parametrize("name,factory", _dispatchers(), ids=[n for n, _ in _dispatchers()])
def test_the_compiled_method_serves_the_plain_cached_call(name: str, factory: Callable[[], Dispatcher]) -> None:
    """The cached calls the benchmark rows make are answered without entering the Python method, each with the
    output PyTorch gives; a first call, another input-name set and a call with a mask are Python's."""
    d = factory()
    inputs, bshd = _plain()
    q, k, v = inputs.values()
    assert not _served(d.dispatch, "attention.full", inputs)  # the first call learns the names
    for options, tensors in [({}, inputs), ({"is_causal": True}, inputs), ({"layout": "BSHD"}, bshd),
                             ({"layout": "BSHD", "is_causal": True}, bshd), ({"scale": 0.5}, inputs)]:
        d.dispatch("attention.full", tensors, **options)
        assert _served(d.dispatch, "attention.full", tensors, **options), options
        r = d.dispatch("attention.full", tensors, **options)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=options.get("is_causal", False),
                                                                    scale=options.get("scale"))
        if "layout" in options:
            expected = expected.transpose(1, 2)
        torch.testing.assert_close(r.output, expected)
        assert r.cached and r.attempts == 1 and not r.fallback_used and r.operation == "attention.full"
    assert not _served(d.dispatch, "attention.full", {"query": q, "key": k, "value": v})
    assert not _served(d.dispatch, "attention.full", {**inputs, "attn_mask": None})
    assert not _served(d.dispatch, "attention.full", inputs, None, is_causal=torch.tensor(True))


@needs_compiled
def test_the_compiled_paths_stamps_read_as_the_tuple() -> None:
    """A served call's clock readings are one compact object (``_accel.Stamps``) that is, to every reader, the
    tuple ``(t0, t0, t2, t2, t4, t4)``: len, indexing (negative, slices, out of range), iteration, ==, hash,
    repr, pickle and copy; ``timing`` reads it as it reads a tuple."""
    import pickle

    d = create_dynamic_dispatcher()
    x, w = torch.randn(4, 16), torch.randn(16)
    for _ in range(3):
        r = d.dispatch("rms_norm", {"x": x, "weight": w})
    s = r.stamps
    assert type(s).__name__ == "Stamps"
    t = tuple(s)
    assert len(s) == 6 and len(t) == 6 and t[0] == t[1] and t[2] == t[3] and t[4] == t[5] and 0 < t[0] <= t[2] <= t[4]
    assert list(s) == list(t) and [s[i] for i in range(-6, 6)] == [t[i] for i in range(-6, 6)]
    assert s[1:4] == t[1:4] and s[::-1] == t[::-1] and s[torch.tensor(2).item()] == t[2]
    for bad in (6, -7):
        with pytest.raises(IndexError):
            s[bad]
    with pytest.raises(TypeError):
        s["0"]
    assert s == t and t == s and not (s != t) and s != t[:5] and (s < (t[0] + 1,)) == (t < (t[0] + 1,))
    assert hash(s) == hash(t) and {s: 1}[t] == 1 and repr(s) == repr(t)
    assert pickle.loads(pickle.dumps(s)) == t and type(pickle.loads(pickle.dumps(s))) is tuple
    assert copy.copy(s) == t and copy.deepcopy(s) == t
    timing = r.timing
    assert tuple(timing) == t and timing.recorded and timing.total_us == (t[5] - t[0]) / 1000.0
    assert timing.cache_lookup_ns == t[2] - t[0] and timing.kernel_invoke_ns == t[4] - t[2]
    assert NOT_TIMED == (0,) * 6  # an untimed dispatcher still answers with NOT_TIMED
    untimed = create_dynamic_dispatcher(config=get_runtime().config.replace(record_timing=False))
    for _ in range(3):
        r = untimed.dispatch("rms_norm", {"x": x, "weight": w})
    assert r.stamps is NOT_TIMED and not r.timing.recorded


@needs_compiled
def test_no_reference_is_leaked() -> None:
    """Served, declined and failing calls give back every reference they take."""
    static, dynamic = _static(True), create_dynamic_dispatcher()
    mvcc, config = create_dynamic_dispatcher(use_mvcc_cache=True), create_config_dispatcher(config_path={"version": "1.0"})
    inputs, bshd = _plain()
    q = inputs["q"]
    x, w = torch.randn(4, 32), torch.rand(32)
    unhashable: dict[str, Any] = {"scale": [1]}
    ctx = lz.SelectionContext(dtype=torch.float32)
    watched = [q, bshd["q"], static, dynamic, mvcc, config, x, w, ctx, torch.float32, NOT_TIMED, "attention.full",
               "rms_norm"]

    def run(n: int) -> None:
        for _ in range(n):
            for d in (dynamic, mvcc, config):
                d.dispatch("rms_norm", {"x": x, "weight": w})
                d.dispatch("rms_norm", {"x": x, "weight": w}, context=ctx)
                d.dispatch("attention.full", inputs, ctx)
                d.dispatch("silu", {"x": x})
                try:
                    d.dispatch("rms_norm", {"x": x, "weight": [1]})
                except LayerZeroError:
                    pass
            for d in (static, dynamic, mvcc, config):
                d.dispatch("attention.full", inputs)
                d.dispatch("attention.full", inputs, is_causal=True)
                d.dispatch("attention.full", bshd, layout="BSHD").timing
                for bad in ({"q": q, "k": q, "v": [1]}, {"x": q, "k": q, "v": q}):
                    try:
                        d.dispatch("attention.full", bad)
                    except LayerZeroError:
                        pass
                try:
                    d.dispatch("attention.full", inputs, **unhashable)
                except LayerZeroError:
                    pass

    def counts() -> list[int]:
        gc.collect()
        return [sys.getrefcount(o) for o in watched]

    run(10)
    before = counts()
    run(300)
    assert counts() == before


@needs_compiled
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_failing_kernel_goes_to_the_dispatchers_detour(kind: str) -> None:
    """A kernel's exception on the compiled path goes where the Python method sends it (``_hot_detour``: the
    failure contract): the same answer or error, the same failure counted on the kernel's breaker."""
    answers = []
    for compiled in (True, False):
        state = {"fail": 0}

        def flaky(q: Any, k: Any, v: Any, *args: Any) -> Any:
            if state["fail"]:
                state["fail"] -= 1
                raise RuntimeError("flaky kernel failed")
            return _kernel(q, k, v, *args)

        d: Dispatcher = (StaticDispatcherBuilder().with_kernel(flaky, operation="attention.full", default=True)
                         .build() if kind == "static" else create_dynamic_dispatcher())
        inputs, _ = _plain()
        d.dispatch("attention.full", inputs)
        d.dispatch("attention.full", inputs)
        plan = (d._hot["attention.full"][0] if kind == "static"  # type: ignore[attr-defined]
                else ATTENTION.calls.lookup(d.runtime.plans.data, "attention.full", *inputs.values(), None, False, 0.0,
                                            None, None)[0])
        kid = plan.kernels[0].kernel_id
        failures = d.get_circuit_stats(kid).failures
        real = plan.direct
        if kind == "dynamic":  # the cached plan's direct kernel raises
            plan.direct = flaky
        state["fail"] = 1
        try:
            answer = _answer(d.dispatch if compiled else _python(d), "attention.full", inputs)
        finally:
            plan.direct = real
        assert state["fail"] == 0
        answers.append((answer[:1] + answer[2:], d.get_circuit_stats(kid).failures - failures))
    assert answers[0] == answers[1], answers


@needs_compiled
def test_a_blocked_gate_a_runtime_change_and_a_scope_are_left_to_python() -> None:
    d = create_dynamic_dispatcher()
    inputs, _ = _plain()
    d.dispatch("attention.full", inputs)
    assert _served(d.dispatch, "attention.full", inputs)
    d.runtime.invalidate("test")  # the runtime's version moves: the Python method syncs first
    assert not _served(d.dispatch, "attention.full", inputs)
    d.dispatch("attention.full", inputs)
    assert _served(d.dispatch, "attention.full", inputs)
    with lz.lock("attention.full", "torch_sdpa"):
        assert not _served(d.dispatch, "attention.full", inputs)
    static = _static(True)
    static.dispatch("attention.full", inputs)
    assert _served(static.dispatch, "attention.full", inputs)
    plan = static._hot["attention.full"][0]
    breaker = static.runtime.breakers.get(plan.kernels[0].kernel_id)
    breaker.trip("test")
    try:
        assert plan.gate.blocked
        assert not _served(static.dispatch, "attention.full", inputs)
    finally:
        breaker.reset()


@needs_compiled
def test_the_compiled_form_is_bound_where_it_can_serve_and_reads_as_the_python_method(tmp_path: Any) -> None:
    """Each dispatcher whose calls it can serve gets the compiled form bound as ``dispatch``; the classes keep
    the Python methods (what torch.compile traces); a subclass overriding ``dispatch`` keeps Python; a closed
    hot-reload dispatcher drops it (and is freed with its last reference)."""
    (tmp_path / "k.yaml").write_text('version: "1.0"\n')
    static, dynamic = _static(True), create_dynamic_dispatcher()
    for d, cls in ((static, StaticDispatcher), (dynamic, Dispatcher), (get_global_dispatcher(), Dispatcher)):
        bound = vars(d)["dispatch"]
        assert type(bound.__func__).__name__ == "Method" and bound.__self__ is d
        assert inspect.signature(bound) == inspect.signature(cls.dispatch.__get__(d))
        assert bound.__doc__ == cls.dispatch.__doc__ and bound.__name__ == "dispatch"
        assert bound.__func__.__wrapped__ is cls.dispatch
    assert isinstance(inspect.getattr_static(Dispatcher, "dispatch"), type(_kernel))
    twin = copy.copy(dynamic)  # a copy binds its own
    assert vars(twin)["dispatch"].__self__ is twin
    for own in (create_dynamic_dispatcher(use_mvcc_cache=True), create_config_dispatcher(config_path={"version": "1.0"})):
        assert vars(own)["dispatch"].__self__ is own  # an own PlanCache or MVCCPlanCache is read too
    with create_hot_reload_dispatcher(config_path=tmp_path / "k.yaml", start_watching=False) as hot:
        assert vars(hot)["dispatch"].__self__ is hot
    assert "dispatch" not in vars(hot)  # closed: the cycle is broken, the Python method serves
    ref = weakref.ref(hot)
    del hot
    assert ref() is None  # freed with its last reference

    class Mine(type(dynamic)):  # type: ignore[misc]
        seen = 0

        def dispatch(self, *args: Any, **kwargs: Any) -> DispatchResult:
            Mine.seen += 1
            return super().dispatch(*args, **kwargs)

    d = Mine(get_runtime())
    assert "dispatch" not in vars(d)
    inputs, _ = _plain()
    assert d.dispatch("attention.full", inputs).kernel_id == d.dispatch("attention.full", inputs).kernel_id
    assert Mine.seen == 2


@needs_compiled
def test_torch_compile_runs_a_function_that_dispatches() -> None:
    """torch.compile traces the class's Python method; the bound compiled form it meets at run time answers as
    in eager mode."""
    inputs, _ = _plain()
    static, dynamic = _static(True), get_global_dispatcher()

    def f(q: Any, k: Any, v: Any) -> Any:
        names = {"q": q, "k": k, "v": v}
        return dynamic.dispatch("attention.full", names).output * 2 + static.dispatch("attention.full", names).output

    eager = f(*inputs.values())
    compiled = torch.compile(f, backend="eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(*inputs.values()), eager)


@pytest.mark.gpu
@needs_compiled
def test_cuda_tensors_take_the_compiled_dispatch() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.float16) for n in (1, 128, 128))
    inputs, bshd = {"q": q, "k": k, "v": v}, {"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2)}
    for d in (_static(True), create_dynamic_dispatcher(), get_global_dispatcher()):
        for tensors, options in [(inputs, {}), (inputs, {"is_causal": True}), (bshd, {"layout": "BSHD"})]:
            d.dispatch("attention.full", tensors, **options)
            assert _served(d.dispatch, "attention.full", tensors, **options), (d, options)
            expected = _answer(_python(d), "attention.full", tensors, **options)
            assert _same(_answer(d.dispatch, "attention.full", tensors, **options), expected)
