"""Fuzzing with hypothesis: whatever comes in, only a ``LayerZeroError`` ever comes out.

Targets: the condition grammar (token soup, then evaluation against arbitrary contexts), the ``_match``
regex guard (accepted patterns must match adversarial subjects quickly), the policy and config loaders
(arbitrary YAML/JSON trees, text and bytes, also through a hot reload), the ops and ``dispatch()``
with arbitrary tensors (shapes, strides, dtypes, devices, layouts) and non-tensors, and the
performance-database reader on corrupt files (random bytes, truncated and bit-flipped SQLite files,
foreign schemas, newer versions, poisoned rows).

Sizes are bounded (tensors of at most a few hundred elements, documents of a few dozen nodes) and
every test has a hypothesis deadline, so a hang or a blow-up fails the test instead of stalling it.
The example counts keep the whole file well under a minute on two cores.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.dispatch import create_hot_reload_dispatcher, dispatch
from layerzero.errors import LayerZeroError
from layerzero.policy.conditions import FIELDS, compile_comparison, compile_condition
from layerzero.policy.config_schema import CONDITION_SUFFIXES, REGEX_LIMITS, compile_safe_regex, load_config
from layerzero.policy.document import load_policy
from layerzero.policy.model import condition_env
from layerzero.tuning.perfdb import PerfDB, Record

FAST = settings(max_examples=150, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
SLOW = settings(max_examples=40, deadline=timedelta(seconds=5), suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture], derandomize=True)


@contextlib.contextmanager
def only_layerzero_errors() -> Iterator[None]:
    """The property: the block may raise a LayerZeroError, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        except LayerZeroError:
            pass


# -- the condition grammar -------------------------------------------------------------------------------------

TOKENS = [*FIELDS, "and", "or", "not", "in", "not in", "==", "!=", "<", "<=", ">", ">=", "(", ")", "[", "]", ",",
          "-", ".", "'float16'", '"cuda"', "'x'", "0", "80", "1.5", "1e308", "99999999999999999999", "True", "None",
          "null", "__import__", "lambda", "is", "if", "x.y", "a[0]", "f()", "**", "+", "@", "'\\n'", "'", '"', "\\",
          "\x00", "é", "²", "_", "__class__", "{", "}", ":", ";", "#"]


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.sampled_from([" ", "", "\t"]))
def test_condition_token_soup(tokens: list[str], sep: str) -> None:
    text = sep.join(tokens)
    with only_layerzero_errors():
        cond = compile_condition(text)
        for ctx in CONTEXTS:
            assert cond(condition_env(ctx, "attention.causal", None)) in (True, False)


@FAST
@given(st.text(max_size=300))
def test_condition_arbitrary_text(text: str) -> None:
    with only_layerzero_errors():
        cond = compile_condition(text, per_kernel=False)
        assert cond(condition_env(CONTEXTS[0], "rms_norm", None)) in (True, False)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))


@FAST
@given(st.one_of(st.sampled_from(list(FIELDS)), st.text(max_size=12)),
       st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in", "match", "~", ""]),
       st.one_of(SCALARS, st.lists(SCALARS, max_size=5), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2)))
def test_condition_comparisons(field: str, op: str, value: Any) -> None:
    with only_layerzero_errors():
        cond = compile_comparison(field, op, value)
        for ctx in CONTEXTS:
            assert cond(condition_env(ctx, "attention.causal", None)) in (True, False)


CONTEXTS = [
    SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch_size=16, seq_len=4096,
                     num_heads=32, num_kv_heads=8, head_dim=128, is_causal=True, layout="BHSD"),
    SelectionContext(dtype=torch.float32, hidden_size=4096, num_tokens=3),
    SelectionContext(),
]


# -- the _match regex guard ------------------------------------------------------------------------------------

REGEX_ATOMS = ["a", "b", ".", "\\w", "\\d", "[ab]", "[^a]", "(", ")", "(?:", "|", "*", "+", "?", "{2}", "{0,9}",
               "{1,}", "^", "$", "\\1", "(?=", "(?P<n>", "*?", "+?", "\\", "[", "]"]
SUBJECTS = ["a" * 128, "a" * 127 + "!", "ab" * 64, "a" * 40 + "b" * 40 + "!", "", "attention.causal",
            "a" * 10_000]


