"""The bad-input catalog (docs/bad-inputs.md): one test per row, and a test that the doc and this table agree.

``ROWS`` mirrors the doc's table: an id, the class of bad input, the input, the error type and the
message. Each row's ``run`` makes that bad input for real (tensors, files, SQLite databases) and the
row's test checks the exact error type and message. Messages are compared exactly, with two
abbreviations the doc uses too: a trailing ``(inputs: …)`` stands for the description of every input
(``q=Tensor(shape=(2, 16, 32), dtype=float32, device=cpu), ...``), and ``<db>`` / ``<dir>`` stand for
temporary paths. Errors of config and policy documents show their first listed error (``.errors[0]``),
the one with the path inside the document. Rows whose error is ``—`` raise nothing on purpose
(a corrupt performance database is set aside and rebuilt; a rejected hot reload keeps the running
config): their ``run`` returns the line that is logged or recorded instead.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from log_lines import LogLines
import layerzero as lz
from layerzero.dispatch import DispatchConfig, create_hot_reload_dispatcher, dispatch
from layerzero.errors import InvalidInputError
from layerzero.errors import ConditionError, ConfigError, LayerZeroError, PolicyError
from layerzero.tuning.perfdb import APPLICATION_ID, SCHEMA_VERSION, PerfDB, Record

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
NONE = "—"


@dataclass(frozen=True)
class Row:
    id: str
    klass: str
    bad: str
    error: str
    message: str
    run: Callable[[Path], Any]


def t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)


def qkv(b: int = 1, h: int = 2, s: int = 4, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t(b, h, s, d), t(b, h, s, d), t(b, h, s, d)


def inference(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor made under ``torch.inference_mode``."""
    with torch.inference_mode():
        return x.clone()


def varlen_window(window: int) -> Any:
    """Two causal sequences (3 and 5 tokens) packed, with ``window``."""
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return lz.attention_varlen(t(8, 2, 8), t(8, 2, 8), t(8, 2, 8), cu, cu, 5, 5, is_causal=True, window=window)


