"""Render docs/benchmarks.md, and the benchmark headline of the front page, from the result files committed
under benchmarks/results/.

Inputs (any that exist):
  benchmarks/results/bench_cpu.json             `layerzero bench --quick --json ...` on the dev machine
  benchmarks/results/bench_<card>.json          `layerzero bench --device cuda --json ...` on a lent GPU
  benchmarks/results/gpu_bench_<card>.json      `python scripts/gpu_bench.py` (measured selection)
  benchmarks/results/model_bench_<card>.json    `layerzero bench --model llama --json benchmarks/results` (whole model)

The headline (between the markers in docs/index.md, which README.md is built from) quotes the CPU bench and
the measured-selection run named by LATEST_GPU_BENCH: name the new file there when a newer run is committed;
and a compact whole-model table per card (each model_bench_<card>.json).

Usage: python scripts/render_benchmarks.py [--check] && python scripts/build_readme.py
  --check: write nothing; exit 1 when docs/benchmarks.md or the headline is not what the results give.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
INDEX = ROOT / "docs" / "index.md"
LATEST_GPU_BENCH = RESULTS / "gpu_bench_NVIDIA_H200_run3.json"
LATEST_VARLEN_PAGED = RESULTS / "gpu_varlen_paged_NVIDIA_H100_80GB_HBM3.json"
HEADLINE_START, HEADLINE_END = "<!-- benchmark-headline -->", "<!-- /benchmark-headline -->"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return path.name


def _bench_section(path: Path, title: str, command: str) -> list[str]:
    from layerzero.bench.report import render_markdown
    from layerzero.bench.runner import BenchReport, OverheadRow, ResultRow
    from layerzero.timing import PairResult, Percentiles

    data = json.loads(path.read_text())

    def pair(d: dict | None) -> PairResult | None:
        if d is None:
            return None
        return PairResult(Percentiles(**d["direct"]), Percentiles(**d["candidate"]), d["overhead_ns"], d["ratio"])

    report = BenchReport(data["system"], data["config"], data["workload"],
                         [ResultRow(**r) for r in data["results"]],
                         [OverheadRow(o["path"], o["direct"], pair(o["result"]), o["budget"], o["passed"], o["note"],
                                      o["value"], o.get("info", False)) for o in data["overhead"]],
                         data.get("elapsed_s", 0.0))
    text = render_markdown(report)
    return [f"## {title}", "", f"Command: `{command}` (file: `{_rel(path)}`).", "", text, ""]


def _gpu_bench_section(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    s = d["summary"]
    run = path.stem.rsplit("_run", 1)[1] if "_run" in path.stem else None
    lines = [f"## Measured selection on {d['gpu']}{f', run {run}' if run else ''} (torch {d['torch']}, "
             f"CUDA {d['cuda']}, Triton {d['triton']}, liger {d.get('liger')})", "",
             f"Command: `bash scripts/gpu_run.sh tune` (runs `{d.get('command', 'python scripts/gpu_bench.py')}`; "
             f"file: `{_rel(path)}`). For every shape: every eligible kernel called directly "
             "(`triton.testing.do_bench` median), the whole `lz.*` call after `layerzero tune` on the grid (host "
             "overhead included), and PyTorch's default (`F.scaled_dot_product_attention`, `F.rms_norm`"
             + (", `F.gelu(gate, approximate='tanh') * up`, `F.cross_entropy`"
                if any(r["operation"] in ("geglu", "cross_entropy") for r in d["rows"]) else "") + ")"
             + (", these two timed alternately over 3 runs (the spread includes the drift between runs); "
                + ("tuning re-timed each bucket's priority choice against its closest rival over 4 alternating "
                   "rounds, and a rival replaced it only decisively"
                   if "confirmed x4" in json.dumps(d.get("tuning", {})) else
                   "tuning re-timed each bucket's priority choice against its closest rival")
                if "confirmed x" in json.dumps(d.get("tuning", {})) else
                "; an earlier version of the script and tuner: one run each, no re-timing") + ".", "",
             f"- geomean layerzero / best kernel: **{s['geomean_lz_over_best']:.3f}** over {s['shapes']} shapes",
             f"- geomean layerzero / PyTorch default: **{s['geomean_lz_over_default']:.3f}**",
             f"- worst vs best: {' '.join(s['worst_lz_over_best']['shape'].split())} ({s['worst_lz_over_best']['ratio']:.3f}: "
             f"{s['worst_lz_over_best']['layerzero']} vs {s['worst_lz_over_best']['best']})",
             f"- worst vs default: {' '.join(s['worst_lz_over_default']['shape'].split())} ({s['worst_lz_over_default']['ratio']:.3f})",
             f"- slower than the default beyond the measured spread: "
             f"{', '.join(' '.join(x.split()) for x in s['shapes_slower_than_default_beyond_noise']) or 'none'}",
             f"- correctness checks before timing: {s['correctness_checks']}, failures: "
             f"{len(s['correctness_failures'])}; tuning took {s['tune_s']:.1f} s "
             f"(budget exhausted: {s['tuning_budget_exhausted']})", "",
             "| Shape | layerzero kernel | layerzero (us) | best kernel | best (us) | default (us) | lz/best | lz/default |",
             "|-------|------------------|----------------|-------------|-----------|--------------|---------|------------|"]
    for r in d["rows"]:
        lines.append(f"| {' '.join(r['shape'].split())} | {r['layerzero_kernel']} | {r['layerzero_us']:.1f} | "
                     f"{r['best_kernel']} | {r['best_us']:.1f} | {r['default_us']:.1f} | {r['lz_over_best']:.3f} | "
                     f"{r['lz_over_default']:.3f} |")
    return lines + [""]


MODEL_BENCH_ABOUT = """## The model bench

