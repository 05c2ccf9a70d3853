"""The compiled hot path (``layerzero.accel``, ``src/layerzero/_accel*.c``) against the Python entries it serves for
(``lz.attention``, ``lz.rms_norm``, ``lz.layer_norm``).

* It is built wherever it can be (a C++ compiler and torch's headers: every machine the README's commands set up).
* Differential: for a grid of valid and invalid calls (ranks, sizes, GQA, dtypes, layouts, masks, scalar types
  and values, subclasses, variants, operation names), ``lz.attention`` answers exactly as the generated Python
  entry does: the same output, or the same error type and message, and the same call counts; the compiled
  ``find`` / ``admits`` agree with the contract's Python ``lookup`` / ``shapes_admit``.
* The compiled hit serves the plain cached call (it is not a pass-through), takes no reference it does not give
  back (hit, miss and failure paths), hands a kernel's exception to the failure contract, and leaves every call
  to Python with ``LAYERZERO_PURE_PYTHON=1``.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero import accel
from layerzero.errors import LayerZeroError
from layerzero.ops.attention import ATTENTION
from layerzero.ops.norms import LAYER_NORM, RMS_NORM
from layerzero.runtime import get_runtime

CALLS = ATTENTION.calls
COMPILED = CALLS.compiled
needs_compiled = pytest.mark.skipif(COMPILED is None, reason=f"compiled hot path not in use: {accel.status()}")


def _can_build() -> bool:
    torch_dir = Path(torch.__file__).parent
    headers = (torch_dir / "include" / "torch" / "csrc" / "autograd" / "python_variable.h").is_file()
    python_h = (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
    return headers and python_h and (shutil.which("c++") or shutil.which("g++")) is not None


def test_extension_is_in_use_wherever_it_can_be_built() -> None:
    if os.environ.get("LAYERZERO_PURE_PYTHON", "").strip() not in ("", "0"):
        pytest.skip("LAYERZERO_PURE_PYTHON is set")
    if not _can_build():
        pytest.skip("no C++ compiler, Python headers or torch headers here: layerzero installs without it")
    assert accel.status() == "compiled", accel.status()
    assert COMPILED is not None and lz.attention is not CALLS.python_entry
    assert type(lz.attention).__name__ == "builtin_function_or_method"


@pytest.mark.parametrize("op", [ATTENTION, RMS_NORM, LAYER_NORM], ids=["attention", "rms_norm", "layer_norm"])
def test_compiled_entry_looks_like_the_python_one(op: Any) -> None:
    public, py = op.calls.entry, op.calls.python_entry
    assert inspect.signature(public) == inspect.signature(py)
    assert public.__doc__ == py.__doc__
    assert public.__name__ == py.__name__ == op.contract.name
    assert public.__module__ == py.__module__


# -- the differential grid ---------------------------------------------------------------------------------

class Sub(torch.Tensor):
    """A tensor subclass: the compiled path leaves it to Python (its attribute reads may be overridden)."""


def _tensors() -> list[tuple[str, tuple[Any, Any, Any]]]:
    g = torch.Generator().manual_seed(3)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = r(2, 4, 5, 8), r(2, 4, 7, 8), r(2, 4, 7, 8)
    return [
        ("mha", (q, k, v)),
        ("gqa", (r(2, 8, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 8))),
        ("mqa", (r(1, 4, 1, 8), r(1, 1, 9, 8), r(1, 1, 9, 8))),
        ("decode", (r(1, 8, 1, 16), r(1, 8, 33, 16), r(1, 8, 33, 16))),
        ("bf16", (q.bfloat16(), k.bfloat16(), v.bfloat16())),
        ("f64", (q.double(), k.double(), v.double())),
        ("mixed dtypes", (q, k.double(), v)),
        ("3-D q", (q[0], k, v)),
        ("3-D all", (q[0], k[0], v[0])),
        ("5-D q", (q.unsqueeze(0), k, v)),
        ("batch broadcast", (q[:1], k, v)),
        ("batch mismatch", (q, k[:1], v[:1])),
        ("v other length", (q, k, r(2, 4, 6, 8))),
        ("v other dim", (q, k, r(2, 4, 7, 4))),
        ("head dim mismatch", (r(2, 4, 5, 4), k, v)),
        ("heads not divisible", (r(2, 3, 5, 8), k[:, :2], v[:, :2])),
        ("zero batch", (q[:0], k[:0], v[:0])),
        ("zero queries", (q[:, :, :0], k, v)),
        ("zero keys", (q, k[:, :, :0], v[:, :, :0])),
        ("zero kv heads", (q, k[:, :0], v[:, :0])),
        ("transposed", (q.transpose(1, 2).contiguous().transpose(1, 2), k, v)),
        ("expanded k", (q, k[:, :1].expand(2, 4, 7, 8), v)),
        ("subclass", (q.as_subclass(Sub), k.as_subclass(Sub), v.as_subclass(Sub))),
        ("int tensors", (q.long(), k.long(), v.long())),
        ("not tensors", (1.0, k, v)),
        ("list", ([1.0], k, v)),
        ("needs grad", (q.clone().requires_grad_(), k, v)),
    ]


def _options() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(4)
    out: list[dict[str, Any]] = [{}]
    out += [{"is_causal": c} for c in (True, False, 1, 0, None)]
    out += [{"scale": s} for s in (0.5, 2, float("nan"), float("inf"), True, "x", None)]
    out += [{"dropout_p": p} for p in (0.0, 0, 0.5)]
    out += [{"window": w} for w in (2, 2.0, 0, -1, None)]
    out += [{"attn_mask": torch.randn(5, 7, generator=g)}, {"attn_mask": torch.rand(5, 7, generator=g) > 0.3},
            {"attn_mask": torch.randn(2, 1, 5, 7, generator=g)}, {"attn_mask": "mask"}]
    out += [{"layout": "BSHD"}, {"layout": "bhsd"}, {"layout": "BHSD"}]
    out += [{"softcap": 30.0}, {"operation": "attention.causal"}, {"operation": "attention.full"},
            {"operation": "attention"}, {"operation": "rms_norm"}, {"is_causal": True, "scale": 0.25},
            {"is_causal": False, "window": 3, "scale": 1.5}]
    return out


def _answer(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    torch.manual_seed(11)  # dropout draws the same numbers through both entries
    try:
        out = fn(*args, **kwargs)
    except (LayerZeroError, TypeError, RuntimeError, ValueError) as exc:
        return ("raised", type(exc).__name__, str(exc))
    return ("ok", out)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "raised":
        return a[1:] == b[1:]
    x, y = a[1], b[1]
    return type(x) is type(y) and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)


def _calls(runtime: Any) -> int:
    return sum(s.calls for s in list(runtime.telemetry.kernels.values()))


@needs_compiled
def test_compiled_and_python_entries_answer_alike(runtime: Any) -> None:
    """Every call of the grid through both entries, once the Python entry has made the call (cached what it
    caches): the same answer, the same call counts."""
    for (name, args), kwargs in itertools.product(_tensors(), _options()):
        _compare(runtime, ATTENTION, args, kwargs, (name, kwargs))


def _compare(runtime: Any, op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], label: Any) -> None:
    """``op``'s public (compiled) and Python entries, twice each after one Python call: same answers and counts."""
    public, py = op.calls.entry, op.calls.python_entry
    _answer(py, args, kwargs)
    for _ in range(2):
        before = _calls(runtime)
        expected = _answer(py, args, kwargs)
        counted_py = _calls(runtime) - before
        before = _calls(runtime)
        got = _answer(public, args, kwargs)
        counted_c = _calls(runtime) - before
        assert _same(got, expected), (label, got[:3], expected[:3])
        assert counted_c == counted_py, (label, counted_c, counted_py)