def attn(**kw: Any) -> Any:
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args.update({n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    return lz.attention(args["q"], args["k"], args["v"], **kw)


X, W = t(3, 8), t(8).abs() + 0.5


# -- files for the document, perf-DB and plan-table rows ----------------------------------------------------------

def policy_text(tmp: Path, text: str, name: str = "policy.yaml") -> Any:
    p = tmp / name
    p.write_text(text)
    return lz.configure(str(p))


def config_doc(data: dict[str, Any]) -> Any:
    from layerzero.dispatch import create_config_dispatcher

    return create_config_dispatcher(config_path={"version": "1.0", **data})


def hot_reload_rejects(tmp: Path) -> str:
    path = tmp / "kernels.yaml"
    path.write_text('version: "1.0"\nkernel_locks: {rms_norm: torch_rms_norm}\n')
    d = create_hot_reload_dispatcher(config_path=path, start_watching=False)
    try:
        path.write_text('version: "1.0"\ndispatch_rules:\n  - {operation: rms_norm, kernel: torch_rms_norm, '
                        'priority: 2000}\n')
        assert d.reload() is False
        assert d.stats.failed_reloads == 1 and d.stats.total_reloads == 0
        assert d.compiled.policy.rules[0].kernels == ("torch_rms_norm",)  # the running config stays
        assert d.dispatch("rms_norm", {"x": X, "weight": W}).kernel_id == "torch_rms_norm"
        return d.stats.last_error.splitlines()[1].strip()
    finally:
        d.close()


def perf_db_outcome(tmp: Path, make: Callable[[Path], None]) -> str:
    """Make a bad database file, read it through PerfDB: nothing raised, {} or rows skipped, one warning."""
    path = tmp / "perf.db"
    make(path)
    handler = LogLines()
    logger = logging.getLogger("layerzero")
    logger.addHandler(handler)
    try:
        db = PerfDB(path)
        found = db.lookup("hw", "rms_norm", "float32", "b")
        db.close()
    finally:
        logger.removeHandler(handler)
    if handler.lines and "holds a malformed row" in handler.lines[0]:
        assert found == {} and db.recoveries == 0 and len(handler.lines) == 1  # the file stays; one warning
        return "row skipped, one warning: lookup() returns {} for its bucket"
    if handler.lines:
        assert found == {}
        assert db.recoveries == 1 and path.exists() and list(tmp.glob("perf.db.corrupt-*"))
        return handler.lines[0].replace(str(path), "<db>")
    assert found == {}
    return "nothing to skip: lookup() returns {} for its bucket"


def random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def truncated(path: Path) -> None:
    good = PerfDB(path)
    good.record([Record("hw", "torch=1", f"k{i}", "rms_norm", "float32", "b", 1.0 + i, 0.1, 5) for i in range(300)])
    good.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def foreign(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (name TEXT, password TEXT)")
    con.commit()
    con.close()


def newer(path: Path) -> None:
    db = PerfDB(path)
    db.count()
    db.close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()


def poisoned_row(column: str, value: Any) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        db = PerfDB(path)
        db.count()
        db.close()
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        row = {"hardware": "hw", "libraries": "torch=1", "kernel_id": "torch_rms_norm", "operation": "rms_norm",
               "dtype": "float32", "bucket": "b", "median_us": 1.0, "spread_us": 0.1, "samples": 5, "failed": 0,
               "error": None, "source": "tune", "updated": 0.0}
        row[column] = value
        con.execute(f"INSERT INTO measurements ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()))
        con.commit()
        con.close()

    return make


def mismatched_plan_table(tmp: Path) -> Any:
    table = lz.solve({"rms_norm": [{"hidden_size": 8, "num_tokens": 3}]}, dtype="float32")
    data = table.to_dict()
    data["environment"]["hardware"]["cpu_model"] = "Imaginary CPU 9000"
    data["environment"]["torch"] = "0.0.1"
    path = tmp / "plans.json"
    path.write_text(json.dumps(data))
    return lz.PlanTable.load(path).install()


def nested_strided() -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([t(2, 8), t(3, 8)])


# -- packed (varlen) and paged attention: two sequences of 3 and 4 tokens, 4 query and 2 key/value heads -------------

def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def varlen(**kw: Any) -> Any:
    """``lz.attention_varlen`` of a valid packed batch, with the arguments in ``kw`` replaced."""
    args = {"q": t(7, 4, 8), "k": t(7, 2, 8), "v": t(7, 2, 8), "cu_seqlens_q": i32(0, 3, 7),
            "cu_seqlens_k": i32(0, 3, 7), "max_seqlen_q": 4, "max_seqlen_k": 4}
    args.update({n: kw.pop(n) for n in list(args) if n in kw})
    return lz.attention_varlen(*args.values(), **kw)


def paged(**kw: Any) -> Any:
    """``lz.attention_paged`` decode of 2 sequences (5 and 3 cached tokens) in 6 pages of 4, ``kw`` replaced."""
    args = {"q": t(2, 1, 4, 8), "k_cache": t(6, 4, 2, 8), "v_cache": t(6, 4, 2, 8), "block_table": i32(0, 1, 2, 3).view(2, 2),
            "seq_lens": i32(5, 3)}
    args.update({n: kw.pop(n) for n in list(args) if n in kw})
    return lz.attention_paged(*args.values(), **kw)


# -- the catalog ----------------------------------------------------------------------------------------------------

ROWS: list[Row] = [
    # rank
    Row("rank-attention", "rank", "`lz.attention` with a 3-D `q`", "InvalidInputError",
        "attention.full: q must be 4-D (batch, heads, seq, head_dim), got 3-D (inputs: …)",
        lambda tmp: attn(q=t(2, 4, 8))),
    Row("rank-norm", "rank", "`lz.rms_norm` of a 0-D tensor", "InvalidInputError",
        "rms_norm: x needs a non-empty last dimension (inputs: …)",
        lambda tmp: lz.rms_norm(torch.tensor(1.0), W)),
    Row("rank-rope-cos", "rank", "`lz.rope` with 0-D `cos`/`sin`", "InvalidInputError",
        "rope: cos and sin need a last dimension, got 0-D tensors (inputs: …)",
        lambda tmp: lz.rope(t(1, 2, 4, 8), torch.tensor(1.0), torch.tensor(1.0))),
    Row("rank-bshd", "rank", "`lz.attention(..., layout=\"BSHD\")` with a 1-D `q`", "InvalidInputError",
        "attention.full: q must be 4-D (batch, heads, seq, head_dim), got 1-D (inputs: …)",
        lambda tmp: attn(q=t(8), layout="BSHD")),
    # shape
    Row("shape-head-dim", "shape", "`q` and `k` head dims 8 and 16", "InvalidInputError",
        "attention.full: q and k head dims differ: 8 vs 16 (inputs: …)",
        lambda tmp: attn(k=t(1, 2, 4, 16))),
    Row("shape-batch", "shape", "`q` batch 1, `k`/`v` batch 2", "InvalidInputError",
        "attention.full: batch sizes differ: q=1, k=2, v=2 (inputs: …)",
        lambda tmp: attn(k=t(2, 2, 4, 8), v=t(2, 2, 4, 8))),
    Row("shape-kv", "shape", "`k` and `v` sequence lengths 4 and 5", "InvalidInputError",
        "attention.full: k and v must agree on heads and sequence length, got (1, 2, 4, 8) and (1, 2, 5, 8) (BHSD) "
        "(inputs: …)",
        lambda tmp: attn(v=t(1, 2, 5, 8))),
    Row("shape-kv-heads", "shape", "`k`/`v` with zero heads", "InvalidInputError",
        "attention.full: query heads (2) must be divisible by key/value heads (0) for grouped-query attention "
        "(inputs: …)", lambda tmp: attn(k=t(1, 0, 4, 8), v=t(1, 0, 4, 8))),
    Row("shape-empty", "shape", "`q` with zero queries", "InvalidInputError",
        "attention.full: empty attention inputs (a zero-sized dimension) (inputs: …)",
        lambda tmp: attn(q=t(1, 2, 0, 8))),
    Row("shape-q-heads", "shape", "`q` with zero heads (the GQA kernel ran it; torch_sdpa was blamed)",
        "InvalidInputError", "attention.full: empty attention inputs (a zero-sized dimension) (inputs: …)",
        lambda tmp: attn(q=t(1, 0, 4, 8))),
    Row("shape-weight", "shape", "`rms_norm` weight of 16 for hidden size 8", "InvalidInputError",
        "rms_norm: weight must have shape (8,) to match x's last dimension, got (16,) (inputs: …)",
        lambda tmp: lz.rms_norm(X, t(16))),
    Row("shape-swiglu", "shape", "`swiglu` gate (3, 8), up (3, 4)", "InvalidInputError",
        "swiglu: gate and up shapes differ: (3, 8) vs (3, 4) (inputs: …)",
        lambda tmp: lz.swiglu(X, t(3, 4))),
    Row("shape-rope", "shape", "`rope` with an odd head_dim (7)", "InvalidInputError",
        "rope: x must be (..., seq, head_dim) with an even head_dim, got (1, 2, 4, 7) (inputs: …)",
        lambda tmp: lz.rope(t(1, 2, 4, 7), t(4, 7), t(4, 7))),
    Row("shape-rope-cos", "shape", "`rope` cos/sin last dim 5 for head_dim 8", "InvalidInputError",
        "rope: cos/sin last dimension must be head_dim=8 or head_dim/2=4, got 5 (inputs: …)",
        lambda tmp: lz.rope(t(1, 2, 4, 8), t(4, 5), t(4, 5))),
    Row("shape-logits", "shape", "`sample` of logits with an empty vocabulary", "InvalidInputError",
        "sample.greedy: logits need a non-empty vocabulary (last) dimension (inputs: …)",
        lambda tmp: lz.sample(t(3, 0), temperature=0.0)),
    # dtype
    Row("dtype-mixed", "dtype", "`q` float32, `k`/`v` float64", "InvalidInputError",
        "attention.full: q, k and v must share a dtype, got torch.float32, torch.float64, torch.float64 (inputs: …)",
        lambda tmp: attn(k=t(1, 2, 4, 8, dtype=torch.float64), v=t(1, 2, 4, 8, dtype=torch.float64))),
    Row("dtype-int-attention", "dtype", "int64 `q`, `k`, `v`", "InvalidInputError",
        "attention.full: attention needs floating-point inputs, got torch.int64 (inputs: …)",
        lambda tmp: attn(q=t(1, 2, 4, 8, dtype=torch.int64), k=t(1, 2, 4, 8, dtype=torch.int64),
                         v=t(1, 2, 4, 8, dtype=torch.int64))),
    Row("dtype-int-norm", "dtype", "int64 `x` for `rms_norm`", "InvalidInputError",
        "rms_norm: x must be floating point, got torch.int64 (inputs: …)",
        lambda tmp: lz.rms_norm(t(3, 8, dtype=torch.int64), W)),
    Row("dtype-weight", "dtype", "int64 `weight` for `rms_norm`", "InvalidInputError",
        "rms_norm: weight must be floating point, got torch.int64 (inputs: …)",
        lambda tmp: lz.rms_norm(X, t(8, dtype=torch.int64))),
    Row("dtype-mask", "dtype", "int64 `attn_mask`", "InvalidInputError",
        "attention.full: attn_mask must be bool or torch.float32, got torch.int64 (inputs: …)",
        lambda tmp: attn(attn_mask=t(4, 4, dtype=torch.int64))),
    Row("dtype-mask-float32", "dtype", "a float32 `attn_mask` for bfloat16 `q`/`k`/`v` (SDPA accepts it; every "
        "kernel here takes q's dtype: cast the mask)", "InvalidInputError",
        "attention.full: attn_mask must be bool or torch.bfloat16, got torch.float32 (inputs: …)",
        lambda tmp: attn(q=t(1, 2, 4, 8, dtype=torch.bfloat16), k=t(1, 2, 4, 8, dtype=torch.bfloat16),
                         v=t(1, 2, 4, 8, dtype=torch.bfloat16), attn_mask=t(4, 4))),
    Row("dtype-complex", "dtype", "complex64 `x` for `silu`", "InvalidInputError",
        "silu: x must be floating point, got torch.complex64 (inputs: …)",
        lambda tmp: lz.silu(t(3, 8, dtype=torch.complex64))),
    Row("dtype-swiglu", "dtype", "`swiglu` gate float32, up float64", "InvalidInputError",
        "swiglu: gate and up dtypes differ: torch.float32 vs torch.float64 (inputs: …)",
        lambda tmp: lz.swiglu(X, t(3, 8, dtype=torch.float64))),
    # device
    Row("device-qkv", "device", "`q` on cpu, `k` on meta", "InvalidInputError",
        "attention.full: q, k and v must be on one device, got cpu, meta, cpu (inputs: …)",
        lambda tmp: attn(k=t(1, 2, 4, 8, device="meta"))),
    Row("device-mask", "device", "`attn_mask` on meta, `q` on cpu", "InvalidInputError",
        "attention.full: attn_mask is on meta, q on cpu (inputs: …)",
        lambda tmp: attn(attn_mask=torch.ones(4, 4, dtype=torch.bool, device="meta"))),
    Row("device-weight", "device", "`rms_norm` weight on meta, `x` on cpu", "InvalidInputError",
        "rms_norm: weight is on meta, x on cpu (inputs: …)",
        lambda tmp: lz.rms_norm(X, t(8, device="meta"))),
    Row("device-rope", "device", "`rope` cos/sin on meta, `x` on cpu", "InvalidInputError",
        "rope: cos, sin and x must be on one device, got cos on meta, sin on meta, x on cpu (inputs: …)",
        lambda tmp: lz.rope(t(1, 2, 4, 8), t(4, 8, device="meta"), t(4, 8, device="meta"))),
    # layout
    Row("layout-name", "layout", "`layout=\"BXYZ\"`", "InvalidInputError",
        "attention.full: layout must be one of ('BHSD', 'BSHD'), got 'BXYZ' (inputs: …)",
        lambda tmp: attn(layout="BXYZ")),
    Row("layout-sparse", "layout", "a sparse COO `x` for `rms_norm`", "InvalidInputError",
        "rms_norm: x must be a dense tensor, got layout=torch.sparse_coo (call .to_dense()) (inputs: …)",
        lambda tmp: lz.rms_norm(X.to_sparse(), W)),
    Row("layout-sparse-attention", "layout", "sparse COO `q`, `k`, `v`", "InvalidInputError",
        "attention.full: q must be a dense tensor, got layout=torch.sparse_coo (call .to_dense()) (inputs: …)",
        lambda tmp: attn(q=qkv()[0].to_sparse(), k=qkv()[1].to_sparse(), v=qkv()[2].to_sparse())),
    Row("layout-nested", "layout", "a nested tensor of the strided layout for `rms_norm`", "InvalidInputError",
        "rms_norm: x is a nested tensor of the strided layout (use layout=torch.jagged or pad it) (inputs: …)",
        lambda tmp: lz.rms_norm(nested_strided(), W)),
    Row("layout-sparse-up", "layout", "a sparse COO `up` for `swiglu` (a cached plan's kernel returned a sparse "
        "result)", "InvalidInputError",
        "swiglu: up must be a dense tensor, got layout=torch.sparse_coo (call .to_dense()) (inputs: …)",
        lambda tmp: lz.swiglu(X, X.to_sparse())),
    Row("grad-inference", "layout", "`q` made under `torch.inference_mode`, `k` requiring grad (its kernels were "
        "blamed)", "InvalidInputError",
        "attention.full: q is an inference tensor (made under torch.inference_mode) and another argument requires "
        "grad: autograd cannot save it for the backward (clone it outside inference_mode, or run the call under "
        "torch.no_grad) (inputs: …)",
        lambda tmp: attn(q=inference(t(1, 2, 4, 8)), k=t(1, 2, 4, 8).requires_grad_(True))),
    Row("layout-dispatch", "layout", "`dispatch(..., layout=\"SBHD\")`", "InvalidInputError",
        "attention.causal: layout must be 'BHSD' or 'BSHD', got 'SBHD'",
        lambda tmp: dispatch("attention.causal", dict(zip(("query", "key", "value"), qkv(), strict=True)),
                             layout="SBHD")),
    # GQA
    Row("gqa-divisibility", "GQA divisibility", "6 query heads, 4 key/value heads", "InvalidInputError",
        "attention.full: query heads (6) must be divisible by key/value heads (4) for grouped-query attention "
        "(inputs: …)",
        lambda tmp: attn(q=t(1, 6, 4, 8), k=t(1, 4, 4, 8), v=t(1, 4, 4, 8))),
    # mask
    Row("mask-shape", "mask shape", "`attn_mask` (3, 5) for (batch, heads, 4, 4)", "InvalidInputError",
        "attention.full: attn_mask of shape (3, 5) does not broadcast to (batch, heads, seq_q, seq_k)=(1, 2, 4, 4) "
        "(inputs: …)",
        lambda tmp: attn(attn_mask=torch.ones(3, 5, dtype=torch.bool))),
    Row("mask-and-causal", "mask shape", "`attn_mask` together with `is_causal=True`", "InvalidInputError",
        "attention.causal: attn_mask and is_causal=True cannot be combined (as in SDPA) (inputs: …)",
        lambda tmp: attn(attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)),
    # non-tensor
    Row("non-tensor-q", "non-tensor", "`q` given as a list", "InvalidInputError",
        "attention.full: q must be a torch.Tensor, got list (inputs: …)",
        lambda tmp: attn(q=[[1.0]])),
    Row("non-tensor-x", "non-tensor", "`x=None` for `rms_norm`", "InvalidInputError",
        "rms_norm: x must be a torch.Tensor, got NoneType (inputs: …)",
        lambda tmp: lz.rms_norm(None, W)),
    Row("non-tensor-weight", "non-tensor", "`weight` given as a list", "InvalidInputError",
        "rms_norm: weight must be a torch.Tensor or None, got list (inputs: …)",
        lambda tmp: lz.rms_norm(X, [1.0] * 8)),
    Row("non-tensor-mask", "non-tensor", "`attn_mask` given as a list", "InvalidInputError",
        "attention.full: attn_mask must be a torch.Tensor or None, got list (inputs: …)",
        lambda tmp: attn(attn_mask=[[True]])),
    Row("non-tensor-generator", "non-tensor", "`generator=1` for `sample`", "InvalidInputError",
        "sample.temperature: generator must be a torch.Generator or None, got int (inputs: …)",
        lambda tmp: lz.sample(X, temperature=1.0, generator=1)),
    Row("non-tensor-window", "non-tensor", "`window=[4]` (unhashable)", "InvalidInputError",
        "attention.full: window must be a positive int or None, got [4] (inputs: …)",
        lambda tmp: attn(window=[4])),
    Row("non-tensor-approximate", "non-tensor", "`gelu(x, approximate=[\"tanh\"])`", "InvalidInputError",
        "gelu: approximate must be 'none' or 'tanh', got ['tanh'] (inputs: …)",
        lambda tmp: lz.gelu(X, approximate=["tanh"])),
    Row("non-tensor-operation", "non-tensor", "`lz.attention(..., operation=5)`", "InvalidInputError",
        "attention: operation must be 'attention' or an 'attention.*' name, got 5 (inputs: …)",
        lambda tmp: attn(operation=5)),
    Row("operation-family", "non-tensor", "`lz.attention(..., operation=\"rms_norm\")`", "InvalidInputError",
        "attention: operation must be 'attention' or an 'attention.*' name, got 'rms_norm' (inputs: …)",
        lambda tmp: attn(operation="rms_norm")),
    # NaN-free contract (scalar arguments are checked; tensor contents only in verify mode)
    Row("nan-dropout", "NaN-free contract", "`dropout_p=nan`", "InvalidInputError",
        "attention.full: dropout_p must be in [0, 1), got nan (inputs: …)",
        lambda tmp: attn(dropout_p=float("nan"))),
    Row("nan-scale", "NaN-free contract", "`scale=nan`", "InvalidInputError",
        "attention.full: scale must be a finite number or None, got nan (inputs: …)",
        lambda tmp: attn(scale=float("nan"))),
    Row("inf-scale", "NaN-free contract", "`scale=inf` (every score inf: NaN out)", "InvalidInputError",
        "attention.full: scale must be a finite number or None, got inf (inputs: …)",
        lambda tmp: attn(scale=float("inf"))),
    Row("huge-scale", "NaN-free contract", "`scale=10**400` (no float holds it: a bare OverflowError before)",
        "InvalidInputError", "attention.full: scale must be a finite number or None, got an int of 401 digits "
        "(inputs: …)",
        lambda tmp: attn(scale=10**400)),
    Row("causal-scale", "NaN-free contract", "`scale=0.0` with `is_causal=True` (PyTorch's flash kernels: NaN)",
        "InvalidInputError", "attention.causal: scale=0.0 with a causal mask or window: PyTorch's flash kernels "
        "return NaN there (-inf * 0); a scale must be > 0 with them (inputs: …)",
        lambda tmp: attn(scale=0.0, is_causal=True)),
    Row("nan-eps", "NaN-free contract", "`eps=nan` for `rms_norm`", "InvalidInputError",
        "rms_norm: eps must be a positive number, got nan (inputs: …)",
        lambda tmp: lz.rms_norm(X, W, eps=float("nan"))),
    Row("negative-eps", "NaN-free contract", "`eps=-1e-6` (rsqrt of a negative: NaN out)", "InvalidInputError",
        "layer_norm: eps must be a positive number, got -1e-06 (inputs: …)",
        lambda tmp: lz.layer_norm(X, W, None, eps=-1e-6)),
    Row("nan-temperature", "NaN-free contract", "`temperature=nan`", "InvalidInputError",
        "sample.temperature: temperature is NaN (a number is needed: 0 or less for greedy) (inputs: …)",
        lambda tmp: lz.sample(X, temperature=float("nan"))),
    Row("inf-temperature", "NaN-free contract", "`temperature=inf`", "InvalidInputError",
        "sample.temperature: temperature must be finite, got inf (inputs: …)",
        lambda tmp: lz.sample(X, temperature=float("inf"))),
    Row("huge-ignore-index", "NaN-free contract", "`ignore_index=2**70` for `cross_entropy`", "InvalidInputError",
        "cross_entropy: ignore_index must be an int64, got 1180591620717411303424 (inputs: …)",
        lambda tmp: lz.cross_entropy(X, torch.tensor([0, 1, 2]), ignore_index=2**70)),
    Row("nan-top-p", "NaN-free contract", "`top_p=nan`", "InvalidInputError",
        "sample.top_p: top_p must be in (0, 1] or None, got nan (inputs: …)",
        lambda tmp: lz.sample(X, temperature=1.0, top_p=float("nan"))),
    Row("bool-top-p", "NaN-free contract", "`top_p=True` (read as 1.0 before)", "InvalidInputError",
        "sample.top_p: top_p must be in (0, 1] or None, got True (inputs: …)",
        lambda tmp: lz.sample(X, temperature=1.0, top_p=True)),
    # other argument ranges
    Row("range-dropout", "argument range", "`dropout_p=1.0`", "InvalidInputError",
        "attention.full: dropout_p must be in [0, 1), got 1.0 (inputs: …)",
        lambda tmp: attn(dropout_p=1.0)),
    Row("range-window", "argument range", "`window=0`", "InvalidInputError",
        "attention.full: window must be a positive int or None, got 0 (inputs: …)",
        lambda tmp: attn(window=0)),
    Row("range-window-huge", "argument range", "`lz.attention_varlen(..., window=2**63 + 5)` (the masks' int64 "
        "arithmetic wrapped: every key masked, zeros returned)", "InvalidInputError",
        "attention_varlen: window=9223372036854775813 is beyond 2147483647, the longest window the kernels take; "
        "a window longer than every sequence is no window at all: pass None (inputs: …)",
        lambda tmp: varlen_window(2**63 + 5)),
    Row("range-top-k", "argument range", "`top_k=0`", "InvalidInputError",
        "sample.top_k: top_k must be a positive int or None, got 0 (inputs: …)",
        lambda tmp: lz.sample(X, temperature=1.0, top_k=0)),
    Row("range-is-causal", "argument range", "`is_causal=\"yes\"`", "InvalidInputError",
        "attention.causal: is_causal must be a bool, got str (inputs: …)",
        lambda tmp: attn(is_causal="yes")),
    # found by adversarial sequences (the same input cold and warm) and by the failure contract
    Row('rank-attention-5d', 'rank', '`lz.attention` with 5-D `q`, `k`, `v`', 'InvalidInputError',
        'attention.full: q must be 4-D (batch, heads, seq, head_dim), got 5-D (inputs: …)',
        lambda tmp: attn(q=t(1, 1, 2, 4, 8), k=t(1, 1, 2, 4, 8), v=t(1, 1, 2, 4, 8))),
    Row('mask-rank-5', 'mask shape', 'a 5-D `attn_mask`', 'InvalidInputError',
        'attention.full: attn_mask must have 2 to 4 dimensions (broadcastable to (batch, heads, seq_q, seq_k)), got 5-D (inputs: …)',
        lambda tmp: attn(attn_mask=torch.ones(1, 1, 1, 4, 4, dtype=torch.bool))),
    Row('mask-1d', 'mask shape', 'a 1-D bool `attn_mask` (SDPA rejects it)', 'InvalidInputError',
        'attention.full: attn_mask must have 2 to 4 dimensions (broadcastable to (batch, heads, seq_q, seq_k)), got 1-D (inputs: …)',
        lambda tmp: attn(attn_mask=torch.ones(4, dtype=torch.bool))),
    Row('mask-larger', 'mask shape', '`attn_mask` (2, 1, 4, 4) for batch 1 (it would add a batch)', 'InvalidInputError',
        'attention.full: attn_mask of shape (2, 1, 4, 4) does not broadcast to (batch, heads, seq_q, seq_k)=(1, 2, 4, 4) (inputs: …)',
        lambda tmp: attn(attn_mask=torch.ones(2, 1, 4, 4, dtype=torch.bool))),
    Row('shape-rope-sin', 'shape', '`rope` with `sin` of another shape than `cos`', 'InvalidInputError',
        'rope: cos and sin shapes differ: (4, 8) vs (4, 4) (inputs: …)',
        lambda tmp: lz.rope(t(1, 2, 4, 8), t(4, 8), t(4, 4))),
    Row('dtype-rope-sin', 'dtype', '`rope` with float32 `cos`, float64 `sin`', 'InvalidInputError',
        "rope: cos and sin must have x's dtype torch.float32, got torch.float32 and torch.float64 (cast them with .to(x.dtype), as transformers' rotary embedding does) (inputs: …)",
        lambda tmp: lz.rope(t(1, 2, 4, 8), t(4, 8), t(4, 8, dtype=torch.float64))),
    Row('dtype-rope-mixed', 'dtype', '`rope` with bfloat16 `x`, float32 `cos`/`sin`', 'InvalidInputError',
        "rope: cos and sin must have x's dtype torch.bfloat16, got torch.float32 and torch.float32 (cast them with .to(x.dtype), as transformers' rotary embedding does) (inputs: …)",
        lambda tmp: lz.rope(t(1, 2, 4, 8, dtype=torch.bfloat16), t(4, 8), t(4, 8))),
    Row('dtype-weight-mixed', 'dtype', 'float64 `x`, float32 `weight` for `rms_norm`', 'InvalidInputError',
        "rms_norm: weight must have x's dtype torch.float64, got torch.float32 (cast it with .to(x.dtype); the result of mixed dtypes differs between kernels) (inputs: …)",
        lambda tmp: lz.rms_norm(t(3, 8, dtype=torch.float64), W)),
    Row('dtype-layer-norm-mixed', 'dtype', 'float64 `x`, float32 `weight` for `layer_norm`', 'InvalidInputError',
        "layer_norm: weight must have x's dtype torch.float64, got torch.float32 (cast it with .to(x.dtype); the result of mixed dtypes differs between kernels) (inputs: …)",
        lambda tmp: lz.layer_norm(t(3, 8, dtype=torch.float64), W, W)),
    Row('dtype-geglu', 'dtype', '`geglu` gate float32, up float64', 'InvalidInputError',
        'geglu: gate and up dtypes differ: torch.float32 vs torch.float64 (inputs: …)',
        lambda tmp: lz.geglu(X, t(3, 8, dtype=torch.float64))),
    Row('non-tensor-up', 'non-tensor', '`swiglu` with `up` a Python float', 'InvalidInputError',
        'swiglu: up must be a torch.Tensor, got float (inputs: …)',
        lambda tmp: lz.swiglu(X, 2.0)),
    Row('type-is-causal-int', 'argument range', '`is_causal=1`', 'InvalidInputError',
        'attention.causal: is_causal must be a bool, got int (inputs: …)',
        lambda tmp: attn(is_causal=1)),
    Row('type-window-float', 'argument range', '`window=2.0` (with `is_causal=True`)', 'InvalidInputError',
        'attention.causal: window must be a positive int or None, got 2.0 (inputs: …)',
        lambda tmp: attn(is_causal=True, window=2.0)),
    Row('type-scale-bool', 'argument range', '`scale=True`', 'InvalidInputError',
        'attention.full: scale must be a finite number or None, got True (inputs: …)',
        lambda tmp: attn(scale=True)),
    Row('type-scale-tensor', 'argument range', '`scale=torch.tensor(0.5)`', 'InvalidInputError',
        'attention.full: scale must be a finite number or None, got tensor(0.5000) (inputs: …)',
        lambda tmp: attn(scale=torch.tensor(0.5))),
    Row('nan-softcap', 'NaN-free contract', '`softcap=nan`', 'InvalidInputError',
        'attention.full: softcap must be a finite positive number or None, got nan (inputs: …)',
        lambda tmp: attn(softcap=float("nan"))),
    Row('inf-softcap', 'NaN-free contract', '`softcap=inf` (tanh(s / inf) * inf: NaN out)', 'InvalidInputError',
        'attention.full: softcap must be a finite positive number or None, got inf (inputs: …)',
        lambda tmp: attn(softcap=float("inf"))),
    Row('range-softcap-zero', 'argument range', '`softcap=0.0` (a division by zero)', 'InvalidInputError',
        'attention.full: softcap must be a finite positive number or None, got 0.0 (inputs: …)',
        lambda tmp: attn(softcap=0.0)),
    Row('range-softcap-negative', 'argument range', '`softcap=-30.0`', 'InvalidInputError',
        'attention.full: softcap must be a finite positive number or None, got -30.0 (inputs: …)',
        lambda tmp: attn(softcap=-30.0)),
    Row('type-softcap-bool', 'argument range', '`softcap=True`', 'InvalidInputError',
        'attention.full: softcap must be a finite positive number or None, got bool True (inputs: …)',
        lambda tmp: attn(softcap=True)),
    Row('shape-sinks', 'shape', '`sinks` of shape (3,) for 2 query heads', 'InvalidInputError',
        'attention.full: sinks must have shape (2,) (the query heads), got (3,) (inputs: …)',
        lambda tmp: attn(sinks=t(3))),
    Row('dtype-sinks', 'dtype', 'float64 `sinks` for float32 `q`', 'InvalidInputError',
        "attention.full: sinks must be float32 or q's dtype (float32), got float64 (inputs: …)",
        lambda tmp: attn(sinks=t(2).double())),
    Row('device-sinks', 'device', '`sinks` on meta, `q` on cpu', 'InvalidInputError',
        'attention.full: sinks is on meta, q on cpu (inputs: …)',
        lambda tmp: attn(sinks=t(2, device="meta"))),
    Row('non-tensor-sinks', 'non-tensor', '`sinks` given as a list', 'InvalidInputError',
        'attention.full: sinks must be a torch.Tensor or None, got list (inputs: …)',
        lambda tmp: attn(sinks=[0.0, 0.0])),
    Row('shape-alibi', 'shape', '`alibi_slopes` of shape (2, 3) for batch 1, 2 heads', 'InvalidInputError',
        'attention.full: alibi_slopes must have shape (2,) or (1, 2) (the query heads), got (2, 3) (inputs: …)',
        lambda tmp: attn(alibi_slopes=t(2, 3))),
    Row('dtype-alibi', 'dtype', 'float16 `alibi_slopes`', 'InvalidInputError',
        'attention.full: alibi_slopes must be float32 (as FlashAttention takes them), got float16 (inputs: …)',
        lambda tmp: attn(alibi_slopes=t(2).half())),
    Row('type-interleaved-int', 'argument range', '`rope(..., interleaved=1)`', 'InvalidInputError',
        'rope: interleaved must be a bool, got 1 (inputs: …)',
        lambda tmp: lz.rope(t(1, 2, 4, 8), t(4, 8), t(4, 8), interleaved=1)),
    Row('type-eps-bool', 'argument range', '`eps=True` for `rms_norm`', 'InvalidInputError',
        'rms_norm: eps must be a positive number, got True (inputs: …)',
        lambda tmp: lz.rms_norm(X, W, eps=True)),
    Row('range-top-p', 'argument range', '`top_p=1.5`', 'InvalidInputError',
        'sample.top_p: top_p must be in (0, 1] or None, got 1.5 (inputs: …)',
        lambda tmp: lz.sample(X, temperature=1.0, top_p=1.5)),
    Row('data-nan-logits', 'data checks', '`sample` of all-NaN logits (checked once a kernel raised)', 'InvalidInputError',
        'sample.temperature: logits rows [0, 1] hold NaN or +inf, or no finite logit at all: no distribution to sample from (inputs: …)',
        lambda tmp: lz.sample(torch.full((2, 8), float('nan')), temperature=1.0)),
    Row('data-target-range', 'data checks', '`cross_entropy` class id 30 for a vocabulary of 10 (checked once a kernel raised)', 'InvalidInputError',
        'cross_entropy: target ids [30] (rows [2]) are outside [0, 10) and are not ignore_index=-100 (inputs: …)',
        lambda tmp: lz.cross_entropy(t(4, 10), torch.tensor([1, 2, 30, 4]))),
    Row('rank-lce', 'rank', '`lz.linear_cross_entropy` with 3-D `hidden` (batch, seq, hidden)', 'InvalidInputError',
        'linear_cross_entropy: hidden must be a 2-D floating-point (rows, hidden) tensor, got 3-D torch.float32 (flatten the batch: hidden.view(-1, H)) (inputs: …)',
        lambda tmp: lz.linear_cross_entropy(t(2, 4, 8), t(10, 8), torch.tensor([1, 2]))),
    Row('shape-lce-weight', 'shape', '`linear_cross_entropy` weight (10, 6) for hidden width 8', 'InvalidInputError',
        'linear_cross_entropy: weight must be (vocab, hidden=8), got (10, 6) (inputs: …)',
        lambda tmp: lz.linear_cross_entropy(t(4, 8), t(10, 6), torch.tensor([1, 2, 3, 4]))),
    Row('shape-lce-bias', 'shape', '`linear_cross_entropy` bias of 9 for a vocabulary of 10', 'InvalidInputError',
        'linear_cross_entropy: bias must be (vocab=10,), got (9,) (inputs: …)',
        lambda tmp: lz.linear_cross_entropy(t(4, 8), t(10, 8), torch.tensor([1, 2, 3, 4]), t(9))),
    Row('dtype-lce-mixed', 'dtype', '`linear_cross_entropy` with bfloat16 `hidden`, float32 `weight`', 'InvalidInputError',
        'linear_cross_entropy: weight has dtype torch.float32, hidden torch.bfloat16 (cast one; under autocast, cast both to the autocast dtype) (inputs: …)',
        lambda tmp: lz.linear_cross_entropy(t(4, 8, dtype=torch.bfloat16), t(10, 8), torch.tensor([1, 2, 3, 4]))),
    Row('range-softcap', 'argument range', '`linear_cross_entropy(..., softcap=0.0)` (a division by zero)', 'InvalidInputError',
        'linear_cross_entropy: softcap must be None or a positive finite number, got 0.0 (inputs: …)',
        lambda tmp: lz.linear_cross_entropy(t(4, 8), t(10, 8), torch.tensor([1, 2, 3, 4]), softcap=0.0)),
    Row('data-lce-target-range', 'data checks', '`linear_cross_entropy` class id 30 for a vocabulary of 10 (checked once a kernel raised)', 'InvalidInputError',
        'linear_cross_entropy: target ids [30] (rows [2]) are outside [0, 10) and are not ignore_index=-100 (inputs: …)',
        lambda tmp: lz.linear_cross_entropy(t(4, 8), t(10, 8), torch.tensor([1, 2, 30, 4]))),
    # packed (varlen) and paged attention; the offsets', seq_lens' and block table's values are data checks
    Row("varlen-rank", "rank", "`lz.attention_varlen` with a 4-D `q`", "InvalidInputError",
        "attention_varlen: q must be 3-D (total_q, heads, head_dim), got 4-D (inputs: …)",
        lambda tmp: varlen(q=t(1, 7, 4, 8))),
    Row("varlen-cu-dtype", "dtype", "int64 `cu_seqlens_q`", "InvalidInputError",
        "attention_varlen: cu_seqlens_q must be a 1-D int32 tensor of offsets (batch + 1,), got 1-D torch.int64 "
        "(inputs: …)",
        lambda tmp: varlen(cu_seqlens_q=torch.tensor([0, 3, 7]))),
    Row("varlen-cu-batch", "shape", "`cu_seqlens_q` of 2 sequences, `cu_seqlens_k` of 1", "InvalidInputError",
        "attention_varlen: cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 2 entries, got 3 and 2 "
        "(inputs: …)",
        lambda tmp: varlen(cu_seqlens_k=i32(0, 7))),
    Row("varlen-cu-start", "data checks", "`cu_seqlens_q` starting at 1 (checked once a kernel raised)",
        "InvalidInputError", "attention_varlen: cu_seqlens_q must start at 0, got 1 (inputs: …)",
        lambda tmp: varlen(cu_seqlens_q=i32(1, 3, 7))),
    Row("varlen-cu-decreasing", "data checks", "`cu_seqlens_k` = [0, 5, 3] (checked once a kernel raised)",
        "InvalidInputError",
        "attention_varlen: cu_seqlens_k must be non-decreasing, got 5 then 3 at sequence 1 (inputs: …)",
        lambda tmp: varlen(cu_seqlens_k=i32(0, 5, 3))),
    Row("varlen-cu-total", "data checks", "`cu_seqlens_q` ending at 6 for 7 tokens (checked once a kernel raised)",
        "InvalidInputError",
        "attention_varlen: cu_seqlens_q ends at 6, but the packed tensor has 7 tokens (inputs: …)",
        lambda tmp: varlen(cu_seqlens_q=i32(0, 3, 6))),
    Row("varlen-max-seqlen", "data checks", "`max_seqlen_q=3` with a 4-token sequence (checked once a kernel raised)",
        "InvalidInputError",
        "attention_varlen: a sequence of 4 tokens is longer than max_seqlen_q=3 (inputs: …)",
        lambda tmp: varlen(max_seqlen_q=3)),
    Row("varlen-max-negative", "argument range", "`max_seqlen_k=-1`", "InvalidInputError",
        "attention_varlen: max_seqlen_k must be a non-negative int, got -1 (inputs: …)",
        lambda tmp: varlen(max_seqlen_k=-1)),
    Row("varlen-gqa", "GQA divisibility", "`attention_varlen` with 4 query heads, 3 key/value heads",
        "InvalidInputError",
        "attention_varlen: query heads (4) must be divisible by key/value heads (3) for grouped-query attention "
        "(inputs: …)",
        lambda tmp: varlen(k=t(7, 3, 8), v=t(7, 3, 8))),
    Row("varlen-softcap", "argument range", "`attention_varlen(..., softcap=0.0)`", "InvalidInputError",
        "attention_varlen: softcap must be a positive finite number or None, got 0.0 (inputs: …)",
        lambda tmp: varlen(softcap=0.0)),
    Row("paged-table-dtype", "dtype", "int64 `block_table`", "InvalidInputError",
        "attention_paged: block_table must be a 2-D int32 tensor (batch, max_pages), got 2-D torch.int64 "
        "(inputs: …)",
        lambda tmp: paged(block_table=torch.tensor([[0, 1], [2, 3]]))),
    Row("paged-batch", "shape", "`seq_lens` of 1 entry for a batch of 2", "InvalidInputError",
        "attention_paged: block_table has 2 rows and seq_lens 1 entries, q a batch of 2 (inputs: …)",
        lambda tmp: paged(seq_lens=i32(5))),
    Row("paged-table-range", "data checks", "`block_table` naming page 9 of 6 (checked once a kernel raised)",
        "InvalidInputError",
        "attention_paged: block_table[0] holds page 9, outside [0, 6) (k_cache has 6 pages) (inputs: …)",
        lambda tmp: paged(block_table=i32(0, 9, 2, 3).view(2, 2))),
    Row("paged-seq-lens-short", "data checks", "`seq_lens[1]=1` for 2 new queries (checked once a kernel raised)",
        "InvalidInputError",
        "attention_paged: seq_lens[1]=1 is less than seq_q=2 (seq_lens counts the new tokens too) (inputs: …)",
        lambda tmp: paged(q=t(2, 2, 4, 8), seq_lens=i32(5, 1))),
    Row("paged-seq-lens-capacity", "data checks", "`seq_lens[1]=9` in 2 pages of 4 (checked once a kernel raised)",
        "InvalidInputError",
        "attention_paged: seq_lens[1]=9 exceeds the block table's capacity of 2 pages x 4 tokens = 8 (inputs: …)",
        lambda tmp: paged(seq_lens=i32(5, 9))),
    Row("paged-gqa", "GQA divisibility", "`attention_paged` with 4 query heads, 3 key/value heads",
        "InvalidInputError",
        "attention_paged: query heads (4) must be divisible by key/value heads (3) for grouped-query attention "
        "(inputs: …)",
        lambda tmp: paged(k_cache=t(6, 4, 3, 8), v_cache=t(6, 4, 3, 8))),
    Row("paged-softcap", "argument range", "`attention_paged(..., softcap=-1.0)`", "InvalidInputError",
        "attention_paged: softcap must be a positive finite number or None, got -1.0 (inputs: …)",
        lambda tmp: paged(softcap=-1.0)),
    Row('resource-oom', 'resource', '`rms_norm` of a (2**40, 64) view: the output cannot be allocated', 'OutOfMemoryError',
        'rms_norm: kernel torch_rms_norm ran out of memory; no kernel is blamed and no other is tried (a smaller batch or sequence is the fix) (inputs: …)',
        lambda tmp: lz.rms_norm(t(1, 64).expand(2**40, 64), t(64))),
    # dispatch() inputs
    Row("dispatch-inputs", "dispatch() inputs", "`inputs` given as a list", "InvalidInputError",
        "dispatch('rms_norm'): inputs must be a dict of tensors keyed by name (for example "
        "{'query': q, 'key': k, 'value': v}), got list",
        lambda tmp: dispatch("rms_norm", [X])),
    Row("dispatch-operation", "dispatch() inputs", "`operation=5`", "InvalidInputError",
        "dispatch(): operation must be a non-empty string, got 5",
        lambda tmp: dispatch(5, {"x": X})),
    Row("dispatch-missing", "dispatch() inputs", "no `x` among the inputs of `rms_norm`", "InvalidInputError",
        "rms_norm: inputs need one of 'x', 'input', 'hidden_states'; got keys ['y']",
        lambda tmp: dispatch("rms_norm", {"y": X})),
    Row("dispatch-misspelled-op", "dispatch() inputs", "`dispatch(\"attention.causl\", ...)`", "InvalidInputError",
        "dispatch(): unknown operation 'attention.causl'; did you mean 'attention.causal' or 'attention.full'? (the "
        "attention operations: attention, attention.causal, attention.cross, attention.decode, attention.full, "
        "attention.prefill, attention.sliding_window)",
        lambda tmp: dispatch("attention.causl", {"q": X, "k": X, "v": X})),
    Row("dispatch-misspelled-option", "dispatch() inputs", "`epsilon=0.5` for `rms_norm`", "InvalidInputError",
        "rms_norm: unknown input or option 'epsilon' (did you mean 'eps'?); rms_norm takes x, weight, eps, input, "
        "hidden_states, w (inputs: …)",
        lambda tmp: dispatch("rms_norm", {"x": X}, epsilon=0.5)),
    Row("dispatch-causal-false", "dispatch() inputs", "`is_causal=False` for `attention.causal`", "InvalidInputError",
        "attention.causal: is_causal=False contradicts the operation (attention.causal is causal; 'attention.full' "
        "is not) (inputs: …)",
        lambda tmp: dispatch("attention.causal", dict(zip("qkv", qkv(), strict=True)), is_causal=False)),
    Row("dispatch-eps", "dispatch() inputs", "`eps=\"small\"`", "InvalidInputError",
        "rms_norm: eps must be a number, got 'small' (inputs: …)",
        lambda tmp: dispatch("rms_norm", {"x": X, "eps": "small"})),
    Row("dispatch-context", "dispatch() inputs", "`context=5`", "InvalidInputError",
        "dispatch('rms_norm'): context must be a SelectionContext, got int",
        lambda tmp: dispatch("rms_norm", {"x": X}, context=5)),
    Row("dispatch-unknown-op", "dispatch() inputs", "an operation no kernel implements", "NoKernelError",
        "no kernel is registered for 'my_op' (call: my_op(device=cpu, dtype=float32, batch_size=3, hidden_size=8, "
        "num_tokens=3))",
        lambda tmp: dispatch("my_op", {"x": X})),
    # no kernel fits
    Row("no-kernel", "no kernel fits", "`rms_norm` with every torch kernel disabled", "NoKernelError",
        "no kernel can run rms_norm(device=cpu, dtype=float32, batch_size=3, hidden_size=8, num_tokens=3); "
        "every candidate was rejected:",
        lambda tmp: [lz.disabled("torch"), lz.rms_norm(X, W)]),
    Row("lock-cannot-run", "no kernel fits", "a lock on a CUDA-only kernel, called on CPU", "KernelNotSupportedError",
        "attention.causal(device=cpu, dtype=float32, batch_size=1, seq_len_q=4, seq_len_k=4, num_heads=2, "
        "num_kv_heads=2, head_dim=8, layout=BHSD, is_causal=True) is locked by lock attention.causal -> "
        "torch_sdpa_flash (lz.lock()), but it cannot run here: torch_sdpa_flash: device is cpu, kernel runs on cuda; "
        "dtype=float32 (supported: bfloat16, float16)",
        lambda tmp: [lz.lock("attention.causal", "torch_sdpa_flash"), attn(is_causal=True)]),
    # policy calls
    Row("policy-unknown-kernel", "policy errors", "`lz.lock(\"rms_norm\", \"torch_rms_nrom\")`", "KernelNotFoundError",
        "unknown kernel 'torch_rms_nrom'; did you mean torch_rms_norm, torch_rms_norm_composed, "
        "torch_layer_norm? (layerzero list shows every kernel)",
        lambda tmp: lz.lock("rms_norm", "torch_rms_nrom")),
    Row("policy-lock-both", "policy errors", "`lz.lock` with both `kernel=` and `backend=`", "PolicyError",
        "lock() takes exactly one of kernel= or backend=",
        lambda tmp: lz.lock("rms_norm", "torch_rms_norm", backend="torch")),
    Row("policy-priority", "policy errors", "`lz.prefer(\"torch\", priority=2000)`", "PolicyError",
        "prefer(): priority must be an int between 0 and 1000, got 2000",
        lambda tmp: lz.prefer("torch", priority=2000)),
    Row("policy-operation", "policy errors", "`lz.disabled(\"torch\", operation=5)`", "PolicyError",
        "operation must be a non-empty string, got 5",
        lambda tmp: lz.disabled("torch", operation=5)),
    Row("condition-call", "policy errors", "condition `__import__('os').system('id')`", "ConditionError",
        "lz.prefer(): function calls are not allowed at position 10",
        lambda tmp: lz.prefer("torch", condition="__import__('os').system('id')")),
    Row("condition-field", "policy errors", "condition `sm >= 80 and batch >= 8`", "ConditionError",
        "lz.prefer(): unknown field 'batch'; did you mean batch_size? at position 13",
        lambda tmp: lz.prefer("torch", condition="sm >= 80 and batch >= 8")),
    Row("condition-lock-kernel", "policy errors", "a lock condition on `kernel`", "ConditionError",
        "lz.lock(): 'kernel' is only known to rules judged per kernel (denies, boosts, prefer); locks and allows "
        "are judged once per call at position 0",
        lambda tmp: lz.lock("rms_norm", "torch_rms_norm", condition="kernel == 'x'")),
    # policy documents
    Row("doc-version", "policy errors", "a policy file without `version`", "PolicyError",
        "version: is required (version: \"1.0\")",
        lambda tmp: policy_text(tmp, "locks: []\n")),
    Row("doc-section", "policy errors", "an unknown section `lockz`", "PolicyError",
        "lockz: unknown key (expected one of: version, description, locks, allows, denies, boosts); "
        "did you mean locks?",
        lambda tmp: policy_text(tmp, 'version: "1.0"\nlockz: []\n')),
    Row("doc-boost", "policy errors", "`boost_factor: .nan`", "PolicyError",
        "boosts[0].boost_factor: must be a finite number, got nan",
        lambda tmp: policy_text(tmp, 'version: "1.0"\nboosts: [{backend: torch, boost_factor: .nan}]\n')),
    Row("doc-python-tag", "policy errors", "a YAML `!!python/object/apply` tag", "PolicyError",
        "<dir>/policy.yaml: invalid YAML at line 2, column 8: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
        lambda tmp: policy_text(tmp, 'version: "1.0"\nlocks: !!python/object/apply:os.system ["id"]\n')),
    Row("doc-alias", "policy errors", "YAML anchors and aliases (a billion laughs)", "PolicyError",
        "<dir>/policy.yaml: YAML anchors and aliases are not supported; write each value out (the value anchored on line 2 is used again)",
        lambda tmp: policy_text(tmp, 'version: "1.0"\na: &a ["x", "x"]\nb: [*a, *a]\n')),
    Row("doc-duplicate-key", "policy errors", "a key given twice in one mapping (`locks:` then `locks: []`)",
        "PolicyError", "<dir>/policy.yaml: the key 'locks' is given twice in one mapping (lines 2 and 3); write it once",
        lambda tmp: policy_text(tmp, 'version: "1.0"\nlocks: [{operation: rms_norm, kernel: torch_rms_norm}]\n'
                                     'locks: []\n')),
    Row("doc-missing", "policy errors", "`lz.configure(\"../../etc/passwd.yaml\")`", "PolicyError",
        "../../etc/passwd.yaml: file not found",
        lambda tmp: lz.configure("../../etc/passwd.yaml")),
    Row("doc-not-a-mapping", "policy errors", "`lz.configure(\"/etc/passwd\")`", "PolicyError",
        "a policy document must be a mapping with version: \"1.0\", got a string",
        lambda tmp: lz.configure("/etc/passwd")),
    # config files
    Row("config-priority", "config errors", "`dispatch_rules[0].priority: 2000`", "ConfigError",
        "dispatch_rules[0].priority: must be between 0 and 1000, got 2000",
        lambda tmp: config_doc({"dispatch_rules": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                                    "priority": 2000}]})),
    Row("config-suffix", "config errors", "condition key `batch_size_gteq`", "ConfigError",
        "dispatch_rules[0].conditions.batch_size_gteq: unknown condition: expected a field name, optionally with "
        "one of the suffixes _not_in, _match, _gte, _lte, _eq, _ne, _gt, _lt, _in; did you mean batch_size?",
        lambda tmp: config_doc({"dispatch_rules": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                                    "conditions": {"batch_size_gteq": 8}}]})),
    Row("config-redos", "config errors", "`_match: \"(a+)+$\"` (catastrophic backtracking)", "ConfigError",
        "dispatch_rules[0].conditions.operation_match: a quantifier after a group is not allowed (position 4); "
        "repeat single characters or classes instead",
        lambda tmp: config_doc({"dispatch_rules": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                                    "conditions": {"operation_match": "(a+)+$"}}]})),
    Row("config-redos-alternation", "config errors", "`_match: \"(a|a)(a|a)…$\"` (2^20 paths)", "ConfigError",
        "dispatch_rules[0].conditions.operation_match: too many alternatives and repetitions (position 84); "
        "each group's alternatives multiply the backtracking budget like quantifiers do",
        lambda tmp: config_doc({"dispatch_rules": [{"operation": "rms_norm", "kernel": "torch_rms_norm",
                                                    "conditions": {"operation_match": "(a|a)" * 20 + "$"}}]})),
    Row("config-kernel-path", "config errors", "`kernel: ../../etc/passwd`", "ConfigError",
        "dispatch_rules[0].kernel: '../../etc/passwd' contains characters not allowed in a kernel id: '/'",
        lambda tmp: config_doc({"dispatch_rules": [{"operation": "rms_norm", "kernel": "../../etc/passwd"}]})),
    Row("config-chain", "config errors", "a fallback chain listing a kernel twice", "ConfigError",
        "fallback_chains['rms_norm'][1]: kernel 'torch_rms_norm' is listed twice",
        lambda tmp: config_doc({"fallback_chains": {"rms_norm": ["torch_rms_norm", "torch_rms_norm"]}})),
    Row("config-json", "config errors", "a `.json` config that is not JSON", "ConfigError",
        "<dir>/kernels.json: invalid JSON at line 1, column 12: Expecting ':' delimiter",
        lambda tmp: [(tmp / "kernels.json").write_text('{"version" "1.0"}'),
                     __import__("layerzero.dispatch", fromlist=["x"]).create_config_dispatcher(
                         config_path=tmp / "kernels.json")]),
    Row("config-dispatch-config", "config errors", "`DispatchConfig(cache_size=-1)`", "ConfigError",
        "DispatchConfig.cache_size: must be >= 0, got -1",
        lambda tmp: DispatchConfig(cache_size=-1)),
    Row("config-env", "config errors", "`LAYERZERO_CACHE_SIZE=lots`", "ConfigError",
        "LAYERZERO_CACHE_SIZE='lots' (DispatchConfig.cache_size): invalid literal for int() with base 10: 'lots'",
        lambda tmp: DispatchConfig.from_env({"LAYERZERO_CACHE_SIZE": "lots"})),
    Row("config-hot-reload", "config errors", "an invalid edit of a hot-reloaded file", NONE,
        "dispatch_rules[0].priority: must be between 0 and 1000, got 2000",
        hot_reload_rejects),
    # performance database
    Row("perfdb-bytes", "perf DB corruption", "a database file of random bytes", NONE,
        "performance database <db> is unusable (not an SQLite file (bad header)); moved it to "
        "<db>.corrupt-<time> and starting a new one",
        lambda tmp: perf_db_outcome(tmp, random_bytes)),
    Row("perfdb-truncated", "perf DB corruption", "a database file cut in half", NONE,
        "performance database <db> is unusable (DatabaseError: database disk image is malformed); moved it to "
        "<db>.corrupt-<time> and starting a new one",
        lambda tmp: perf_db_outcome(tmp, truncated)),
    Row("perfdb-foreign", "perf DB corruption", "another application's SQLite file", NONE,
        "performance database <db> is unusable (not a layerzero performance database (application_id=0x0, "
        "tables: users)); moved it to <db>.corrupt-<time> and starting a new one",
        lambda tmp: perf_db_outcome(tmp, foreign)),
    Row("perfdb-newer", "perf DB corruption", "a database from a newer layerzero (`user_version` 2)", NONE,
        "performance database <db> is unusable (written by a newer layerzero (schema version 2 > 1)); moved it to "
        "<db>.corrupt-<time> and starting a new one",
        lambda tmp: perf_db_outcome(tmp, newer)),
    Row("perfdb-huge-string", "perf DB corruption", "a row whose `libraries` is a 10 MB string", NONE,
        "row skipped, one warning: lookup() returns {} for its bucket",
        lambda tmp: perf_db_outcome(tmp, poisoned_row("libraries", "x" * 10_000_000))),
    Row("perfdb-absurd-number", "perf DB corruption", "a row with `median_us = 1e300`", NONE,
        "row skipped, one warning: lookup() returns {} for its bucket",
        lambda tmp: perf_db_outcome(tmp, poisoned_row("median_us", 1e300))),
    Row("perfdb-negative", "perf DB corruption", "a row with `samples = -5`", NONE,
        "row skipped, one warning: lookup() returns {} for its bucket",
        lambda tmp: perf_db_outcome(tmp, poisoned_row("samples", -5))),
    Row("perfdb-write", "perf DB corruption", "storing a measurement of `nan` µs", "PerfDBError",
        "cannot store measurement of 'torch_rms_norm' for rms_norm: median_us must be a finite number >= 0 and at "
        "most 1e+12, got nan",
        lambda tmp: PerfDB(tmp / "w.db").record([Record("hw", "torch=1", "torch_rms_norm", "rms_norm", "float32",
                                                        "b", float("nan"), 0.0, 3)])),
    # baked plan tables
    Row("plan-table-mismatch", "plan-table mismatch", "a plan table baked for another CPU and torch",
        "PlanMismatchError", "baked plan table does not match this machine:",
        mismatched_plan_table),
    Row("plan-table-invalid", "plan-table mismatch", "a plan table with `format: 7`", "ConfigError",
        "format: must be 1, got 7",
        lambda tmp: lz.PlanTable.from_dict({"format": 7, "environment": {}, "entries": []})),
]


