"""CUDA graphs: plans are chosen before capture, only capture-safe kernels are captured.

Kernel selection allocates, reads hardware state and may time kernels: none of
that can happen inside ``torch.cuda.graph``. layerzero enforces it:

- while a stream is capturing, a call whose plan is not cached raises
  :class:`~layerzero.errors.CaptureError` (``Runtime.plan_for``) instead of
  selecting; a cached plan whose kernel is not ``cuda_graph_safe`` re-plans,
  which raises the same error; the selection engine itself rejects unsafe
  kernels for a capturing context (reason ``CUDA_GRAPH_UNSAFE``).
- :func:`capture_safe` is a scoped policy that denies every kernel not marked
  ``cuda_graph_safe``, so the plans cached while warming up inside it are
  ones that can be captured.
- :func:`capture` does the whole dance: warm up inside :func:`capture_safe` on
  a side stream (plans get cached), capture on the same scope (no selection,
  only cached plans), and return a :class:`CapturedGraph` that replays with
  exactly the kernels selected during warm-up.

Example::

    g = capture(block, q, k, v, x, w)       # q, k, v, x, w are the graph's static inputs
    q.copy_(new_q); ...; out = g.replay()   # reruns the captured kernels
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from layerzero.errors import CaptureError
from layerzero.policy.model import Policy, Rule
from layerzero.policy.scope import SCOPE, Scope
from layerzero.runtime import Runtime, get_runtime

__all__ = ["capture_safe", "capture", "CapturedGraph", "unsafe_kernels", "CAPTURE_ORIGIN"]

CAPTURE_ORIGIN = "layerzero.integrations.cuda_graphs.capture_safe()"


def unsafe_kernels(runtime: Runtime | None = None) -> tuple[str, ...]:
    """Ids of registered kernels that are not marked ``cuda_graph_safe``."""
    rt = runtime or get_runtime()
    return tuple(sorted(s.kernel_id for s in rt.kernels if not s.cuda_graph_safe))


@contextlib.contextmanager
def capture_safe(runtime: Runtime | None = None) -> Iterator[Scope]:
    """A scoped policy denying every kernel that is not capture-safe (this thread / task only).

    Plans cached inside the block live in the block's scope, so warm-up and capture must happen in
    the same ``with`` block (as :func:`capture` does).

    Example:
        >>> with capture_safe():
        ...     block(*static_inputs)                   # warm-up: capture-safe plans get cached
        ...     with torch.cuda.graph(graph):
        ...         out = block(*static_inputs)         # cached plans only
    """
    unsafe = unsafe_kernels(runtime)
    parent = SCOPE.get()
    base = parent.policy if parent is not None else Policy(())
    rules = (Rule("deny", "*", unsafe, origin=CAPTURE_ORIGIN),) if unsafe else ()
    scope = Scope(Policy(rules + base.rules), {}, parent)
    token = SCOPE.set(scope)
    try:
        yield scope
    finally:
        SCOPE.reset(token)


@dataclass
class CapturedGraph:
    """A captured CUDA graph and what it captured.

    Attributes:
        graph: the ``torch.cuda.CUDAGraph``.
        output: the static output of the captured call (overwritten by each :meth:`replay`).
        kernels: operation -> kernel id of every layerzero plan the capture used.
    """

    graph: Any
    output: Any
    kernels: dict[str, list[str]] = field(default_factory=dict)

    def replay(self) -> Any:
        """Run the captured kernels again (on the static inputs' current values); returns ``output``."""
        self.graph.replay()
        return self.output


def _kernels(plans: dict[Any, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for plan in plans.values():
        ids = out.setdefault(plan.operation, [])
        if plan.kernel_id not in ids:
            ids.append(plan.kernel_id)
    return out


def capture(fn: Callable[..., Any], *args: Any, warmup: int = 2, pool: Any = None,
            runtime: Runtime | None = None, **kwargs: Any) -> CapturedGraph:
    """Warm up ``fn(*args, **kwargs)`` with capture-safe kernels, then capture it into a CUDA graph.

    Args:
        fn: the code to capture (layerzero calls and any other CUDA work).
        args / kwargs: its static inputs (write new values into them before each replay).
        warmup: eager runs before capture, on a side stream, as PyTorch recommends (at least 1).
        pool: a memory pool handle shared with other graphs (``torch.cuda.graph_pool_handle()``).

    Raises:
        CaptureError: no CUDA device, or a layerzero call inside ``fn`` needed a plan it did not use
            during warm-up (a shape that only appears on the capture run).
    """
    if not torch.cuda.is_available():
        raise CaptureError("layerzero.integrations.cuda_graphs.capture: CUDA graphs need a CUDA device, "
                           "and torch.cuda.is_available() is False here")
    with capture_safe(runtime) as scope:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, int(warmup))):
                fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        failure: CaptureError | None = None
        out = None
        try:
            with torch.cuda.graph(graph, pool=pool):
                try:
                    out = fn(*args, **kwargs)
                except CaptureError as exc:  # keep ours: ending the broken capture raises a vaguer error
                    failure = exc
        except Exception:
            if failure is None:
                raise
        if failure is not None:
            raise failure
        plans = scope.plans
    return CapturedGraph(graph, out, _kernels(plans))
