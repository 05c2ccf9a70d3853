"""Shared pytest fixtures: GPU marker handling and a clean global runtime per test."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.runtime import get_runtime

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_runtime():
    """Every test starts and ends with no policy, closed breakers and an empty plan cache."""
    rt = get_runtime()
    rt.policy.clear()
    rt.invalidate("test start")
    yield rt
    rt.policy.clear()
    for b in rt.breakers.all().values():
        b.reset()
    rt.invalidate("test end")


@pytest.fixture
def runtime():
    return get_runtime()


__all__ = ["HAS_CUDA", "lz"]