# -- checking a row ----------------------------------------------------------------------------------------------

_INPUTS = re.compile(r" \(inputs: .*\)$")


def normalise(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "<dir>")
    text = re.sub(r"\.corrupt-\d{8}T\d{6}(-\d+)?", ".corrupt-<time>", text)
    return _INPUTS.sub(" (inputs: …)", text)


def message_of(exc: BaseException) -> str:
    """The documented message: a document's first listed error, else the first line of the message."""
    if isinstance(exc, ConfigError) and not isinstance(exc, ConditionError) and len(exc.errors) and \
            str(exc).splitlines()[0].endswith(":") and " invalid " in str(exc).splitlines()[0]:
        return exc.errors[0].splitlines()[0]
    return str(exc).splitlines()[0] if str(exc) else ""


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_catalog_row(row: Row, tmp_path: Path) -> None:
    if row.error == NONE:
        got = row.run(tmp_path)
        assert isinstance(got, str)
        assert normalise(got, tmp_path) == row.message
        return
    with pytest.raises(LayerZeroError) as info:
        row.run(tmp_path)
    exc = info.value
    assert type(exc).__name__ == row.error
    assert normalise(message_of(exc), tmp_path) == row.message
    if isinstance(exc, (ConfigError, PolicyError)) and not isinstance(exc, ConditionError):
        assert all(isinstance(e, str) for e in exc.errors)
    if row.klass in ("rank", "shape", "dtype", "device", "layout", "GQA divisibility", "mask shape", "non-tensor",
                     "NaN-free contract", "argument range"):
        assert isinstance(exc, ValueError)  # InvalidInputError: callers' `except ValueError` keeps working