A whole transformers model built from a config with random weights (no download): `--model llama` or
`--model qwen2` or `--model gemma2` (its reference row is transformers' `eager` attention: sdpa does not
take Gemma 2's softcapping). `--quick --device cpu`: hidden 64, 2 layers, 4 / 2 heads, vocabulary 256, float32, batch 2 x 32
(seconds); `--device cuda`: hidden 2048, 16 layers, 32 / 8 heads, intermediate 8192, vocabulary 32,000,
bfloat16, batch 4 x 1024 (`--layers N` changes the depth). Run it with

```bash
layerzero bench --model llama --quick --json benchmarks/results              # CPU, eager
layerzero bench --model llama --device cuda --json benchmarks/results         # CUDA, eager and compiled
```

Variants, all on the same weights: `sdpa` (`attn_implementation="sdpa"`, the reference), `layerzero`
(`attn_implementation="layerzero"`), `layerzero+patch` (that plus `layerzero.integrations.transformers.patch(model)`);
with liger-kernel installed on CUDA, `liger` (Liger's `apply_liger_kernel_to_<model>(rope, rms_norm, swiglu,
fused_linear_cross_entropy, model=...)`) and `liger+layerzero` (Liger's patch on a `layerzero`-attention copy).
Modes: `eager`, and `compiled` (`torch.compile(model)`, or with `--compile-scope layers` each decoder layer
compiled; default on CUDA, `--modes eager,compiled` on the CPU, where compiling takes minutes). Workloads (`--workloads`): `prefill` (one forward over batch x seq tokens),
`decode_b1` / `decode_b8` (greedy decode with a KV cache at batch 1 and 8: 32 new tokens after a 128-token prompt
on CUDA, 8 after 8 with `--quick`, prompt included), `train` (forward with labels and backward, no optimizer
step). Each of `--rounds` rounds (default 10 on the CPU, 5 on CUDA; on CUDA no warm-up and no round after
the first starts after `--budget-s`, default 420 s: entries not begun are reported as not run) runs every entry of one mode once per workload in rotating order, after one
warm-up call each (compilation happens there); eager runs first, then compiled, and the JSON is rewritten
after every round.

Columns: **Median** and **Min-max** of the rounds' times (ms, the whole call, synchronized); **vs sdpa**: the
median over `sdpa`'s in the same mode (below 1 is faster); **Peak extra**: on CUDA the peak of
`torch.cuda.max_memory_allocated` during the call minus what was allocated before it (activations and
temporaries, not the resident weights; `-` on the CPU, which has no allocator statistics); **Agreement**
with `sdpa` of the same mode on the warm-up call: the fraction of identical greedy tokens (decode) or argmax
positions (prefill), 1.000 expected in float32, lower in bfloat16 where near-ties of random weights flip;
**Loss**: the training step's loss, with its absolute difference from `sdpa`'s; **Warm-up**: the first call,
compilation included in compiled mode (seconds).
"""


_ONLINE = "_online"


def _model_title(d: dict, path_name: str = "") -> str:
    c = d["config"]
    where = "the 2-core development machine (CPU)" if c["card"] == "cpu" else f"an {c['card'].replace('_', ' ')}"
    flags = " --quick" if c["quick"] else ""
    m, sh = c["model_config"], c.get("shapes", {})
    if not c["quick"] and m.get("vocab_size") != 32000:
        flags += f" --vocab {m['vocab_size']}"
    if not c["quick"] and sh.get("seq") not in (None, 1024, 128):
        flags += f" --seq {sh['seq']}"
    if c.get("compile_scope", "model") != "model":
        flags += f" --compile-scope {c['compile_scope']}"
    online = "`LAYERZERO_ONLINE_TUNING=1` " if path_name.endswith(_ONLINE) else ""
    return f"{online}`layerzero bench --model {c['model']}{flags}` on {where}"


def _model_bench_section(path: Path) -> list[str]:
    from layerzero.bench.model_report import render_model_markdown

    d = json.loads(path.read_text())
    c = d["config"]
    command = (f"layerzero bench --model {c['model']}{' --quick' if c['quick'] else ''} --device {c['device']} "
               f"--modes {','.join(c['modes'])} --json benchmarks/results")
    tuned = "_tuned" in path.name
    how = ""  # how the measurements came about, when not from the default selection
    if "_compiled_tuned" in path.name:
        how = (" Run after compiled-mode tuning at these shapes (`scripts/gpu_compiled_tuning.py`: Inductor's code "
               "for the native op against Liger's kernels inside the pinned dispatched op, file "
               "`compiled_tuning_<card>.json`), on that performance database; Inductor's code won every bucket, so "
               "the graph is the default selection's.")
    elif tuned:
        how = (" Run after `layerzero tune` of rms_norm and swiglu at these shapes (grad=0 and grad=1), on that "
               "performance database (`LAYERZERO_PERF_DB`; `scripts/gpu_run.sh tunedgrad model19`).")
    elif "_shipped" in path.name:
        how = (" With the measurements shipped for this card (`layerzero/tuning/shipped/`), no local tuning: "
               "what a fresh install selects (`scripts/gpu_run.sh model19`).")
    elif _ONLINE in path.name:
        how = (" Online tuning on, on an empty performance database: each new bucket (inference and training) "
               "is measured at its first call, inside the warm-up (`scripts/gpu_run.sh online model19`).")
    title = _model_title(d, path.stem.removesuffix("_" + c["card"])) + (", tuned" if tuned else "")
    return [f"## {title}", "", f"Command: `{command}` (file: `{_rel(path)}`).{how} What the columns mean: "
            "[the model bench](#the-model-bench).", "", render_model_markdown(d), ""]


def _varlen_paged_section(path: Path) -> list[str]:
    """``scripts/gpu_varlen_paged.py``: correctness per kernel, packed vs padded, paged vs dense decode."""
    d = json.loads(path.read_text())
    ok = all(r.get("ok") for r in d["correctness"])
    out = [f"## Packed and paged attention on an {d['device']}", "",
           f"Command: `python scripts/gpu_varlen_paged.py{' --quick' if d.get('quick', True) else ''}` "
           f"(file: `{_rel(path)}`), torch {d['torch']}. "
           f"Correctness: {len(d['correctness'])} kernel checks against the float64 reference, "
           f"{'all within tolerance' if ok else 'SOME FAILED'} (kernels: "
           f"{', '.join(sorted({r['kernel'] for r in d['correctness']}))}).", "",
           "Packed training mix (32,768 tokens in sequences of a log-normal length mix), tokens per second:", "",
           "| kernel | ms | tokens/s |", "|---|---|---|"]
    if not any(r["kernel"] != "padded_sdpa" for r in d["packed_vs_padded"]):
        out[-2:-2] = ["No packed kernel was timed on this image (torch's `varlen_attn` is missing in this version, "
                      "and `--quick` skips the per-sequence loop); padded SDPA is the baseline a fast packed "
                      "kernel has to beat.", ""]
    for r in d["packed_vs_padded"]:
        extra = f" (padded to {r['padded_tokens']:,} tokens)" if r.get("padded_tokens") else ""
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        tps = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s'] / 1e6:.2f} M"
        out.append(f"| `{r['kernel']}`{extra} | {ms} | {tps} |")
    out += ["", "Decode (one new token per sequence, 32 / 8 heads, head_dim 128), µs per call:", "",
            "| batch | context | page | kernel | µs |", "|---|---|---|---|---|"]
    for r in d["paged_vs_dense"]:
        us = "-" if r["us"] is None else f"{r['us']:.1f}"
        out.append(f"| {r['batch']} | {r['context']:,} | {r['page'] or 'dense'} | `{r['kernel']}` | {us} |")
    return out + [""]


def _compile_check_section(path: Path) -> list[str]:
    """``scripts/compile_cpu_check.py``'s JSON line: a compiled training step, side by side."""
    d = json.loads(path.read_text().strip().splitlines()[-1])
    c = d["config"]
    card = path.stem.removeprefix("compile_check_").replace("_", " ")
    out = [f"## A compiled training step (torch.compile) on an {card}", "",
           f"Command: `python scripts/compile_cpu_check.py --device {c['device']} --dtype {c['dtype']} --hidden "
           f"{c['hidden']} --heads {c['heads']} --kv-heads {c['kv_heads']} --layers {c['layers']} --batch "
           f"{c['batch']} --seq {c['seq']} --rounds {c['rounds']}` (file: `{_rel(path)}`), torch {d['torch']}: "
           "`layerzero-opaque` keeps every call an opaque custom op with a recomputing backward (what every "
           "compiled call was before native tracing).", "", "| variant | median (ms) | spread | vs sdpa |",
           "|---|---|---|---|"]
    for name, r in d["results"].items():
        out.append(f"| `{name}` | {r['median_ms']:.2f} | ±{r['spread_ms']:.2f} | {r['vs_sdpa']:.3f} |")
    return out + [""]


