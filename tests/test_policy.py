"""Policy: lock / unlock / prefer / disabled / enabled / configure, documents, scopes and cached plans."""

from __future__ import annotations

import asyncio
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from doc_pages import page, python_blocks
import layerzero as lz
from layerzero.errors import KernelNotSupportedError, NoKernelError, PolicyError
from layerzero.policy.document import MAX_DOCUMENT_BYTES, ConfigWarning, load_policy
from layerzero.registry import get_global_kernel_registry
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec

# CPU float32 attention candidates by priority: torch_sdpa 70, torch_sdpa_gqa 68, torch_sdpa_flash_cpu 60,
# torch_sdpa_math 10.  rms_norm: torch_rms_norm 60, torch_rms_norm_composed 20.
DEFAULT_ATTN = "torch_sdpa"
DEFAULT_RMS = "torch_rms_norm"


def qkv(seq: int = 8, heads: int = 2, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seq * 31 + heads)
    return tuple(torch.randn(batch, heads, seq, 16, generator=g) for _ in range(3))  # type: ignore[return-value]


def rows(n: int = 4, hidden: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7 + hidden)
    return torch.randn(n, hidden, generator=g), torch.randn(hidden, generator=g) + 1.5


def which_attn(seq: int = 8) -> str:
    return lz.which("attention.causal", *qkv(seq))


def which_rms() -> str:
    return lz.which("rms_norm", *rows())


def calls(kernel_id: str) -> int:
    """Invocations of a kernel over every operation (the hot path counts each call)."""
    stats = get_runtime().telemetry.kernels.get(kernel_id)
    return stats.calls if stats is not None else 0


@pytest.fixture
def custom_rms() -> Iterator[list[str]]:
    """A second backend for rms_norm ("custom", priority 40) whose calls are recorded."""
    seen: list[str] = []

    def custom_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        seen.append("custom")
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    reg = get_global_kernel_registry()
    reg.register(KernelSpec("custom_rms_norm", "rms_norm", "custom", custom_rms_norm, priority=40))
    try:
        yield seen
    finally:
        reg.unregister("custom_rms_norm")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- lock / unlock ------------------------------------------------------------------------------------------

def test_lock_global_and_unlock() -> None:
    assert which_attn() == DEFAULT_ATTN
    lz.lock("attention.causal", "torch_sdpa_math")
    assert which_attn() == "torch_sdpa_math"
    assert lz.which("attention.full", *qkv()) == DEFAULT_ATTN          # other operations are untouched
    lz.unlock("attention.causal")
    assert which_attn() == DEFAULT_ATTN


def test_a_scoped_lock_entered_later_leaves_the_process_wide_lock_in_force() -> None:
    """A lock not written directly in a ``with`` (ExitStack, a conditional, a variable) is applied process-wide
    until it is entered; the lock it replaced meanwhile comes back when it turns scoped (it used to be lost)."""
    import contextlib

    lz.lock("attention.causal", "torch_sdpa_math")
    with contextlib.ExitStack() as stack:
        stack.enter_context(lz.lock("attention.causal", "torch_sdpa_gqa"))
        assert which_attn() == "torch_sdpa_gqa"
    assert which_attn() == "torch_sdpa_math"
    change = lz.lock("attention.causal", "torch_sdpa_flash_cpu")
    with change:
        assert which_attn() == "torch_sdpa_flash_cpu"
    assert which_attn() == "torch_sdpa_math"
    lz.unlock("attention.causal")
    assert which_attn() == DEFAULT_ATTN


def test_a_lock_never_falls_back_to_a_denied_kernel_and_a_higher_deny_overrides_it() -> None:
    """Denied kernels "never run": not as a lock's fallbacks either. Rules apply in precedence order (scoped,
    programmatic, document): a scoped deny of the locked kernel overrides a process-wide lock; a document's
    deny does not override a programmatic lock."""
    lz.configure({"version": "1.0", "locks": [{"operation": "attention.causal", "kernel": "torch_sdpa_math"}],
                  "denies": [{"operation": "attention.*", "kernels": ["torch_sdpa", "torch_sdpa_gqa"]}]})
    try:
        ranked = [c["kernel_id"] for c in lz.explain(*qkv(), operation="attention.causal").to_dict()["candidates"]]
        assert ranked[0] == "torch_sdpa_math" and not {"torch_sdpa", "torch_sdpa_gqa"} & set(ranked), ranked
    finally:
        lz.configure(None)
    lz.lock("attention.causal", "torch_sdpa_math")
    try:
        with lz.disabled("torch"):
            with pytest.raises(NoKernelError, match="denied by policy"):
                which_attn()
        deny_math = {"version": "1.0", "denies": [{"operation": "*", "kernels": ["torch_sdpa_math"]}]}
        lz.configure(deny_math)  # the document in force: the programmatic lock comes first
        assert which_attn() == "torch_sdpa_math"
        lz.configure(None)
        with lz.configure(deny_math):  # a scoped document comes first: its deny overrides the lock
            assert which_attn() == DEFAULT_ATTN
    finally:
        lz.configure(None)
        lz.unlock("attention.causal")


