"""Structured logging: one key=value line per slow-path event on the ``layerzero`` logger, never one per call."""

from __future__ import annotations

import logging

import pytest
import torch

import layerzero as lz
from layerzero.registry import get_global_kernel_registry
from layerzero.spec import KernelSpec
from layerzero.telemetry.logs import format_event, log_event


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str | None = None) -> list[logging.LogRecord]:
        return [r for r in self.records if name is None or getattr(r, "layerzero_event", None) == name]


@pytest.fixture
def logs():
    logger = logging.getLogger("layerzero")
    handler = Capture()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def broken_gelu():
    def broken(x, approximate):
        raise RuntimeError("simulated gelu crash\nsecond line")

    spec = KernelSpec("custom_broken_gelu", "gelu", "custom", broken, priority=1000)
    lz.register_kernel(spec)
    yield spec
    get_global_kernel_registry().unregister(spec.kernel_id)


def test_format_event_is_logfmt():
    line = format_event("fallback", {"operation": "rms_norm", "message": 'out of "memory"', "next": None,
                                     "ok": True, "ms": 1.23456789, "empty": ""})
    assert line == 'event=fallback operation=rms_norm message="out of \\"memory\\"" next=none ok=true ms=1.23457 empty=""'


def test_every_line_break_in_a_value_stays_on_one_line():
    line = format_event("config_reload", {"error": "line one\r line two", "note": "a\rb", "other": "p\u2028q",
                                          "more": "x\r\ny\x0bz"})
    assert len(line.splitlines()) == 1
    assert 'error="line one  line two"' in line and 'note="a b"' in line


def test_log_event_carries_fields_on_the_record(logs):
    log_event("config_reload", result="success", source="/etc/lz.yaml")
    (rec,) = logs.events("config_reload")
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == "event=config_reload result=success source=/etc/lz.yaml"
    assert rec.layerzero_fields == {"result": "success", "source": "/etc/lz.yaml"}


def test_one_line_per_fallback(logs, broken_gelu, runtime):
    x = torch.randn(2, 8)
    for _ in range(3):
        torch.testing.assert_close(lz.gelu(x).double(), torch.nn.functional.gelu(x.double()), atol=1e-6, rtol=1e-5)
    lines = logs.events("fallback")
    assert len(lines) == 3
    assert lines[0].levelno == logging.WARNING
    assert lines[0].getMessage() == ('event=fallback operation=gelu from_kernel=custom_broken_gelu '
                                     'to_kernel=torch_gelu error=RuntimeError message="simulated gelu crash"')


def test_one_line_per_breaker_transition(logs, broken_gelu, runtime):
    x = torch.randn(3, 8)
    for _ in range(runtime.config.failure_threshold + 3):
        lz.gelu(x)
    lines = logs.events("breaker_transition")
    assert [(r.layerzero_fields["from_state"], r.layerzero_fields["to_state"]) for r in lines] == [("CLOSED", "OPEN")]
    assert "kernel=custom_broken_gelu" in lines[0].getMessage()
    assert "last_error=\"RuntimeError: simulated gelu crash\"" in lines[0].getMessage()
    # while open the kernel is skipped: no more fallback lines than failures
    assert len(logs.events("fallback")) == runtime.config.failure_threshold


def test_one_line_per_policy_change(logs):
    change = lz.lock("rms_norm", "torch_rms_norm")
    change.undo()
    lines = logs.events("policy_change")
    assert len(lines) == 2
    assert lines[0].layerzero_fields["rules"] == 1 and lines[1].layerzero_fields["rules"] == 0
    assert lines[0].getMessage().startswith("event=policy_change digest=")


def test_one_line_per_reload_and_tuning_decision(logs, runtime):
    runtime.telemetry.record_reload(False, source="lz.yaml", error="dispatch_rules[0].priority: must be <= 1000")
    runtime.telemetry.record_tuning_run(operation="rms_norm", bucket="n=8;hidden=64;grad=0", winner="torch_rms_norm")
    (reload_line,) = logs.events("config_reload")
    assert reload_line.levelno == logging.WARNING
    assert reload_line.getMessage() == ('event=config_reload result=failure source=lz.yaml '
                                        'error="dispatch_rules[0].priority: must be <= 1000"')
    (tuning,) = logs.events("tuning")
    assert tuning.getMessage() == 'event=tuning operation=rms_norm bucket="n=8;hidden=64;grad=0" winner=torch_rms_norm'


def test_ten_thousand_cached_calls_log_nothing(logs):
    x, w = torch.randn(2, 16), torch.randn(16)
    q = torch.randn(1, 2, 4, 8)
    lz.rms_norm(x, w)
    lz.attention(q, q, q, is_causal=True)
    logs.records.clear()
    for _ in range(5000):
        lz.rms_norm(x, w)
        lz.attention(q, q, q, is_causal=True)
    assert logs.records == []


def test_lines_are_formatted_only_when_a_handler_sees_them(logs):
    formatted: list[int] = []

    class Probe:
        def __str__(self) -> str:
            formatted.append(1)
            return "probe"

    logger = logging.getLogger("layerzero")
    logger.setLevel(logging.ERROR)
    log_event("fallback", operation=Probe())  # WARNING < ERROR: dropped before formatting
    assert formatted == [] and logs.records == []
    logger.setLevel(logging.DEBUG)
    log_event("fallback", operation=Probe())
    assert logs.records[0].getMessage() == "event=fallback operation=probe" and formatted