def _norm_calls() -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(3, 5, 16, generator=g), torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    xs = [("2-D", x[0]), ("3-D", x), ("bf16", x.bfloat16()), ("f64", x.double()), ("empty rows", x[:0]),
          ("0-D", torch.tensor(1.0)), ("strided", x.transpose(0, 1)), ("subclass", x.as_subclass(Sub)),
          ("int", x.long()), ("other width", torch.randn(4, 8, generator=g)), ("not a tensor", 1.0)]
    out = []
    for (name, t), (wname, wargs), eps in itertools.product(
            xs, [("no weight", ()), ("weight", (w,)), ("weight f64", (w.double(),)), ("short weight", (w[:8],)),
                 ("parameter", (torch.nn.Parameter(w.clone()),)), ("weight by name", None)], (None, 1e-5, 0, True, torch.tensor(1e-5), "x")):
        kwargs: dict[str, Any] = {} if eps is None else {"eps": eps}
        args: tuple[Any, ...] = (t, *wargs) if wargs is not None else (t,)
        if wargs is None:
            kwargs["weight"] = w
        out.append((f"{name}, {wname}, eps={eps!r}", args, kwargs))
    return out


@needs_compiled
@pytest.mark.parametrize("op", [RMS_NORM, LAYER_NORM], ids=["rms_norm", "layer_norm"])
def test_compiled_and_python_norms_answer_alike(runtime: Any, op: Any) -> None:
    assert op.calls.compiled is not None and op.calls.entry is not op.calls.python_entry
    bias = torch.randn(16)
    for name, args, kwargs in _norm_calls():
        if op is LAYER_NORM and len(args) == 2:
            args = (*args, bias)
        _compare(runtime, op, args, kwargs, name)