@settings(max_examples=300, deadline=timedelta(seconds=2), derandomize=True)
@given(st.lists(st.sampled_from(REGEX_ATOMS), min_size=1, max_size=40))
def test_accepted_regexes_stay_fast_on_adversarial_subjects(parts: list[str]) -> None:
    """A pattern is either refused or cheap: accepted patterns search every subject well within the deadline."""
    pattern = "".join(parts)
    try:
        rx = compile_safe_regex(pattern)
    except ValueError:
        return
    limit = REGEX_LIMITS["subject_length"]
    for subject in SUBJECTS:
        if len(subject) <= limit:  # longer subjects are never searched (the condition is false)
            rx.search(subject)


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a*)*b", "(a|aa)+$", "(a|a)" * 39 + "$", "(.*a){20}",
                                     "a*a*a*a*a*a*b", "(?:a+){2,}x", "(a)\\1", "(?=a)", "(?<!a)b",
                                     "(?P<x>a)(?P=x)", "x" * 300])
def test_catastrophic_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_safe_regex(pattern)
    with pytest.raises(lz.ConfigError, match=r"dispatch_rules\[0\]\.conditions\.operation_match: "):
        load_config({"version": "1.0", "dispatch_rules": [
            {"operation": "rms_norm", "kernel": "torch_rms_norm", "conditions": {"operation_match": pattern}}]})


# -- policy and config documents -----------------------------------------------------------------------------

KEYS = ["version", "description", "locks", "allows", "denies", "boosts", "operation", "kernel", "kernels",
        "backend", "backends", "condition", "conditions", "boost_factor", "priority", "dispatch_rules",
        "kernel_locks", "kernel_allows", "kernel_denies", "fallback_chains", "defaults", "default_priority",
        "fallback_kernel", "name", *(f"batch_size{s}" for s, _ in CONDITION_SUFFIXES), "dtype", "sm_gte"]
NAMES = ["1.0", "*", "rms_norm", "attention.*", "torch", "torch_rms_norm", "torch_sdpa_flash", "../../etc/passwd",
         "/proc/self/mem", "os.system", "__import__('os')", "sm >= 80", "(a+)+$", "kernel == 'x'", "", "[",
         "*" * 300, "a" * 5000]
LEAVES = st.one_of(SCALARS, st.sampled_from(NAMES))
TREES = st.recursive(LEAVES, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), kids, max_size=5)), max_leaves=30)


@FAST
@given(TREES)
def test_policy_and_config_loaders_on_arbitrary_trees(tree: Any) -> None:
    for doc in (tree, {"version": "1.0", **tree} if isinstance(tree, dict) else tree):
        with only_layerzero_errors():
            load_policy(doc) if isinstance(doc, dict) else lz.configure(doc)
        with only_layerzero_errors():
            load_config(doc) if isinstance(doc, dict) else load_config(str(doc))


@FAST
@given(st.dictionaries(st.sampled_from(["locks", "allows", "denies", "boosts", "dispatch_rules", "kernel_locks",
                                        "kernel_allows", "kernel_denies", "fallback_chains", "defaults"]),
                       st.one_of(st.lists(st.dictionaries(st.sampled_from(KEYS), LEAVES, max_size=5), max_size=3),
                                 st.dictionaries(st.sampled_from(NAMES), LEAVES, max_size=3)), max_size=4))
def test_structured_documents(sections: dict[str, Any]) -> None:
    """Documents shaped like real ones, so the fuzzing reaches the per-rule validators."""
    doc = {"version": "1.0", **sections}
    with only_layerzero_errors():
        policy = load_policy(doc)
        for rule in policy.rules:
            for ctx in CONTEXTS:
                rule.holds(condition_env(ctx, "rms_norm", None))
    with only_layerzero_errors():
        load_config(doc)


@SLOW
@given(st.binary(max_size=2000), st.sampled_from(["policy.yaml", "policy.json", "policy.yml"]))
def test_loaders_on_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes, name: str) -> None:
    path = tmp_path_factory.mktemp("doc") / name
    path.write_bytes(raw)
    with only_layerzero_errors():
        lz.configure(str(path)).undo()
    with only_layerzero_errors():
        load_config(path)
    with only_layerzero_errors():
        load_policy(raw.decode("utf-8", "replace"))


