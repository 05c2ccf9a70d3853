"""STATIC dispatch: the builder, static_kernel_map, resolve() identity, build-time errors, telemetry off."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.dispatch import (
    DispatchConfig,
    DispatchMode,
    StaticDispatcherBuilder,
    create_static_dispatcher,
)
from layerzero.errors import ConfigError, InvalidInputError, NoKernelError
from layerzero.ops.attention import attention_reference
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec


def flash_attn(q, k, v, attn_mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)


def rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    return torch.rms_norm(x, x.shape[-1:], weight, eps)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, 8, 16, generator=g) for _ in range(3))


def test_builder_with_plain_callables():
    d = (StaticDispatcherBuilder()
         .with_kernel(flash_attn, operation="attention.causal", default=True)
         .with_kernel(rms_norm, operation="rms_norm", default=True)
         .with_config(enable_telemetry=False)
         .build())
    assert d.resolve("attention.causal") is flash_attn
    assert d.resolve("rms_norm") is rms_norm
    assert d.mode is DispatchMode.STATIC and d.config.mode is DispatchMode.STATIC
    assert d.runtime is not get_runtime()  # its telemetry switch does not touch lz.*
    assert get_runtime().config.enable_telemetry == get_runtime().telemetry.enabled
    q, k, v = _qkv()
    r = d.dispatch("attention.causal", {"query": q, "key": k, "value": v})
    torch.testing.assert_close(r.output.double(), attention_reference(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    assert (r.kernel_id, r.mode, r.fallback_used) == ("flash_attn", "static", False)
    tel = d.get_telemetry()
    assert not tel.enabled and tel.total_calls == 0 and tel.cache_stats.misses == 0


def test_builder_with_spec_and_registered_id():
    spec = KernelSpec("my_rms", "rms_norm", "custom", rms_norm)
    d = (StaticDispatcherBuilder()
         .with_kernel(spec, default=True)
         .with_kernel("torch_sdpa_math", operation="attention.causal")
         .build())
    assert d.resolve("rms_norm") is rms_norm
    assert d.resolve("attention.causal") is lz.get_global_kernel_registry().get("torch_sdpa_math").impl
    assert set(d.operations) == {"rms_norm", "attention.causal"}
    x = torch.randn(3, 8)
    torch.testing.assert_close(d.dispatch("rms_norm", {"x": x}).output, rms_norm(x, None, 1e-6))


def test_static_kernel_map_resolves_against_the_registry():
    cfg = DispatchConfig(mode=DispatchMode.STATIC, static_kernel_map={
        "attention.causal": "torch_sdpa_math", "attention.cross": "torch_sdpa_math", "rms_norm": "torch_rms_norm"})
    before = get_runtime().config
    d = create_static_dispatcher(cfg)
    # global registries, a config of its own: a runtime derived from the global one (same registries and
    # policy, own config), and lz.* keeps its config
    assert d.runtime.parent is get_runtime() and d.runtime.kernels is get_runtime().kernels
    assert d.runtime.policy is get_runtime().policy and get_runtime().config is before
    reg = lz.get_global_kernel_registry()
    assert d.resolve("rms_norm") is reg.get("torch_rms_norm").impl
    q, k, v = _qkv(1)
    r = d.dispatch("attention.cross", {"q": q, "k": k[:, :, :5], "v": v[:, :, :5]})
    want = attention_reference(q, k[:, :, :5], v[:, :, :5])
    torch.testing.assert_close(r.output.double(), want, atol=1e-5, rtol=1e-5)
    causal = d.dispatch("attention.causal", {"q": q, "k": k, "v": v}).output
    torch.testing.assert_close(causal.double(), attention_reference(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    # The builder reads the same map.
    b = StaticDispatcherBuilder().with_config(cfg).build()
    assert b.resolve("attention.cross") is reg.get("torch_sdpa_math").impl


def test_bad_static_entries_fail_at_build_with_every_problem():
    cfg = DispatchConfig(mode=DispatchMode.STATIC, static_kernel_map={
        "rms_norm": "torch_rms_nrom", "attention.causal": "torch_rms_norm"})
    with pytest.raises(ConfigError) as err:
        create_static_dispatcher(cfg)
    first, second = err.value.errors
    assert first.startswith("static_kernel_map['rms_norm']: unknown kernel 'torch_rms_nrom'; did you mean torch_rms_norm")
    assert second == ("static_kernel_map['attention.causal']: kernel 'torch_rms_norm' implements 'rms_norm', "
                      "not 'attention.causal'")
    assert first in str(err.value) and second in str(err.value)
    with pytest.raises(ConfigError, match=r"already has a default kernel"):
        (StaticDispatcherBuilder().with_kernel(rms_norm, operation="rms_norm", default=True)
         .with_kernel(flash_attn, operation="rms_norm", default=True).build())
    with pytest.raises(InvalidInputError, match=r"operation= is required"):
        StaticDispatcherBuilder().with_kernel(rms_norm)


def test_unavailable_backend_is_a_build_error():
    backends = BackendRegistry()
    backends.register("test_missing_lib", module="layerzero_test_no_such_module", pip="pip install no-such-module")
    spec = KernelSpec("test_missing_rms", "rms_norm", "test_missing_lib", rms_norm)
    with pytest.raises(ConfigError, match=r"cannot run here: test_missing_lib is not available: python package "
                                          r"'layerzero_test_no_such_module' is not installed \(install with: pip"):
        StaticDispatcherBuilder().with_registries(KernelRegistry(), backends).with_kernel(spec, default=True).build()


def test_unknown_operation_names_what_is_served():
    d = StaticDispatcherBuilder().with_kernel(rms_norm, operation="rms_norm", default=True).build()
    with pytest.raises(NoKernelError, match=r"no kernel for 'layer_norm' \(it serves: rms_norm\)"):
        d.dispatch("layer_norm", {"x": torch.randn(2, 4)})
    with pytest.raises(NoKernelError, match=r"it serves: rms_norm"):
        d.resolve("layer_norm")


def test_static_user_operation_gets_keyword_arguments():
    def fused_bias_gelu(x, bias):
        return torch.nn.functional.gelu(x + bias)

    d = StaticDispatcherBuilder().with_kernel(fused_bias_gelu, operation="my.bias_gelu", default=True).build()
    x, b = torch.randn(4, 8), torch.randn(8)
    assert d.resolve("my.bias_gelu") is fused_bias_gelu
    torch.testing.assert_close(d.dispatch("my.bias_gelu", {"x": x, "bias": b}).output, fused_bias_gelu(x, b))


def test_static_timing_is_recorded_when_asked():
    d = (StaticDispatcherBuilder().with_kernel(rms_norm, operation="rms_norm", default=True)
         .with_config(record_timing=True).build())
    t = d.dispatch("rms_norm", {"x": torch.randn(4, 64)}).timing
    assert t.recorded and t.kernel_invoke_ns > 0 and t.total_us >= t.execution_us > 0


def test_a_kernel_is_never_handed_an_option_it_does_not_implement():
    """torch_sdpa takes no window and torch_rope no interleaved layout: a static table naming them used to run
    them anyway (plain causal attention for window=3, rotate-half rope for interleaved=True) and report them as
    the kernel. The call goes to the table's first kernel that declares the option, or is refused naming each
    kernel's reason, cold and warm."""
    import math

    from layerzero.errors import KernelNotSupportedError

    q, k, v = _qkv(3)
    qkv = {"q": q, "k": k, "v": v}
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    band = (i - j < 3) & (j <= i)
    scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(16)).masked_fill(~band, float("-inf"))
    want = scores.softmax(-1) @ v.double()
    alone = create_static_dispatcher(DispatchConfig(mode=DispatchMode.STATIC,
                                                    static_kernel_map={"attention.sliding_window": "torch_sdpa"}))
    for _ in range(3):
        with pytest.raises(KernelNotSupportedError, match="torch_sdpa: sliding window=3 is not supported"):
            alone.dispatch("attention.sliding_window", qkv, window=3, is_causal=True)
        alone.dispatch("attention.sliding_window", qkv, is_causal=True)  # no window: it serves (and is hot)
    both = (StaticDispatcherBuilder().with_kernel("torch_sdpa", "attention.causal", default=True)
            .with_kernel("torch_sdpa_math", "attention.causal").build())
    for _ in range(3):
        r = both.dispatch("attention.causal", qkv, window=3, is_causal=True)
        assert r.kernel_id == "torch_sdpa_math"
        torch.testing.assert_close(r.output.double(), want, atol=1e-5, rtol=1e-5)
        assert both.dispatch("attention.causal", qkv).kernel_id == "torch_sdpa"
    rope = create_static_dispatcher(DispatchConfig(mode=DispatchMode.STATIC, static_kernel_map={"rope": "torch_rope"}))
    x, cos, sin = torch.randn(1, 2, 8, 16), torch.randn(8, 16), torch.randn(8, 16)
    rope.dispatch("rope", {"x": x, "cos": cos, "sin": sin})
    with pytest.raises(KernelNotSupportedError, match="torch_rope: rope variant interleaved"):
        rope.dispatch("rope", {"x": x, "cos": cos, "sin": sin}, interleaved=True)