def test_lock_glob_and_backend_lock() -> None:
    lz.lock("attention.*", "torch_sdpa_gqa")
    assert which_attn() == "torch_sdpa_gqa"
    assert lz.which("attention.full", *qkv()) == "torch_sdpa_gqa"
    lz.unlock("attention.*")
    lz.lock("rms_norm", backend="torch")
    assert which_rms() == DEFAULT_RMS


def test_lock_scoped_is_restored_on_exit() -> None:
    lz.lock("attention.causal", "torch_sdpa_gqa")
    with lz.lock("attention.causal", "torch_sdpa_math"):
        assert which_attn() == "torch_sdpa_math"
        with lz.unlock("attention.causal"):
            assert which_attn() == DEFAULT_ATTN
        assert which_attn() == "torch_sdpa_math"
    assert which_attn() == "torch_sdpa_gqa"
    assert get_runtime().policy.api_rules[0].kernels == ("torch_sdpa_gqa",)   # the scope left nothing behind


def test_lock_with_condition_applies_only_where_it_holds() -> None:
    lz.lock("attention.causal", "torch_sdpa_math", condition="seq_len > 64")
    assert which_attn(seq=8) == DEFAULT_ATTN
    assert which_attn(seq=128) == "torch_sdpa_math"


def test_locks_with_different_conditions_are_different_rules() -> None:
    """A second conditional lock (or prefer) on the same operation keeps the first: the first whose condition
    holds decides. Only the same condition takes the earlier rule's place."""
    lz.lock("attention.causal", "torch_sdpa_math", condition="seq_len > 64")
    lz.lock("attention.causal", "torch_sdpa_gqa", condition="seq_len <= 64")
    assert which_attn(seq=8) == "torch_sdpa_gqa"
    assert which_attn(seq=128) == "torch_sdpa_math"
    lz.lock("attention.causal", "torch_sdpa_flash_cpu", condition="seq_len <= 64")  # the same condition: replaced
    assert [r.kernels for r in get_runtime().policy.api_rules] == [("torch_sdpa_flash_cpu",), ("torch_sdpa_math",)]
    lz.unlock("attention.causal")
    lz.prefer("torch", priority=0, operation="rms_norm", condition="num_tokens > 8")
    lz.prefer("torch", priority=1000, operation="rms_norm", condition="num_tokens <= 8")
    assert len(get_runtime().policy.api_rules) == 2


@pytest.mark.parametrize("order", ["first-first", "last-first"])
def test_undoing_stacked_locks_in_either_order_leaves_none(order: str) -> None:
    """Three process-wide locks on one operation, each replacing the last, undone in either order: a lock whose
    own change was undone never comes back (undoing the first, then the others, brought it back), and undoing
    the last one only puts back the lock before it."""
    x, w = rows()
    a = lz.lock("rms_norm", "torch_rms_norm_composed")
    b = lz.lock("rms_norm", "torch_rms_norm")
    c = lz.lock("rms_norm", "torch_rms_norm_composed")
    if order == "first-first":
        a.undo()
        b.undo()
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"  # c is still in force
        c.undo()
    else:
        c.undo()
        assert lz.which("rms_norm", x, w) == "torch_rms_norm"  # b comes back
        a.undo()
        assert lz.which("rms_norm", x, w) == "torch_rms_norm"  # b stays; a, undone, never comes back
        b.undo()
    assert get_runtime().policy.api_rules == ()
    assert lz.which("rms_norm", x, w) == "torch_rms_norm"
    d = lz.lock("rms_norm", "torch_rms_norm_composed")
    e = lz.lock("rms_norm", "torch_rms_norm")
    lz.unlock("rms_norm")
    e.undo()  # what an unlocked lock replaced stays gone
    d.undo()
    assert get_runtime().policy.api_rules == ()


def test_one_change_object_entered_again_nested_and_from_two_threads() -> None:
    """A PolicyChange closes the block it opened in this thread: entered twice nested, or by a second thread
    while the first is inside, every block ends with the policy it started with."""
    from layerzero.policy.scope import SCOPE

    x, w = rows()
    change = lz.lock("rms_norm", "torch_rms_norm_composed")
    with change:
        with change:
            assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
    assert SCOPE.get() is None and lz.which("rms_norm", x, w) == DEFAULT_RMS
    inside, second_in = threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with change:
                inside.set()
                second_in.wait(5)
            seen["first"] = (SCOPE.get(), lz.which("rms_norm", x, w))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def second() -> None:
        inside.wait(5)
        with change:
            second_in.set()
            seen["second inside"] = lz.which("rms_norm", x, w)
        seen["second"] = (SCOPE.get(), lz.which("rms_norm", x, w))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert seen == {"first": (None, DEFAULT_RMS), "second inside": "torch_rms_norm_composed",
                    "second": (None, DEFAULT_RMS)}