def render_page() -> str:
    out = ["# Benchmarks", "",
           "Measured side by side in one run (the layerzero path and the direct call it replaces, interleaved), "
           "medians and p99; never timed assertions in tests. Regenerate this page (and the headline on the "
           "front page) with `python scripts/render_benchmarks.py && python scripts/build_readme.py`.", ""]
    cpu = RESULTS / "bench_cpu.json"
    if cpu.exists():
        out += _bench_section(cpu, "`layerzero bench --quick` on the 2-core development machine (CPU)",
                              "layerzero bench --quick --json benchmarks/results/bench_cpu.json")
    for path in sorted(RESULTS.glob("bench_NVIDIA*.json")):
        card = path.stem.removeprefix("bench_").replace("_", " ")
        quick = json.loads(path.read_text()).get("workload", {}).get("quick", False)
        out += _bench_section(path, f"`layerzero bench --device cuda{' --quick' if quick else ''}` on an {card} "
                              "(host time per call)", f"bash scripts/gpu_run.sh {'benchq' if quick else 'bench'}")
    for path in sorted(RESULTS.glob("gpu_bench_*.json")):
        out += _gpu_bench_section(path)
    for path in sorted(RESULTS.glob("gpu_varlen_paged_*.json")):
        out += _varlen_paged_section(path)
    for path in sorted(RESULTS.glob("compile_check_*.json")):
        out += _compile_check_section(path)
    out += MODEL_BENCH_ABOUT.splitlines() + [""]
    for path in sorted(RESULTS.glob("model_bench_*.json")):
        out += _model_bench_section(path)
    return "\n".join(out).rstrip() + "\n"