def test_a_plain_callable_is_handed_the_window():
    """A plain callable takes the canonical arguments, window among them: honouring it is its own business."""
    seen = []

    def mine(q, k, v, attn_mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
        seen.append(window)
        return flash_attn(q, k, v, attn_mask, is_causal, dropout_p, scale, window)

    d = StaticDispatcherBuilder().with_kernel(mine, operation="attention.causal", default=True).build()
    q, k, v = _qkv()
    d.dispatch("attention.causal", {"q": q, "k": k, "v": v}, window=4, is_causal=True)
    assert seen == [4]


def test_a_refused_call_keeps_nothing_of_its_inputs():
    """The refusal is memoized per key; the memo used to be the exception itself, re-raised each time, so every
    refused call's frames (and tensors) piled up on its traceback (+1 MiB per call of a 1 MiB input)."""
    import gc
    import weakref

    from layerzero.errors import KernelNotSupportedError

    spec = KernelSpec("f32_only_rms", "rms_norm", "custom",
                      lambda x, weight, eps: torch.rms_norm(x, x.shape[-1:], weight, eps),
                      dtypes=frozenset({torch.float32}))
    d = StaticDispatcherBuilder().with_kernel(spec, operation="rms_norm", default=True).build()
    w = torch.ones(64, dtype=torch.float64)
    alive = []
    for _ in range(5):
        x = torch.randn(8, 64, dtype=torch.float64)
        alive.append(weakref.ref(x))
        with pytest.raises(KernelNotSupportedError, match="f32_only_rms: dtype=float64"):
            d.dispatch("rms_norm", {"x": x, "weight": w})
        del x
    gc.collect()
    assert not any(r() is not None for r in alive)


def test_a_refusal_is_not_applied_to_calls_that_differ_in_what_the_key_leaves_out():
    """The refusal memo was keyed by the exact plan key only: one call with requires_grad inputs (or a
    non-contiguous one) refused by a kernel without a backward made every later no-grad call of that shape fail."""
    from layerzero.errors import KernelNotSupportedError

    spec = KernelSpec("nograd_rms", "rms_norm", "custom", rms_norm, supports_autograd=False)
    d = StaticDispatcherBuilder().with_kernel(spec, operation="rms_norm", default=True).build()
    x = torch.randn(4, 8)
    with pytest.raises(KernelNotSupportedError, match="require grad"):
        d.dispatch("rms_norm", {"x": x.clone().requires_grad_()})
    assert d.dispatch("rms_norm", {"x": x}).kernel_id == "nograd_rms"
    with pytest.raises(KernelNotSupportedError, match="require grad"):
        d.dispatch("rms_norm", {"x": x.clone().requires_grad_()})


def test_calls_the_table_kernel_cannot_take_never_open_its_breaker():
    """The hot path checks options and shape relations only: GQA heads reached torch_sdpa (no GQA), which raised,
    and the call was blamed on it; five such calls opened its breaker and every good call failed after. A kernel
    that raises on a call its declaration excludes is not blamed: the call gets KernelNotSupportedError."""
    from layerzero.errors import KernelNotSupportedError

    d = StaticDispatcherBuilder().with_kernel("torch_sdpa", operation="attention.full", default=True).build()
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16)
    for _ in range(2):
        d.dispatch("attention.full", {"q": q, "k": k, "v": k})
    grouped = torch.randn(1, 2, 8, 16)
    for _ in range(d.runtime.config.failure_threshold + 2):
        with pytest.raises(KernelNotSupportedError, match="torch_sdpa"):
            d.dispatch("attention.full", {"q": q, "k": grouped, "v": grouped})
    assert not any(b.failures for b in d.runtime.breakers.all().values())
    r = d.dispatch("attention.full", {"q": q, "k": k, "v": k})
    assert r.kernel_id == "torch_sdpa"
    torch.testing.assert_close(r.output, torch.nn.functional.scaled_dot_product_attention(q, k, k))


