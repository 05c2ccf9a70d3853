"""``layerzero list`` and ``layerzero explain`` through the installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerzero as lz
from layerzero.cli import main
from layerzero.context import SelectionContext

LZ = str(Path(sys.executable).parent / "layerzero")

CUDA_EXPLAIN = ["explain", "--op", "attention.causal", "--shape", "q=1,32,1,128", "--shape", "k=1,8,4096,128",
                "--dtype", "bfloat16", "--device", "cuda", "--sm", "90", "--json"]
# Through the installed entry point (more samples run in test_cli_docs.py); the rest call main() in-process.
COMMANDS = {
    "list_json": ["list", "--json"],
    "explain_cuda": CUDA_EXPLAIN,
    "explain_bad_shape": ["explain", "--op", "attention.causal", "--shape", "q=1,32,abc"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every command at once (each is a fresh process importing torch)."""
    env = dict(os.environ, COLUMNS="200", LAYERZERO_PERF_DB=str(tmp_path_factory.mktemp("db") / "perf.db"))
    procs = {name: subprocess.Popen([LZ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, args in COMMANDS.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = (p.returncode, stdout, stderr)
    return out


def test_list_json_has_every_kernel_with_usability(runs):
    rc, stdout, _ = runs["list_json"]
    assert rc == 0
    rows = {r["kernel_id"]: r for r in json.loads(stdout)["kernels"]}
    assert set(rows) == {s.kernel_id for s in lz.list_kernels()}
    for spec in lz.list_kernels():
        row = rows[spec.kernel_id]
        assert (row["operation"], row["backend"], row["priority"]) == (spec.operation, spec.backend, spec.priority)
    flash = rows["torch_sdpa_flash"]
    assert flash["usable"] == torch.cuda.is_available()
    if not flash["usable"]:
        assert any("cuda" in r for r in flash["reasons"])
    assert rows["torch_rms_norm"]["usable"] and rows["torch_rms_norm"]["reasons"] == []


def test_list_plain_word_matches_as_substring(capsys):
    assert main(["list", "sdpa_fl"]) == 0
    stdout = capsys.readouterr().out
    assert "torch_sdpa_flash " in stdout and "torch_sdpa_flash_cpu" in stdout
    assert "torch_rms_norm" not in stdout and "torch_sdpa_math" not in stdout


def test_list_an_operation_name_lists_its_kernels_as_the_python_api(capsys):
    for name in ("attention.causal", "sample.greedy", "attention.paged"):
        assert main(["list", name, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["kernels"]
        assert {r["kernel_id"] for r in rows} >= {s.kernel_id for s in lz.list_kernels(name)}, name


def test_list_without_match_exits_1(capsys):
    assert main(["list", "no_such_kernel_xyz"]) == 1
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    assert "no kernel id or operation matches 'no_such_kernel_xyz'" in stderr


def test_explain_a_cuda_decision_on_any_machine(runs):
    rc, stdout, stderr = runs["explain_cuda"]
    assert rc == 0, stderr
    data = json.loads(stdout)
    ctx = data["context"]
    assert (ctx["platform"], ctx["sm"], ctx["dtype"]) == ("cuda", 90, "bfloat16")
    assert (ctx["batch_size"], ctx["num_heads"], ctx["num_kv_heads"], ctx["seq_len_q"], ctx["seq_len_k"],
            ctx["head_dim"], ctx["is_causal"]) == (1, 32, 8, 1, 4096, 128, True)
    # The CLI agrees with the library given the same context.
    same = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch_size=1,
                            num_heads=32, num_kv_heads=8, seq_len_q=1, seq_len_k=4096, head_dim=128,
                            is_causal=True, layout="BHSD")
    expected = lz.explain_context("attention.causal", same)
    assert data["selected_kernel"] == expected.selected_kernel is not None
    assert [c["kernel_id"] for c in data["candidates"]] == [k for k, _ in expected.candidates]
    codes = {r["code"] for r in data["rejection_reasons"]["torch_sdpa_flash_cpu"]}
    assert "PLATFORM_MISMATCH" in codes


def test_explain_text_names_the_selected_kernel(capsys):
    assert main(["explain", "--op", "rms_norm", "--shape", "x=4,4096"]) == 0
    stdout = capsys.readouterr().out
    expected = lz.which("rms_norm", torch.randn(4, 4096), torch.randn(4096))
    assert f"selected: {expected}" in stdout
    assert stdout.splitlines()[0].startswith("rms_norm(device=cpu, dtype=float32")


def test_explain_with_no_kernel_exits_1_and_lists_rejections(capsys):
    assert main(["explain", "--op", "rms_norm", "--shape", "x=4,64", "--dtype", "int64"]) == 1
    stdout = capsys.readouterr().out
    assert "no kernel fits" in stdout
    assert "torch_rms_norm" in stdout and "DTYPE_UNSUPPORTED" in stdout


def test_explain_bad_shape_is_a_usage_error(runs):
    rc, _, stderr = runs["explain_bad_shape"]
    assert rc == 2
    assert "dimensions must be integers" in stderr


@pytest.mark.parametrize("args, message", [
    (["explain", "--op", "nosuchop", "--shape", "x=2,2"], "unknown operation 'nosuchop'"),
    (["explain", "--op", "attention.causl", "--shape", "q=1,2,3,4", "--shape", "k=1,2,3,4", "--shape", "v=1,2,3,4"],
     "unknown operation 'attention.causl'; did you mean 'attention.causal'"),
    (["explain", "--op", "attention", "--shape", "q=1,2,3"], "q must have 4 dimensions"),
    (["explain", "--op", "attention", "--shape", "x=1,2,3,4"], "attention takes shapes named q, k, v"),
    (["explain", "--op", "rms_norm", "--shape", "x=2,0"], "dimensions must be positive"),
    (["explain", "--op", "rms_norm", "--shape", "x=2,8", "--dtype", "float7"], "unknown dtype 'float7'"),
    (["explain", "--op", "rms_norm", "--shape", "x=2,8", "--device", "cuda", "--sm", "nine"],
     "expected a compute capability"),
    # shapes lz.attention refuses are refused here too (they explained a kernel and exited 0)
    (["explain", "--op", "attention.causal", "--shape", "q=1,8,16,64", "--shape", "k=1,8,16,32"],
     "q and k head dims differ: 64 vs 32"),
    (["explain", "--op", "attention.full", "--shape", "q=1,8,16,64", "--shape", "k=1,3,16,64"], "divisible"),
    (["explain", "--op", "attention.full", "--shape", "q=1,8,16,64", "--mask", "bool", "--causal"], "mask"),
    (["explain", "--op", "attention.full", "--shape", "q=1,8,16,64", "--shape", "k=2,8,16,64"], "batch sizes differ"),
])
def test_explain_usage_errors_exit_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the real capability is used")
def test_explain_cuda_without_sm_on_a_cpu_machine_asks_for_it(capsys):
    assert main(["explain", "--op", "rms_norm", "--shape", "x=2,8", "--device", "cuda"]) == 2
    assert "--sm 90" in capsys.readouterr().err


def test_explain_options_reach_the_context(capsys):
    rc = main(["explain", "--op", "attention", "--shape", "q=2,16,4,64", "--shape", "k=2,16,4,64",
               "--layout", "BSHD", "--mask", "bool", "--requires-grad", "--json"])
    assert rc == 0
    ctx = json.loads(capsys.readouterr().out)["context"]
    assert (ctx["batch_size"], ctx["seq_len_q"], ctx["num_heads"], ctx["head_dim"]) == (2, 16, 4, 64)
    assert (ctx["layout"], ctx["mask_kind"], ctx["requires_grad"], ctx["is_causal"]) == ("BSHD", "bool", True, False)


@pytest.mark.gpu
def test_explain_on_a_gpu_matches_the_real_call(capsys):
    """On a CUDA machine, --device cuda uses the real compute capability and agrees with a real call."""
    assert main(["explain", "--op", "attention.causal", "--shape", "q=2,8,256,64", "--dtype", "float16",
                 "--device", "cuda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    major, minor = torch.cuda.get_device_capability()
    assert data["context"]["sm"] == major * 10 + minor
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.float16)
    assert data["selected_kernel"] == lz.which("attention.causal", q, q, q)


@pytest.mark.parametrize("shape", ["x=99999999999999999999,4", "x=4294967296,4", "x=2147483648,2147483648,4"])
def test_explain_refuses_a_shape_past_torch_sizes_in_one_line(shape: str) -> None:
    """A dimension past int64 crashed explain with a Python and C++ traceback (torch.empty overflowed)."""
    from layerzero.cli import main

    assert main(["explain", "--op", "rms_norm", "--shape", shape]) == 2


def test_explain_linear_cross_entropy_takes_the_lm_heads_weight(capsys):
    """The vocabulary is the logits' width (the weight's rows): with one x= shape the CLI took the model's width
    for it and named the naive kernel where the call runs the chunked one."""
    args = ["explain", "--op", "linear_cross_entropy", "--shape", "x=4096,2048", "--shape", "weight=32000,2048",
            "--dtype", "bfloat16", "--json"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)["selected_kernel"]
    h, w = torch.empty(4096, 2048, dtype=torch.bfloat16), torch.empty(32000, 2048, dtype=torch.bfloat16)
    assert got == lz.which("linear_cross_entropy", h, w, torch.zeros(4096, dtype=torch.long))
    assert main(["explain", "--op", "linear_cross_entropy", "--shape", "x=8,64"]) == 2
    assert "weight=V,H" in capsys.readouterr().err


def test_explain_rope_describes_the_call_as_lz_rope_does(capsys):
    assert main(["explain", "--op", "rope", "--shape", "x=2,4,32,16", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["context"]
    x = torch.empty(2, 4, 32, 16)
    want = lz.explain(x, torch.empty(32, 16), torch.empty(32, 16), operation="rope").context
    assert got["head_dim"] == want.head_dim == 16 and got["num_tokens"] == want.num_tokens
