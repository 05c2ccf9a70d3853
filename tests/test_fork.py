"""A forked child dispatches even when the parent forked while another thread held a layerzero lock.

``os.fork()`` copies a held lock as held; without :mod:`layerzero.forksafe` the child's first registry change,
plan store or breaker count waited forever (a threaded probe: 16 of 40 children hung). Each case holds one lock
in a parent thread across the fork; the child must finish its calls within a few seconds.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.runtime import get_runtime
from layerzero.spec import KernelSpec

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _held_locks() -> dict[str, Callable[[], Any]]:
    rt = get_runtime()
    return {
        "kernel registry": lambda: rt.kernels._lock,
        "backend registry": lambda: rt.backends._lock,
        "plan cache": lambda: rt.plans._lock,
        "runtime": lambda: rt._lock,
        "policy state": lambda: rt.policy._lock,
        "breaker": lambda: rt.breakers.get("torch_rms_norm")._lock,
    }


def _child_calls() -> None:
    """What a worker does first: a miss (selection, a plan stored), a kernel registered, a policy change."""
    x, w = torch.randn(5, 24), torch.rand(24) + 0.5
    torch.testing.assert_close(lz.rms_norm(x, w), torch.rms_norm(x, (24,), w, 1e-6))
    spec = lz.register_kernel(KernelSpec("custom_child_rms", "rms_norm", "custom",
                                         lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps), priority=1))
    get_runtime().kernels.unregister(spec.kernel_id)
    with lz.lock("rms_norm", "torch_rms_norm_composed"):
        lz.rms_norm(torch.randn(6, 24), w)
    change = lz.lock("rms_norm", "torch_rms_norm")  # process-wide, then undone
    change.undo()
    get_runtime().breakers.get("torch_rms_norm").record_failure(RuntimeError("counted in the child"))


@pytest.mark.parametrize("name", list(_held_locks()))
def test_a_child_forked_while_a_lock_is_held_dispatches(name: str) -> None:
    lock = _held_locks()[name]()
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(10)  # a hang ends the child, which the parent then reports
                _child_calls()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join(5)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the child hung or failed with {name} held"
