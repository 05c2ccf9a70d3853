"""time_cuda_device: a training bucket's kernels timed with the host ahead (the tuner's grad=1 buckets)."""

from __future__ import annotations

import time

import pytest
import torch

from layerzero.context import SelectionContext
from layerzero.timing import time_call, time_cuda, time_cuda_device
from layerzero.tuning.tuner import DEVICE_BOUND_MIN_TOKENS, device_bound


def test_on_the_cpu_device_bound_changes_nothing() -> None:
    t = time_call(lambda: torch.ones(64).sum(), torch.device("cpu"), quick=True, device_bound=True)
    assert t.method == "perf_counter_ns" and t.median_us > 0


def test_only_large_cuda_training_buckets_are_timed_device_bound() -> None:
    def ctx(device: str, tokens: int, grad: bool) -> SelectionContext:
        return SelectionContext(device=device, dtype=torch.bfloat16, num_tokens=tokens, hidden_size=4096,
                                requires_grad=grad)

    assert device_bound(ctx("cuda", DEVICE_BOUND_MIN_TOKENS, True))
    assert not device_bound(ctx("cuda", DEVICE_BOUND_MIN_TOKENS - 1, True))  # host-bound: timed alone
    assert not device_bound(ctx("cuda", 8192, False))  # inference: latency
    assert not device_bound(ctx("cpu", 8192, True))


@pytest.mark.gpu
def test_a_host_heavy_call_reads_its_kernels_not_its_host_time() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(1024, 1024, device="cuda")

    def host_heavy() -> torch.Tensor:
        time.sleep(0.002)  # 2 ms of host work (a slow launcher), then some 50 us of kernels
        return x @ x

    kernels = time_cuda(lambda: x @ x).median_us
    isolated = time_cuda(host_heavy).median_us
    ahead = time_cuda_device(host_heavy)
    assert isolated > 1500.0  # timed alone, the host decides
    assert ahead.method == "cuda_events, host ahead"
    assert ahead.median_us < 0.5 * isolated and ahead.median_us < 3.0 * kernels + 50.0
