"""The dispatchers' hot path for calls with options (``layout="BSHD"``, ``is_causal=True``, ...).

A call with options gets a hot-path entry of its own, keyed by each option's name, exact type and value
(:func:`layerzero.dispatch.generic.kwargs_key`). These tests run every such path cold (a fresh dispatcher),
warm (its entry made) and after a second shape, with valid and invalid inputs, and check that the answer is
the same every time: the direct ``F.scaled_dot_product_attention`` result (with the BSHD transposes), or the
same ``InvalidInputError`` with the same message. A value that only compares equal to a cached one
(``is_causal=1``, ``numpy.True_``) and an option no entry carries never reach a cached entry: they map in full.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import layerzero.dispatch.dispatcher as dispatcher_module
import layerzero.dispatch.static as static_module
from layerzero.dispatch import StaticDispatcherBuilder, create_dynamic_dispatcher, get_global_dispatcher
from layerzero.dispatch.generic import attention_inputs, hot_key, kwargs_key
from layerzero.errors import InvalidInputError
from layerzero.ops.attention import ATTENTION

OPERATION = "attention.full"


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) + 0.5


def sdpa_kernel(q, k, v, mask, is_causal, dropout_p, scale, window):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          scale=scale)


def make(path: str) -> Callable[..., Any]:
    """A fresh dispatcher's ``dispatch`` for ``path`` ("static-..." or "dynamic-...", "global-...")."""
    if path.startswith("static"):
        d = StaticDispatcherBuilder().with_kernel(sdpa_kernel, operation=OPERATION, default=True).build()
    elif path.startswith("registered"):
        d = StaticDispatcherBuilder().with_kernel("torch_sdpa", operation=OPERATION, default=True).build()
    elif path.startswith("dynamic"):
        d = create_dynamic_dispatcher()
    else:
        d = get_global_dispatcher()
    return d.dispatch


# path -> the call's options; BSHD paths take (batch, seq, heads, head_dim) tensors
PATHS = {
    "static-bshd": {"layout": "BSHD"},
    "static-causal": {"is_causal": True},
    "static-causal-bshd": {"is_causal": True, "layout": "BSHD"},
    "registered-bshd": {"layout": "BSHD"},
    "dynamic-bshd": {"layout": "BSHD"},
    "dynamic-causal": {"is_causal": True},
    "dynamic-bhsd": {"layout": "BHSD"},
    "global-bshd": {"layout": "BSHD"},
    "global-causal": {"is_causal": True},
}


def qkv(options: dict[str, Any], b: int, h: int, sq: int, sk: int, d: int, **change: Any) -> dict[str, Any]:
    """q, k, v in the layout ``options`` says (shapes given as BHSD sizes)."""
    tensors = {"q": rnd(b, h, sq, d), "k": rnd(b, h, sk, d), "v": rnd(b, h, sk, d)}
    if options.get("layout") == "BSHD":
        tensors = {n: t.transpose(1, 2).contiguous() for n, t in tensors.items()}
    tensors.update(change)
    return tensors