@needs_compiled
def test_binding_errors_are_python_s(runtime: Any) -> None:
    q = torch.randn(1, 2, 3, 4)
    for args, kwargs in [((q, q), {}), ((q, q, q, None), {}), ((q, q, q), {"causal": True}),
                         ((), {"q": q, "k": q}), ((q, q), {"v": q, "k": q})]:
        assert _answer(lz.attention, args, kwargs) == _answer(CALLS.python_entry, args, kwargs)
    out = lz.attention(q=q, k=q, v=q)  # by name: bound by Python, then cached as usual
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


@needs_compiled
def test_find_and_admits_agree_with_the_contract(runtime: Any) -> None:
    for (name, (q, k, v)), causal in itertools.product(_tensors(), (False, True)):
        operation = "attention.causal" if causal else "attention.full"
        args = (q, k, v, None, causal, 0.0, None, None)
        _answer(lz.attention, (q, k, v), {"is_causal": causal})  # caches a plan where the call is valid
        plan, _, _ = CALLS.lookup(runtime.plans.data, operation, *args)
        found = COMPILED.find(runtime.plans.data, operation, q, k, v, causal, 0.0, None)
        python_reads = type(q) is not torch.Tensor or getattr(q, "dim", lambda: 0)() != 4
        assert found is plan or (found is None and python_reads), name
        admitted = COMPILED.admits(q, k, v)
        assert admitted == bool(CALLS.shapes_admit(operation, *args)) or (not admitted and python_reads), name