def test_lock_on_a_kernel_that_cannot_run_raises_with_reasons() -> None:
    lz.lock("attention.causal", "torch_sdpa_flash")
    with pytest.raises(KernelNotSupportedError, match=r"locked by lock attention.causal -> torch_sdpa_flash.*"
                                                      r"device is cpu, kernel runs on cuda"):
        which_attn()


def test_lock_unknown_kernel_and_bad_arguments() -> None:
    with pytest.raises(lz.errors.KernelNotFoundError, match=r"unknown kernel 'torch_sdpa_mth'; did you mean torch_sdpa_math"):
        lz.lock("attention.causal", "torch_sdpa_mth")
    with pytest.raises(PolicyError, match=r"exactly one of kernel= or backend="):
        lz.lock("attention.causal")
    with pytest.raises(PolicyError, match=r"backend must be a non-empty string, got ''"):
        lz.lock("attention.causal", backend="")
    with pytest.raises(PolicyError, match=r"operation must be a non-empty string, got None"):
        lz.disabled("torch", operation=None)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=r"lz.lock\(\): 'kernel' is only known to rules judged per kernel"):
        lz.lock("attention.causal", "torch_sdpa_math", condition="kernel == 'torch_sdpa'")
    with pytest.raises(PolicyError, match=r"function calls are not allowed at position 10"):
        lz.lock("attention.causal", "torch_sdpa_math", condition="__import__('os')")
    assert get_runtime().policy.api_rules == ()


# -- disabled / enabled, prefer -----------------------------------------------------------------------------------

def test_disabled_and_enabled_backend(custom_rms: list[str]) -> None:
    lz.disabled("torch")
    assert which_rms() == "custom_rms_norm"
    with pytest.raises(NoKernelError, match=r"denied by policy: deny \* -> backend torch"):
        which_attn()
    with lz.enabled("torch"):
        assert which_rms() == DEFAULT_RMS
    assert which_rms() == "custom_rms_norm"
    lz.enabled("torch")
    assert which_rms() == DEFAULT_RMS


def test_enabled_lifts_the_disables_its_operation_glob_covers(custom_rms: list[str]) -> None:
    """enabled(backend) lifted only a disable of the very same operation string ("*"): a disabled(backend,
    operation="rms_norm") stayed in force."""
    lz.disabled("torch", operation="rms_norm")
    assert which_rms() == "custom_rms_norm"
    lz.enabled("torch")
    assert which_rms() == DEFAULT_RMS
    lz.disabled("torch")
    lz.enabled("torch", operation="rms_norm")  # one rule for every operation: not lifted for one of them
    assert which_rms() == "custom_rms_norm"
    lz.enabled("torch")
    assert which_rms() == DEFAULT_RMS


def test_disabled_scoped(custom_rms: list[str]) -> None:
    with lz.disabled("torch", operation="rms_norm"):
        assert which_rms() == "custom_rms_norm"
        assert which_attn() == DEFAULT_ATTN
    assert which_rms() == DEFAULT_RMS


def test_prefer_and_scoped_prefer_wins_over_global(custom_rms: list[str]) -> None:
    assert which_rms() == DEFAULT_RMS
    lz.prefer("custom", priority=100)
    assert which_rms() == "custom_rms_norm"
    with lz.prefer("custom", priority=1):                  # the scoped (earlier) rule wins
        assert which_rms() == DEFAULT_RMS
    assert which_rms() == "custom_rms_norm"


def test_prefer_with_per_kernel_condition(custom_rms: list[str]) -> None:
    lz.prefer("custom", priority=100, condition="kernel == 'custom_rms_norm' and hidden_size >= 64")
    assert which_rms() == DEFAULT_RMS                     # hidden_size 32
    assert lz.which("rms_norm", *rows(hidden=64)) == "custom_rms_norm"
    with pytest.raises(PolicyError, match=r"priority must be an int between 0 and 1000, got 5000"):
        lz.prefer("custom", priority=5000)


# -- policy documents --------------------------------------------------------------------------------------------

POLICY_YAML = """\
version: "1.0"
locks:
  - operation: "attention.causal"
    kernel: torch_sdpa_math
    condition: "seq_len > 64"
denies:
  - operation: "attention.*"
    kernels: ["torch_sdpa"]
allows:
  - operation: "rms_norm"
    backends: ["torch"]
    kernels: ["custom_*"]
boosts:
  - operation: "attention.*"
    kernel: torch_sdpa_flash_cpu
    boost_factor: 2.0
    condition: "batch_size >= 2"
"""