INPUT_CLASSES = ("rank", "shape", "dtype", "device", "layout", "GQA divisibility", "mask shape", "non-tensor",
                 "NaN-free contract", "argument range", "data checks", "resource")


def warm_up(size: int = 4) -> None:
    """Valid calls of every family the input rows use, at one sequence / row count: afterwards a bad input
    of those families meets cached plans (shape-free and exact) instead of a cold cache."""
    q, k, v = t(1, 2, size, 8), t(1, 2, size, 8), t(1, 2, size, 8)
    for kw in ({}, {"is_causal": True}, {"scale": 0.5}, {"is_causal": True, "window": 2}, {"layout": "BSHD"},
               {"attn_mask": torch.ones(size, size, dtype=torch.bool)}, {"attn_mask": t(size, size)},
               {"dropout_p": 0.0}):
        lz.attention(q, k, v, **kw)
    lz.attention(t(1, 4, size, 8), k, v)  # GQA
    for kw in ({"softcap": 5.0}, {"sinks": t(2)}, {"alibi_slopes": t(2)}, {"is_causal": True, "sinks": t(2)}):
        lz.attention(q, k, v, **kw)  # the variant families
    lz.attention(q.double(), k.double(), v.double())
    x = t(size - 1, 8)
    lz.rms_norm(x, W), lz.rms_norm(x, None), lz.rms_norm(x, W, eps=1), lz.layer_norm(x, W, W)
    lz.rms_norm(x.double(), W.double()), lz.layer_norm(x.double(), W.double(), W.double())
    lz.swiglu(x, x), lz.geglu(x, x), lz.gelu(x), lz.gelu(x, "tanh"), lz.silu(x)
    for il in (False, True):
        lz.rope(t(1, 2, size, 8), t(size, 8), t(size, 8), interleaved=il)
    lz.rope(t(1, 2, size, 8, dtype=torch.bfloat16), t(size, 8, dtype=torch.bfloat16), t(size, 8, dtype=torch.bfloat16))
    for kw in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9},
               {"temperature": 1.0, "top_k": 2}):
        lz.sample(x, **kw)
    lz.sample(t(2, 8), temperature=1.0)
    lz.cross_entropy(t(size, 10), torch.arange(size) % 10)
    lz.linear_cross_entropy(t(size, 8), t(10, 8), torch.arange(size) % 10)
    lz.linear_cross_entropy(t(size, 8), t(10, 8), torch.arange(size) % 10, t(10), softcap=2.0)
    for causal in (False, True):
        varlen(q=t(2 * size - 1, 4, 8), k=t(2 * size - 1, 2, 8), v=t(2 * size - 1, 2, 8),
               cu_seqlens_q=i32(0, size - 1, 2 * size - 1), cu_seqlens_k=i32(0, size - 1, 2 * size - 1),
               max_seqlen_q=size, max_seqlen_k=size, is_causal=causal)
        paged(q=t(2, size - 3, 4, 8), seq_lens=i32(size + 1, size - 1), is_causal=causal)