def render_headline() -> str:
    """The front page's benchmark lines: the latest measured selection on a GPU and the CPU dispatch overhead."""
    lines = []
    if LATEST_GPU_BENCH.exists():
        d = json.loads(LATEST_GPU_BENCH.read_text())
        s = d["summary"]
        run = LATEST_GPU_BENCH.stem.rsplit("_run", 1)[1] if "_run" in LATEST_GPU_BENCH.stem else None
        slower = len(s["shapes_slower_than_default_beyond_noise"])
        lines.append(f"- **Measured selection on an {d['gpu']}**{f' (run {run})' if run else ''}, torch {d['torch']}, "
                     f"CUDA {d['cuda']}: over {s['shapes']} shapes the kernel layerzero runs is "
                     f"**{s['geomean_lz_over_best']:.3f}x** the fastest kernel and **{s['geomean_lz_over_default']:.3f}x** "
                     f"PyTorch's default (geometric means); {slower} shape{'' if slower == 1 else 's'} slower than "
                     f"the default beyond the measured spread; tuning took {s['tune_s']:.1f} s.")
    cpu = RESULTS / "bench_cpu.json"
    if cpu.exists():
        d = json.loads(cpu.read_text())
        hw, sw = d["system"]["hardware"], d["system"]["software"]
        row = next(o for o in d["overhead"] if o["path"] == "lz.attention(q, k, v) cached")
        budgets = [o for o in d["overhead"] if not o.get("info", False)]
        lines.append(f"- **Dispatch overhead on a {hw['cpu_cores']}-core {hw['cpu']} CPU** "
                     f"(`layerzero bench --quick`, torch {sw['pytorch']}): a cached `lz.attention` call is "
                     f"**{row['result']['ratio']:.3f}x** the direct `{row['direct']}` call "
                     f"(+{row['result']['overhead_ns'] / 1000:.1f} us at p50); "
                     f"{sum(o['passed'] for o in budgets)}/{len(budgets)} overhead budget lines pass.")
    lines += _ragged_headline()
    lines += _model_headline()
    return "\n".join(lines)