def test_configure_yaml_file_changes_which_exactly_as_documented(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", POLICY_YAML)
    lz.configure(path)
    assert which_attn(seq=128) == "torch_sdpa_math"                          # lock, condition holds
    assert which_attn(seq=8) == "torch_sdpa_gqa"                             # torch_sdpa denied: next is 68
    assert lz.which("attention.causal", *qkv(batch=2)) == "torch_sdpa_flash_cpu"  # boost 60 * 2 = 120 > 68
    assert which_rms() == DEFAULT_RMS                                         # allowed by backend
    exp = lz.explain(*qkv(seq=128), operation="attention.causal")
    assert exp.locked_by == f"lock attention.causal -> torch_sdpa_math if seq_len > 64 ({path}: locks[0])"
    denied = lz.explain(*qkv(), operation="attention.causal").rejection_reasons["torch_sdpa"]
    assert [r.code for r in denied] == ["POLICY_DENIED"]
    assert f"({path}: denies[0])" in denied[0].message
    lz.configure({"version": "1.0"})                                          # clears the document
    assert which_attn(seq=128) == DEFAULT_ATTN


def test_allows_reject_everything_else(custom_rms: list[str]) -> None:
    lz.configure({"version": "1.0", "allows": [{"operation": "rms_norm", "kernels": ["torch_rms_norm_composed"]}]})
    assert which_rms() == "torch_rms_norm_composed"
    exp = lz.explain(*rows(), operation="rms_norm")
    assert exp.rejection_reasons["custom_rms_norm"][0].code == "POLICY_NOT_ALLOWED"
    assert which_attn() == DEFAULT_ATTN                     # the allow list is for rms_norm only


def test_allow_with_condition_and_deny_with_kernel_condition() -> None:
    lz.configure({"version": "1.0",
                  "allows": [{"operation": "attention.*", "kernels": ["torch_sdpa_math"], "condition": "seq_len > 64"}],
                  "denies": [{"operation": "rms_norm", "backends": ["torch"],
                              "condition": "kernel == 'torch_rms_norm' and hidden_size < 64"}]})
    assert which_attn(seq=8) == DEFAULT_ATTN
    assert which_attn(seq=128) == "torch_sdpa_math"
    assert which_rms() == "torch_rms_norm_composed"
    assert lz.which("rms_norm", *rows(hidden=64)) == DEFAULT_RMS


def test_configure_scoped_document(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", POLICY_YAML)
    with lz.configure(path):
        assert which_attn(seq=128) == "torch_sdpa_math"
    assert which_attn(seq=128) == DEFAULT_ATTN
    assert get_runtime().policy.document.rules == ()


def test_programmatic_lock_wins_over_the_document(tmp_path: Path) -> None:
    lz.configure(write(tmp_path, "policy.yaml", POLICY_YAML))
    lz.lock("attention.causal", "torch_sdpa_gqa")
    assert which_attn(seq=128) == "torch_sdpa_gqa"


def test_json_document_and_text_document(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.json", '{"version": "1.0", "locks": [{"operation": "rms_norm", '
                                          '"kernel": "torch_rms_norm_composed"}]}')
    lz.configure(path)
    assert which_rms() == "torch_rms_norm_composed"
    lz.configure('version: "1.0"\ndenies: [{operation: rms_norm, kernels: [torch_rms_norm]}]\n')
    assert which_rms() == "torch_rms_norm_composed"


def test_invalid_document_lists_every_error_and_changes_nothing(tmp_path: Path) -> None:
    lz.configure({"version": "1.0", "locks": [{"operation": "rms_norm", "kernel": "torch_rms_norm_composed"}]})
    bad = write(tmp_path, "bad.yaml", """\
version: "1.0"
locks:
  - operation: "attention.*"
    kernel: torch_sdpa_flsh
    condition: "sm >= 'x'"
  - kernel: 5
  - operation: rms_norm
    kernel: torch_sdpa_math
allows:
  - backends: torch
denies:
  - operation: "*"
boosts:
  - backend: torch
    boost_factor: 0
  - kernel: torch_sdpa_math
    boost_factor: 2
    condition: "__import__('os').system('true')"
extra: 1
""")
    with pytest.raises(PolicyError) as info:
        lz.configure(bad)
    errors = info.value.errors
    assert errors == [
        "extra: unknown key (expected one of: version, description, locks, allows, denies, boosts)",
        "locks[0].kernel: unknown kernel 'torch_sdpa_flsh'; did you mean torch_sdpa_flash, torch_sdpa_flash_cpu, "
        "torch_sdpa_math?",
        "locks[0].condition: cannot compare sm (int) with 'x' (str) using '>=' at position 3\n    sm >= 'x'\n"
        "       ^",
        "locks[1].operation: is required (the operation glob to lock)",
        "locks[1].kernel: must be a string, got 5",
        "locks[2].kernel: kernel 'torch_sdpa_math' implements 'attention', not 'rms_norm'",
        "allows[0].backends: must be a list of backend globs, got 'torch' (a string)",
        "denies[0]: needs backends and/or kernels (lists of globs)",
        "boosts[0].boost_factor: must be greater than 0 and at most 1e+06, got 0",
        "boosts[1].condition: function calls are not allowed at position 10\n"
        "    __import__('os').system('true')\n              ^",
    ]
    assert str(info.value).startswith(f"{bad}: invalid policy (10 errors):")
    assert which_rms() == "torch_rms_norm_composed"            # the old document is still in force


def test_unknown_kernels_can_be_warnings() -> None:
    doc = {"version": "1.0", "denies": [{"kernels": ["acme_rms_norm"]}], "locks": []}
    with pytest.raises(PolicyError, match=r"denies\[0\].kernels\[0\]: unknown kernel 'acme_rms_norm'"):
        load_policy(doc)
    with pytest.warns(ConfigWarning, match=r"denies\[0\].kernels\[0\]: unknown kernel 'acme_rms_norm'"):
        policy = load_policy(doc, unknown_kernels="warn")
    assert policy.to_list() == ["deny * -> acme_rms_norm (dict: denies[0])"]
    load_policy({"version": "1.0", "denies": [{"kernels": ["acme_*"]}]})   # a glob may match nothing


@pytest.mark.parametrize("text, message", [
    ("version: '1.0'\nlocks: [", r"invalid YAML at line 2"),
    ("a: &x [1, 2]\nb: *x\nversion: '1.0'", r"YAML anchors and aliases are not supported"),
    ("version: '2.0'", r"version: unsupported version '2.0' \(supported: 1.0\)"),
    ("locks: []", r"version: is required"),
    ("- 1\n- 2", r"a policy document must be a mapping"),
    ("version: '1.0'\nlocks: {operation: x}", r"locks: must be a list of rules, got a mapping"),
    ("a: " + "[" * 40 + "]" * 40, r"nested more than 32 levels"),
    ('{"a": ' * 20000 + "1" + "}" * 20000, r"document is nested too deeply"),
])
def test_document_shape_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        lz.configure(text)


def test_document_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing.yaml: file not found"):
        lz.configure(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("version: '1.0'\n" + "#" * (MAX_DOCUMENT_BYTES + 10))
    with pytest.raises(PolicyError, match=r"more than the 1048576 allowed"):
        lz.configure(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: '1.0'\n\xff\xfe")
    with pytest.raises(PolicyError, match=r"not UTF-8 text"):
        lz.configure(binary)
    with pytest.raises(PolicyError, match=r"invalid JSON at line 1"):
        lz.configure(write(tmp_path, "p.json", "{version: 1}"))


def test_a_missing_file_name_is_not_read_as_text() -> None:
    with pytest.raises(PolicyError, match=r"'mypolicy': no such file \(and not YAML/JSON document text\)"):
        lz.configure("mypolicy")


def test_yaml_float_version_is_accepted() -> None:
    assert load_policy("version: 1.0\n").rules == ()


# -- scopes are thread- and task-local ------------------------------------------------------------------------------

def test_scope_in_one_thread_does_not_affect_another() -> None:
    inside = threading.Event()
    done = threading.Event()
    seen: dict[str, str] = {}

    def worker() -> None:
        with lz.lock("attention.causal", "torch_sdpa_math"):
            seen["worker"] = which_attn()
            lz.attention(*qkv(), is_causal=True)
            inside.set()
            done.wait(10)
            seen["worker_after"] = which_attn()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main"] = which_attn()
    before = calls(DEFAULT_ATTN)
    lz.attention(*qkv(), is_causal=True)                  # main thread's hot path: not the worker's scope
    assert calls(DEFAULT_ATTN) == before + 1
    done.set()
    t.join(10)
    assert seen == {"worker": "torch_sdpa_math", "main": DEFAULT_ATTN, "worker_after": "torch_sdpa_math"}


def test_new_threads_do_not_inherit_a_scope() -> None:
    seen: list[str] = []
    with lz.lock("attention.causal", "torch_sdpa_math"):
        t = threading.Thread(target=lambda: seen.append(which_attn()))
        t.start()
        t.join(10)
    assert seen == [DEFAULT_ATTN]


def test_scopes_are_asyncio_task_local() -> None:
    async def locked(entered: asyncio.Event, release: asyncio.Event) -> tuple[str, str]:
        with lz.lock("attention.causal", "torch_sdpa_math"):
            first = which_attn()
            entered.set()
            await release.wait()
            return first, which_attn()

    async def plain(entered: asyncio.Event, release: asyncio.Event) -> str:
        await entered.wait()
        try:
            return which_attn()
        finally:
            release.set()

    async def main() -> tuple[tuple[str, str], str]:
        entered, release = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(locked(entered, release), plain(entered, release))  # type: ignore[return-value]

    (first, again), other = asyncio.run(main())
    assert (first, again, other) == ("torch_sdpa_math", "torch_sdpa_math", DEFAULT_ATTN)


# -- every policy change reaches the cached hot path -------------------------------------------------------------

def test_policy_changes_invalidate_cached_plans_on_the_hot_path(tmp_path: Path) -> None:
    q, k, v = qkv()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    lz.attention(q, k, v, is_causal=True)
    lz.attention(q, k, v, is_causal=True)                 # cached now
    steps = [
        (lambda: lz.lock("attention.causal", "torch_sdpa_math"), "torch_sdpa_math"),
        (lambda: lz.unlock("attention.causal"), DEFAULT_ATTN),
        (lambda: lz.disabled("torch", operation="attention.full"), DEFAULT_ATTN),
        (lambda: lz.configure({"version": "1.0", "denies": [{"kernels": ["torch_sdpa"]}]}), "torch_sdpa_gqa"),
        (lambda: lz.configure(write(tmp_path, "p.yaml", POLICY_YAML)), "torch_sdpa_gqa"),
        (lambda: lz.configure({"version": "1.0", "boosts": [{"kernel": "torch_sdpa_flash_cpu",
                                                            "boost_factor": 10}]}), "torch_sdpa_flash_cpu"),
        (lambda: lz.configure(None), DEFAULT_ATTN),
    ]
    for change, expected in steps:
        change()
        before = calls(expected)
        for _ in range(3):
            out = lz.attention(q, k, v, is_causal=True)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert calls(expected) == before + 3, expected


def test_scoped_policy_reaches_the_hot_path_and_leaves_with_the_scope(custom_rms: list[str]) -> None:
    x, w = rows()
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    for _ in range(2):
        lz.rms_norm(x, w)
    assert custom_rms == []
    with lz.prefer("custom", priority=500):
        for _ in range(3):
            torch.testing.assert_close(lz.rms_norm(x, w).double(), ref, atol=1e-5, rtol=1e-5)
    assert custom_rms == ["custom"] * 3
    lz.rms_norm(x, w)
    assert custom_rms == ["custom"] * 3
    lz.prefer("custom", priority=500)                     # process-wide now: the cached plan is replaced
    lz.rms_norm(x, w)
    lz.rms_norm(x, w)
    assert custom_rms == ["custom"] * 5


def test_a_policy_change_during_a_cache_miss_never_leaves_a_stale_plan() -> None:
    changed: list[bool] = []

    def custom_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        if not changed:                                   # a policy change lands while this call selects and runs
            changed.append(True)
            lz.lock("rms_norm", "torch_rms_norm_composed")
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    reg = get_global_kernel_registry()
    reg.register(KernelSpec("custom_rms_norm", "rms_norm", "custom", custom_rms_norm, priority=99))
    try:
        x, w = rows()
        lz.rms_norm(x, w)                                 # ran on the old policy; its plan must not be cached
        before = calls("torch_rms_norm_composed")
        lz.rms_norm(x, w)
        lz.rms_norm(x, w)
        assert calls("torch_rms_norm_composed") == before + 2
        assert [p.kernel_id for p in get_runtime().plans.data.values()] == ["torch_rms_norm_composed"]
    finally:
        reg.unregister("custom_rms_norm")


def test_configure_accepts_a_dispatch_config_document() -> None:
    lz.configure({"version": "1.0", "kernel_locks": {"rms_norm": "torch_rms_norm_composed"},
                  "fallback_chains": {"attention.causal": ["torch_sdpa_gqa", "torch_sdpa_math"]}})
    assert which_rms() == "torch_rms_norm_composed"
    assert which_attn() == "torch_sdpa_gqa"
    ranked = [k for k, _ in lz.explain(*qkv(), operation="attention.causal").candidates]
    assert ranked == ["torch_sdpa_gqa", "torch_sdpa_math", "torch_sdpa", "torch_sdpa_flash_cpu", "torch_attention_eager"]


def test_warnings_module_clean_for_valid_documents() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy({"version": "1.0", "boosts": [{"backend": "torch", "boost_factor": 1.5}]})


# -- docs/policy.md --------------------------------------------------------------------------------------------------

DOC = page("policy.md")


def test_policy_doc_examples_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of the doc runs, top to bottom, in one namespace; its printed output is the doc's."""
    import re

    text = DOC.read_text()
    blocks = python_blocks(DOC)
    outputs = re.findall(r"^```text\n(.*?)^```$", text, flags=re.S | re.M)
    assert len(blocks) >= 5
    ns: dict[str, object] = {"__name__": "policy_doc"}
    printed: list[str] = []
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name}[python block {i + 1}]", "exec"), ns)  # noqa: S102 - our own doc
        except Exception as exc:
            raise AssertionError(f"python block {i + 1} of {DOC} failed: {type(exc).__name__}: {exc}") from exc
        printed.append(capsys.readouterr().out)
    documented = "".join(o for o in outputs if not o.startswith("$ "))
    got = "".join(printed)
    tmp = Path(str(ns["tmp"]))
    assert got.replace(str(tmp), "/tmp/tmpXXXX") == documented
    # The CLI session: the doc's YAML blocks (named by their first comment line) plus the example's policy.yaml.
    from click.testing import CliRunner

    from layerzero.cli import cli

    files = tmp / "cli"
    files.mkdir()
    for block in re.findall(r"^```yaml\n(.*?)^```$", text, flags=re.S | re.M):
        (files / block.splitlines()[0].removeprefix("# ").strip()).write_text(block)
    (files / "policy.yaml").write_text((tmp / "policy.yaml").read_text())
    session = next(o for o in outputs if o.startswith("$ "))
    commands = re.split(r"^\$ ", session, flags=re.M)[1:]
    assert len(commands) == 3
    runner = CliRunner()
    monkeypatch.chdir(files)
    for command in commands:
        line, _, expected = command.partition("\n")
        res = runner.invoke(cli, line.split()[1:])
        assert res.output == expected, line
        assert res.exit_code == (1 if "invalid" in expected else 0), line


# -- on a real GPU (skipped on CPU-only machines) ----------------------------------------------------------------------

@pytest.mark.gpu
def test_conditional_lock_and_config_dispatch_on_a_gpu(tmp_path: Path) -> None:
    from layerzero.context import SelectionContext
    from layerzero.dispatch import create_config_dispatcher
    from layerzero.ops.attention import attention_reference

    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    ref = attention_reference(q, k, v, is_causal=True)
    default = lz.which("attention.causal", q, k, v)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    default32 = lz.which("attention.causal", q32, k32, v32)
    lz.lock("attention.causal", "torch_sdpa_math", condition="platform == 'cuda' and sm >= 75 and dtype == 'fp16'")
    assert lz.which("attention.causal", q, k, v) == ("torch_sdpa_math" if sm >= 75 else default)
    out = lz.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=4e-3, rtol=4e-3)
    assert lz.which("attention.causal", q32, k32, v32) == default32       # the condition does not hold
    lz.unlock("attention.causal")

    path = tmp_path / "kernels.yaml"
    path.write_text('version: "1.0"\ndispatch_rules:\n'
                    '  - {operation: "attention.*", kernel: torch_sdpa_efficient,'
                    ' conditions: {platform: cuda, dtype: [float16, bfloat16], sm_gte: 50}}\n')
    d = create_config_dispatcher(config_path=path)
    r = d.dispatch("attention.causal", {"query": q, "key": k, "value": v})
    assert r.kernel_id == "torch_sdpa_efficient"
    torch.testing.assert_close(r.output.double(), ref, atol=4e-3, rtol=4e-3)
    ctx32 = SelectionContext.from_attention(q32, k32, v32, is_causal=True)
    fired = [rule for dec in d.select("attention.causal", ctx32).trace for rule in dec.rules]
    assert not any("dispatch_rules[0]" in rule for rule in fired)            # float32: the rule does not hold


def test_nested_scoped_documents_the_inner_wins(runtime) -> None:
    """``with lz.configure(doc):`` inside another: the inner document's rules come first, as an inner
    ``lz.lock`` does (the outer one used to win)."""
    q = k = v = torch.randn(1, 2, 4, 8)
    outer = {"version": "1.0", "locks": [{"operation": "attention.causal", "kernel": "torch_sdpa_math"}]}
    inner = {"version": "1.0", "locks": [{"operation": "attention.*", "kernel": "torch_sdpa_gqa"}]}
    with lz.configure(outer):
        assert lz.which("attention.causal", q, k, v) == "torch_sdpa_math"
        with lz.configure(inner):
            assert lz.which("attention.causal", q, k, v) == "torch_sdpa_gqa"
            with lz.lock("attention.causal", "torch_sdpa"):
                assert lz.which("attention.causal", q, k, v) == "torch_sdpa"
        assert lz.which("attention.causal", q, k, v) == "torch_sdpa_math"
    assert lz.which("attention.causal", q, k, v) == "torch_sdpa"


@pytest.mark.parametrize("call", [
    lambda: lz.lock("rms_norm", backend="torhc"), lambda: lz.disabled("torhc"), lambda: lz.prefer("torhc"),
    lambda: lz.enabled("torhc"),
    lambda: lz.configure({"version": "1.0", "locks": [{"operation": "rms_norm", "backend": "torhc"}]}),
    lambda: lz.configure({"version": "1.0", "denies": [{"operation": "*", "backends": ["torhc"]}]}),
    lambda: lz.configure({"version": "1.0", "boosts": [{"backend": "torhc", "boost_factor": 2.0}]}),
])
def test_a_backend_no_kernel_has_is_refused_when_the_rule_is_made(call) -> None:  # type: ignore[no-untyped-def]
    """A lock on a misspelled backend used to pass validation and then break every call of the operation."""
    with pytest.raises(PolicyError, match="no backend 'torhc' has kernels; did you mean torch"):
        call()
    assert which_rms() == DEFAULT_RMS


def test_configure_on_a_directory_says_it_is_one(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is a directory, not a file"):
        lz.configure(str(tmp_path))


def test_prefer_keeps_the_backends_own_order() -> None:
    """prefer(backend) gives all its kernels one priority; the tie went to the alphabetically first id, so
    prefer("torch", priority=1000) picked torch_attention_eager, the slowest."""
    with lz.prefer("torch", priority=1000):
        assert which_attn() == DEFAULT_ATTN
    with lz.prefer("torch", priority=100):
        assert which_rms() == DEFAULT_RMS


def test_scoped_policy_caches_are_bounded_and_a_live_scope_survives_eviction() -> None:
    """One plan dict per scoped policy digest was kept forever (900 scopes: 900 dicts, 18,000 plans); at most
    SCOPED_POLICIES are kept now, and a scope still alive whose dict was dropped misses once and goes on under
    its own policy."""
    from layerzero.runtime.core import SCOPED_POLICIES

    rt = get_runtime()
    x, w = rows()
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
        lz.rms_norm(x, w)
        for i in range(SCOPED_POLICIES + 10):
            with lz.prefer("torch", i, operation="rms_norm"):
                lz.rms_norm(x, w)
        assert len(rt._scoped) <= SCOPED_POLICIES
        torch.testing.assert_close(lz.rms_norm(x, w), F.rms_norm(x, x.shape[-1:], w, 1e-6))
        assert lz.which("rms_norm", x, w) == "torch_rms_norm_composed"
    assert which_rms() == DEFAULT_RMS


def test_keys_of_different_types_are_not_duplicates() -> None:
    """The duplicate-key check compared key text: 1 and '1' (an int and a string, two keys to safe_load) were
    refused as "given twice"."""
    from layerzero.config_file.load import parse_text

    assert parse_text("1: x\n'1': y\n", "<text>") == {1: "x", "1": "y"}
    with pytest.raises(Exception, match="given twice"):
        parse_text("a: 1\na: 2\n", "<text>")


@pytest.mark.parametrize("text,named", [("~: 1\nnull: 2\n", "'~' (as 'null')"), ("true: 1\nyes: 2\n", "'true' (as 'yes')"),
                                        ("1: a\n0x1: b\n", "'1' (as '0x1')"), ("1: a\n1.0: b\n", "'1' (as '1.0')")])
def test_keys_safe_load_makes_equal_are_duplicates(text: str, named: str) -> None:
    """Two spellings of one key (``null`` and ``~``, ``true`` and ``yes``, ``1`` and ``0x1``) are one key to
    safe_load, which keeps the last value without a word; they were compared by their text and passed."""
    from layerzero.config_file.load import parse_text

    with pytest.raises(Exception, match=re.escape(f"the key {named} is given twice in one mapping (lines 1 and 2)")):
        parse_text(text, "<text>")


def test_boost_factors_that_differ_past_six_digits_are_different_policies() -> None:
    """The rule line (and so the policy digest that keys scoped plans and is compared across ranks) printed the
    factor with :g, so 1.5 and 1.5000001 made one digest."""
    a = load_policy({"version": "1.0", "boosts": [{"operation": "rms_norm", "backend": "torch", "boost_factor": 1.5}]})
    b = load_policy({"version": "1.0", "boosts": [{"operation": "rms_norm", "backend": "torch",
                                                   "boost_factor": 1.5000001}]})
    assert a.digest != b.digest
    assert "x1.5 " in a.rules[0].describe() and "x1.5000001 " in b.rules[0].describe()


def test_a_plan_selected_before_an_invalidation_is_never_stored_after_it() -> None:
    """Runtime.miss and the dispatchers checked the runtime's version, then stored: an invalidation in between
    (a policy change in another thread) left a plan of the old policy in the cache. The stores check the version
    again under the lock the invalidation takes (a scope's dict) or the cache's own lock (a versioned put)."""
    from layerzero.policy.scope import SCOPE

    rt = get_runtime()
    x, w = rows()
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        lz.rms_norm(x, w)
        scope, plan = SCOPE.get(), next(iter(SCOPE.get().plans.values()))
        before = rt.version
        rt.invalidate("test")
        rt.store_scoped(rt.current_policy(), scope, [("stale", plan)], before)
        assert "stale" not in scope.plans
        rt.store_scoped(rt.current_policy(), scope, [("fresh", plan)], rt.version)
        assert scope.plans["fresh"] is plan
    cache_version = rt.plans.version
    rt.invalidate("test")
    rt.plans.put("stale", plan, version=cache_version)
    assert "stale" not in rt.plans.data


def test_a_lock_reapplied_without_undo_keeps_a_bounded_history() -> None:
    """A server re-applying its process-wide lock at every request: each lock kept the one it replaced (to put
    back on undo), for good. The history is capped at UNDO_DEPTH; undo within it still works."""
    from layerzero.policy.state import UNDO_DEPTH

    kernels = ("torch_rms_norm", "torch_rms_norm_composed")
    changes = [lz.lock("rms_norm", kernels[i % 2]) for i in range(5 * UNDO_DEPTH)]
    state = get_runtime().policy
    assert len(state.api_rules) == 1 and len(state._held) <= UNDO_DEPTH
    x, w = rows()
    changes[-1].undo()
    assert lz.which("rms_norm", x, w) == kernels[(5 * UNDO_DEPTH - 2) % 2]  # the one before comes back
    lz.unlock("rms_norm")
    assert state.api_rules == () and state._held == {}
