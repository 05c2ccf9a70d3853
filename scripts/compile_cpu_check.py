#!/usr/bin/env python3
"""Compiled training step, side by side: a plain-PyTorch model vs the same model written with ``lz.*``.

Three variants of one small Llama-shaped stack (pre-norm GQA attention, RMSNorm, SwiGLU MLP), each
under ``torch.compile`` (Inductor), timed as whole training steps (forward, loss, backward) in
interleaved rounds (two replicas of each, see ``main``), reported as medians with the spread (half the
interquartile range):

* ``sdpa``: ``F.scaled_dot_product_attention``, the HF RMSNorm arithmetic, ``F.silu(gate) * up``;
* ``layerzero``: ``lz.attention``, ``lz.rms_norm``, ``lz.swiglu`` (PyTorch's kernels traced natively);
* ``layerzero-opaque``: the same inside a live policy scope, which keeps every ``lz.*`` call an opaque
  dispatched custom op with a recomputing backward (what every compiled call was before).

Usage (CPU, a couple of minutes of compilation on a small machine)::

    python scripts/compile_cpu_check.py
    python scripts/compile_cpu_check.py --device cuda --dtype bfloat16 --hidden 2048 --heads 32 \\
        --kv-heads 8 --layers 8 --batch 4 --seq 1024 --rounds 30     # an H200

The checkout's ``src/`` goes first on ``sys.path`` (an installed layerzero of another version would
otherwise be measured instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "layerzero").is_dir():  # measure this checkout, not an installed copy
    sys.path.insert(0, str(_SRC))
import layerzero as lz  # noqa: E402


class Block(torch.nn.Module):
    """One pre-norm decoder block; ``mode`` picks plain PyTorch ("sdpa") or the lz.* ops."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, mode: str) -> None:
        super().__init__()
        self.mode, self.heads, self.kv_heads, self.d = mode, heads, kv_heads, hidden // heads
        self.norm1 = torch.nn.Parameter(torch.ones(hidden))
        self.norm2 = torch.nn.Parameter(torch.ones(hidden))
        self.q = torch.nn.Linear(hidden, hidden, bias=False)
        self.kv = torch.nn.Linear(hidden, 2 * kv_heads * self.d, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.up = torch.nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = torch.nn.Linear(4 * hidden, hidden, bias=False)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "sdpa":  # transformers' LlamaRMSNorm
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return lz.rms_norm(x, w, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        n = self._norm(x, self.norm1)
        q = self.q(n).view(b, s, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(n).view(b, s, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            a = lz.attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        n = self._norm(x, self.norm2)
        gate, up = self.gate(n), self.up(n)
        m = F.silu(gate) * up if self.mode == "sdpa" else lz.swiglu(gate, up)
        return x + self.down(m)


def _model(args: argparse.Namespace, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = [Block(args.hidden, args.heads, args.kv_heads, mode) for _ in range(args.layers)]
    return torch.nn.Sequential(*blocks).to(args.device, getattr(torch, args.dtype))


@contextlib.contextmanager
def _scope(mode: str) -> Iterator[None]:
    if mode == "layerzero-opaque":
        with lz.lock("rms_norm", "torch_rms_norm"):  # any live scope: lz.* stay dispatched custom ops
            yield
    else:
        yield


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _stepper(args: argparse.Namespace, mode: str) -> Callable[[], float]:
    model = _model(args, mode)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return model(x).float().square().mean()

    # a code object per variant: each gets its own Dynamo cache (and guards only its own graph)
    code = loss.__code__.replace(co_name=f"loss_{mode.replace('-', '_')}")
    loss_fn = torch.compile(types.FunctionType(code, loss.__globals__, code.co_name, None, loss.__closure__),
                            fullgraph=True)
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device, dtype=getattr(torch, args.dtype))

    def step() -> float:
        with _scope(mode):
            _sync(args.device)
            t0 = time.perf_counter()
            loss_fn(x).backward()
            _sync(args.device)
            return time.perf_counter() - t0

    return step


def _summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times) * 1e3, "spread_ms": (q[2] - q[0]) / 2 * 1e3,
            "min_ms": min(times) * 1e3}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--modes", default="sdpa,layerzero,layerzero-opaque", help="comma-separated variants (sdpa first)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(args.modes.split(","))
    # Two replicas of each variant, built in the order A B C C B A: on a small CPU the model built first
    # ran ~20% faster than an identical one built later (memory placement), which this cancels.
    builds = [*modes, *reversed(modes)]
    steps = [(m, _stepper(args, m)) for m in builds]
    for m, step in steps:  # compile and warm up each replica before any timing
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        print(f"# {m}: compiled and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {m: [] for m in modes}
    per_replica: list[list[float]] = [[] for _ in steps]
    order = list(range(len(steps)))
    for r in range(args.rounds):  # interleaved: each round times every replica once, in a rotating order
        k = r % len(steps)
        for i in order[k:] + order[:k]:
            t = steps[i][1]()
            times[steps[i][0]].append(t)
            per_replica[i].append(t)
    print("# per replica (build order):", ", ".join(f"{m} {statistics.median(t) * 1e3:.1f} ms"
                                                  for (m, _), t in zip(steps, per_replica, strict=True)))
    result = {"config": vars(args), "torch": torch.__version__, "results": {m: _summary(t) for m, t in times.items()}}
    base = result["results"]["sdpa"]["median_ms"]
    for m in modes:
        s = result["results"][m]
        s["vs_sdpa"] = s["median_ms"] / base
        print(f"{m:18s} {s['median_ms']:9.3f} ms +- {s['spread_ms']:.3f} (min {s['min_ms']:.3f})   "
              f"{s['vs_sdpa']:.3f}x sdpa")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