@SLOW
@given(st.lists(st.one_of(st.binary(max_size=400), TREES.map(lambda t: repr(t).encode())), min_size=1, max_size=4))
def test_hot_reload_never_raises(tmp_path_factory: pytest.TempPathFactory, versions: list[bytes]) -> None:
    """reload() on arbitrary file contents returns True or False; the dispatcher keeps serving."""
    path = tmp_path_factory.mktemp("hot") / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n')
    d = create_hot_reload_dispatcher(config_path=path, start_watching=False)
    x, w = torch.randn(3, 8), torch.rand(8) + 0.5
    try:
        for raw in versions:
            path.write_bytes(raw)
            assert d.reload() in (True, False)
            out = d.dispatch("rms_norm", {"x": x, "weight": w}).output
            assert out.shape == x.shape and not torch.isnan(out).any()
        assert d.stats.total_reloads + d.stats.failed_reloads <= len(versions)
    finally:
        d.close()


# -- ops and dispatch() with arbitrary tensors and non-tensors ---------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
          torch.complex64, torch.uint8]


@st.composite
def tensors(draw: st.DrawFn, max_dims: int = 5, four_d: bool = False) -> torch.Tensor:
    ndim = 4 if four_d and draw(st.booleans()) else draw(st.integers(0, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    kind = draw(st.sampled_from(["plain", "plain", "strided", "transposed", "expanded", "sparse", "nested"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "strided" and ndim:
        strides = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
        need = 1 + sum((s - 1) * st_ for s, st_ in zip(shape, strides, strict=True) if s)
        base = torch.randn(max(need, 1), generator=g)
        t = base.as_strided(shape, strides)
    else:
        t = torch.randn(shape, generator=g) * 3
    t = t.to(dtype) if dtype is not torch.bool else t > 0
    if kind == "transposed" and ndim >= 2:
        t = t.transpose(0, -1)
    elif kind == "expanded" and ndim >= 1 and shape[0] == 1:
        t = t.expand(3, *shape[1:])
    elif kind == "sparse" and ndim >= 1 and dtype.is_floating_point:
        t = t.to_sparse()
    elif kind == "nested" and ndim == 2 and dtype.is_floating_point:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.nested.nested_tensor([t, t[:1]])
    if device == "meta":
        t = t.to("meta")
    return t


NON_TENSORS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                        st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                 max_size=2),
                        st.builds(object), st.just(torch.float32), st.just(torch.Generator()))
ARG = st.one_of(tensors(), NON_TENSORS)
FLOATISH = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10**20), NON_TENSORS)


def check_output(out: Any) -> None:
    assert isinstance(out, torch.Tensor)


@FAST
@given(st.one_of(tensors(four_d=True), NON_TENSORS), st.one_of(tensors(four_d=True), NON_TENSORS),
       st.one_of(tensors(four_d=True), NON_TENSORS),
       st.fixed_dictionaries({}, optional={
           "attn_mask": st.one_of(st.none(), tensors(max_dims=4), NON_TENSORS),
           "is_causal": st.one_of(st.booleans(), NON_TENSORS), "dropout_p": FLOATISH, "scale": FLOATISH,
           "layout": st.one_of(st.sampled_from(["BHSD", "BSHD", "bshd", ""]), NON_TENSORS),
           "window": st.one_of(st.integers(-2, 5), NON_TENSORS),
           "operation": st.one_of(st.sampled_from(["attention.causal", "attention.decode", "attention", "rms_norm",
                                                   "attention.", "attentionx"]), NON_TENSORS)}))
def test_attention_with_arbitrary_arguments(q: Any, k: Any, v: Any, kwargs: dict[str, Any]) -> None:
    with only_layerzero_errors():
        check_output(lz.attention(q, k, v, **kwargs))


# (required positional arguments, all positional arguments, keyword options) of each row-wise op
SIGNATURES = {"rms_norm": (1, 3, ("eps",)), "layer_norm": (1, 4, ("eps",)), "rope": (3, 4, ("interleaved",)),
              "swiglu": (2, 2, ()), "gelu": (1, 2, ("approximate",)), "silu": (1, 1, ()),
              "sample": (1, 5, ("temperature", "top_k", "top_p", "generator"))}


@FAST
@given(st.sampled_from(sorted(SIGNATURES)), st.data())
def test_row_ops_with_arbitrary_arguments(name: str, data: st.DataObject) -> None:
    required, positional, options = SIGNATURES[name]
    n = data.draw(st.integers(required, positional))
    args = data.draw(st.lists(ARG, min_size=n, max_size=n))
    kwargs = data.draw(st.dictionaries(st.sampled_from(options), st.one_of(FLOATISH, st.sampled_from(["none", "tanh"])),
                                       max_size=len(options))) if options and n == required else {}
    with only_layerzero_errors():
        check_output(getattr(lz, name)(*args, **kwargs))


@FAST
@given(st.one_of(st.sampled_from(["rms_norm", "attention.causal", "layer_norm", "gelu", "sample.top_k", "rope",
                                  "swiglu", "my_op", "attention", "Bad Name", "rms_norm.x", ""]), NON_TENSORS),
       st.one_of(st.dictionaries(st.sampled_from(["x", "q", "k", "v", "query", "key", "value", "weight", "eps",
                                                  "gate", "up", "logits", "cos", "sin", "layout", "is_causal"]),
                                 ARG, max_size=5), NON_TENSORS),
       st.dictionaries(st.sampled_from(["eps", "layout", "scale", "window", "is_causal", "temperature"]),
                       FLOATISH, max_size=2))
def test_dispatch_with_arbitrary_inputs(operation: Any, inputs: Any, kwargs: dict[str, Any]) -> None:
    with only_layerzero_errors():
        result = dispatch(operation, inputs, **kwargs)
        assert isinstance(result.kernel_id, str)


# Near-valid calls: right ranks and divisible heads, everything else varied (dtypes, GQA, masks, windows,
# scales, layouts, strides, repeated shapes so plans are cached). A call either raises a LayerZeroError or
# returns what the float64 reference returns; this found a cached plan being reused for a q with a strided
# last dimension, which PyTorch's CPU flash kernel turned into values around 1e19.

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                  scale: float | None, window: int | None) -> torch.Tensor:
    q64, k64, v64 = q.double(), k.double(), v.double()
    if q.shape[1] != k.shape[1]:
        k64 = k64.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v64 = v64.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = (q64 @ k64.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None]
    keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if causal or window is not None:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v64  # a row with no key left attends to nothing


TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@settings(max_examples=120, deadline=timedelta(seconds=5), derandomize=True)
@given(st.data())
def test_near_valid_attention_is_correct_or_rejected(data: st.DataObject) -> None:
    draw = data.draw
    hkv = draw(st.sampled_from([1, 2]))
    b, hq = draw(st.integers(1, 2)), hkv * draw(st.sampled_from([1, 2]))
    sq, sk, d = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(list(TOL)))
    causal, window = draw(st.booleans()), draw(st.sampled_from([None, None, 1, 2, 4]))
    mask_kind = "none" if causal else draw(st.sampled_from(["none", "bool", "additive"]))
    scale = draw(st.sampled_from([None, 0.5, 2.0]))
    layout, strided = draw(st.sampled_from(["BHSD", "BSHD"])), draw(st.sampled_from(["", "q", "k", "v"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 3)))  # few seeds: shapes repeat, plans get cached
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    q, k, v = ((t.transpose(-1, -2).contiguous().transpose(-1, -2) if strided == n else t)
               for n, t in (("q", q), ("k", k), ("v", v)))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(sq, sk, generator=g) > 0.3
        mask[:, 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(sq, sk, generator=g).to(dtype)
    args = (q, k, v) if layout == "BHSD" else tuple(t.transpose(1, 2) for t in (q, k, v))
    try:
        out = lz.attention(*args, attn_mask=mask, is_causal=causal, scale=scale, window=window, layout=layout)
    except LayerZeroError:
        return
    out = out if layout == "BHSD" else out.transpose(1, 2)
    want = attention_ref(q, k, v, mask, causal, scale, window)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@settings(max_examples=80, deadline=timedelta(seconds=5), derandomize=True)
@given(st.data())
def test_near_valid_norms_are_correct_or_rejected(data: st.DataObject) -> None:
    draw = data.draw
    rows, hidden = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(list(TOL)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 3)))
    x = torch.randn(hidden, rows, generator=g).to(dtype).t() if draw(st.booleans()) else \
        torch.randn(rows, hidden, generator=g).to(dtype)
    w = draw(st.sampled_from([None, "same", "float32"]))
    weight = None if w is None else (torch.rand(hidden, generator=g) + 0.5).to(dtype if w == "same" else torch.float32)
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    layer = draw(st.booleans())
    try:
        out = lz.layer_norm(x, weight, None, eps) if layer else lz.rms_norm(x, weight, eps)
    except LayerZeroError:
        return
    x64 = x.double()
    if layer:
        want = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + eps)
    else:
        want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        want = want * weight.double()
    tol = max(TOL[dtype], TOL[weight.dtype] if weight is not None else 0.0) * 10
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


