"""``layerzero bench --model``: a whole transformers model, timed per workload, variant and mode.

A Llama / Qwen2 (Gemma 2 once layerzero's attention takes its softcap) built from a config with random
weights (no download), run by each variant of :mod:`layerzero.bench.model_variants`, eager and compiled
(``torch.compile(model)``), over four workloads:

* ``prefill``: one forward over ``batch x seq`` tokens (no cache), under ``torch.no_grad``;
* ``decode_b1`` / ``decode_b8``: greedy decode of ``new_tokens`` tokens after a ``prompt``-token prompt, at
  batch 1 and 8 (prompt forward included), with a KV cache: eager, a ``DynamicCache`` that grows; compiled, a
  ``StaticCache`` of ``prompt + new_tokens`` tokens made once per entry and reset before each run, as compiled
  decoding is done (a growing cache changes shape every token: Dynamo recompiles until it marks the length
  dynamic, about 100 s per variant for the ~1B config on an H200);
* ``train``: forward with labels and backward over ``batch x seq`` tokens (no optimizer step; the gradients
  are dropped after each step).

Per mode (eager first, so its rows are saved before compiling starts), each round runs every variant once per
workload, the order rotating from round to round; one warm-up call per entry first (compilation happens
there). On CUDA no warm-up and no round after the first starts after ``budget_s`` (default 420 s): what was
not begun by then is reported as not run. Per entry: the median and min-max over rounds, the ratio
to ``sdpa`` (Gemma 2: ``eager``) of the same mode, peak memory on CUDA (``torch.cuda.max_memory_allocated`` after a reset, minus
what was allocated before the call: activations and temporaries, not the resident weights; ``None`` on the
CPU, which has no allocator statistics), and agreement with ``sdpa`` of the same mode on the warm-up call:
the fraction of identical greedy tokens (decode), of identical argmax positions (prefill), and the loss
difference (train).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerzero.bench.model_variants import (LIGER_VARIANTS, MODELS, MODES, WORKLOADS, Variant, build_base,
                                            build_variants, check_layerzero_attention, liger_unavailable_reason,
                                            model_config, reference_name, variant_names)
from layerzero.errors import UnsupportedModelError

__all__ = ["ModelBenchOptions", "ModelBenchReport", "EntryResult", "WORKLOADS", "MODES", "run_model_bench",
           "card_name"]


@dataclass
class ModelBenchOptions:
    model: str = "llama"
    device: str = "cpu"
    quick: bool = False
    rounds: int | None = None  # default: 10 on the CPU, 5 on CUDA
    workloads: tuple[str, ...] = WORKLOADS
    modes: tuple[str, ...] | None = None  # default: eager on the CPU (compiling takes minutes there), both on CUDA
    dtype: str | None = None  # default: float32 on the CPU, bfloat16 on CUDA
    layers: int | None = None
    budget_s: float | None = None  # no warm-up / later round starts after this many seconds (default: 420 on CUDA)
    compile_scope: str = "model"  # "model": torch.compile(model); "layers": each decoder layer compiled
    liger: bool = True
    vocab: int | None = None  # vocabulary size (default: the device's config, 32000 on CUDA)
    seq: int | None = None  # tokens per sequence of prefill and train (default: the device's shapes)

    @property
    def n_rounds(self) -> int:
        return self.rounds or (5 if self.cuda else 10)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def mode_list(self) -> tuple[str, ...]:
        return self.modes or (MODES if self.cuda else ("eager",))

    @property
    def torch_dtype(self) -> torch.dtype:
        from layerzero.context import dtype_from_name

        return dtype_from_name(self.dtype) if self.dtype else (torch.bfloat16 if self.cuda else torch.float32)

    @property
    def budget(self) -> float | None:
        return self.budget_s if self.budget_s is not None else (420.0 if self.cuda else None)

    def shapes(self) -> dict[str, int]:
        if self.cuda:
            shapes = dict(batch=4, seq=1024, prompt=128, new_tokens=32)
        elif self.quick:
            shapes = dict(batch=2, seq=32, prompt=8, new_tokens=8)
        else:
            shapes = dict(batch=2, seq=128, prompt=32, new_tokens=16)
        if self.seq:
            shapes["seq"] = self.seq
        return shapes

    def validate(self) -> None:
        if self.model not in MODELS:
            raise UnsupportedModelError(f"layerzero bench --model {self.model!r}: unknown model; choose one of "
                                        f"{', '.join(MODELS)}", model_class=self.model)
        bad = [w for w in self.workloads if w not in WORKLOADS] + [m for m in self.mode_list if m not in MODES]
        if self.compile_scope not in ("model", "layers"):
            bad.append(f"compile scope {self.compile_scope!r} (model or layers)")
        if bad or not self.workloads:
            raise ValueError(f"layerzero bench --model: unknown workload or mode {', '.join(bad) or '(none given)'};"
                             f" workloads: {', '.join(WORKLOADS)}; modes: {', '.join(MODES)}")


@dataclass
class EntryResult:
    """One (workload, variant, mode): timings over rounds and the checks against ``sdpa``."""

    workload: str
    variant: str
    mode: str
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    agreement: float | None = None  # decode: identical tokens; prefill: identical argmax; vs sdpa, same mode
    loss: float | None = None
    loss_diff: float | None = None  # |loss - sdpa loss|, same mode
    ratio: float | None = None  # median / sdpa median, same mode and workload
    warmup_s: float | None = None
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["median_ms"] = self.median_ms
        d["min_ms"] = min(self.times_ms) if self.times_ms else None
        d["max_ms"] = max(self.times_ms) if self.times_ms else None
        return d


@dataclass
class ModelBenchReport:
    system: dict[str, Any]
    config: dict[str, Any]
    results: list[EntryResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it has no rows
    notes: dict[str, str] = field(default_factory=dict)  # variant -> what it is
    rounds_run: dict[str, int] = field(default_factory=dict)  # mode -> rounds completed
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "model_bench", "system": self.system, "config": self.config,
                "results": [r.to_dict() for r in self.results], "skipped": self.skipped, "notes": self.notes,
                "rounds_run": self.rounds_run, "elapsed_s": self.elapsed_s}


def card_name(device: str) -> str:
    """``cpu``, or the CUDA device's name with spaces as underscores (``NVIDIA_H200``)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return "cpu"