@needs_compiled
def test_the_compiled_hit_serves_the_plain_cached_call(runtime: Any) -> None:
    q, k, v = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 20, 16), torch.randn(1, 8, 20, 16)
    raw = (None, False, 0.0, None, "BHSD", None, None, None, None, None, None)  # ... operation, enable_gqa
    assert COMPILED(q, k, v, *raw) is accel.MISS  # nothing cached yet: the Python entry selects
    lz.attention(q, k, v)
    out = COMPILED(q, k, v, *raw)
    assert out is not accel.MISS
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    mask = torch.randn(1, 20)
    lz.attention(q, k, v, attn_mask=mask)  # an exact-shape plan with a mask
    assert COMPILED(q, k, v, mask, *raw[1:]) is not accel.MISS
    with lz.disabled("flash_attn"):  # an open policy scope: its own plans, which the Python entry finds
        assert COMPILED(q, k, v, *raw) is accel.MISS
        torch.testing.assert_close(lz.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert COMPILED(q, k, v, "x", *raw[1:]) is accel.MISS  # a mask that is no tensor: Python reports it
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BSHD: served as BHSD views
    bshd = (*raw[:4], "BSHD", *raw[5:])
    out = COMPILED(qs, ks, vs, *bshd)
    assert out is not accel.MISS and out.shape == qs.shape
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    x, w = torch.randn(3, 16), torch.rand(16)
    assert RMS_NORM.calls.compiled(x, w, 1e-6) is accel.MISS
    lz.rms_norm(x, w)
    torch.testing.assert_close(RMS_NORM.calls.compiled(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))
    p = torch.nn.Parameter(w.clone())  # a module's weight: read as the tensor it is
    torch.testing.assert_close(RMS_NORM.calls.compiled(x, p, 1e-6), F.rms_norm(x, (16,), p, 1e-6))
    lz.layer_norm(x, w, None)
    torch.testing.assert_close(LAYER_NORM.calls.compiled(x, w, None, 1e-5), F.layer_norm(x, (16,), w, None, 1e-5))


@needs_compiled
def test_no_reference_is_leaked(runtime: Any) -> None:
    """Hit, miss and failure paths give back every reference they take (refcounts stay put over many calls)."""
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    lz.attention(q, k, v)
    lz.attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool))
    plan = CALLS.lookup(runtime.plans.data, "attention.full", q, k, v, None, False, 0.0, None, None)[0]
    mask = torch.ones(3, 5, dtype=torch.bool)
    x, w = torch.randn(2, 8), torch.rand(8)
    watched = [q, k, v, mask, plan, q.dtype, plan.stats, torch.float32, x, w]

    def counts() -> list[int]:
        gc.collect()
        return [sys.getrefcount(o) for o in watched]

    def run(n: int) -> None:
        for _ in range(n):
            lz.attention(q, k, v)  # hit
            lz.attention(q, k, v, attn_mask=mask)  # hit through the exact key
            lz.attention(q, k, v, scale=0.5)  # hit through plan.fn
            lz.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BSHD")  # Python
            lz.rms_norm(x, w)
            lz.layer_norm(x, w, w)
            COMPILED.find(runtime.plans.data, "attention.full", q, k, v, False, 0.0, None)
            COMPILED.admits(q, k, v)
            try:
                lz.attention(q[0], k, v)  # miss, then validation raises
            except LayerZeroError:
                pass

    run(10)
    before = counts()
    run(300)
    assert counts() == before


@needs_compiled
def test_a_failing_kernel_goes_to_the_failure_contract(runtime: Any) -> None:
    """The compiled hit hands a kernel's exception to ``Runtime.recover``, as the Python entry does."""
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    lz.attention(q, k, v)
    plan = CALLS.lookup(runtime.plans.data, "attention.full", q, k, v, None, False, 0.0, None, None)[0]
    seen = []

    def broken(*args: Any) -> Any:
        seen.append(len(args))
        raise RuntimeError("broken direct kernel")

    plan.direct = broken
    out = lz.attention(q, k, v)  # recovered: the executor runs the plan again, then falls back or blames
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert seen == [3]


