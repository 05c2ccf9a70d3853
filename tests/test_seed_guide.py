"""Every ```python block of the user's seed document (performance-guide.md) runs here, as written.

Names the seed uses without defining them are provided as stand-ins: ``flash_attn``
and ``rms_norm`` callables (torch kernels, since flash-attn and Liger are not
installed here), example ``inputs``, ``dispatcher``, the registries, and so on.
The kernel ids its ``static_kernel_map`` names (``flash_attn_v2_attention``,
``liger_rms_norm``) are registered for the test as torch-backed stand-ins.
After each block, a check asserts that it did what the guide says.
"""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import layerzero.dispatch as lzd
from layerzero.ops.attention import attention_reference
from layerzero.registry import get_global_backend_registry, get_global_kernel_registry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec

SEED = Path("/work/shared/seed/performance-guide.md")
if not SEED.exists():  # a checkout next to ``shared/``
    SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "performance-guide.md"

pytestmark = pytest.mark.skipif(not SEED.exists(), reason="the seed document is not in this checkout")


def _blocks(lang: str) -> list[tuple[str, str]]:
    """``(id, code)`` for every fenced block of ``lang``, named after the heading above it."""
    if not SEED.exists():
        return []
    out: list[tuple[str, str]] = []
    heading = "top"
    lines = SEED.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
        if line.strip() == f"```{lang}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append((f"{len(out) + 1:02d}-{heading}", "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


PYTHON_BLOCKS = _blocks("python")


# -- stand-ins ----------------------------------------------------------------------------------------------

def flash_attn(q, k, v, attn_mask, is_causal, dropout_p, scale, window):  # type: ignore[no-untyped-def]
    """Stand-in for a FlashAttention kernel: canonical attention arguments, BHSD."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)


def rms_norm(x, weight, eps):  # type: ignore[no-untyped-def]
    """Stand-in for Liger's RMSNorm: canonical rms_norm arguments."""
    return torch.rms_norm(x, x.shape[-1:], weight, eps)


BATCH, SEQ, HEADS, HEAD_DIM, HIDDEN = 2, 16, 2, 16, 32


def _attention_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=g) for n in ("query", "key", "value")}


def _norm_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(BATCH, SEQ, HIDDEN, generator=g), "weight": torch.rand(HIDDEN, generator=g) + 0.5}


def get_representative_inputs() -> list[dict[str, torch.Tensor]]:
    return [{**_attention_inputs(s), **_norm_inputs(s)} for s in (1, 2)]


@pytest.fixture
def seed_kernels():
    """``flash_attn_v2_attention`` and ``liger_rms_norm`` as torch stand-ins, restored afterwards."""
    reg = get_global_kernel_registry()
    saved = {kid: reg.find(kid) for kid in ("flash_attn_v2_attention", "liger_rms_norm")}
    reg.register(KernelSpec("flash_attn_v2_attention", "attention", "torch", flash_attn, priority=1,
                            description="test stand-in for FlashAttention-2"), replace=True)
    reg.register(KernelSpec("liger_rms_norm", "rms_norm", "torch", rms_norm, priority=1,
                            description="test stand-in for Liger RMSNorm"), replace=True)
    yield
    for kid, spec in saved.items():
        if spec is None:
            reg.unregister(kid)
        else:
            reg.register(spec, replace=True)


@pytest.fixture
def namespace(seed_kernels) -> dict[str, Any]:
    rt = get_runtime()
    cfg = rt.config
    torch.set_num_threads(1)
    ns: dict[str, Any] = {
        "__name__": "seed_guide",
        "flash_attn": flash_attn,
        "rms_norm": rms_norm,
        "inputs": _attention_inputs(0),
        "attention_inputs": _attention_inputs(3),
        "norm_inputs": _norm_inputs(3),
        "get_representative_inputs": get_representative_inputs,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "dtype": torch.float32,
        "device": "cpu",
        "dispatcher": lzd.get_global_dispatcher(),
        "dispatch": lzd.dispatch,
        # imported by earlier blocks of the guide, which reads top to bottom
        "DispatchConfig": lzd.DispatchConfig,
        "DispatchMode": lzd.DispatchMode,
        "kernel_registry": get_global_kernel_registry(),
        "backend_registry": get_global_backend_registry(),
        "config": lzd.DispatchConfig(mode=lzd.DispatchMode.DYNAMIC, enable_cache=True, cache_size=50000,
                                     cache_ttl_seconds=3600.0),
    }
    yield ns
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    if rt.config is not cfg:
        rt.configure(cfg)


