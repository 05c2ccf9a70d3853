"""Baked plan tables (lz.solve / lz.compile / PlanTable) and lz.warmup."""

from __future__ import annotations

import json

import pytest
import torch

import layerzero as lz
from layerzero.inspection import cache_key
from layerzero.solve import uninstall_plan_table

SHAPES = {
    "rms_norm": [{"hidden_size": 64, "num_tokens": 8}, {"hidden_size": 128, "num_tokens": 3}],
    "attention.causal": [{"batch_size": 2, "seq_len": 16, "num_heads": 4, "num_kv_heads": 4, "head_dim": 32}],
}


@pytest.fixture(autouse=True)
def _no_table():
    yield
    uninstall_plan_table()


def test_solve_save_load_install_runs_without_selection(tmp_path, runtime):
    table = lz.solve(SHAPES, dtype="float32", path=tmp_path / "plans.json")
    assert len(table) == 3
    assert lz.compile is lz.solve
    loaded = lz.PlanTable.load(tmp_path / "plans.json")
    assert loaded.entries == table.entries
    assert loaded.install() is True

    selections = []
    real_select = runtime.select
    runtime.select = lambda *a, **k: selections.append(a) or real_select(*a, **k)  # type: ignore[method-assign]
    try:
        x, w = torch.randn(8, 64), torch.rand(64) + 0.5
        out = lz.rms_norm(x, w)
        # 5 rows land in the same power-of-two bucket (8) as the baked 8-row shape
        x5 = torch.randn(5, 64)
        lz.rms_norm(x5, w)
    finally:
        runtime.select = real_select  # type: ignore[method-assign]
    assert selections == []
    plan = runtime.plans.data[cache_key("rms_norm", (x, w, 1e-6))]
    assert plan.locked_by == "baked plan table"
    assert plan.kernels[0].kernel_id == table.lookup("rms_norm", plan.context)[0]
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_unbaked_bucket_falls_back_to_selection(runtime):
    lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32").install()
    x, w = torch.randn(4, 256), torch.rand(256)
    lz.rms_norm(x, w)
    plan = runtime.plans.data[cache_key("rms_norm", (x, w, 1e-6))]
    assert plan.locked_by is None


def test_policy_lock_wins_over_baked_table(runtime):
    lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32").install()
    x, w = torch.randn(8, 64), torch.rand(64)
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
        lz.rms_norm(x, w)


def test_mismatched_table_refused_or_ignored(tmp_path):
    table = lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32")
    data = table.to_dict()
    data["environment"]["hardware"]["device_name"] = "NVIDIA H100 80GB HBM3"
    data["environment"]["torch"] = "1.0.0"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    other = lz.PlanTable.load(path)
    with pytest.raises(lz.errors.PlanMismatchError, match="device_name: table made for 'NVIDIA H100 80GB HBM3'"):
        other.install()
    assert other.install(on_mismatch="dynamic") is False
    assert lz.get_runtime().baked is None


def test_invalid_table_lists_every_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": 7, "environment": [], "entries": [{"operation": "rms_norm"}, 3]}))
    with pytest.raises(lz.ConfigError) as info:
        lz.PlanTable.load(path)
    text = str(info.value)
    assert "format: must be 1, got 7" in text
    assert "environment: must be an object" in text
    assert "entries[0]" in text and "entries[1]: must be an object" in text
    path.write_text("{not json")
    with pytest.raises(lz.ConfigError, match="not valid JSON"):
        lz.PlanTable.load(path)


def test_solve_rejects_bad_shapes():
    with pytest.raises(lz.InvalidInputError, match="bad shape"):
        lz.solve({"rms_norm": [{"no_such_field": 1}]})
    with pytest.raises(lz.InvalidInputError, match="unknown operation"):
        lz.solve({"matmul": [{}]})