def _ragged_headline() -> list[str]:
    """The packed and paged attention line of the latest ``scripts/gpu_varlen_paged.py`` run."""
    if not LATEST_VARLEN_PAGED.exists():
        return []
    d = json.loads(LATEST_VARLEN_PAGED.read_text())
    packed = {r["kernel"]: r["ms"] for r in d["packed_vs_padded"]}
    fast = {(r["batch"], r["context"], r["page"]): r["us"] for r in d["paged_vs_dense"]
            if r["kernel"] == "flex_attention_paged" and r["us"]}
    ratios = [us / r["us"] for r in d["paged_vs_dense"] if r["kernel"] == "torch_paged_dense"
              for us in [fast.get((r["batch"], r["context"], r["page"]))] if us]
    if "flex_attention_varlen" not in packed or not ratios:
        return []
    return [f"- **Packed and paged attention on an {d['device']}** (`scripts/gpu_varlen_paged.py`): a 32k-token "
            f"packed mix runs in **{packed['flex_attention_varlen']:.2f} ms** with `flex_attention_varlen` against "
            f"{packed['padded_sdpa']:.2f} ms for SDPA padded to the longest sequence; a paged decode step with "
            f"`flex_attention_paged` takes **{min(ratios):.2f}-{max(ratios):.2f}x** the time of gathering the pages "
            f"(`torch_paged_dense`), batch 1-64, contexts 1k-32k."]


#: Model-bench files kept out of the README's headline (diagnostic reruns; docs/benchmarks.md has them all).
# The front page shows what a user gets by default: the shipped-table run of the issue-19 config, not the
# earlier runs of it (before shipped measurements, online tuning, tuned), which docs/benchmarks.md keeps; and
# not the CPU smoke-test size (host overhead, not kernel speed).
HEADLINE_SKIP = ("_tuned", "_compiled_layers", _ONLINE, "llama128k_NVIDIA", "model_bench_cpu",
                 "model_bench_NVIDIA_H200")  # the last: a 1-compiled-round run, superseded by the compiled runs


def _model_headline() -> list[str]:
    """Per card, the whole-model ratios: each variant's median time over the reference's of the same mode."""
    from layerzero.bench.model_report import render_ratio_table, rounds_text

    lines = []
    for path in sorted(RESULTS.glob("model_bench_*.json")):
        if any(part in path.name for part in HEADLINE_SKIP):
            continue
        d = json.loads(path.read_text())
        c, m = d["config"], d["config"]["model_config"]
        tiny = " (a smoke-test size: the ratios show host overhead more than kernel speed)" if c["quick"] else ""
        title = _model_title(d, path.stem.removesuffix("_" + c["card"]))
        lines += [f"- **A whole model**, {title}, {m['num_hidden_layers']} layers, hidden "
                  f"{m['hidden_size']}, {c['dtype']}{tiny}: median time over `{c['variants'][0]}` of the same mode "
                  f"({rounds_text(d)} interleaved rounds):", ""]
        lines += ["  " + line for line in render_ratio_table(d)] + [""]
    return lines[:-1] if lines else lines


def with_headline(index: str, headline: str) -> str:
    start, end = index.index(HEADLINE_START) + len(HEADLINE_START), index.index(HEADLINE_END)
    return index[:start] + "\n" + headline + "\n" + index[end:]


def main(argv: list[str]) -> int:
    page = render_page()
    index = with_headline(INDEX.read_text(), render_headline())
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p, text in ((PAGE, page), (INDEX, index)) if p.read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}: run python scripts/render_benchmarks.py && "
                  "python scripts/build_readme.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    INDEX.write_text(index)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
