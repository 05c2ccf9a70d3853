"""transformers' continuous batching (``model.generate_batch``, ``ContinuousBatchingManager``) on layerzero.

transformers (5.x) serves many requests at once from a paged KV cache: each step, the cache gathers every
running request's keys and values (its cached tokens, then the new ones) into one row, and the model's
attention function gets the new tokens of all requests as one packed row with ``cu_seq_lens_q`` /
``cu_seq_lens_k`` offsets, as its flash path does. With ``attn_implementation="layerzero"`` that call runs
``lz.attention_varlen`` (bottom-right causal per request, sliding windows per layer; see
:func:`layerzero.integrations.transformers_packed.served_layout`).

transformers accepts only ``"sdpa"``, ``"paged|eager"`` and flash implementations there
(``ContinuousBatchingManager.switch_to_cb_friendly_attn`` raises for any other name, and switches sdpa to
flash when a FlashAttention package is installed). :func:`install` wraps that check so ``"layerzero"`` is
kept as it is; every other name goes through transformers' own check unchanged.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

__all__ = ["install"]

_WRAPPED = "_layerzero_serves_batches"


def install(name: str) -> bool:
    """Let continuous batching run the ``name`` attention implementation (idempotent); False when this
    transformers has no continuous batching."""
    try:
        module = importlib.import_module("transformers.generation.continuous_batching.continuous_api")
    except ImportError:
        return False
    manager = getattr(module, "ContinuousBatchingManager", None)
    original = None if manager is None else manager.__dict__.get("switch_to_cb_friendly_attn")
    if original is None:
        return False
    if getattr(original, _WRAPPED, False):
        return True

    @functools.wraps(original)
    def switch(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(model.config, "_attn_implementation", None) == name:
            return None  # layerzero serves the varlen calls itself: no switch to flash, no refusal
        return original(self, model, *args, **kwargs)

    setattr(switch, _WRAPPED, True)
    manager.switch_to_cb_friendly_attn = switch
    return True
