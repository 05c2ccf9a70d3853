"""Where the time goes: CUDA kernel time per kernel name, for the model-bench variants side by side.

Builds the bench's Llama from a config (random weights), runs each variant's workload a few times under
``torch.profiler`` and prints, per (workload, mode, variant), the wall time per step, the total CUDA kernel
time and the kernels that take most of it, then the kernels whose time differs most between a variant and the
reference. It answers "which kernels make ``layerzero+patch`` slower than Liger / than compiled ``sdpa``",
which a median step time cannot.

    python scripts/gpu_profile_model.py --vocab 128256 --seq 2048 --variants sdpa,layerzero+patch,liger
    python scripts/gpu_profile_model.py --vocab 32000 --seq 1024 --mode compiled --variants sdpa,layerzero,layerzero+patch

Writes ``--json`` (default ``$OUT/gpu_profile_<card>_<mode>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from layerzero.bench.model_variants import build_base, build_variants, model_config


def _short(name: str) -> str:
    """A kernel name without template arguments and parameter lists (Triton and CUTLASS names are long)."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name[:90]


def _kernels(prof: Any, steps: int, kind: Any) -> tuple[float, dict[str, float]]:
    per: dict[str, float] = defaultdict(float)
    total = 0.0
    for evt in prof.events():
        if evt.device_type == kind and (kind == torch.autograd.DeviceType.CUDA or not evt.cpu_children):
            us = getattr(evt, "device_time", None) if kind == torch.autograd.DeviceType.CUDA else None
            us = us if us is not None else (evt.cuda_time if kind == torch.autograd.DeviceType.CUDA
                                            else evt.cpu_time)
            per[_short(evt.name)] += us / steps
            total += us / steps
    return total, dict(per)


def _step(workload: str, call: Any, ids: torch.Tensor) -> None:
    if workload == "prefill":
        with torch.no_grad():
            call(input_ids=ids, use_cache=False).logits.argmax(-1)
    else:
        call.train()
        loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        call.eval()
        call.zero_grad(set_to_none=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mode", default="eager", choices=("eager", "compiled"))
    ap.add_argument("--variants", default="sdpa,layerzero+patch,liger")
    ap.add_argument("--workloads", default="prefill,train")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: the tiny config, to check the script itself")
    a = ap.parse_args()
    import torch._dynamo

    # one compiled graph per decoder layer and mode (eval / train): 16 layers need more than the default 8
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    cuda = a.device == "cuda"
    card = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu"
    fields = model_config(a.model, a.device, quick=not cuda, layers=a.layers if cuda else None)
    if cuda:
        fields.update(vocab_size=a.vocab, max_position_embeddings=max(4096, a.seq))
    a.vocab = fields["vocab_size"]
    base = build_base(a.model, fields, a.device, torch.bfloat16 if cuda else torch.float32)
    names = tuple(a.variants.split(","))
    variants, skipped = build_variants(a.model, base, names, (a.mode,), compile_scope="layers")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device,
                        generator=torch.Generator(a.device).manual_seed(0))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    results: dict[str, Any] = {"card": card, "torch": torch.__version__, "args": vars(a),
                               "online_tuning": os.environ.get("LAYERZERO_ONLINE_TUNING", ""), "runs": {}}
    for workload in a.workloads.split(","):
        ref_kernels: dict[str, float] | None = None
        for v in variants:
            call = v.calls[a.mode]
            with v.active():
                for _ in range(3):  # warm-up: compile, tune, allocator
                    _step(workload, call, ids)
                sync()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    _step(workload, call, ids)
                sync()
                wall_ms = (time.perf_counter() - t0) * 1e3 / a.steps
                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                    for _ in range(a.steps):
                        _step(workload, call, ids)
                    sync()
            total_us, per = _kernels(prof, a.steps, kind)
            top = sorted(per.items(), key=lambda kv: -kv[1])[: a.top]
            key = f"{workload}/{a.mode}/{v.name}"
            results["runs"][key] = {"wall_ms": wall_ms, "cuda_ms": total_us / 1e3, "kernels_us": per}
            print(f"\n== {key}: wall {wall_ms:.2f} ms/step, CUDA kernels {total_us / 1e3:.2f} ms/step")
            for name, us in top:
                print(f"   {us / 1e3:8.3f} ms  {name}")
            if ref_kernels is None:
                ref_kernels = per
                continue
            diff = {k: per.get(k, 0.0) - ref_kernels.get(k, 0.0) for k in set(per) | set(ref_kernels)}
            worst = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:8]
            print(f"   -- vs {variants[0].name}: largest differences (ms/step, + = more here)")
            for name, d in worst:
                print(f"   {d / 1e3:+8.3f} ms  {name}")
    path = Path(a.json or Path(os.environ.get("OUT", "benchmarks/results")) / f"gpu_profile_{card}_{a.mode}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"\nJSON written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
