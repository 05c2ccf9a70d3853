"""Call contracts and the failure contract.

* Every ``lz.*`` entry looks up exactly the keys its :class:`CallContract` declares, and ``lookup`` (used by
  ``dispatch()``, ``Runtime.run_exact`` and the bench) finds the plan the entry runs.
* No cached plan serves an invalid call: for mutations of valid calls (other ranks, sizes, dtypes, scalar
  types and values), whenever the contract's lookup returns a plan, validation accepts the call.
* The failure contract: a kernel is blamed only when another kernel or the reference computes the call; a
  call nothing computes is the input's fault (nothing counted); out of memory is its own uncounted error;
  a retry restores the generator.
* Sequence mode: bad calls, then valid calls of the same families at varying shapes: every valid call is
  right and no breaker ever opens.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.errors import AllKernelsFailedError, InvalidInputError, LayerZeroError, OutOfMemoryError
from layerzero.ops import OPS
from layerzero.spec import KernelSpec

CONTRACT_OPS = [name for name, op in OPS.items() if op.calls is not None]


def public_call(name: str, operation: str, args: tuple[Any, ...]) -> Any:
    """The public ``lz.*`` call for canonical kernel arguments."""
    if name == "attention":
        q, k, v, mask, causal, p, scale, window = args
        return lz.attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p, scale=scale, window=window,
                            operation=operation)
    if name == "cross_entropy":
        logits, target, ii, ls, red = args
        return lz.cross_entropy(logits, target, ignore_index=ii, label_smoothing=ls, reduction=red)
    if name == "attention_varlen":
        *tensors, causal, scale, window, softcap = args
        return lz.attention_varlen(*tensors, is_causal=causal, scale=scale, window=window, softcap=softcap)
    if name == "attention_paged":
        *tensors, causal, scale, window, softcap = args
        return lz.attention_paged(*tensors, is_causal=causal, scale=scale, window=window, softcap=softcap)
    if name == "linear_cross_entropy":
        hidden, weight, target, bias, ii, ls, red, cap = args
        return lz.linear_cross_entropy(hidden, weight, target, bias, ignore_index=ii, label_smoothing=ls,
                                       reduction=red, softcap=cap)
    return getattr(lz, name)(*args)


def operations(name: str) -> list[str]:
    return {"attention": ["attention.full", "attention.causal"],
            "sample": ["sample.greedy", "sample.top_p"]}.get(name, [name])


class Recording(OrderedDict):
    def __init__(self, data: Any) -> None:
        super().__init__(data)
        self.seen: list[Any] = []

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.append(key)
        return super().get(key, default)


@pytest.mark.parametrize("name", CONTRACT_OPS)
def test_entry_looks_up_the_declared_keys(name: str, runtime: Any) -> None:
    op = OPS[name]
    gen = torch.Generator().manual_seed(7)
    for operation in operations(name):
        for ctx in op.sample_contexts(operation):
            args = op.make_inputs(operation, ctx, gen)
            public_call(name, operation, args)  # the miss caches the plan(s)
            family, key = op.keys(operation, args)
            runtime.plans.data = rec = Recording(runtime.plans.data)
            public_call(name, operation, args)
            assert rec.seen and set(rec.seen) <= {family, key}, (rec.seen, family, key)
            plan, f2, k2 = op.lookup(runtime.plans.data, operation, args)
            assert plan is not None and plan is rec.get(rec.seen[-1])
            assert f2 == family


def scalar_mutations(value: Any = None) -> list[Any]:
    """For a scalar or an absent (None) argument: other values, tensors that broadcast (an absent bias given
    as (1,) must not ride on the plan of a (vocab,) one), and the value itself as numpy and exact-fraction
    scalars (equal, so they find the plan its float or int made)."""
    out = [1, 0, True, False, 2.0, 0.5, float("nan"), float("inf"), -1, torch.tensor(0.5), "x", None, [1],
           10**400, -(10**400), 1e308, -0.5, torch.randn(1) + 0.5, torch.randn(2, 1) + 0.5]
    if type(value) in (int, float):
        out += [np.float32(value), np.float64(value), Fraction(value)]
        if type(value) is int:
            out += [np.int64(value), np.int32(value)]
    return out


def tensor_mutations(t: torch.Tensor) -> list[Any]:
    out: list[Any] = [t.unsqueeze(0), t[0] if t.dim() else t, t.double(), t.to(torch.int64), 2.0,
                      t.unsqueeze(0).expand(2, *t.shape),  # a leading dim that broadcasts against the others
                      t.to("meta")]  # another device, where CPU kernels may not raise (a CPU matmul with meta)
    if t.dim():
        out.append(t.narrow(-1, 0, 1))  # a last dim of 1: broadcasts where a full one belongs
        out.append(torch.cat([t, t], 0))
        out.append(t.narrow(-1, 0, max(t.shape[-1] - 1, 0)))
        out.append(t.narrow(0, 0, 0))
        out.append(t.narrow(-1, 0, 0))
    if t.dim() > 2:
        out.append(t.narrow(1, 0, 0))  # no heads
    if t.dim():
        out.append(t.to_sparse())  # a layout no key carries: sparse kernels may return a sparse result
    return out


def inference_mutations(valid: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """``valid`` with one tensor made under ``torch.inference_mode`` while a floating-point one requires grad
    (PyTorch refuses: autograd cannot save an inference tensor), for each pair of tensor arguments."""
    tensors = [i for i, a in enumerate(valid) if isinstance(a, torch.Tensor)]
    out = []
    for i in tensors:
        for j in tensors:
            if i == j or not valid[j].is_floating_point():
                continue
            with torch.inference_mode():
                frozen = valid[i].clone()
            args = list(valid)
            args[i], args[j] = frozen, valid[j].detach().clone().requires_grad_(True)
            out.append(tuple(args))
    return out


def answer(name: str, operation: str, args: tuple[Any, ...]) -> Any:
    try:
        out = public_call(name, operation, args)
    except LayerZeroError as exc:
        return type(exc).__name__, str(exc).splitlines()[0]
    return "ok", tuple(out.shape), out.dtype


def valid_calls(name: str, operation: str, gen: torch.Generator) -> list[tuple[Any, ...]]:
    """The family's sample calls, and the forms they leave out: a given bias, rope on a 2-D x."""
    op = OPS[name]
    calls = [op.make_inputs(operation, ctx, gen) for ctx in op.sample_contexts(operation)]
    if name == "linear_cross_entropy":
        hidden, weight, target, _, *rest = calls[0]
        calls.append((hidden, weight, target, torch.randn(weight.shape[0], generator=gen), *rest))
    if name == "rope":
        x, cos, sin, interleaved = calls[0]
        calls.append((x[0, 0], cos.reshape(-1, cos.shape[-1])[: x.shape[-2]],
                      sin.reshape(-1, sin.shape[-1])[: x.shape[-2]], interleaved))
    return calls