INPUT_ROWS = [r for r in ROWS if r.klass in INPUT_CLASSES]


@pytest.mark.parametrize("row", INPUT_ROWS, ids=[r.id for r in INPUT_ROWS])
def test_same_answer_cold_and_warm(row: Row, runtime: Any) -> None:
    """Validation parity: the row's error is the same as the first call of its family, after valid calls of
    the family (cached plans, shape-free and exact), and after a second shape of it; and no breaker counts."""
    answers = []
    for warm in ((), (4,), (4, 6)):
        runtime.reset()
        for size in warm:
            warm_up(size)
        with pytest.raises(LayerZeroError) as info:
            row.run(Path("/nonexistent"))
        answers.append((type(info.value).__name__, message_of(info.value)))
        assert not any(b.failures for b in runtime.breakers.all().values()), warm
    assert answers[0] == answers[1] == answers[2]


def test_inputs_are_described_in_full() -> None:
    """What ``(inputs: …)`` stands for: every input's shape, dtype and device (or type)."""
    q, k, v = qkv()
    with pytest.raises(lz.InvalidInputError) as info:
        lz.attention(q, t(1, 2, 4, 16), v)
    assert str(info.value).endswith(
        "(inputs: q=Tensor(shape=(1, 2, 4, 8), dtype=float32, device=cpu), k=Tensor(shape=(1, 2, 4, 16), "
        "dtype=float32, device=cpu), v=Tensor(shape=(1, 2, 4, 8), dtype=float32, device=cpu), attn_mask=None, "
        "is_causal=bool, dropout_p=float, scale=None, window=None)")


