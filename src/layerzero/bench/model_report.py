"""Render a model-bench report (the JSON of :meth:`~layerzero.bench.model.ModelBenchReport.to_dict`) as Markdown.

One table: per workload, mode and variant the median time over rounds with its min-max, the ratio to the
reference (``sdpa``; Gemma 2: ``eager``) of the same mode, peak extra memory (CUDA), agreement with the
reference (identical greedy tokens for decode, identical argmax positions for prefill) and the training loss
with its difference from the reference's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_model_markdown", "render_ratio_table", "rounds_text", "HEADER"]

HEADER = ("| Workload | Mode | Variant | Median (ms) | Min-max (ms) | vs {ref} | Peak extra (MB) | Agreement "
          "| Loss (diff vs {ref}) | Warm-up (s) |")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _loss(r: dict[str, Any], ref: str) -> str:
    if r.get("loss") is None:
        return "-"
    diff = r.get("loss_diff")
    return f"{r['loss']:.4f}" + ("" if diff is None or r["variant"] == ref else f" ({diff:.1e})")


def _row(r: dict[str, Any], ref: str) -> str:
    if r.get("error"):
        return f"| {r['workload']} | {r['mode']} | {r['variant']} | failed: {r['error']} | | | | | | |"
    spread = "-" if r.get("min_ms") is None else f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
    ratio = "1.000" if r["variant"] == ref and r.get("median_ms") is not None else _num(r.get("ratio"), ".3f")
    agreement = "-" if r["workload"] == "train" else _num(r.get("agreement"), ".3f")
    return (f"| {r['workload']} | {r['mode']} | {r['variant']} | {_num(r.get('median_ms'), '.2f')} | {spread} | "
            f"{ratio} | {_num(r.get('peak_mb'), '.0f')} | {agreement} | {_loss(r, ref)} | {_num(r.get('warmup_s'), '.1f')} |")


def _scope(c: dict[str, Any]) -> str:
    if "compiled" not in c["modes"]:
        return ""
    scope = ("each decoder layer compiled (`layer.compile()`)" if c.get("compile_scope") == "layers"
             else "`torch.compile(model)`")
    decode = "; compiled decode uses a `StaticCache`" if any(w.startswith("decode") for w in c["workloads"]) else ""
    return f" Compiled: {scope}{decode}."


def rounds_text(data: dict[str, Any]) -> str:
    return ", ".join(f"{n} {mode}" for mode, n in data["rounds_run"].items()) or "none"


def _setup(data: dict[str, Any]) -> list[str]:
    c = data["config"]
    m, s = c["model_config"], c["shapes"]
    hw, sw = data["system"]["hardware"], data["system"]["software"]
    where = hw.get("gpu") or f"{hw.get('cpu_cores')}-core {hw.get('cpu')}"
    return [f"{c['model']} from a config with random weights: hidden {m['hidden_size']}, "
            f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} / {m['num_key_value_heads']} heads, "
            f"intermediate {m['intermediate_size']}, vocabulary {m['vocab_size']}, {c['dtype']}; on {where} "
            f"(torch {sw.get('pytorch')}, transformers {c['transformers']}). Prefill and training step: batch "
            f"{s['batch']} x {s['seq']} tokens; decode: {s['new_tokens']} greedy tokens after a {s['prompt']}-token "
            f"prompt.{_scope(c)} Interleaved rounds (of {c['rounds']}): {rounds_text(data)}; bench took "
            f"{data['elapsed_s']:.1f} s."]


def render_model_markdown(data: dict[str, Any]) -> str:
    """The setup line, the table, and the skipped variants with their reasons."""
    ref = data["config"]["variants"][0]
    lines = _setup(data) + ["", HEADER.format(ref=ref), "|" + "---|" * 10]
    order = {w: i for i, w in enumerate(data["config"]["workloads"])}
    modes = {m: i for i, m in enumerate(data["config"]["modes"])}
    variants = {v: i for i, v in enumerate(data["config"]["variants"])}
    rows = sorted(data["results"], key=lambda r: (order.get(r["workload"], 99), modes.get(r["mode"], 9),
                                                   variants.get(r["variant"], 99)))
    lines += [_row(r, ref) for r in rows]
    if data.get("notes"):
        lines += [""] + [f"- `{name}`: {note}" for name, note in data["notes"].items()]
    if data.get("skipped"):
        lines += [""] + [f"- skipped `{name}`: {reason}" for name, reason in data["skipped"].items()]
    if data["config"]["device"] == "cpu":
        lines += ["", "Peak memory is not measured on the CPU (no allocator statistics there): `-`."]
    return "\n".join(lines)


def _peak_ratio(row: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    """``row``'s peak memory over ``ref``'s, or "-" where either has none."""
    if not (row and ref and not row.get("error") and row.get("peak_mb") and ref.get("peak_mb")):
        return "-"
    return _num(row["peak_mb"] / ref["peak_mb"], ".3f")


def render_ratio_table(data: dict[str, Any]) -> list[str]:
    """The compact table of the front page: per workload, each variant's median over the reference's, per mode."""
    columns = [(m, v) for m in data["config"]["modes"] for v in data["config"]["variants"][1:]
               if any(r["mode"] == m and r["variant"] == v for r in data["results"])]
    cells = {(r["workload"], r["mode"], r["variant"]): r for r in data["results"]}
    lines = ["| workload | " + " | ".join(f"{m} `{v}`" for m, v in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for w in data["config"]["workloads"]:
        row = []
        for m, v in columns:
            r = cells.get((w, m, v))
            error = r.get("error") if r is not None else None
            row.append(("not run" if str(error).startswith("not run") else "failed") if error
                       else _num(r and r.get("ratio"), ".3f"))
        lines.append(f"| {w} | " + " | ".join(row) + " |")
        if w == "train":  # the training step's peak memory, over the reference's of the same mode
            reference = data["config"]["variants"][0]
            mem = [_peak_ratio(cells.get((w, m, v)), cells.get((w, m, reference))) for m, v in columns]
            if any(x != "-" for x in mem):
                lines.append("| train peak memory | " + " | ".join(mem) + " |")
    return lines