@pytest.mark.parametrize("name", CONTRACT_OPS)
def test_mutated_calls_answer_the_same_cold_and_warm(name: str, runtime: Any) -> None:
    """Mutations of valid calls (other ranks, sizes, dtypes, scalar types and values, shapes that broadcast) get
    the same answer after valid calls of their family (cached plans) as on a cold cache, and never open a
    breaker."""
    gen = torch.Generator().manual_seed(3)
    cases = []
    for operation in operations(name):
        for valid in valid_calls(name, operation, gen):
            for i, a in enumerate(valid):
                subs = tensor_mutations(a) if isinstance(a, torch.Tensor) else scalar_mutations(a)
                cases += [(operation, valid, (*valid[:i], sub, *valid[i + 1:])) for sub in subs]
            cases += [(operation, valid, args) for args in inference_mutations(valid)]
            # tensors of one shape (rope's cos and sin, swiglu's gate and up) mutated together
            for shape in {a.shape for a in valid if isinstance(a, torch.Tensor)}:
                same = [i for i, a in enumerate(valid) if isinstance(a, torch.Tensor) and a.shape == shape]
                for m in range(len(tensor_mutations(valid[same[0]])) if len(same) > 1 else 0):
                    cases.append((operation, valid, tuple(tensor_mutations(a)[m] if i in same else a
                                                          for i, a in enumerate(valid))))
    warm = []
    for operation, valid, args in cases:
        public_call(name, operation, valid)
        warm.append(answer(name, operation, args))
    assert not [(kid, b.failures) for kid, b in runtime.breakers.all().items() if b.failures]
    for (operation, _, args), got in zip(cases, warm, strict=True):
        runtime.reset()
        assert answer(name, operation, args) == got, args
    assert not any(b.failures for b in runtime.breakers.all().values())


