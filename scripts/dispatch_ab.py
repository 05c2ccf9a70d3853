"""The dispatchers' cached attention call, compiled (``d.dispatch``: ``layerzero._accel.Method`` bound to the
dispatcher) against the class's Python method, each side by side with the direct call in one interleaved run.

    python scripts/dispatch_ab.py [--device cuda] [--rounds 200] [--json out.json]

Prints, per path, the p50 overhead over the direct call (ns) and the ratio, for the compiled and the Python
method; the JSON names the machine.

Then where ``lz.attention``'s overhead goes: the compiled lookup alone (warm, between empty calls), the same
lookup right after the kernel (what it costs in place, its objects evicted by the launch), and on CUDA the
host's cost alone (the GPU held busy by ``torch.cuda._sleep``, so that launches only queue and no
synchronization enters the timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero import accel
from layerzero.context import SelectionContext
from layerzero.dispatch import (
    StaticDispatcherBuilder,
    create_config_dispatcher,
    create_dynamic_dispatcher,
    get_global_dispatcher,
)
from layerzero.doctor.hardware import hardware_info
from layerzero.policy.scope import LIVE
from layerzero.runtime import get_runtime
from layerzero.timing import interleaved, percentiles


def host_only(direct: Callable[[], Any], candidate: Callable[[], Any], rounds: int, batch: int = 20
              ) -> dict[str, Any]:
    """Per-call host time of each side, the GPU held busy so that launches only queue (CUDA only)."""
    d_s: list[float] = []
    c_s: list[float] = []
    pc = time.perf_counter_ns
    for r in range(rounds):
        torch.cuda._sleep(2_000_000)  # ~1 ms of spinning: the 2 x 20 launches below queue behind it
        order = ((direct, d_s), (candidate, c_s)) if r % 2 == 0 else ((candidate, c_s), (direct, d_s))
        for fn, bucket in order:
            t = pc()
            for _ in range(batch):
                fn()
            bucket.append((pc() - t) / batch)
        torch.cuda.synchronize()
    diffs = [c - d for d, c in zip(d_s, c_s, strict=True)]
    return {"direct": percentiles(d_s).to_dict(), "candidate": percentiles(c_s).to_dict(),
            "overhead_ns": statistics.median(diffs)}


def breakdown(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rounds: int, sync: Any) -> list[dict[str, Any]]:
    """Where lz.attention's overhead goes (see the module docstring)."""
    sdpa = F.scaled_dot_product_attention
    rt = get_runtime()
    hit = accel.attention_hit(rt, LIVE, "attention.full", "attention.causal")
    rows: list[dict[str, Any]] = []
    if hit is None:
        return rows
    plans = rt.plans.data
    find = hit.find
    assert find(plans, "attention.full", q, k, v, False, 0.0, None) is not None
    pairs = [("lookup alone (find), between empty calls", lambda: None,
              lambda: find(plans, "attention.full", q, k, v, False, 0.0, None)),
             ("lookup right after the kernel (sdpa; find)", lambda: sdpa(q, k, v),
              lambda: (sdpa(q, k, v), find(plans, "attention.full", q, k, v, False, 0.0, None))),
             ("lz.attention(q, k, v)", lambda: sdpa(q, k, v), lambda: lz.attention(q, k, v))]
    for name, direct, cand in pairs:
        res = interleaved(direct, cand, rounds=rounds, batch=20, sync=sync)
        print(f"{name:44s} {res.overhead_ns:+8.0f} ns  (direct p50 {res.direct.p50_ns / 1e3:.2f} us)")
        rows.append({"path": name, "result": res.to_dict()})
    if sync is not None:
        for name, direct, cand in (("host only: lz.attention vs sdpa", lambda: sdpa(q, k, v),
                                    lambda: lz.attention(q, k, v)),
                                   ("host only: sdpa; find vs sdpa", lambda: sdpa(q, k, v),
                                    lambda: (sdpa(q, k, v), find(plans, "attention.full", q, k, v, False, 0.0, None)))):
            res = host_only(direct, cand, rounds)
            print(f"{name:44s} {res['overhead_ns']:+8.0f} ns  (direct host p50 {res['direct']['p50_ns'] / 1e3:.2f} us)")
            rows.append({"path": name, "host_only": res})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json")
    a = ap.parse_args()
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else None
    if sync is None:
        torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 8, n, 64, device=a.device, dtype=dtype) for n in (1, 128, 128))
    lz.attention(q, k, v)
    rt = get_runtime()
    kernel = rt.plans.data[next(iter(rt.plans.data))].kernels[0].impl
    static = (StaticDispatcherBuilder().with_kernel(kernel, operation="attention.full", default=True)
              .with_config(enable_telemetry=False).build())
    quiet = (StaticDispatcherBuilder().with_kernel(kernel, operation="attention.full", default=True)
             .with_config(enable_telemetry=False, record_timing=False).build())
    gd = get_global_dispatcher()
    untimed = create_dynamic_dispatcher(config=rt.config.replace(record_timing=False))
    inputs = {"q": q, "k": k, "v": v}
    bshd = {"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2)}
    args = (q, k, v, None, False, 0.0, None, None)
    causal = (q, k, v, None, True, 0.0, None, None)

    def from_bshd() -> Any:
        return F.scaled_dot_product_attention(bshd["q"].transpose(1, 2), bshd["k"].transpose(1, 2),
                                              bshd["v"].transpose(1, 2)).transpose(1, 2)

    sdpa = F.scaled_dot_product_attention
    x, w = torch.randn(1, 4096, device=a.device, dtype=dtype), torch.randn(4096, device=a.device, dtype=dtype)
    mvcc = create_dynamic_dispatcher(use_mvcc_cache=True)
    config = create_config_dispatcher(config_path={"version": "1.0"})
    ctx = SelectionContext(batch_size=1, seq_len=128, dtype=dtype, device=q.device.type)
    rows = [("static dispatch(op, inputs)", static, lambda: kernel(*args), (inputs,), {}),
            ("static, record_timing=False", quiet, lambda: kernel(*args), (inputs,), {}),
            ("static, is_causal=True", static, lambda: kernel(*causal), (inputs,), {"is_causal": True}),
            ("static, layout='BSHD'", static, lambda: kernel(*(t.transpose(1, 2) for t in bshd.values()), None, False,
                                                             0.0, None, None).transpose(1, 2), (bshd,),
             {"layout": "BSHD"}),
            ("dynamic dispatch(op, inputs)", gd, lambda: sdpa(q, k, v), (inputs,), {}),
            ("dynamic, record_timing=False", untimed, lambda: sdpa(q, k, v), (inputs,), {}),
            ("dynamic, layout='BSHD'", gd, from_bshd, (bshd,), {"layout": "BSHD"}),
            ("dynamic, rms_norm", gd, lambda: F.rms_norm(x, (4096,), w, 1e-6), ({"x": x, "weight": w},), {}),
            ("MVCC dispatcher", mvcc, lambda: sdpa(q, k, v), (inputs,), {}),
            ("config dispatcher", config, lambda: sdpa(q, k, v), (inputs,), {}),
            ("dynamic, context=ctx", gd, lambda: sdpa(q, k, v), (inputs,), {"context": ctx})]
    cpu = hardware_info()["hardware"]["cpu"]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if sync else f"{cpu} (CPU)", "cpu": cpu,
                           "python": sys.version.split()[0], "torch": torch.__version__, "hot_path": accel.status(),
                           "rows": []}
    print(f"{out['device']} | python {out['python']} | torch {out['torch']} | {out['hot_path']}")
    print(f"{'path':34s} {'compiled ns':>12s} {'ratio':>7s} {'python ns':>10s} {'ratio':>7s}")
    for name, d, direct, dargs, kw in rows:
        py = type(d).dispatch.__get__(d)  # the Python method; d.dispatch is the compiled form where bound
        compiled = d.dispatch
        op = "rms_norm" if "x" in dargs[0] else "attention.full"
        compiled(op, *dargs, **kw)
        res_c = interleaved(direct, lambda: compiled(op, *dargs, **kw), rounds=a.rounds, batch=20, sync=sync)
        res_p = interleaved(direct, lambda: py(op, *dargs, **kw), rounds=a.rounds, batch=20, sync=sync)
        print(f"{name:34s} {res_c.overhead_ns:+12.0f} {res_c.ratio:7.3f} {res_p.overhead_ns:+10.0f} {res_p.ratio:7.3f}")
        out["rows"].append({"path": name, "compiled": res_c.to_dict(), "python": res_p.to_dict()})
    res = interleaved(lambda: sdpa(q, k, v), lambda: lz.attention(q, k, v), rounds=a.rounds, batch=20, sync=sync)
    print(f"{'lz.attention(q, k, v)':34s} {res.overhead_ns:+12.0f} {res.ratio:7.3f}")
    out["rows"].append({"path": "lz.attention(q, k, v)", "compiled": res.to_dict()})
    print("-- where lz.attention's overhead goes")
    out["breakdown"] = breakdown(q, k, v, a.rounds, sync)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
