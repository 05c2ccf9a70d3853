"""The policy condition grammar: evaluation, type checks, error positions, injection attempts, fuzzing."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerzero.context import SelectionContext
from layerzero.errors import ConditionError, LayerZeroError
from layerzero.policy.conditions import FIELDS, LIMITS, compile_comparison, compile_condition, describe_fields
from layerzero.policy.model import condition_env
from layerzero.registry import get_global_kernel_registry

H100 = SelectionContext(device="cuda", compute_capability=(9, 0), dtype=torch.bfloat16, batch_size=16, seq_len=4096,
                        num_heads=32, num_kv_heads=8, head_dim=128, is_causal=True, layout="BHSD")
T4 = SelectionContext(device="cuda", compute_capability=(7, 5), dtype=torch.float16, batch_size=2, seq_len=512,
                      num_heads=8, head_dim=64)
CPU = SelectionContext(dtype=torch.float32, hidden_size=4096, num_tokens=3)


def env(ctx: SelectionContext, operation: str = "attention.causal", kernel: str | None = None) -> dict[str, Any]:
    spec = get_global_kernel_registry().get(kernel) if kernel else None
    return condition_env(ctx, operation, spec)


@pytest.mark.parametrize("text, h100, t4, cpu", [
    ("sm >= 80 and batch_size >= 8", True, False, False),
    ("seq_len > 1024", True, False, False),
    ("dtype in ('float16', 'bfloat16')", True, True, False),
    ("dtype in ['fp16', 'bf16']", True, True, False),          # aliases are normalised at compile time
    ("dtype == 'torch.float32'", False, False, True),
    ("platform == 'cuda'", True, True, False),
    ("not is_causal", False, True, True),
    ("sm >= 80 or platform == 'cpu'", True, False, True),
    ("(sm >= 90 or sm < 80) and not (platform == 'cpu')", True, True, False),
    ("compute_capability >= (8, 0)", True, False, False),
    ("compute_capability == (7, 5)", False, True, False),
    ("compute_capability == None", False, False, True),
    ("num_kv_heads < num_heads", True, False, False),           # field against field (GQA)
    ("64 <= head_dim <= 128", True, True, False),                # chained comparison
    ("batch_size != None and batch_size < 4", False, True, False),
    ("hidden_size >= 4096", False, False, True),
    ("head_dim >= 0", True, True, False),                        # unknown (None) never satisfies an ordering
    ("dropout_p == 0", True, True, True),                        # int and float compare as numbers
    ("operation == 'attention.causal'", True, True, True),
    ("layout not in ('BSHD',)", True, True, True),
    ("True", True, True, True),
    ("sm > -1 and sm < 1_000", True, True, True),
    ("scale == None and window == None", True, True, True),
])
def test_conditions_evaluate_on_real_contexts(text: str, h100: bool, t4: bool, cpu: bool) -> None:
    cond = compile_condition(text)
    assert (cond(env(H100)), cond(env(T4)), cond(env(CPU))) == (h100, t4, cpu)


def test_kernel_and_backend_fields_are_per_kernel() -> None:
    cond = compile_condition("backend == 'torch' and kernel in ('torch_sdpa_math',)")
    assert cond(env(CPU, kernel="torch_sdpa_math"))
    assert not cond(env(CPU, kernel="torch_sdpa"))
    assert not cond(env(CPU))                                    # no candidate: backend/kernel are None
    with pytest.raises(ConditionError, match=r"'kernel' is only known to rules judged per kernel"):
        compile_condition("kernel == 'torch_sdpa'", per_kernel=False)


def test_condition_reports_fields_and_source() -> None:
    cond = compile_condition("sm >= 80 and (seq_len > 1024 or not is_causal)")
    assert cond.fields == {"sm", "seq_len", "is_causal"}
    assert cond.source == "sm >= 80 and (seq_len > 1024 or not is_causal)"
    assert "sm >= 80" in repr(cond)


@pytest.mark.parametrize("text, message, position", [
    ('sm >= "x"', r"cannot compare sm \(int\) with 'x' \(str\) using '>='", 3),
    ("batch_size > 8 and", r"condition ends where a field or a value was expected", 18),
    ("batch_sise > 8", r"unknown field 'batch_sise'; did you mean batch_size", 0),
    ("dtype == 'float61'", r"'float61' is not a known dtype \(known: bfloat16", 9),
    ("platform == 'cdua'", r"'cdua' is not a known platform", 12),
    ("is_causal == 1", r"cannot compare is_causal \(bool\) with 1 \(int\)", 10),
    ("sm == None", r"cannot compare sm \(int\) with None", 3),
    ("batch_size >= None", r"'>=' cannot compare with None", 11),
    ("layout < 'BSHD'", r"'<' does not order strings", 7),
    ("batch_size", r"batch_size is an int, not a condition; compare it \(for example batch_size > 0\)", 0),
    ("sm in 80", r"the right side of 'in' must be a tuple or list", 6),
    ("dtype in ('float16', 3)", r"3 \(int\) cannot be compared with dtype \(str\)", 21),
    ("(sm > 80", r"expected '\)' to close '\(' at position 0", 8),
    ("sm > 80)", r"unexpected '\)'", 7),
    ("sm >> 80", r"unexpected '>'", 4),
    ("sm = 80", r"unexpected character '=' \(use '==' to compare\)", 3),
    ("sm > 80 && is_causal", r"unexpected character '&' \(use 'and'\)", 8),
    ("sm is None", r"'is' is not allowed in conditions \(use == or !=\)", 3),
    ("'abc", r"unterminated string literal", 0),
    ("sm > 0x10", r"malformed number '0x'", 5),
    ("sm > 007", r"malformed number '007' \(no leading zeros\)", 5),
    ("", r"condition is empty", 0),
    ("sm > 80 and and", r"expected a field or a value, got 'and'", 12),
])
def test_errors_name_the_position_with_a_caret(text: str, message: str, position: int) -> None:
    with pytest.raises(ConditionError, match=message) as info:
        compile_condition(text)
    err = info.value
    assert err.position == position
    assert err.expression == text
    lines = str(err).splitlines()
    if text:
        assert f"at position {position}" in str(err)
        caret = lines[-1]
        assert caret.strip() == "^"
        assert caret.index("^") - lines[-2].index(text[:1] or " ") == position  # caret under the offending char
    assert isinstance(err, LayerZeroError) and isinstance(err, ValueError)


INJECTIONS = [
    ("__import__('os').system('touch {marker}')", r"function calls are not allowed"),
    ("x.__class__", r"attribute access is not allowed"),
    ("(lambda: 1)()", r"'lambda' is not allowed in conditions"),
    ("9**9**9**9", r"unexpected character '\*' \(arithmetic is not allowed\)"),
    ("batch_size[0] > 1", r"subscripts are not allowed"),
    ("open('{marker}', 'w')", r"function calls are not allowed"),
    ("sm.__class__.__mro__", r"attribute access is not allowed"),
    ("().__class__.__bases__[0]", r"attribute access is not allowed"),
    ("[c for c in ()]", r"'for' is not allowed in conditions"),
    ("__builtins__ == 1", r"names starting with '__' are not allowed"),
    ("exec('import os')", r"function calls are not allowed"),
    ("sm if True else 0", r"'if' is not allowed in conditions"),
    ("{'a': 1}", r"dicts and sets are not allowed"),
    ("f'{sm}' == 'x'", r"unknown field 'f'|unexpected"),
    ("sm > 1; import os", r"only one expression is allowed"),
    ("sm + 1 > 2", r"arithmetic is not allowed"),
    ("sm > 80\n__import__('os')", r"unexpected '__import__'"),
    ("sm > 80 and getattr(sm, 'real')", r"function calls are not allowed"),
]


@pytest.mark.parametrize("template, message", INJECTIONS)
def test_injection_attempts_are_rejected_and_nothing_runs(template: str, message: str, tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    text = template.replace("{marker}", str(marker))
    with pytest.raises(ConditionError, match=message):
        compile_condition(text)
    assert not marker.exists()
    assert not os.path.exists("pwned")


@pytest.mark.parametrize("text, message", [
    ("sm > " + "1" * 30, r"number literal is too long"),
    ("sm > 99999999999999999999", r"out of range"),
    ("sm > 1e999", r"out of range"),
    ("dtype == '" + "x" * 300 + "'", r"string literal is too long"),
    ("sm in (" + ", ".join(["1"] * 70) + ")", r"too many elements \(at most 64\)"),
    ("(" * 30 + "is_causal" + ")" * 30, r"nested too deeply \(at most 24 levels\)"),
    ("not " * 40 + "is_causal", r"nested too deeply"),
    ("sm > 1 and " * 300 + "is_causal", r"condition is too long|too many tokens"),
    ("sm>1 or " * 150 + "is_causal", r"too many tokens \(at most 400\)"),
])
def test_sizes_are_bounded(text: str, message: str) -> None:
    with pytest.raises(ConditionError, match=message):
        compile_condition(text)


def test_non_string_condition_is_an_error() -> None:
    with pytest.raises(ConditionError, match=r"condition must be a string, got int"):
        compile_condition(80)  # type: ignore[arg-type]


def test_compile_comparison_type_checks_structured_values() -> None:
    assert compile_comparison("batch_size", ">=", 8)(env(H100))
    assert compile_comparison("dtype", "in", ["bf16", "float16"])(env(T4))
    assert not compile_comparison("dtype", "not in", ["bfloat16"])(env(H100))
    # A string value is data, never syntax: this is just an unknown dtype name.
    with pytest.raises(ConditionError, match=r"is not a known dtype"):
        compile_comparison("dtype", "==", "float16') or True or ('")
    with pytest.raises(ConditionError, match=r"cannot compare sm \(int\) with 'x' \(str\)"):
        compile_comparison("sm", ">=", "x")
    with pytest.raises(ConditionError, match=r"unknown field 'nope'"):
        compile_comparison("nope", "==", 1)
    with pytest.raises(ConditionError, match=r"'in' needs a list of values"):
        compile_comparison("sm", "in", 80)
    with pytest.raises(ConditionError, match=r"values must be numbers, strings"):
        compile_comparison("sm", "==", {"a": 1})


def test_every_selection_context_field_is_a_condition_field() -> None:
    import dataclasses

    names = {f.name for f in dataclasses.fields(SelectionContext)}
    assert names <= set(FIELDS)
    assert {"sm", "seq_len", "dtype", "platform", "operation", "backend", "kernel"} <= set(FIELDS)
    assert set(condition_env(CPU, "rms_norm")) >= names - {"dtype"}
    assert [name for name, _, _ in describe_fields()] == list(FIELDS)


# -- property tests -------------------------------------------------------------------------------------------

_TOKENS = ["sm", "batch_size", "dtype", "is_causal", "seq_len", "platform", "and", "or", "not", "in", "(", ")",
           "[", "]", ",", "==", "!=", "<", "<=", ">", ">=", "80", "-1", "1.5", "'float16'", "'cuda'", "True", "None",
           ".", "__class__", "(", "lambda", ":", "*", "**", "'", "\"", "\\", "#", "x", "1e9", "0"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS), max_size=25), st.text(max_size=30))
def test_fuzz_token_soup_only_raises_condition_errors(tokens: list[str], noise: str) -> None:
    for text in (" ".join(tokens), " ".join(tokens) + noise, noise):
        try:
            cond = compile_condition(text)
        except ConditionError as err:
            assert 0 <= err.position <= len(text)
            continue
        for ctx in (H100, T4, CPU):                 # a compiled condition never raises
            assert cond(env(ctx)) in (True, False)


# A naive model: random condition trees rendered to text must evaluate like the tree itself.
_INT_FIELDS = ["sm", "batch_size", "seq_len", "head_dim", "num_heads", "hidden_size"]
_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _leaf() -> st.SearchStrategy[tuple[str, Any]]:
    numeric = st.tuples(st.sampled_from(_INT_FIELDS), st.sampled_from(sorted(_OPS)), st.integers(-5, 5000)).map(
        lambda t: (f"{t[0]} {t[1]} {t[2]}", lambda e, t=t: (e[t[0]] is not None or t[1] in ("==", "!="))
                   and (_OPS[t[1]](e[t[0]], t[2]) if e[t[0]] is not None else t[1] == "!=")))
    member = st.tuples(st.sampled_from(["dtype", "platform"]), st.booleans(),
                       st.lists(st.sampled_from(["float16", "bfloat16", "float32"]), min_size=1, max_size=3)).map(
        lambda t: (f"dtype {'not in' if t[1] else 'in'} {tuple(t[2])!r}",
                   lambda e, t=t: (e["dtype"] in t[2]) != t[1]))
    flag = st.sampled_from(["is_causal", "requires_grad"]).map(lambda f: (f, lambda e, f=f: e[f]))
    return st.one_of(numeric, member, flag)


def _combine(children: st.SearchStrategy[tuple[str, Any]]) -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(children, children).map(lambda p: (f"({p[0][0]}) and ({p[1][0]})",
                                                     lambda e, p=p: p[0][1](e) and p[1][1](e))),
        st.tuples(children, children).map(lambda p: (f"({p[0][0]}) or ({p[1][0]})",
                                                     lambda e, p=p: p[0][1](e) or p[1][1](e))),
        children.map(lambda c: (f"not ({c[0]})", lambda e, c=c: not c[1](e))),
    )


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaf(), _combine, max_leaves=8))
def test_random_condition_trees_match_a_naive_model(tree: tuple[str, Any]) -> None:
    text, model = tree
    cond = compile_condition(text)
    for ctx in (H100, T4, CPU):
        e = env(ctx)
        assert cond(e) == bool(model(e)), text


def test_limits_are_documented_numbers() -> None:
    assert LIMITS["expression_length"] >= 1000 and LIMITS["depth"] >= 16


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.complex64])
def test_conditions_name_every_dtype_a_context_can_have(dtype: torch.dtype) -> None:
    """int8, uint8, the float8 types and complex were 'not a known dtype', and a context of such a dtype read as
    'torch.int8': no rule could target them."""
    name = str(dtype).removeprefix("torch.")
    cond = compile_condition(f"dtype == '{name}'")
    assert cond(condition_env(SelectionContext(device="cpu", dtype=dtype), "rms_norm"))
    assert not cond(condition_env(SelectionContext(device="cpu", dtype=torch.float32), "rms_norm"))