# -- the failure contract -------------------------------------------------------------------------------------

@pytest.fixture
def kernels(runtime: Any):
    added: list[str] = []

    def add(spec: KernelSpec) -> KernelSpec:
        lz.register_kernel(spec)
        added.append(spec.kernel_id)
        return spec

    yield add
    for kid in added:
        runtime.kernels.unregister(kid)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], w, eps)


def test_kernel_that_fails_on_valid_input_is_blamed(runtime: Any, kernels: Any) -> None:
    def broken(x, w, eps):  # type: ignore[no-untyped-def]
        raise RuntimeError("broken kernel")

    kernels(KernelSpec("custom_broken_rms", "rms_norm", "custom", broken, priority=99))
    x, w = torch.randn(3, 8), torch.rand(8) + 0.5
    out = lz.rms_norm(x, w)
    torch.testing.assert_close(out, rms(x, w, 1e-6))
    assert runtime.breakers.get("custom_broken_rms").failures == 1


def test_a_kernel_that_needs_values_is_not_blamed_for_meta_tensors(runtime: Any, kernels: Any) -> None:
    """Meta tensors have shapes and no values: a kernel that reads values (``.item()``) fails on them, and the
    reference computing the shapes proves nothing against it. Another kernel serving the call, or none, counts
    nothing; the kernel still serves real tensors."""
    def reads_values(x, w, eps):  # type: ignore[no-untyped-def]
        if float(x.abs().max().item()) < 0:
            raise AssertionError
        return rms(x, w, eps)

    kernels(KernelSpec("custom_value_rms", "rms_norm", "custom", reads_values, priority=99))
    x, w = torch.randn(3, 8, device="meta"), torch.rand(8, device="meta")
    for _ in range(runtime.config.failure_threshold + 1):
        assert lz.rms_norm(x, w).device.type == "meta"  # the next kernel serves it
    assert runtime.breakers.get("custom_value_rms").failures == 0
    assert lz.which("rms_norm", torch.randn(3, 8), torch.ones(8)) == "custom_value_rms"
    logits = torch.randn(4, 50, device="meta")
    for _ in range(runtime.config.failure_threshold + 1):
        with pytest.raises(InvalidInputError, match="meta tensor"):
            lz.sample(logits, temperature=1.0)
    assert not any(b.failures for b in runtime.breakers.all().values())


def test_fake_tensors_run_and_blame_no_kernel(runtime: Any) -> None:
    """FakeTensors (``FakeTensorMode``: what torch.compile and export trace with) have shapes and no values, as
    meta tensors: sampling gives the shapes PyTorch gives (its output check reads no values then), and nothing is
    counted against a kernel; real calls after them are served as before."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.randn(4, 50)
        for _ in range(runtime.config.failure_threshold + 1):
            for kw in ({"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 0.8, "top_k": 5},
                       {"temperature": 0.8, "top_p": 0.9}):
                assert lz.sample(logits, **kw).shape == (4,)
    assert not any(b.failures for b in runtime.breakers.all().values())
    assert lz.sample(torch.randn(4, 50), temperature=0.0).shape == (4,)


def test_kernel_failing_on_bad_data_is_not_blamed(runtime: Any, kernels: Any) -> None:
    """Every kernel raises on out-of-range class ids and so would the reference: the input's fault."""
    logits = torch.randn(4, 10)
    lz.cross_entropy(logits, torch.tensor([1, 2, 3, 4]))
    for _ in range(runtime.config.failure_threshold + 2):
        with pytest.raises(InvalidInputError, match="outside \\[0, 10\\)"):
            lz.cross_entropy(logits, torch.tensor([1, 2, 30, 4]))
    assert not any(b.failures for b in runtime.breakers.all().values())
    torch.testing.assert_close(lz.cross_entropy(logits, torch.tensor([1, 2, 3, 4])),
                               F.cross_entropy(logits, torch.tensor([1, 2, 3, 4])))


def test_nothing_computes_the_call_means_invalid_input(runtime: Any, kernels: Any) -> None:
    """A user operation whose only kernel raises and which has no reference: nothing is shown valid."""
    def picky(x):  # type: ignore[no-untyped-def]
        raise ValueError("picky kernel refuses this")

    kernels(KernelSpec("custom_picky", "my_picky_op", "custom", picky, priority=50))
    for _ in range(runtime.config.failure_threshold + 1):
        with pytest.raises(InvalidInputError, match="custom_picky: ValueError: picky kernel refuses this"):
            lz.dispatch.dispatch("my_picky_op", {"x": torch.randn(2)})
    assert runtime.breakers.get("custom_picky").failures == 0