def expected(options: dict[str, Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The direct call: F.sdpa, with the BSHD transposes in and out."""
    bshd = options.get("layout") == "BSHD"
    q, k, v = (t.transpose(1, 2) if bshd else t for t in (inputs["q"], inputs["k"], inputs["v"]))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(options.get("is_causal", False)))
    return out.transpose(1, 2) if bshd else out


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """("ok", output, kernel id) or (error type, message)."""
    try:
        r = call()
    except Exception as exc:  # noqa: BLE001 - the very error is what is compared
        return type(exc), str(exc)
    return "ok", r.output, r.kernel_id


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != "ok" or b[0] != "ok":
        return a == b
    return a[2] == b[2] and a[1].shape == b[1].shape and torch.allclose(a[1], b[1], atol=1e-6, rtol=1e-6)


@pytest.fixture
def mapped(monkeypatch) -> list[int]:
    """How many calls went the full way (each maps its inputs with map_inputs once)."""
    count = [0]
    for module in (static_module, dispatcher_module):
        real = module.map_inputs

        def counting(*a: Any, _real: Any = real, **kw: Any) -> Any:
            count[0] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, "map_inputs", counting)
    return count


def bad_calls(options: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (inputs, options) of calls that must fail the same way cold and warm."""
    b, h, sq, sk, d = 2, 4, 3, 7, 16
    good = qkv(options, b, h, sq, sk, d)
    bshd = options.get("layout") == "BSHD"
    out = {
        "lowercase layout": (good, {**options, "layout": "bshd"}),
        "unknown layout": (good, {**options, "layout": "SBHD"}),
        "wrong-rank q": ({**good, "q": rnd(b, sq, d)}, options),
        "mismatched batch": ({**good, "k": qkv(options, 1, h, sq, sk, d)["k"], "v": qkv(options, 1, h, sq, sk, d)["v"]},
                             options),
        "head dims differ": ({**good, "q": rnd(b, sq, h, 8) if bshd else rnd(b, h, sq, 8)}, options),
        "non-tensor k": ({**good, "k": [1.0, 2.0]}, options),
        "unhashable window": (good, {**options, "window": [4]}),
        "is_causal another value": (good, {**options, "is_causal": None if options.get("is_causal") else "x"}),
    }
    return out


@pytest.mark.parametrize("path", sorted(PATHS))
def test_options_path_is_the_direct_call_cold_warm_and_on_a_new_shape(path, mapped) -> None:
    options = PATHS[path]
    call = make(path)
    bad = bad_calls(options)
    cold_bad = {name: outcome(lambda i=i, o=o: call(OPERATION, i, **o)) for name, (i, o) in bad.items()}
    for name in ("lowercase layout", "unknown layout", "wrong-rank q", "mismatched batch", "non-tensor k",
                 "unhashable window", "head dims differ"):
        assert cold_bad[name][0] is InvalidInputError, (name, cold_bad[name])
    decode = qkv(options, 1, 8, 1, 128, 64)
    results = [call(OPERATION, decode, **options) for _ in range(3)]
    for r in results:
        torch.testing.assert_close(r.output, expected(options, decode), atol=1e-6, rtol=1e-6)
        assert r.output.shape == decode["q"].shape
    before = mapped[0]
    warm = call(OPERATION, decode, **options)
    assert mapped[0] == before, f"{path}: a warm call mapped its inputs in full"
    assert warm.cached and warm.kernel_id == results[0].kernel_id
    torch.testing.assert_close(warm.output, expected(options, decode), atol=1e-6, rtol=1e-6)
    warm_bad = {name: outcome(lambda i=i, o=o: call(OPERATION, i, **o)) for name, (i, o) in bad.items()}
    for name in bad:
        assert same(cold_bad[name], warm_bad[name]), (name, cold_bad[name], warm_bad[name])
    second = qkv(options, 2, 4, 5, 9, 32)  # another shape of the family
    for _ in range(2):
        r = call(OPERATION, second, **options)
        torch.testing.assert_close(r.output, expected(options, second), atol=1e-6, rtol=1e-6)
    before = mapped[0]
    r = call(OPERATION, second, **options)
    assert mapped[0] == before and r.cached
    after_bad = {name: outcome(lambda i=i, o=o: call(OPERATION, i, **o)) for name, (i, o) in bad.items()}
    for name in bad:
        assert same(cold_bad[name], after_bad[name]), (name, cold_bad[name], after_bad[name])
    r = call(OPERATION, decode, **options)  # the bad calls left the entry as it was
    torch.testing.assert_close(r.output, expected(options, decode), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["static-causal", "dynamic-causal", "global-causal", "static-causal-bshd"])
@pytest.mark.parametrize("value", [1, np.bool_(True), 1.0], ids=["int", "numpy-bool", "float"])
def test_is_causal_that_only_equals_true_never_meets_the_true_entry(path, value, mapped) -> None:
    options = PATHS[path]
    call = make(path)
    inputs = qkv(options, 1, 8, 1, 128, 64)
    other = {**options, "is_causal": value}
    cold = outcome(lambda: call(OPERATION, inputs, **other))  # before any entry exists
    for _ in range(3):
        call(OPERATION, inputs, **options)
    for _ in range(2):
        before = mapped[0]
        warm = outcome(lambda: call(OPERATION, inputs, **other))
        assert mapped[0] == before + 1, "is_causal=%r took the entry of is_causal=True" % (value,)
        assert same(cold, warm), (cold, warm)
    assert kwargs_key(OPERATION, other) != kwargs_key(OPERATION, options)
    assert hash(kwargs_key(OPERATION, other)) is not None


@pytest.mark.parametrize("path", ["static-bshd", "dynamic-bshd", "global-bshd"])
def test_bshd_and_bhsd_entries_are_apart(path, mapped) -> None:
    call = make(path)
    bhsd = qkv({}, 1, 8, 1, 128, 64)
    bshd = {n: t.transpose(1, 2).contiguous() for n, t in bhsd.items()}
    for _ in range(3):
        a = call(OPERATION, bshd, layout="BSHD")
        b = call(OPERATION, bhsd, layout="BHSD")
        c = call(OPERATION, bhsd)
    torch.testing.assert_close(a.output, expected({"layout": "BSHD"}, bshd), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.output, expected({}, bhsd), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.output, b.output, atol=0, rtol=0)
    torch.testing.assert_close(a.output.transpose(1, 2), b.output, atol=1e-6, rtol=1e-6)
    before = mapped[0]
    call(OPERATION, bshd, layout="BSHD")
    call(OPERATION, bhsd, layout="BHSD")
    assert mapped[0] == before  # both warm, each through its own entry
    # BHSD tensors said to be BSHD: what the full path makes of them, also when warm (a square q here: the
    # transposed views are valid attention inputs of other sizes)
    square = qkv({}, 1, 4, 4, 4, 16)
    cold = outcome(lambda: make(path)(OPERATION, square, layout="BSHD"))
    warm = outcome(lambda: call(OPERATION, square, layout="BSHD"))
    assert same(cold, warm) and cold[0] == "ok"
    torch.testing.assert_close(warm[1], expected({"layout": "BSHD"}, square), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["static-bshd", "dynamic-bshd", "global-bshd"])
def test_options_no_entry_carries_always_map_in_full(path, mapped) -> None:
    call = make(path)
    inputs = qkv({"layout": "BSHD"}, 1, 8, 1, 128, 64)
    for extra in ({"layout": np.str_("BSHD")}, {"layout": "BSHD", "unknown_option": 3},
                  {"layout": "BSHD", "attn_mask": None}):
        outs = []
        for _ in range(3):
            before = mapped[0]
            outs.append(outcome(lambda: call(OPERATION, inputs, **extra)))
            assert mapped[0] == before + 1, extra
        assert all(same(outs[0], o) for o in outs)


def test_hot_key_and_attention_inputs_with_options() -> None:
    q = rnd(1, 2, 3, 16)
    assert hot_key(OPERATION, {}) == OPERATION
    assert hot_key(OPERATION, {"is_causal": True}) == kwargs_key(OPERATION, {"is_causal": True})
    assert hot_key(OPERATION, {"attn_mask": q}) is None  # no entry would keep a tensor alive
    assert hot_key(OPERATION, {"is_causal": np.bool_(True)}) is None
    assert kwargs_key(OPERATION, {"is_causal": True}) != kwargs_key(OPERATION, {"is_causal": 1})
    assert kwargs_key(OPERATION, {"window": 2}) != kwargs_key(OPERATION, {"window": 2.0})
    assert (OPERATION, "is_causal", bool, True) != kwargs_key(OPERATION, {"is_causal": True})  # a marker first
    inputs = {"q": q, "k": q, "v": q}
    entry = attention_inputs(ATTENTION, OPERATION, inputs, {"is_causal": True, "layout": "BSHD"})
    assert entry is not None and entry.is_causal is True and entry.bshd
    assert attention_inputs(ATTENTION, OPERATION, inputs, {"layout": "bshd"}) is None
    assert attention_inputs(ATTENTION, OPERATION, inputs, {"scale": [1]}) is None
    assert attention_inputs(ATTENTION, OPERATION, inputs, {"is_causal": 1}) is None
    with pytest.raises(InvalidInputError):
        ATTENTION.validate(OPERATION, (q, q, q, None, 1, 0.0, None, None))


@pytest.mark.parametrize("options", [{"layout": "BSHD"}, {"is_causal": True, "layout": "BSHD"}])
def test_a_kernel_failing_on_the_options_hot_path_falls_back_in_the_same_layout(options) -> None:
    calls = {"n": 0}

    def flaky(q, k, v, mask, is_causal, dropout_p, scale, window):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("illegal memory access")
        return sdpa_kernel(q, k, v, mask, is_causal, dropout_p, scale, window)

    static = (StaticDispatcherBuilder().with_kernel(flaky, operation=OPERATION, default=True)
              .with_kernel("torch_sdpa_math", operation=OPERATION).build())
    inputs = qkv(options, 2, 4, 3, 5, 16)
    for _ in range(2):
        r = static.dispatch(OPERATION, inputs, **options)
        assert (r.kernel_id, r.fallback_used) == ("flaky", False)
    r = static.dispatch(OPERATION, inputs, **options)  # raises on the hot path: the fallback runs
    assert (r.kernel_id, r.fallback_used, r.attempts) == ("torch_sdpa_math", True, 2)
    torch.testing.assert_close(r.output, expected(options, inputs), atol=1e-5, rtol=1e-5)
    static.runtime.breakers.get("flaky").trip("fenced off")  # a blocked gate: the slow runner, same layout
    r = static.dispatch(OPERATION, inputs, **options)
    assert (r.kernel_id, r.fallback_used) == ("torch_sdpa_math", True)
    torch.testing.assert_close(r.output, expected(options, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["dynamic-bshd", "global-bshd"])
def test_an_open_breaker_on_the_options_hot_path_routes_elsewhere_in_the_same_layout(path, runtime) -> None:
    options = PATHS[path]
    call = make(path)
    inputs = qkv(options, 1, 8, 1, 128, 64)
    for _ in range(3):
        first = call(OPERATION, inputs, **options)
    runtime.breakers.get(first.kernel_id).trip("fenced off")
    r = call(OPERATION, inputs, **options)
    assert r.kernel_id != first.kernel_id
    torch.testing.assert_close(r.output, expected(options, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("operation", "inputs", "options", "said"), [
    ("attention.full", "qkv", {"is_causal": "False"}, "is_causal must be a bool, got 'False'"),
    ("attention.full", "qkv", {"is_causal": 2}, "is_causal must be a bool, got 2"),
    ("attention.full", "qkv", {"dropout_p": "0"}, "dropout_p must be a number, got '0'"),
    ("rms_norm", "x", {"eps": "1e-5"}, "eps must be a number, got '1e-5'"),
    ("rope", "rope", {"interleaved": "yes"}, "interleaved must be a bool, got 'yes'"),
    ("sample.temperature", "logits", {"temperature": "0.7"}, "temperature must be a number, got '0.7'"),
])
def test_a_string_option_is_refused_not_converted(operation: str, inputs: str, options: dict, said: str) -> None:
    """bool("False") is True: a string flag used to run causal attention; a string number was parsed."""
    from layerzero.dispatch import dispatch
    from layerzero.errors import InvalidInputError

    t = torch.randn(1, 2, 4, 8)
    given = {"qkv": {"q": t, "k": t, "v": t}, "x": {"x": t}, "logits": {"logits": torch.randn(2, 5)},
             "rope": {"x": t, "cos": torch.randn(4, 8), "sin": torch.randn(4, 8)}}[inputs]
    for _ in range(2):
        with pytest.raises(InvalidInputError, match=re.escape(said)):
            dispatch(operation, given, **options)


def test_numpy_and_int_flags_still_read_as_bools() -> None:
    import numpy as np

    from layerzero.dispatch import dispatch

    t = torch.randn(1, 2, 4, 8)
    want = torch.nn.functional.scaled_dot_product_attention(t, t, t, is_causal=True)
    for flag in (np.True_, 1, True):
        torch.testing.assert_close(dispatch("attention.full", {"q": t, "k": t, "v": t}, is_causal=flag).output, want)