# -- sequence mode: bad calls between valid calls of one family, shapes varying ----------------------------------
# A drawn sequence of calls to one operation: valid calls of several shapes (plans get cached, shape-free and
# exact) and near-valid mutations of them (a wrong rank, batch, dtype, scalar or mask; an arbitrary argument).
# Properties: every valid call returns the float64 reference, whatever came before it; no breaker ever counts a
# failure; every other call answers in the sequence exactly as it does as the first call of a fresh runtime.

def _attention_call(draw: st.DrawFn, g: torch.Generator) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    hkv = draw(st.sampled_from([1, 2]))
    b, hq = draw(st.integers(1, 2)), hkv * draw(st.sampled_from([1, 2]))
    sq, sk, d = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    causal = draw(st.booleans())
    kwargs = {"is_causal": causal, "scale": draw(st.sampled_from([None, 0.5])),
              "window": draw(st.sampled_from([None, 2])) if causal else None}
    return "attention", (q, k, v), kwargs


def _row_call(draw: st.DrawFn, g: torch.Generator) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    name = draw(st.sampled_from(["rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy"]))
    rows, hidden = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(rows, hidden, generator=g, dtype=dtype)
    if name == "rms_norm":
        return name, (x, torch.rand(hidden, generator=g, dtype=dtype) + 0.5), {"eps": 1e-6}
    if name == "layer_norm":
        return name, (x, torch.rand(hidden, generator=g, dtype=dtype) + 0.5, torch.randn(hidden, generator=g,
                                                                                         dtype=dtype)), {}
    if name == "swiglu":
        return name, (x, torch.randn(rows, hidden, generator=g, dtype=dtype)), {}
    if name == "rope":
        angles = torch.rand(rows, hidden // 2, generator=g, dtype=dtype) * 3
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return name, (x.view(1, 1, rows, hidden), cos, sin), {}
    return name, (x * 2, torch.randint(0, hidden, (rows,), generator=g)), {}


def _reference(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if name == "attention":
        return attention_ref(*args, None, kwargs["is_causal"], kwargs["scale"], kwargs["window"])
    a = [t.double() if t.is_floating_point() else t for t in args]
    if name == "rms_norm":
        return a[0] * torch.rsqrt(a[0].pow(2).mean(-1, keepdim=True) + 1e-6) * a[1]
    if name == "layer_norm":
        return torch.nn.functional.layer_norm(a[0], a[0].shape[-1:], a[1], a[2], 1e-5)
    if name == "swiglu":
        return torch.nn.functional.silu(a[0]) * a[1]
    if name == "rope":
        half = a[0].shape[-1] // 2
        rotated = torch.cat([-a[0][..., half:], a[0][..., :half]], -1)
        return a[0] * a[1] + rotated * a[2]
    return torch.nn.functional.cross_entropy(a[0], a[1])


def _mutate(draw: st.DrawFn, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A near-valid variant of a valid call (or one with an arbitrary argument)."""
    args, kwargs = list(args), dict(kwargs)
    first = args[0]
    kinds = ["arbitrary", "rank", "dtype", "empty"]
    if name == "attention":
        kinds += ["batch", "v shape", "heads", "zero heads", "scale", "is_causal", "window", "mask"]
    kind = draw(st.sampled_from(kinds))
    where = draw(st.integers(0, len(args) - 1))
    t = args[where]
    if kind == "arbitrary":
        args[where] = draw(ARG)
    elif kind == "rank":
        args[where] = t[0] if t.dim() > 1 and draw(st.booleans()) else t.unsqueeze(0)
    elif kind == "dtype":
        args[where] = t.to(draw(st.sampled_from([torch.float16, torch.int64, torch.float64, torch.float32])))
    elif kind == "empty":
        args[where] = t[..., :0] if draw(st.booleans()) or t.dim() < 2 else t[:0]
    elif kind == "batch":
        args[1], args[2] = (torch.cat([x, x]) for x in args[1:3])
    elif kind == "v shape":
        args[2] = torch.cat([args[2], args[2][..., :1]], -1) if draw(st.booleans()) else \
            torch.cat([args[2], args[2][..., :1, :]], -2)
    elif kind == "heads":
        args[1], args[2] = (torch.cat([x, x[:, :1]], 1) for x in args[1:3])
    elif kind == "zero heads":
        args[1], args[2] = (x[:, :0] for x in args[1:3])
    elif kind == "scale":
        kwargs["scale"] = draw(st.sampled_from([math.nan, math.inf, -math.inf, True, "0.5"])) \
            if draw(st.booleans()) else torch.tensor(0.5)
    elif kind == "is_causal":
        kwargs["is_causal"] = draw(st.sampled_from([1, 0, "yes", None]))
    elif kind == "window":
        kwargs["window"] = draw(st.sampled_from([2.0, -1, 0, True]))
    else:
        sq, sk = first.shape[2], args[1].shape[2]
        kwargs["is_causal"], kwargs["window"] = False, None
        kwargs["attn_mask"] = draw(st.sampled_from([
            torch.ones(sk, dtype=torch.bool), torch.ones(1, 1, 1, sq, sk, dtype=torch.bool),
            torch.ones(sq + 1, sk, dtype=torch.bool), torch.zeros(sq, sk, dtype=torch.int64),
            torch.zeros(sq, sk, dtype=torch.float16 if first.dtype != torch.float16 else torch.float32)]))
    return tuple(args), kwargs


def _answer(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What the call returns, or the type and text of the LayerZeroError it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(lz, name)(*args, **kwargs)
    except LayerZeroError as exc:
        return (type(exc), str(exc))


@settings(max_examples=60, deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(st.data())
def test_sequence_mode_answers_as_cold_and_keeps_good_kernels(data: st.DataObject) -> None:
    from layerzero.runtime import get_runtime

    rt = get_runtime()
    rt.reset()
    draw = data.draw
    make = draw(st.sampled_from([_attention_call, _row_call]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    others: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = []
    for _ in range(draw(st.integers(3, 9))):
        name, args, kwargs = make(draw, g)
        if draw(st.booleans()):  # a valid call, after whatever came before
            out = getattr(lz, name)(*args, **kwargs)
            want = _reference(name, args, kwargs)
            tol = 1e-4 if args[0].dtype == torch.float32 else 1e-8
            torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
        else:
            args, kwargs = _mutate(draw, name, args, kwargs)
            others.append((name, args, kwargs, _answer(name, args, kwargs)))
    assert [kid for kid, b in rt.breakers.all().items() if b.failures] == []
    for name, args, kwargs, warm in others:  # each again, as the first call of a fresh runtime
        rt.reset()
        cold = _answer(name, args, kwargs)
        if isinstance(cold, tuple) or isinstance(warm, tuple):
            assert warm == cold, (name, kwargs)
        else:
            torch.testing.assert_close(warm, cold, equal_nan=True)
    rt.reset()


def test_cached_plan_is_not_reused_for_a_strided_query() -> None:
    """Regression: same shapes, but q's last dimension strided: the CPU flash plan cached for the contiguous
    call must not see it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 6, generator=g), torch.randn(2, 1, 4, 6, generator=g), torch.randn(2, 1, 4, 6,
                                                                                                   generator=g)
    lz.attention(q, k, v, is_causal=True)
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert strided.stride(-1) != 1
    for _ in range(3):
        for out in (lz.attention(strided, k, v, is_causal=True),
                    dispatch("attention.causal", {"query": strided, "key": k, "value": v}).output):
            torch.testing.assert_close(out.double(), attention_ref(q, k, v, None, True, None, None), atol=1e-5,
                                       rtol=1e-5)


def test_valid_calls_still_work_after_fuzzing() -> None:
    """Bad input never trips a breaker, so after all of the above the good kernels still serve."""
    x, w = torch.randn(4, 8), torch.rand(8) + 0.5
    out = lz.rms_norm(x, w)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


# -- the performance database on corrupt files -------------------------------------------------------------------

def _good_db(path: Path, rows: int = 40) -> None:
    db = PerfDB(path)
    db.record([Record("hw", "torch=1", f"kernel_{i}", "rms_norm", "float32", f"b{i % 4}", 1.0 + i, 0.1, 5)
               for i in range(rows)], fingerprints={"hw": "{}"})
    db.close()


def _read_everything(path: Path) -> None:
    """Every reader: nothing may raise, and a lookup result is always well formed."""
    db = PerfDB(path, refresh_s=0.0)
    try:
        for bucket in ("b0", "b1", "zzz"):
            found = db.lookup("hw", "rms_norm", "float32", bucket)
            assert isinstance(found, dict)
            for kid, (libs, m) in found.items():
                assert isinstance(kid, str) and isinstance(libs, str)
                assert math.isfinite(m.median_us) and 0 <= m.median_us <= 1e12
        assert isinstance(db.rows(), list)
        assert isinstance(db.count(), int)
        assert isinstance(db.fingerprints(), dict)
    finally:
        db.close()


@SLOW
@given(st.binary(max_size=4096), st.booleans())
def test_perfdb_on_random_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes, sqlite_header: bool) -> None:
    path = tmp_path_factory.mktemp("db") / "perf.db"
    path.write_bytes((b"SQLite format 3\x00" if sqlite_header else b"") + raw)
    _read_everything(path)


@SLOW
@given(st.floats(0.0, 1.0), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8))
def test_perfdb_on_truncated_and_bit_flipped_files(tmp_path_factory: pytest.TempPathFactory, keep: float,
                                                    flips: list[tuple[float, int]]) -> None:
    path = tmp_path_factory.mktemp("db") / "perf.db"
    _good_db(path)
    data = bytearray(path.read_bytes())
    data = data[: max(int(len(data) * keep), 0)] if keep < 1.0 else data
    for where, byte in flips:
        if data:
            data[min(int(where * len(data)), len(data) - 1)] = byte
    path.write_bytes(bytes(data))
    _read_everything(path)


