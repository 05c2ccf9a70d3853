"""Shared pytest fixtures: GPU marker handling and a clean global runtime per test."""

from __future__ import annotations

import os
import tempfile

# Tests never read or write the user's performance database: the default one lives in a fresh
# directory for the session (tests that need a database make their own).
os.environ["LAYERZERO_PERF_DB"] = os.path.join(tempfile.mkdtemp(prefix="layerzero-tests-"), "perf.db")

import pytest  # noqa: E402
import torch  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero.runtime import get_runtime  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _reset(rt) -> None:
    for hook in rt.on_miss:
        clear = getattr(hook, "clear", None)
        if clear is not None:  # the distributed decision log: what earlier tests dispatched is not ours
            clear()
            hook.always = False
    rt.reset()  # no policy, no baked table, fresh breakers: no state or counts leak from one test into the next


@pytest.fixture(autouse=True)
def clean_runtime():
    """Every test starts and ends with no policy, no baked table, fresh breakers, an empty plan cache,
    an empty decision log, and the global dispatch config, measurement source and miss hooks it started with."""
    rt = get_runtime()
    config = rt.config
    source, hooks, verify = rt.measurement_source, list(rt.on_miss), rt.verify_first_calls
    _reset(rt)
    yield rt
    if rt.config is not config:
        rt.configure(config)
    rt.measurement_source, rt.verify_first_calls = source, verify
    rt.on_miss[:] = hooks
    _reset(rt)


@pytest.fixture
def runtime():
    return get_runtime()


@pytest.fixture
def attached(tmp_path):
    """The global runtime reading a fresh database (``attached.db``); the previous measurement source is
    restored after."""
    rt = get_runtime()
    old = rt.measurement_source
    db = lz.tuning.use_perf_db(tmp_path / "attached.db")
    yield db
    lz.tuning.detach_perf_db()
    rt.measurement_source = old
    db.close()


__all__ = ["HAS_CUDA", "lz"]
