"""``lz.readiness_check()``: each operation run once through layerzero and checked against its reference."""

from __future__ import annotations

import sys
from typing import Any

import torch

from layerzero.runtime import get_runtime

__all__ = ["readiness_check"]


def readiness_check(operations: tuple[str, ...] = ("attention.causal", "rms_norm"), device: str | None = None
                    ) -> dict[str, Any]:
    """Run each operation once on small random inputs through layerzero and check it against the reference.

    Returns ``{"ready": bool, "operations": {op: {"kernel": id, "ok": bool, "error": str|None}}}``.
    """
    from layerzero.ops import op_for

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rt = get_runtime()
    results: dict[str, Any] = {}
    for operation in operations:
        op = op_for(operation)
        ctx = op.sample_contexts(operation, dev)[0]
        try:
            args = op.make_inputs(operation, ctx)
            plan = rt.plan_for(op, operation, op.context(operation, args))
            rt.telemetry.record_miss()  # a call that needed selection
            out = rt.run_plan(plan, args, 0, check_output=True)
            ref = op.reference(operation, args)
            ok = True
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                atol, rtol = plan.selected.tolerance_for(out.dtype)
                ok = bool(torch.allclose(out.double(), ref, atol=atol * 4, rtol=rtol * 4))
            results[operation] = {"kernel": plan.kernel_id, "ok": ok, "error": None}
        except Exception as exc:
            results[operation] = {"kernel": None, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ready": all(r["ok"] for r in results.values()), "device": dev, "python": sys.version.split()[0],
            "operations": results}
