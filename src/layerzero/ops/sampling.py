"""``lz.sample``: next-token sampling from logits (greedy, temperature, top-k, top-p).

Kernels receive ``(logits, temperature, top_k, top_p, generator)`` and return
int64 token ids of shape ``logits.shape[:-1]``. The operation follows from the
arguments: ``temperature <= 0`` is ``sample.greedy``; otherwise ``sample.top_p``
when ``top_p`` is given (top-k applied first when both are), ``sample.top_k``
when only ``top_k`` is, and ``sample.temperature`` for plain sampling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.ops.base import (FLOAT_MAX, GUARD_NAMES, OpDef, default_generator, dense_guard, finite_number,
                                layout_problem, option_number, pick, shown)
from layerzero.ops.contract import CallContract
from layerzero.runtime import get_runtime
from layerzero.tensor_helpers import valueless

__all__ = ["sample", "SAMPLE", "SampleOp", "filtered_probs", "sampling_operation"]


def sampling_operation(temperature: float, top_k: int | None, top_p: float | None) -> str:
    if temperature <= 0:
        return "sample.greedy"
    if top_p is not None:
        return "sample.top_p"
    if top_k is not None:
        return "sample.top_k"
    return "sample.temperature"


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Float64 reference distribution after temperature, top-k and top-p filtering."""
    x = logits.double() / max(temperature, 1e-30)
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, idx = torch.sort(probs, dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = (cum - sp) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class SampleOp(OpDef):
    family = "sample"
    arg_names = ("logits", "temperature", "top_k", "top_p", "generator")
    input_aliases = ("x",)

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        logits, temperature, top_k, top_p, generator = args
        if not isinstance(logits, torch.Tensor):
            raise self.invalid(operation, f"logits must be a torch.Tensor, got {type(logits).__name__}", args)
        problem = layout_problem("logits", logits)
        if problem is not None:
            raise self.invalid(operation, problem, args)
        if logits.dim() < 1 or logits.shape[-1] == 0:
            raise self.invalid(operation, "logits need a non-empty vocabulary (last) dimension", args)
        if not logits.is_floating_point():
            raise self.invalid(operation, f"logits must be floating point, got {logits.dtype}", args)
        if logits.is_meta:
            raise self.invalid(operation, "logits are a meta tensor: a sampled token depends on values it has none of",
                               args)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise self.invalid(operation, f"temperature must be a number, got {shown(temperature)}", args)
        if temperature != temperature:
            raise self.invalid(operation, "temperature is NaN (a number is needed: 0 or less for greedy)", args)
        if not finite_number(temperature):  # inf sampled uniformly; 10**400 overflowed in the kernels
            raise self.invalid(operation, f"temperature must be finite, got {shown(temperature)}", args)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise self.invalid(operation, f"top_k must be a positive int or None, got {shown(top_k)}", args)
        if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                                  or not 0.0 < top_p <= 1.0):
            raise self.invalid(operation, f"top_p must be in (0, 1] or None, got {shown(top_p)}", args)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise self.invalid(operation, f"generator must be a torch.Generator or None, got {type(generator).__name__}", args)

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        return SelectionContext.from_rows(args[0], requires_grad=False)

    def diagnose(self, operation: str, args: tuple[Any, ...]) -> None:
        logits = args[0]
        flat = logits.detach().reshape(-1, logits.shape[-1])
        bad = torch.isnan(flat).any(-1) | torch.isposinf(flat).any(-1) | ~(flat > float("-inf")).any(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:8].tolist()
            raise self.invalid(operation, f"logits rows {rows} hold NaN or +inf, or no finite logit at all: no "
                                          "distribution to sample from", args)

    def consumes_rng(self, operation: str, ctx: SelectionContext) -> bool:
        return operation != "sample.greedy"

    def generator(self, operation: str, args: tuple[Any, ...]) -> torch.Generator | None:
        logits, temperature, _, _, generator = args
        if not temperature > 0:
            return None  # greedy: nothing random
        if generator is not None:
            return generator
        return default_generator(logits.device)

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        logits = args[0]
        problem = self.output_meta_check(operation, out, logits.shape[:-1], torch.int64, logits.device)
        if problem is None and out.numel() and not valueless(out) and (
                int(out.min()) < 0 or int(out.max()) >= logits.shape[-1]):
            return f"returned token ids outside [0, {logits.shape[-1]})"
        return problem

    def reference(self, operation: str, args: tuple[Any, ...]) -> torch.Tensor:
        logits, temperature, top_k, top_p, _ = args
        if temperature <= 0:
            return logits.double().argmax(-1)
        return filtered_probs(logits, temperature, top_k, top_p)

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        logits = torch.randn(ctx.num_tokens or ctx.batch_size or 4, ctx.hidden_size or 32000, device=ctx.device,
                             dtype=ctx.dtype or torch.float32, generator=generator) * 3
        temperature = 0.0 if operation == "sample.greedy" else 0.8
        top_k = 50 if operation in ("sample.top_k", "sample.top_p") else None
        top_p = 0.9 if operation == "sample.top_p" else None
        return (logits, temperature, top_k, top_p, None)

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**inputs, **kwargs}
        default_t = 0.0 if operation == "sample.greedy" else 1.0
        return (pick(merged, "logits", "x", operation=operation), option_number(merged, "temperature", default_t, operation),
                merged.get("top_k"), merged.get("top_p"), merged.get("generator"))

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        return [SelectionContext(device=device, dtype=torch.float32, hidden_size=v, num_tokens=n, batch_size=n)
                for n, v in ((1, 32000), (8, 1024))]


