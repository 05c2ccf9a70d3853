"""Which patched op costs the time and the memory: the training step with one part of ``patch()`` (or of
Liger's patch) switched off at a time, side by side.

Builds the model bench's Llama from a config (random weights), then per variant a copy of it, warms it up and
times ``--steps`` training steps (forward with labels, backward), with the peak memory one step allocates
above what the model holds. Variants:

    liger                      Liger's patch (rope, rms_norm, swiglu, fused linear cross-entropy)
    lz                         layerzero attention + patch()
    lz:norms=0 (rope=0, ...)   patch() with that part off (the keywords of ``patch``)
    lz@rms_norm=liger_rms_norm patch() with a kernel locked for an op (``lz.lock``)
    liger:rope=0 (rms_norm, swiglu, fused_linear_cross_entropy) Liger's patch with that part off

    python scripts/gpu_patch_ablation.py --vocab 128256 --seq 2048 \\
        --variants liger,lz,lz:norms=0,lz:rope=0,lz:mlp=0,lz:loss=0,lz@rms_norm=liger_rms_norm
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import layerzero as lz
from layerzero.bench.model_variants import Variant, apply_liger, build_base, model_config


def _build(spec: str, base: torch.nn.Module) -> tuple[torch.nn.Module, Any, contextlib.AbstractContextManager]:
    from layerzero.integrations.transformers import patch

    name, _, lock = spec.partition("@")
    kwargs = {}
    for part in name.split(":")[1:]:
        key, _, value = part.partition("=")
        kwargs[key] = value not in ("0", "false", "False")
    model = copy.deepcopy(base)
    if name.startswith("liger"):
        variant = Variant(spec, model)
        variant.module, variant.globals_patch = apply_liger("llama", model, **kwargs)
        return model, variant, variant.active()
    model.set_attn_implementation("layerzero")
    patch(model, **kwargs)
    if lock:
        op, _, kernel = lock.partition("=")
        return model, None, lz.lock(op, kernel)
    return model, None, contextlib.nullcontext()


def _step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default="liger,lz,lz:norms=0,lz:rope=0,lz:mlp=0,lz:loss=0")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: the tiny config (no memory numbers), to check the script")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    card = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu"
    fields = model_config("llama", a.device, quick=not cuda, layers=a.layers if cuda else None)
    if cuda:
        fields.update(vocab_size=a.vocab, max_position_embeddings=max(4096, a.seq))
    a.vocab = fields["vocab_size"]
    base = build_base("llama", fields, a.device, torch.bfloat16 if cuda else torch.float32)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device,
                        generator=torch.Generator(a.device).manual_seed(0))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: dict[str, Any] = {}
    for spec in a.variants.split(","):
        model, keep, ctx = _build(spec, base)
        with ctx:
            for _ in range(3):
                _step(model, ids)
            sync()
            times = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                _step(model, ids)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            peak = after_fwd = peak_fwd = float("nan")
            if cuda:
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                model.train()
                loss = model(input_ids=ids, labels=ids).loss
                sync()
                after_fwd = (torch.cuda.memory_allocated() - held) / 2**20
                peak_fwd = (torch.cuda.max_memory_allocated() - held) / 2**20
                loss.backward()
                model.zero_grad(set_to_none=True)
                del loss
                sync()
                peak = (torch.cuda.max_memory_allocated() - held) / 2**20
        rows[spec] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                      "peak_extra_mb": None if not cuda else round(peak),
                      "after_forward_mb": None if not cuda else round(after_fwd),
                      "forward_peak_mb": None if not cuda else round(peak_fwd)}
        print(f"{spec:34s} {statistics.median(times):8.2f} ms ({min(times):.2f}-{max(times):.2f})  "
              f"peak extra {peak:8.0f} MB (forward peak {peak_fwd:.0f}, held after forward {after_fwd:.0f})", flush=True)
        del model, keep
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    path = Path(a.json or Path(os.environ.get("OUT", "benchmarks/results")) / f"gpu_patch_ablation_{card}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"card": card, "torch": torch.__version__, "args": vars(a), "rows": rows}, indent=1))
    print(f"JSON written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