@pytest.mark.parametrize(("operation", "inputs", "said"), [
    ("rms_norm", {"x": torch.randn(4, 8), "weight": torch.ones(8), "eps": -1.0}, "eps must be a positive number"),
    ("rms_norm", {"x": torch.randn(4, 8), "weight": torch.ones(8, dtype=torch.float64)}, "weight"),
    ("rms_norm", {"x": torch.randn(4, 0), "weight": torch.ones(0)}, "non-empty last dimension"),
    ("silu", {"x": torch.ones(4, 8, dtype=torch.int64)}, "silu"),
])
def test_static_dispatch_validates_as_every_other_path(operation: str, inputs: dict, said: str) -> None:
    """The static table has no plan cache, so no miss ever validated: eps=-1, a float64 weight or an empty row
    ran the kernel. The first call of each exact key validates now, cold and after valid calls, with
    lz.*'s error."""
    static = create_static_dispatcher(config=DispatchConfig(
        mode=DispatchMode.STATIC, static_kernel_map={"rms_norm": "torch_rms_norm", "silu": "torch_silu"}))
    for warm in (False, True):
        if warm:
            static.dispatch("rms_norm", {"x": torch.randn(4, 8), "weight": torch.ones(8)})
            static.dispatch("silu", {"x": torch.randn(4, 8)})
        with pytest.raises(InvalidInputError, match=said):
            static.dispatch(operation, inputs)


def test_a_static_kernel_declaring_limits_is_checked_on_every_call() -> None:
    """A kernel declaring float16 only and sequences of at most 16: after a valid call the hot path (shape
    relations only) served float32 and longer calls too; such a kernel is served by the full path, whose memo
    checks its declared limits per exact key."""
    from layerzero.errors import KernelNotSupportedError

    seen = []

    def fp16_attn(q, k, v, mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
        seen.append((q.dtype, q.shape[2]))
        return flash_attn(q, k, v, mask, is_causal, dropout_p, scale, window)

    spec = KernelSpec("fp16_attn", "attention", "custom", fp16_attn, dtypes={torch.float16}, max_seq_len=16)
    static = StaticDispatcherBuilder().with_kernel(spec, operation="attention.causal", default=True).build()
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    static.dispatch("attention.causal", {"q": q, "k": q, "v": q})
    for bad in (q.float(), torch.randn(1, 2, 64, 16, dtype=torch.float16)):
        with pytest.raises(KernelNotSupportedError, match="fp16_attn"):
            static.dispatch("attention.causal", {"q": bad, "k": bad, "v": bad})
    assert seen == [(torch.float16, 8)]