def test_bad_input_never_trips_a_breaker(runtime: Any) -> None:
    """Rejected before any kernel runs, bad input leaves every breaker closed and counts no kernel failure."""
    before = {kid: s.failures for kid, s in runtime.telemetry.kernels.items()}
    tripped = {kid: b.failures for kid, b in runtime.breakers.all().items()}
    rows = [r for r in ROWS if r.klass in INPUT_CLASSES]
    for _ in range(runtime.config.failure_threshold + 1):
        for row in rows:
            with pytest.raises(LayerZeroError):
                row.run(Path("/nonexistent"))
    after = {kid: s.failures for kid, s in runtime.telemetry.kernels.items()}
    assert all(after[k] == before.get(k, 0) for k in after)
    assert {kid: b.failures for kid, b in runtime.breakers.all().items() if b.failures} == \
        {kid: n for kid, n in tripped.items() if n}


# -- the doc mirrors this table ------------------------------------------------------------------------------------

def doc_rows() -> list[tuple[str, ...]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| id ") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
        for i in (3, 4):  # the error and message cells are code spans
            if cells[i].startswith("`") and cells[i].endswith("`"):
                cells[i] = cells[i][1:-1]
        rows.append(tuple(cells))
    return rows


def test_doc_and_table_agree() -> None:
    want = [(r.id, r.klass, r.bad, r.error, r.message) for r in ROWS]
    got = doc_rows()
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g == w


def test_every_class_in_the_brief_has_a_row() -> None:
    classes = {r.klass for r in ROWS}
    assert {"rank", "shape", "dtype", "device", "layout", "GQA divisibility", "mask shape", "non-tensor",
            "NaN-free contract", "config errors", "policy errors", "perf DB corruption",
            "plan-table mismatch"} <= classes
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("call", "said"), [
    (lambda q: lz.attention(q, q, q, is_causal=np.bool_(True)), "is_causal must be a bool, got numpy.bool"),
    (lambda q: lz.attention(q, q, q, scale=np.float32(0.5)), "got np.float32(0.5) (a numpy.float32, not a Python"),
    (lambda q: lz.attention(q, q, q, window=np.int64(3)), "got np.int64(3) (a numpy.int64, not a Python scalar)"),
    (lambda q: lz.rms_norm(q, torch.ones(8), eps=np.float32(1e-3)), "(a numpy.float32, not a Python scalar)"),
    # equal to the Python value that made a cached plan: the guards refuse it as the first call does
    (lambda q: lz.attention(q, q, q, dropout_p=np.float32(0.0)), "got np.float32(0.0) (a numpy.float32, not a"),
    (lambda q: lz.rms_norm(q, torch.ones(8), eps=np.float32(0.5)), "got np.float32(0.5) (a numpy.float32, not a"),
    (lambda q: lz.cross_entropy(q.reshape(-1, 8), torch.zeros(8, dtype=torch.long), label_smoothing=np.float32(0.0)),
     "got np.float32(0.0) (a numpy.float32, not a Python scalar)"),
])
def test_a_numpy_scalar_is_named_as_one(call: Any, said: str) -> None:
    """A numpy scalar where a Python one belongs: the message says which type it is (it used to read
    "is_causal must be a bool, got bool" for ``np.bool_``), cold and after the same call with Python values."""
    with pytest.raises(InvalidInputError) as err:
        call(torch.randn(1, 2, 4, 8))
    assert said in str(err.value)
    lz.attention(*torch.randn(3, 1, 2, 4, 8), dropout_p=0.0)
    lz.rms_norm(torch.randn(1, 2, 4, 8), torch.ones(8), eps=0.5)
    lz.cross_entropy(torch.randn(8, 8), torch.zeros(8, dtype=torch.long), label_smoothing=0.0)
    with pytest.raises(InvalidInputError) as err:
        call(torch.randn(1, 2, 4, 8))
    assert said in str(err.value)