def test_single_kernel_failing_where_the_reference_computes_is_blamed(runtime: Any) -> None:
    """No fallback at all: the float64 reference computes the call, so the kernel is at fault."""
    def broken(x, w, eps):  # type: ignore[no-untyped-def]
        raise RuntimeError("always broken")

    lz.register_kernel(KernelSpec("custom_only_rms", "rms_norm", "custom", broken, priority=99))
    config = runtime.config
    try:
        runtime.configure(config.replace(enable_fallback=False))
        with pytest.raises(AllKernelsFailedError, match="custom_only_rms: RuntimeError: always broken"):
            lz.rms_norm(torch.randn(3, 8), torch.ones(8))
        assert runtime.breakers.get("custom_only_rms").failures == 1
    finally:
        runtime.configure(config)
        runtime.kernels.unregister("custom_only_rms")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_out_of_memory_is_not_a_kernel_fault(runtime: Any, kernels: Any, error: Exception) -> None:
    calls = {"fallback": 0}

    def hungry(x, w, eps):  # type: ignore[no-untyped-def]
        raise error

    kernels(KernelSpec("custom_hungry_rms", "rms_norm", "custom", hungry, priority=99))
    real = runtime.kernels.find("torch_rms_norm").impl
    for _ in range(runtime.config.failure_threshold + 1):
        before = runtime.telemetry.kernel("torch_rms_norm", "rms_norm").calls
        with pytest.raises(OutOfMemoryError, match="kernel custom_hungry_rms ran out of memory") as info:
            lz.rms_norm(torch.randn(3, 8), torch.ones(8))
        assert isinstance(info.value, torch.OutOfMemoryError) and isinstance(info.value, LayerZeroError)
        calls["fallback"] += runtime.telemetry.kernel("torch_rms_norm", "rms_norm").calls - before
    assert calls["fallback"] == 0  # never cascades to the next kernel
    assert runtime.breakers.get("custom_hungry_rms").failures == 0
    assert real is not None


def test_retry_restores_the_generator(runtime: Any, kernels: Any) -> None:
    """A kernel that draws random numbers and then raises: the fallback draws exactly what a clean call draws."""
    def greedy_then_broken(logits, temperature, top_k, top_p, generator):  # type: ignore[no-untyped-def]
        torch.rand(1000, generator=generator)
        raise RuntimeError("broken after drawing")

    logits = torch.randn(4, 50)
    want = lz.sample(logits, temperature=0.8, generator=torch.Generator().manual_seed(11))
    kernels(KernelSpec("custom_drawing_sampler", "sample", "custom", greedy_then_broken, priority=99))
    for _ in range(3):  # cold, then cached (the fast path's restore)
        got = lz.sample(logits, temperature=0.8, generator=torch.Generator().manual_seed(11))
        assert torch.equal(got, want)
    torch.manual_seed(5)
    want_global = lz.sample(logits, temperature=0.8)
    torch.manual_seed(5)
    assert torch.equal(lz.sample(logits, temperature=0.8), want_global)


# -- sequence mode -----------------------------------------------------------------------------------------

def bad_calls(size: int) -> list[Any]:
    q = torch.randn(1, 2, size, 8)
    x = torch.randn(size, 8)
    return [
        lambda: lz.attention(q[0], q[0], q[0]),
        lambda: lz.attention(q, torch.randn(2, 2, size, 8), torch.randn(2, 2, size, 8)),
        lambda: lz.attention(q, q, q, scale=math.inf),
        lambda: lz.attention(q, q, q, is_causal=1),
        lambda: lz.attention(q, q, q, attn_mask=torch.ones(1, 1, 1, size, size, dtype=torch.bool)),
        lambda: lz.attention(q, q, q, attn_mask=torch.ones(size, dtype=torch.bool)),
        lambda: lz.rms_norm(x.double(), torch.ones(8)),
        lambda: lz.layer_norm(x.double(), torch.ones(8), torch.ones(8)),
        lambda: lz.rope(q.bfloat16(), torch.randn(size, 8), torch.randn(size, 8)),
        lambda: lz.swiglu(x, x.double()),
        lambda: lz.sample(torch.full((2, 8), math.nan), temperature=1.0),
        lambda: lz.sample(x, temperature=1.0, top_p=1.5),
        lambda: lz.cross_entropy(torch.randn(4, 10), torch.tensor([1, 2, 30, 4])),
        lambda: lz.rms_norm(torch.randn(1, 64).expand(2**40, 64), torch.ones(64)),
    ]