# -- workloads --------------------------------------------------------------------------------------------

def _inputs(opts: ModelBenchOptions, vocab: int) -> dict[str, torch.Tensor]:
    s = opts.shapes()
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (max(s["batch"], 8), max(s["seq"], s["prompt"])), generator=gen)
    ids = ids.to(opts.device)
    return {"prefill": ids[: s["batch"], : s["seq"]], "train": ids[: s["batch"], : s["seq"]],
            "decode_b1": ids[:1, : s["prompt"]], "decode_b8": ids[:8, : s["prompt"]]}


def _prefill(call: Callable[..., Any], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return call(input_ids=ids, use_cache=False).logits.argmax(-1)


def _cache_keyword(model: Any) -> str:
    """``cache`` (transformers 5.2x) or ``past_key_values`` (earlier): what ``model.forward`` takes."""
    import inspect

    # the class's forward: patch() installs a (*args, **kwargs) forward on the instance
    forward = getattr(type(model), "forward", model.forward)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _static_cache(model: Any, batch: int, max_len: int) -> Any:
    """A ``StaticCache`` of ``max_len`` tokens for ``model``, initialized up front (its tensors then have fixed
    addresses and shapes, so a compiled decode step is traced once, not once per cache length)."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    if hasattr(cache, "early_initialization"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, param.dtype, param.device)
    return cache


def _decode(call: Callable[..., Any], ids: torch.Tensor, new_tokens: int, cache_kw: str,
            static: Any = None) -> torch.Tensor:
    """Greedy decode; ``static``: a ``StaticCache`` to reset and use (else each run grows a ``DynamicCache``)."""
    with torch.no_grad():
        first: dict[str, Any] = {}
        if static is not None:
            static.reset()
            first[cache_kw] = static
        out = call(input_ids=ids, use_cache=True, logits_to_keep=1, **first)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [tok]
        for _ in range(new_tokens - 1):
            cache = static if static is not None else _cache_of(out)
            out = call(input_ids=tok, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
    return torch.cat(tokens, dim=1)


def _train(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Forward with labels and backward in training mode; the gradients are dropped afterwards."""
    module.train()
    try:
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        module.eval()
        module.zero_grad(set_to_none=True)
    return loss.detach().float()


def _work(workload: str, variant: Variant, mode: str, inputs: dict[str, torch.Tensor],
          new_tokens: int) -> Callable[[], torch.Tensor]:
    call, ids = variant.calls[mode], inputs[workload]  # the model, torch.compile(model) or a layer-compiled twin
    if workload == "prefill":
        return lambda: _prefill(call, ids)
    if workload == "train":
        return lambda: _train(call, ids)
    cache_kw = _cache_keyword(variant.model)
    static = _static_cache(variant.model, ids.shape[0], ids.shape[1] + new_tokens) if mode == "compiled" else None
    return lambda: _decode(call, ids, new_tokens, cache_kw, static)


@contextlib.contextmanager
def _recompile_room(limit: int = 64) -> Iterator[None]:
    """Every variant and workload compiles the same ``forward`` code object: give Dynamo room for all of them
    (its default limit of 8 would silently fall back to eager for the later variants)."""
    import torch._dynamo.config as dynamo_config

    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(dynamo_config, n)]
    saved = {n: getattr(dynamo_config, n) for n in names}
    for n in names:
        setattr(dynamo_config, n, max(saved[n], limit * (8 if n.startswith("accumulated") else 1)))
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(dynamo_config, n, v)