def test_warmup_populates_the_cache(runtime):
    shape = {"batch_size": 1, "seq_len": 8, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"}
    assert lz.warmup("attention.causal", [shape], progress=False) == 1
    q = torch.randn(1, 2, 8, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    assert lz.explain(q, k, v, operation="attention.causal").cached
    misses = runtime.telemetry.misses
    lz.attention(q, k, v, is_causal=True)
    assert runtime.telemetry.misses == misses


# -- packed and paged attention --------------------------------------------------------------------------------

RAGGED = {
    "attention_varlen": [{"batch_size": 3, "seq_len": 16, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
                          "is_causal": True}],
    "attention_paged": [{"batch_size": 2, "seq_len_q": 1, "seq_len_k": 64, "num_heads": 4, "num_kv_heads": 2,
                         "head_dim": 32}],
}


def _ragged_calls() -> tuple[tuple, tuple]:
    """A packed batch of 10/16/7 tokens and a decode of 2 sequences in a pool of 50 pages of 16 (other totals
    and another pool than the warm-up's own inputs)."""
    from layerzero.ops.attention_paged import page_table
    from layerzero.ops.attention_varlen import cu_seqlens

    q, k, v = torch.randn(33, 4, 32), torch.randn(33, 2, 32), torch.randn(33, 2, 32)
    cu = cu_seqlens([10, 16, 7])
    kc, vc = torch.randn(50, 16, 2, 32), torch.randn(50, 16, 2, 32)
    table = page_table([60, 30], 16, 4, 50)
    paged = (torch.randn(2, 1, 4, 32), kc, vc, table, torch.tensor([60, 30], dtype=torch.int32))
    return (q, k, v, cu, cu, 16, 16), paged


def test_warmup_caches_the_plans_of_packed_and_paged_calls(runtime):
    for operation, shapes in RAGGED.items():
        assert lz.warmup(operation, shapes, progress=False) == 1
    misses: list[str] = []

    def hook(operation: str, ctx: object) -> None:
        misses.append(operation)

    varlen, paged = _ragged_calls()
    runtime.on_miss.append(hook)
    try:
        lz.attention_varlen(*varlen, is_causal=True)
        lz.attention_paged(*paged)  # causal by default, as the warm-up shape without is_causal
    finally:
        runtime.on_miss.remove(hook)
    assert misses == []


def test_baked_table_serves_packed_and_paged_calls(runtime):
    table = lz.solve(RAGGED, dtype="float32")
    buckets = {o: b for (o, _, _, b) in table.entries}
    assert buckets == {"attention_varlen": "b=4;sq=16;sk=16;h=4;hkv=2;d=32;dv=32;causal=1;win=-;softcap=0;grad=0",
                       "attention_paged": "b=2;sq=1;sk=64;page=16;h=4;hkv=2;d=32;dv=32;causal=1;win=-;softcap=0;"
                                          "grad=0"}
    table.install()
    varlen, paged = _ragged_calls()
    out = lz.attention_varlen(*varlen, is_causal=True)
    lz.attention_paged(*paged)
    for operation, args in (("attention_varlen", (*varlen, True, None, None, None)),
                            ("attention_paged", (*paged, True, None, None, None))):
        plan = runtime.plans.data[cache_key(operation, args)]
        assert plan.locked_by == "baked plan table", operation
        assert plan.kernels[0].kernel_id == table.lookup(operation, plan.context)[0]
    from layerzero.ops.attention_varlen import varlen_reference

    torch.testing.assert_close(out.double(), varlen_reference(*varlen, is_causal=True), atol=1e-5, rtol=1e-5)


def test_paged_shapes_name_their_page_size(runtime):
    from layerzero.ops.attention_paged import page_table

    shape = {"batch_size": 2, "seq_len_q": 1, "seq_len_k": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
             "page_size": 32}
    table = lz.solve({"attention.paged": [shape]}, dtype="float32")
    assert [o for (o, _, _, _) in table.entries] == ["attention_paged"]  # the name calls look it up by
    assert lz.warmup("attention.paged", [shape], progress=False) == 1
    kc = torch.randn(9, 32, 2, 32)
    args = (torch.randn(2, 1, 4, 32), kc, kc.clone(), page_table([64, 40], 32, 2, 9),
            torch.tensor([64, 40], dtype=torch.int32))
    assert cache_key("attention_paged", (*args, True, None, None, None)) in runtime.plans.data


def test_a_table_naming_kernels_it_cannot_use_is_refused(runtime):
    """An edited table ranking an attention kernel for rms_norm handed it rms_norm's arguments: every call
    failed and counted against the healthy kernel (its breaker opened). Installing it is a ConfigError now, and
    a malformed environment is named instead of a bare AttributeError."""
    table = lz.solve({"rms_norm": [{"hidden_size": 512, "num_tokens": 64}]}, dtype="float32")
    data = json.loads(json.dumps(table.to_dict()))
    data["entries"][0]["kernels"] = ["torch_sdpa", "no_such_kernel"]
    with pytest.raises(lz.ConfigError) as info:
        lz.PlanTable.from_dict(data).install()
    assert "kernel 'torch_sdpa' implements 'attention', not 'rms_norm'" in str(info.value)
    assert "unknown kernel 'no_such_kernel'" in str(info.value)
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    torch.testing.assert_close(lz.rms_norm(x, w), torch.nn.functional.rms_norm(x, (512,), w, 1e-6))
    assert not any(b.failures for b in runtime.breakers.all().values())
    for key, bad in (("hardware", "x"), ("backends", ["torch"]), ("torch", 2)):
        broken = json.loads(json.dumps(table.to_dict()))
        broken["environment"][key] = bad
        with pytest.raises(lz.ConfigError, match=f"environment.{key}: must be"):
            lz.PlanTable.from_dict(broken)


def test_which_and_explain_report_the_baked_kernel(runtime):
    table = lz.solve({"rms_norm": [{"hidden_size": 512, "num_tokens": 8}]}, dtype="float32")
    data = table.to_dict()
    data["entries"][0]["kernels"] = ["torch_rms_norm_composed", "torch_rms_norm"]
    lz.PlanTable.from_dict(data).install()
    try:
        x, w = torch.randn(8, 512), torch.rand(512) + 0.5
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
        assert lz.explain(x, w, operation="rms_norm").selected_kernel == "torch_rms_norm_composed"
        lz.rms_norm(x, w)
        assert runtime.telemetry.kernels["torch_rms_norm_composed"].calls >= 1
    finally:
        uninstall_plan_table()
    assert lz.which("rms_norm", torch.randn(8, 512), torch.rand(512)) == "torch_rms_norm"


def test_a_shape_without_a_dtype_is_named():
    """Keyed under dtype '-', its entry would never apply to a real call."""
    with pytest.raises(lz.InvalidInputError, match="has no dtype"):
        lz.solve({"rms_norm": [{"hidden_size": 512, "num_tokens": 8}]})


def test_explain_reports_a_baked_tables_choice(runtime):
    """explain() raised TypeError while a table was installed (a table's selection has no score)."""
    x, w = torch.randn(64, 512), torch.rand(512) + 0.5
    lz.solve({"rms_norm": [{"hidden_size": 512, "num_tokens": 64}]}, dtype="float32").install()
    exp = lz.explain(x, w, operation="rms_norm")
    text = str(exp)
    assert exp.locked_by == "baked plan table" and exp.score is None
    assert f"selected: {exp.selected_kernel} (from the baked plan table" in text
    assert "the table's kernels, in order: " in text and exp.candidates
    assert exp.to_dict()["candidates"][0]["kernel_id"] == exp.selected_kernel


@pytest.mark.parametrize(("operation", "shape", "call"), [
    ("rope", {"batch_size": 2, "seq_len": 32, "num_heads": 4, "head_dim": 16},
     lambda: lz.rope(torch.randn(2, 4, 32, 16), torch.randn(32, 16), torch.randn(32, 16))),
    ("sample.greedy", {"batch_size": 8, "hidden_size": 100}, lambda: lz.sample(torch.randn(8, 100), 0.0)),
])
def test_a_solved_entry_is_the_one_its_real_call_looks_up(runtime, operation, shape, call):
    """A shape's fields need not be what the call's context reads (rope counts rows as batch x heads x sequence):
    the entry is keyed by the context the real call builds, so the call runs from the table."""
    lz.solve({operation: [shape]}, dtype="float32").install()
    call()
    assert [p.locked_by for p in runtime.plans.data.values()] == ["baked plan table"]


def test_a_broken_table_file_is_a_config_error(tmp_path):
    cases = {"binary.json": b"\xff\xfe\x00{", "nested.json": b"[" * 200_000 + b"]" * 200_000,
             "digits.json": b'{"format": ' + b"9" * 5000 + b"}"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(lz.ConfigError, match="plan table"):
            lz.PlanTable.load(tmp_path / name)


def test_entries_that_no_call_can_look_up_are_refused(tmp_path):
    table = lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32")
    data = table.to_dict()
    entry = data["entries"][0]
    data["format"] = True  # True == 1
    data["entries"] = [entry, dict(entry), {**entry, "dtype": "floatX"}, {**entry, "platform": "tpu"},
                       {**entry, "bucket": "garbage"}, {**entry, "operation": "attention.causal.bogus"}]
    with pytest.raises(lz.ConfigError) as info:
        lz.PlanTable.from_dict(data)
    text = str(info.value)
    for said in ("format: must be 1, got True", "entries[1]: a second entry", "entries[2]: unknown dtype 'floatX'",
                 "entries[3]: platform must be one of", "entries[4]: bucket 'garbage' is not a bucket",
                 "entries[5]:"):
        assert said in text, said


def test_a_table_for_other_hardware_is_ignored_with_dynamic_even_naming_its_kernels(tmp_path, runtime):
    table = lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32")
    data = table.to_dict()
    data["environment"]["hardware"] = None  # accepted by the schema: no fingerprint recorded
    assert lz.PlanTable.from_dict(data).mismatch() != []
    data["environment"]["hardware"] = {"device_name": "NVIDIA H100 80GB HBM3", "platform": "cuda"}
    data["entries"] = [{**e, "platform": "cuda", "kernels": ["liger_rms_norm_on_that_box"]} for e in data["entries"]]
    foreign = lz.PlanTable.from_dict(data)
    assert foreign.install(on_mismatch="dynamic") is False and runtime.baked is None
    with pytest.raises(lz.errors.PlanMismatchError, match="this machine has no CUDA device"):
        foreign.install()


def test_a_table_entry_keeps_the_other_kernels_as_fallbacks(runtime):
    """An entry ranking one kernel that raises: the other eligible kernels serve the call behind it, as behind a
    lock (the first calls failed until the kernel's breaker opened)."""
    def broken(x, weight, eps):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    lz.register_kernel(lz.KernelSpec("custom_raising_rms", "rms_norm", "custom", broken, priority=1))
    try:
        table = lz.solve({"rms_norm": [{"hidden_size": 64, "num_tokens": 8}]}, dtype="float32")
        table.entries = {k: ["custom_raising_rms"] for k in table.entries}
        table.install()
        x, w = torch.randn(8, 64), torch.rand(64) + 0.5
        for _ in range(3):
            torch.testing.assert_close(lz.rms_norm(x, w), torch.rms_norm(x, (64,), w, 1e-6))
    finally:
        runtime.kernels.unregister("custom_raising_rms")


def test_warmup_errors_and_count_match_solve(runtime):
    with pytest.raises(lz.NoKernelError):
        lz.warmup("rms_norm", [{"hidden_size": 64, "num_tokens": 8, "dtype": torch.int64}], progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(lz.InvalidInputError, match="device cuda, which this machine does not have"):
            lz.warmup("rms_norm", [{"hidden_size": 64, "num_tokens": 8, "dtype": "float32"}], device="cuda",
                      progress=False)
    with lz.lock("rms_norm", "torch_rms_norm_composed"):  # a scope's plans count too
        assert lz.warmup("rms_norm", [{"hidden_size": 64, "num_tokens": 8, "dtype": "float32"}], progress=False) == 1