def test_sequence_mode_bad_calls_never_disable_good_kernels(runtime: Any) -> None:
    for size, rep in itertools.product((3, 5, 8), range(runtime.config.failure_threshold + 1)):
        for bad in bad_calls(size):
            with pytest.raises(LayerZeroError):
                bad()
        q, k, v = (torch.randn(2, 4, size, 16) for _ in range(3))
        ref = torch.softmax((q.double() @ k.double().transpose(-2, -1)) / 4, -1) @ v.double()
        torch.testing.assert_close(lz.attention(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
        x, w = torch.randn(size, 8), torch.rand(8) + 0.5
        torch.testing.assert_close(lz.rms_norm(x, w), rms(x, w, 1e-6))
        logits = torch.randn(2, 8)
        seeded = [lz.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
        assert torch.equal(seeded[0], seeded[1])
    assert [kid for kid, b in runtime.breakers.all().items() if b.failures] == []


@pytest.mark.parametrize("temperature, scale", [(1e-39, 1.0), (1e-36, 2000.0), (5e-324, 1.0), (1e-30, 1.0)])
def test_a_tiny_temperature_samples_the_argmax(runtime: Any, temperature: float, scale: float) -> None:
    """The limit as T -> 0+ is the argmax (the reference clamps T at 1e-30). Logits / T used to overflow to
    inf, then NaN probabilities: the kernels raised (counted: after five calls torch_sample's breaker took every
    top-p call away) or the Gumbel kernel returned the first token."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]]) * scale
    want = logits.argmax(-1)
    for _ in range(6):
        for options in ({}, {"top_p": 0.9}, {"top_k": 2}):
            assert torch.equal(lz.sample(logits, temperature, **options), want), options
    for kid in ("torch_sample", "torch_sample_gumbel"):
        with lz.lock("sample.*", kid):
            assert torch.equal(lz.sample(logits, temperature), want), kid
    assert not any(b.failures for b in runtime.breakers.all().values())
    assert lz.sample(torch.randn(4, 100), 0.8, top_p=0.9).shape == (4,)


def test_a_first_call_under_autocast_blames_no_kernel(runtime: Any) -> None:
    """Under CPU autocast PyTorch's kernels return autocast's dtypes (cross-entropy float32 for bfloat16 logits,
    SDPA bfloat16 for float32 inputs); the output check wanted the inputs' dtype, counted each as a kernel
    failure and opened the breaker (every later cross_entropy call then raised NoKernelError for 30 s)."""
    logits, target = torch.randn(6, 50, dtype=torch.bfloat16), torch.randint(0, 50, (6,))
    q = torch.randn(1, 2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, want_loss = lz.cross_entropy(logits, target), F.cross_entropy(logits, target)
        out, want_out = lz.attention(q, q, q), F.scaled_dot_product_attention(q, q, q)
    assert loss.dtype == want_loss.dtype and out.dtype == want_out.dtype
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(out, want_out)
    assert not any(b.failures for b in runtime.breakers.all().values())
    big = torch.randn(128, 1000)
    torch.testing.assert_close(lz.cross_entropy(big, torch.zeros(128, dtype=torch.long)),
                               F.cross_entropy(big, torch.zeros(128, dtype=torch.long)))


@pytest.mark.parametrize("kernel", ["torch_linear_cross_entropy_naive", "torch_linear_cross_entropy_chunked"])
def test_every_target_ignored_gives_zero_gradients(runtime: Any, kernel: str) -> None:
    """A batch of prompt or padding only: the mean loss is NaN (0 / 0) as F.cross_entropy's, and the
    gradients are 0 as torch's; the chunked kernel divided them by a count of 0 (NaN weights after the step)."""
    h, w, b = (torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True),
               torch.randn(16, requires_grad=True))
    target = torch.full((4,), -100)
    with lz.lock("linear_cross_entropy", kernel):
        loss = lz.linear_cross_entropy(h, w, target, b, label_smoothing=0.1)
    assert torch.isnan(loss)
    loss.backward()
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