SAMPLE = SampleOp()


def _operation(temperature: Any, top_k: Any, top_p: Any) -> str:
    try:
        return sampling_operation(temperature, top_k, top_p)
    except (TypeError, RuntimeError):  # a temperature that does not compare (a str, a tensor of several values):
        return "sample.temperature"    # validation names it


#: ``lz.sample``'s cached call: one plan per logits shape; the numbers (temperature, top_k, top_p) are not keyed
#: (each call may use others), so the guard checks each as validation does: a NaN temperature, ``top_p=1.5`` or
#: ``nan``, ``top_k=0`` or a float never reach a cached plan.
SAMPLE_CONTRACT = CallContract(
    name="sample",
    signature="logits, temperature=1.0, top_k=None, top_p=None, generator=None",
    args="logits, temperature, top_k, top_p, generator",
    prologue="operation = sampling_operation(temperature, top_k, top_p)",
    operation="operation",
    family="(operation, logits.dtype, logits.is_cpu or logits.device)",
    shape="logits.shape",
    guard="((temperature.__class__ is float or temperature.__class__ is int) and -FLOAT_MAX <= temperature <= FLOAT_MAX "
          "and (top_k is None or top_k.__class__ is int and top_k >= 1) "
          "and (top_p is None or (top_p.__class__ is float or top_p.__class__ is int) and 0.0 < top_p <= 1.0) "
          "and (generator is None or generator.__class__ is Generator)) and " + dense_guard("logits", shapes_keyed=True),
    namespace={"sampling_operation": _operation, "Generator": torch.Generator, "FLOAT_MAX": FLOAT_MAX, **GUARD_NAMES},
    doc="""Sample token ids from ``logits`` (``(..., vocab)``); returns int64 of shape ``logits.shape[:-1]``.

    A seeded call (``generator=``, or the global seed) draws the same tokens whatever failed before it: a
    kernel that raises hands the generator back as it found it before the next kernel runs.

    Example:
        >>> next_ids = lz.sample(logits, temperature=0.0)            # greedy
        >>> next_ids = lz.sample(logits, temperature=0.7, top_p=0.9)  # nucleus
    """,
)

sample = SAMPLE.bind_contract(SAMPLE_CONTRACT, get_runtime())