def test_pure_python_mode_leaves_every_call_to_python(tmp_path: Path) -> None:
    code = ("import layerzero as lz, layerzero.accel as a, torch, types; q = torch.randn(1, 2, 3, 4); "
            "lz.attention(q, q, q); print(a.status()); print(isinstance(lz.attention, types.FunctionType)); "
            "print(lz.ops.ATTENTION.calls.compiled)")
    env = {**os.environ, "LAYERZERO_PURE_PYTHON": "1", "LAYERZERO_PERF_DB": str(tmp_path / "perf.db")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["pure Python: LAYERZERO_PURE_PYTHON is set", "True", "None"]


def test_an_extension_built_for_another_torch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    if accel.status() != "compiled":
        pytest.skip(accel.status())
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    module, why = accel._load()
    assert module is None and "built for torch" in why and "0.0.0-other" in why


def test_lz_attention_pickles_by_reference() -> None:
    """A model holding ``lz.attention`` (or a partial of it) still pickles: the function is named, not copied."""
    import copy
    import functools
    import pickle

    assert pickle.loads(pickle.dumps(lz.attention)) is lz.attention
    assert pickle.loads(pickle.dumps(lz.rms_norm)) is lz.rms_norm
    assert pickle.loads(pickle.dumps(lz.layer_norm)) is lz.layer_norm
    part = pickle.loads(pickle.dumps(functools.partial(lz.attention, is_causal=True)))
    assert part.func is lz.attention
    assert copy.deepcopy(lz.attention) is lz.attention
    code = "import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); import layerzero as lz; print(f is lz.attention)"
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(lz.attention), capture_output=True,
                         timeout=120)
    assert out.stdout.strip() == b"True", out.stderr  # a fresh process (the pickle imports layerzero)


@pytest.mark.gpu
@needs_compiled
def test_cuda_tensors_take_the_compiled_hit(runtime: Any) -> None:
    """On a GPU: the device key (a cached ``torch.device``) matches the Python one, and CUDA calls hit."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    py = CALLS.python_entry
    raw = (None, False, 0.0, None, "BHSD", None, None, None, None, None, None)  # ... operation, enable_gqa
    for dtype, (hq, hk) in itertools.product((torch.float16, torch.bfloat16, torch.float32), ((8, 8), (8, 2))):
        q = torch.randn(2, hq, 5, 64, device=dev, dtype=dtype, generator=g)
        k = torch.randn(2, hk, 33, 64, device=dev, dtype=dtype, generator=g)
        v = torch.randn(2, hk, 33, 64, device=dev, dtype=dtype, generator=g)
        for kwargs in ({}, {"is_causal": True}, {"scale": 0.5}):
            expected = _answer(py, (q, k, v), kwargs)
            assert _same(_answer(lz.attention, (q, k, v), kwargs), expected), (dtype, hq, hk, kwargs)
        assert COMPILED(q, k, v, *raw) is not accel.MISS
        assert COMPILED.find(runtime.plans.data, "attention.full", q, k, v, False, 0.0, None) is \
            CALLS.lookup(runtime.plans.data, "attention.full", q, k, v, None, False, 0.0, None, None)[0]


@needs_compiled
def test_a_class_attribute_assigned_later_is_honoured(runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled hit reads plan slots at their offsets, as CPython's own attribute caches do; assigning the
    class attribute changes the type's version, and the next call reads through the new descriptor."""
    from layerzero.selection.plan import ExecutionPlan

    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    lz.attention(q, k, v)
    lz.attention(q, k, v)  # the slot offsets are learnt
    seen = []

    def recording(*args: Any) -> Any:
        seen.append(len(args))
        return F.scaled_dot_product_attention(*args)

    monkeypatch.setattr(ExecutionPlan, "direct", property(lambda plan: recording))
    torch.testing.assert_close(lz.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert seen == [3]


def test_doctor_warns_when_the_extension_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not built (or built for another torch) and not turned off: ``layerzero doctor`` says what it costs."""
    monkeypatch.delenv("LAYERZERO_PURE_PYTHON", raising=False)
    monkeypatch.setattr(accel, "_accel", None)
    monkeypatch.setattr(accel, "_why_not", "the extension is not built (no module named layerzero._accel)")
    report = lz.doctor()
    assert report.extra["config"]["hot_path"].startswith("pure Python: the extension is not built")
    assert any("run in Python" in w and "reinstall" in w for w in report.warnings)
    monkeypatch.setenv("LAYERZERO_PURE_PYTHON", "1")  # turned off on purpose: no warning
    assert not any("run in Python" in w for w in lz.doctor().warnings)
