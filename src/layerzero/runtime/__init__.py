"""The runtime: the state ``lz.*`` and every dispatcher on the global registries share.

It is a few collaborating objects, each in its own module:

* :mod:`~layerzero.runtime.core`: :class:`Runtime`, the core: registries, config, plan cache, policy state,
  telemetry, invalidation, selection, plan binding, the cache miss;
* :mod:`~layerzero.runtime.family`: :class:`FamilyPlans`, shape-free plans (one plan for every shape of a
  call family, when selection provably cannot depend on shapes);
* :mod:`~layerzero.runtime.executor`: :class:`Executor`, running plans under the failure contract (who is
  blamed when a kernel raises, out-of-memory, generator state on retries);
* :mod:`~layerzero.runtime.verifier`: :class:`Verifier`, verify mode (first outputs against the reference);
* :mod:`~layerzero.runtime.gates`: what the cached hot path reads instead of a breaker, per-call guards;
* :mod:`~layerzero.runtime.config` and :mod:`~layerzero.runtime.breaker`: the runtime's config and breakers.

Nothing below the runtime imports it: policy documents, telemetry exporters and tuning sources get what
they need passed in.
"""

from __future__ import annotations

from layerzero.runtime.core import Runtime, get_runtime

__all__ = ["Runtime", "get_runtime"]