# -- per-block checks: what the guide says each block does ----------------------------------------------------

def _check_caching(ns: dict[str, Any], out: str) -> None:
    c = ns["config"]
    assert (c.mode, c.enable_cache, c.cache_size, c.cache_ttl_seconds) == (lzd.DispatchMode.DYNAMIC, True, 50000,
                                                                           3600.0)


def _check_static(ns: dict[str, Any], out: str) -> None:
    d = ns["dispatcher"]
    assert isinstance(d, lzd.StaticDispatcher)
    assert d.resolve("attention.causal") is flash_attn and d.resolve("rms_norm") is rms_norm
    assert not d.get_telemetry().enabled
    q, k, v = (ns["inputs"][n] for n in ("query", "key", "value"))
    out_t = d.dispatch("attention.causal", ns["inputs"]).output
    torch.testing.assert_close(out_t.double(), attention_reference(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    # The static_kernel_map config builds too, and every id resolves to a real kernel.
    static = lzd.create_static_dispatcher(ns["config"])
    reg = get_global_kernel_registry()
    assert static.resolve("attention.cross") is reg.get("flash_attn_v2_attention").impl
    assert static.resolve("rms_norm") is reg.get("liger_rms_norm").impl
    r = static.dispatch("rms_norm", ns["norm_inputs"])
    assert r.kernel_id == "liger_rms_norm"


def _check_low_latency(ns: dict[str, Any], out: str) -> None:
    c = ns["config"]
    assert (c.mode, c.enable_telemetry, c.record_timing, c.log_fallbacks, c.circuit_breaker_enabled) == (
        lzd.DispatchMode.STATIC, False, False, False, False)


def _check_breaker_config(ns: dict[str, Any], out: str) -> None:
    assert ns["config"].circuit_breaker_enabled is False


def _check_warm(ns: dict[str, Any], out: str) -> None:
    d = lzd.get_global_dispatcher()
    for inputs in get_representative_inputs():
        for op in ("attention.causal", "attention.cross", "rms_norm"):
            assert d.dispatch(op, inputs).cached, f"{op} was not warmed"


def _check_context(ns: dict[str, Any], out: str) -> None:
    a = ns["attention_inputs"]
    want = attention_reference(a["query"], a["key"], a["value"], is_causal=True)
    torch.testing.assert_close(ns["attention_result"].output.double(), want, atol=1e-5, rtol=1e-5)
    n = ns["norm_inputs"]
    x64 = n["x"].double()
    want_n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * n["weight"].double()
    torch.testing.assert_close(ns["norm_result"].output.double(), want_n, atol=1e-5, rtol=1e-5)


def _check_mvcc(ns: dict[str, Any], out: str) -> None:
    d = ns["dispatcher"]
    assert isinstance(d, lzd.DynamicDispatcher) and d.use_mvcc_cache
    assert get_runtime() in (d.runtime, d.runtime.parent)  # the global registries (its config stays its own)
    r = d.dispatch("rms_norm", ns["norm_inputs"])
    assert d.dispatch("rms_norm", ns["norm_inputs"]).cached and r.output.shape == ns["norm_inputs"]["x"].shape


def _check_memory(ns: dict[str, Any], out: str) -> None:
    assert 17.0 <= ns["estimated_memory_mb"] < 17.5


def _check_timing(ns: dict[str, Any], out: str) -> None:
    total = float(re.search(r"Total: ([0-9.]+)us", out).group(1))
    assert total > 0 and ns["result"].timing.recorded and "Selection: 0.00us" not in out
    assert int(re.search(r"Kernel invoke: (\d+)ns", out).group(1)) > 0


def _check_benchmark(ns: dict[str, Any], out: str) -> None:
    r = ns["results"]
    assert r["min_ns"] <= r["p50_ns"] <= r["p99_ns"] <= r["p999_ns"] <= r["max_ns"]
    assert re.search(r"p50: [0-9.]+us\np99: [0-9.]+us\np99.9: [0-9.]+us", out)


def _check_hit_rate(ns: dict[str, Any], out: str) -> None:
    rate = float(re.search(r"Cache hit rate: ([0-9.]+)%", out).group(1))
    assert rate >= 99.0, out
    assert re.search(r"Cache size: \d+ / \d+", out)


def _check_low_hit_rate(ns: dict[str, Any], out: str) -> None:
    assert ns["hit_rate"] >= 0.99 and "Low cache hit rate" not in out


def _check_profile(ns: dict[str, Any], out: str) -> None:
    ns["profile_dispatch"]()


def _check_circuit(ns: dict[str, Any], out: str) -> None:
    assert "State transitions: 0" in out and "Current state: CLOSED" in out


def _check_tracemalloc(ns: dict[str, Any], out: str) -> None:
    assert re.search(r"Current: [0-9.]+MB\nPeak: [0-9.]+MB", out)


def _check_reload(ns: dict[str, Any], out: str) -> None:
    assert "Reload count: 0" in out


# The first line of each block that identifies it -> its check.
CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "# Optimal caching configuration": _check_caching,
    "# Pre-resolve kernels at initialization time": _check_static,
    "# Low-latency configuration": _check_low_latency,
    "# Low-overhead circuit breaker": _check_breaker_config,
    "def warm_cache(": _check_warm,
    "# Build context once": _check_context,
    "# Enable MVCC cache": _check_mvcc,
    "# Estimate cache memory usage": _check_memory,
    "# Access timing information": _check_timing,
    "def benchmark_dispatch(": _check_benchmark,
    "hit_rate = cache_stats.hits": _check_hit_rate,
    "if hit_rate < 0.9:": _check_low_hit_rate,
    "def profile_dispatch(": _check_profile,
    "circuit_stats = dispatcher.get_circuit_stats": _check_circuit,
    "tracemalloc.start()": _check_tracemalloc,
    "reload_stats = dispatcher.stats": _check_reload,
}


def _prepare(code: str, ns: dict[str, Any]) -> None:
    """Per-block set-up the guide implies (caches warmed on repeated shapes)."""
    if "# Access timing information" in code:
        assert get_runtime().config.record_timing  # on by default: the snippet runs as written
    if "cache_stats.hits" in code:
        get_runtime().telemetry.reset()
        for _ in range(300):  # warm-up on repeated shapes
            lzd.dispatch("attention.causal", ns["inputs"])
            lzd.dispatch("rms_norm", ns["norm_inputs"])


def test_seed_has_the_blocks_we_check():
    assert len(PYTHON_BLOCKS) >= 17
    codes = "\n".join(code for _, code in PYTHON_BLOCKS)
    missing = [marker for marker in CHECKS if marker not in codes]
    assert not missing, f"seed blocks changed; no block contains {missing}"


@pytest.mark.parametrize("code", [c for _, c in PYTHON_BLOCKS], ids=[i for i, _ in PYTHON_BLOCKS])
def test_seed_python_block_runs(code: str, namespace: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    _prepare(code, namespace)
    exec(compile(code, str(SEED), "exec"), namespace)  # noqa: S102 - the user's documented snippets, verbatim
    out = capsys.readouterr().out
    for marker, check in CHECKS.items():
        if marker in code:
            check(namespace, out)


@pytest.mark.parametrize("code", [c for _, c in _blocks("yaml")], ids=[i for i, _ in _blocks("yaml")])
def test_seed_yaml_blocks_parse(code: str) -> None:
    assert isinstance(yaml.safe_load(code), dict)