SQL_VALUES = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=40), st.binary(max_size=40),
                       st.sampled_from(["torch=1", "kernel_1", "x" * 600]))


@SLOW
@given(st.lists(st.fixed_dictionaries({c: SQL_VALUES for c in (
    "libraries", "kernel_id", "median_us", "spread_us", "samples", "failed", "error", "source")}), min_size=1,
    max_size=6), st.sampled_from(["ours", "foreign", "newer", "no-columns"]))
def test_perfdb_on_poisoned_rows_and_foreign_schemas(tmp_path_factory: pytest.TempPathFactory,
                                                     rows: list[dict[str, Any]], variant: str) -> None:
    path = tmp_path_factory.mktemp("db") / "perf.db"
    if variant == "ours":
        _good_db(path, rows=4)
    con = sqlite3.connect(path)
    if variant == "ours":
        for r in rows:
            con.execute("INSERT OR IGNORE INTO measurements (hardware, libraries, kernel_id, operation, dtype, "
                        "bucket, median_us, spread_us, samples, failed, error, source, updated) VALUES "
                        "('hw', ?, ?, 'rms_norm', 'float32', 'b0', ?, ?, ?, ?, ?, ?, 0)",
                        tuple(r[c] for c in ("libraries", "kernel_id", "median_us", "spread_us", "samples", "failed",
                                             "error", "source")))
    elif variant == "foreign":
        con.execute("CREATE TABLE measurements (hardware, kernel_id)")
    elif variant == "newer":
        con.execute("PRAGMA application_id = 1280987204")
        con.execute("PRAGMA user_version = 99")
    else:
        con.execute("PRAGMA application_id = 1280987204")
        con.execute("PRAGMA user_version = 1")
        con.execute("CREATE TABLE measurements (hardware TEXT)")
    con.commit()
    con.close()
    _read_everything(path)


def test_selection_survives_a_corrupt_database(tmp_path: Path) -> None:
    """The same corruption seen through lz.*: the call succeeds on priorities and the file is rebuilt."""
    path = tmp_path / "perf.db"
    _good_db(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    from layerzero.tuning import detach_perf_db, use_perf_db

    use_perf_db(path)
    try:
        x, w = torch.randn(5, 8), torch.rand(8) + 0.5
        for _ in range(3):
            assert lz.rms_norm(x, w).shape == x.shape
    finally:
        detach_perf_db()