def _timed(fn: Callable[[], torch.Tensor], cuda: bool) -> tuple[float, float | None, torch.Tensor]:
    """(milliseconds, peak extra MB or None, the call's output on the CPU)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated() - start_bytes) / 2**20 if cuda else None
    return ms, peak, out.cpu()


# -- the run ----------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    result: EntryResult
    fn: Callable[[], torch.Tensor]
    variant: Variant
    output: torch.Tensor | None = None


def _record(entry: _Entry, cuda: bool, warmup: bool) -> None:
    r = entry.result
    try:
        with entry.variant.active():
            ms, peak, out = _timed(entry.fn, cuda)
    except Exception as exc:  # one failing entry is reported with its reason; the others still run
        r.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        return
    if warmup:
        r.warmup_s, entry.output = ms / 1e3, out
        return
    r.times_ms.append(ms)
    if peak is not None:
        r.peak_mb = max(r.peak_mb or 0.0, peak)


def _compare(entries: list[_Entry], reference: str) -> None:
    """Agreement, loss difference and ratio of each entry against ``reference`` in the same workload and mode."""
    refs = {(e.result.workload, e.result.mode): e for e in entries if e.result.variant == reference}
    for e in entries:
        r, ref = e.result, refs.get((e.result.workload, e.result.mode))
        if r.workload == "train" and e.output is not None:
            r.loss = float(e.output)
        if ref is None or e.output is None or ref.output is None:
            continue
        if r.workload == "train":
            r.loss_diff = abs(float(e.output) - float(ref.output))
        else:
            r.agreement = float((e.output == ref.output).float().mean())
        if r.median_ms is not None and ref.result.median_ms:
            r.ratio = r.median_ms / ref.result.median_ms


def _entries(opts: ModelBenchOptions, variants: list[Variant], inputs: dict[str, torch.Tensor]) -> list[_Entry]:
    new_tokens = opts.shapes()["new_tokens"]
    return [_Entry(EntryResult(w, v.name, m), _work(w, v, m, inputs, new_tokens), v)
            for m in opts.mode_list for w in opts.workloads for v in variants]


def _over(budget: float | None, t_start: float) -> bool:
    return budget is not None and time.perf_counter() - t_start > budget


def _rounds(opts: ModelBenchOptions, entries: list[_Entry], report: ModelBenchReport, t_start: float,
            progress: Callable[[str], None], checkpoint: Callable[[ModelBenchReport], None] | None) -> None:
    """Per mode (eager first: its rows are saved before compiling starts), warm-up then interleaved rounds."""
    budget, reference = opts.budget, report.config["variants"][0]
    for mode in opts.mode_list:
        mine = [e for e in entries if e.result.mode == mode]
        if _over(budget, t_start):
            for e in mine:
                e.result.error = f"not run: the time budget of {budget:.0f} s was spent before {mode} mode started"
            continue
        for e in mine:
            if _over(budget, t_start):  # the rest of this mode's warm-ups (compilations) would overrun: not run
                e.result.error = f"not run: the time budget of {budget:.0f} s was spent during the {mode} warm-ups"
                continue
            progress(f"{time.perf_counter() - t_start:.0f} s: warm-up {mode} {e.result.variant} {e.result.workload}")
            _record(e, opts.cuda, warmup=True)
            if checkpoint is not None:
                checkpoint(report)
        for rnd in range(opts.n_rounds):
            if rnd > 0 and _over(budget, t_start):
                progress(f"time budget of {budget:.0f} s reached after {rnd} {mode} rounds")
                break
            for workload in opts.workloads:
                group = [e for e in mine if e.result.workload == workload and e.result.error is None]
                shift = rnd % max(len(group), 1)
                for e in group[shift:] + group[:shift]:
                    progress(f"{time.perf_counter() - t_start:.0f} s: round {rnd + 1}/{opts.n_rounds} {mode} "
                             f"{e.result.variant} {workload}")
                    _record(e, opts.cuda, warmup=False)
            report.rounds_run[mode] = rnd + 1
            _compare(entries, reference)
            report.elapsed_s = time.perf_counter() - t_start
            if checkpoint is not None:
                checkpoint(report)


def _config(opts: ModelBenchOptions, fields: dict[str, Any], variants: tuple[str, ...]) -> dict[str, Any]:
    import transformers

    return {"model": opts.model, "device": opts.device, "card": card_name(opts.device),
            "dtype": str(opts.torch_dtype).removeprefix("torch."), "quick": opts.quick,
            "model_config": fields, "shapes": opts.shapes(), "workloads": list(opts.workloads),
            "modes": list(opts.mode_list), "compile_scope": opts.compile_scope, "variants": list(variants), "rounds": opts.n_rounds,
            "budget_s": opts.budget, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def run_model_bench(opts: ModelBenchOptions, progress: Callable[[str], None] | None = None,
                    checkpoint: Callable[[ModelBenchReport], None] | None = None) -> ModelBenchReport:
    """Run the model bench; ``checkpoint`` gets the report after each round (to save partial results)."""
    from layerzero.doctor.hardware import hardware_info

    say = progress or (lambda _msg: None)
    opts.validate()
    t_start = time.perf_counter()
    say(f"checking attn_implementation='layerzero' on {opts.model}")
    check_layerzero_attention(opts.model)
    fields = model_config(opts.model, opts.device, opts.quick, opts.layers)
    if opts.vocab:
        fields["vocab_size"] = opts.vocab
    shapes = opts.shapes()
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], shapes["seq"], shapes["prompt"]
                                            + shapes["new_tokens"])
    names = variant_names(opts.model, opts.liger)
    report = ModelBenchReport(hardware_info(), _config(opts, fields, names))
    liger_reason = liger_unavailable_reason(opts.device) if opts.liger else None
    if liger_reason:
        names = variant_names(opts.model, False)
        report.skipped.update({name: liger_reason for name in LIGER_VARIANTS})
    say(f"building {opts.model} ({fields['num_hidden_layers']} layers) on {opts.device}")
    base = build_base(opts.model, fields, opts.device, opts.torch_dtype, attn=reference_name(opts.model))
    variants, skipped = build_variants(opts.model, base, names, opts.mode_list, opts.compile_scope)
    report.skipped.update(skipped)
    report.notes.update({v.name: v.note for v in variants if v.note})
    entries = _entries(opts, variants, _inputs(opts, fields["vocab_size"]))
    report.results = [e.result for e in entries]
    threads = torch.get_num_threads()
    if not opts.cuda:
        torch.set_num_threads(1)  # as `layerzero bench` on the CPU: one thread, quieter on a shared machine
    report.config["torch_threads"] = torch.get_num_threads()
    try:
        with _recompile_room() if "compiled" in opts.mode_list else contextlib.nullcontext():
            _rounds(opts, entries, report, t_start, say, checkpoint)
    finally:
        torch.set_num_threads(threads)
        _release(variants)
    _compare(entries, reference_name(opts.model))
    report.elapsed_s = time.perf_counter() - t_start
    return report


def _release(variants: list[Any]) -> None:
    """Undo the patched variant's process-wide changes (its rope function in transformers' modeling module)."""
    from layerzero.integrations.transformers import unpatch

    for v in variants:
        if v.name == "layerzero+patch":
            unpatch(v.model)
