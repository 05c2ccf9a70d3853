"""CONFIG mode: dispatch steered by a config file (SPEC section 4), on the one selection engine.

The file is validated and compiled once (:mod:`layerzero.policy.config_schema`)
into policy rules: ``kernel_locks`` / ``kernel_allows`` / ``kernel_denies``
become locks, allows and denies, and ``dispatch_rules`` and
``fallback_chains`` become the ranking (a matching rule's kernel first, then
the operation's chain in order, then the rest). On a cache miss the engine
ranks the kernels under that policy, without measured times (the file
decides), and the plan runs them in that order: the fallback order is the
chain's. Plans are cached per call shape in the dispatcher's own cache, so
the rules are evaluated once per shape.

Precedence: code beats files. Scoped rules (``with lz.lock(...)``) and
process-wide ``lz.lock`` / ``lz.prefer`` / ``lz.disabled`` calls come first,
then this dispatcher's config, then the document of ``lz.configure``.

Example::

    d = create_config_dispatcher(config_path="kernels.yaml")
    r = d.dispatch("attention.causal", {"query": q, "key": k, "value": v})
    r.kernel_id
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

from layerzero import forksafe
from layerzero.config_file.schema import CompiledConfig, load_config
from layerzero.context import SelectionContext
from layerzero.environment import env_text
from layerzero.runtime.config import DispatchConfig, DispatchMode
from layerzero.dispatch.dispatcher import Dispatcher
from layerzero.dispatch.runtimes import runtime_for
from layerzero.errors import CaptureError, ConfigError
from layerzero.ops.base import OpDef
from layerzero.policy.model import Policy, Rule
from layerzero.policy.scope import SCOPE
from layerzero.registry import BackendRegistry, KernelRegistry
from layerzero.runtime import Runtime
from layerzero.selection.cache import MVCCPlanCache
from layerzero.selection.engine import Selection, format_context
from layerzero.selection.plan import ExecutionPlan

__all__ = ["ConfigDrivenDispatcher", "create_config_dispatcher", "resolve_config_path"]

ConfigSource = str | os.PathLike[str] | Mapping[str, Any]


class ConfigDrivenDispatcher(Dispatcher):
    """Dispatch by a compiled config (see the module docstring).

    Args:
        runtime: the runtime (breakers, telemetry and dispatch config are shared with it).
        compiled: the validated config (:func:`layerzero.policy.config_schema.load_config`).
        use_mvcc_cache: a sharded MVCC plan cache for many concurrent threads.
    """

    mode = DispatchMode.CONFIG
    shares_plan_cache = False  # its plans follow its own config, not the runtime's selection

    def __init__(self, runtime: Runtime, compiled: CompiledConfig, *, use_mvcc_cache: bool = False,
                 shards: int = 16) -> None:
        cache = None
        if use_mvcc_cache:
            cfg = runtime.config
            cache = MVCCPlanCache(cfg.cache_size if cfg.enable_cache else 0, cfg.cache_ttl_seconds, shards=shards,
                                  clock=runtime.clock, on_evict=runtime.telemetry.record_eviction)
        super().__init__(runtime, cache=cache)
        self._compiled = compiled
        # Swapping the config and storing a new plan both happen under this lock (slow path only), so a
        # plan made from a config that was just replaced is never cached after the replacement.
        self._swap_lock = forksafe.lock(self, "_swap_lock")
        self._policy_memo: tuple[Any, Policy] | None = None

    # -- the config ---------------------------------------------------------------------------------
    @property
    def compiled(self) -> CompiledConfig:
        """The config in force."""
        return self._compiled

    def _swap(self, compiled: CompiledConfig) -> bool:
        """Put ``compiled`` in force; drops cached plans when the rules changed. True when they changed."""
        with self._swap_lock:
            changed = compiled.digest != self._compiled.digest or compiled.policy.digest != self._compiled.policy.digest
            self._compiled = compiled
            self._policy_memo = None
            if changed and self._cache is not None:
                self._cache.invalidate()
        return changed

    def effective_policy(self, compiled: CompiledConfig | None = None) -> Policy:
        """Scoped rules, then programmatic ``lz.*`` rules, then this config, then the ``lz.configure`` document."""
        compiled = self._compiled if compiled is None else compiled
        rt = self.runtime
        scope = SCOPE.get()
        if scope is None:
            memo = self._policy_memo
            key = (id(compiled), rt.policy.version)
            if memo is not None and memo[0] == key:
                return memo[1]
        api, document = rt.policy.api_rules, rt.policy.document.rules
        scoped: tuple[Rule, ...] = ()
        if scope is not None:
            scoped = scope.policy.rules
            if scope.hides:
                api = tuple(r for r in api if not any(h(r) for h in scope.hides))
                document = tuple(r for r in document if not any(h(r) for h in scope.hides))
        policy = Policy(scoped + api + compiled.policy.rules + document)
        if scope is None:
            self._policy_memo = ((id(compiled), rt.policy.version), policy)
        return policy

    # -- plans ---------------------------------------------------------------------------------------
    def select(self, operation: str, context: SelectionContext) -> Selection:
        """The ranking this dispatcher would use for ``context`` (for inspection; nothing is cached)."""
        return self.runtime.select(operation, context, policy=self.effective_policy(), use_measurements=False)

    def build_plan(self, op: OpDef, operation: str, ctx: SelectionContext, policy: Policy) -> ExecutionPlan:
        compiled = self._compiled  # read once: the whole plan comes from one config
        rt = self.runtime
        version = rt.version  # before the policy is read: a change after this keeps the plan out of the cache
        if ctx.cuda_graph_capturing:
            raise CaptureError(f"{format_context(operation, ctx)}: kernel selection was needed while a CUDA graph "
                               f"is being captured; run the same shapes once before capture so the plan is cached")
        for hook in rt.on_miss:
            hook(operation, ctx)
        full = self.effective_policy(compiled)
        sel = rt.select(operation, ctx, policy=full, use_measurements=False)
        plan = self.make_plan(operation, op, sel.ranked, ctx, locked_by=sel.locked_by, policy_digest=full.digest,
                              source=_tag(compiled, version), specialize_for=ctx)  # its own cache: exact keys
        rt.telemetry.record_selection(operation, plan.kernel_id)
        return plan

    def _store(self, key: Hashable | None, plan: ExecutionPlan, scope: Any, versions: tuple[int, int]) -> None:
        with self._swap_lock:
            # made from a config replaced since, or under a policy changed since: do not cache it
            if plan.source != _tag(self._compiled, self.runtime.version):
                return
            super()._store(key, plan, scope, versions)

    def close(self) -> None:
        """Nothing to stop (the hot-reload dispatcher stops its watcher here)."""

    def __enter__(self) -> ConfigDrivenDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self._compiled.source!r}, digest={self._compiled.digest})"


def _tag(compiled: CompiledConfig, runtime_version: int) -> str:
    return f"config:{compiled.digest}@{runtime_version}"


def resolve_config_path(config_path: ConfigSource | None, config: DispatchConfig | None) -> ConfigSource:
    """``config_path``, else ``config.config_path``, else ``LAYERZERO_CONFIG``; a ConfigError when none is set."""
    if config_path is not None:
        return config_path
    if config is not None and config.config_path is not None:
        return config.config_path
    env = env_text("LAYERZERO_CONFIG")
    if env:
        return env
    raise ConfigError("a config-driven dispatcher needs a config: pass config_path=..., set "
                      "DispatchConfig.config_path or the LAYERZERO_CONFIG environment variable")


def create_config_dispatcher(config_path: ConfigSource | None = None, kernel_registry: KernelRegistry | None = None,
                             backend_registry: BackendRegistry | None = None, config: DispatchConfig | None = None,
                             *, unknown_kernels: str = "error", use_mvcc_cache: bool = False, shards: int = 16,
                             clock: Callable[[], float] | None = None) -> ConfigDrivenDispatcher:
    """A CONFIG-mode dispatcher.

    Args:
        config_path: a YAML or JSON file (or a mapping / YAML text); defaults to ``config.config_path``
            or ``LAYERZERO_CONFIG``.
        kernel_registry / backend_registry: default to the global ones (then the dispatcher shares the
            global runtime's breakers and telemetry with ``lz.*``).
        config: dispatch settings (cache size / TTL, telemetry, breakers, fallback limits).
        unknown_kernels: ``"error"`` (default) or ``"warn"`` for kernel ids the registry does not know.
        use_mvcc_cache: a sharded MVCC plan cache for many concurrent threads.

    Raises:
        ConfigError: the file is missing or invalid; ``.errors`` lists every problem with its path.

    Example:
        >>> d = create_config_dispatcher(config_path="kernels.yaml")
        >>> d.dispatch("rms_norm", {"x": x, "weight": w}).kernel_id
    """
    source = resolve_config_path(config_path, config)
    runtime = runtime_for(kernel_registry, backend_registry, config, clock=clock)
    compiled = load_config(Path(source) if isinstance(source, os.PathLike) else source,
                           kernel_registry=runtime.kernels, unknown_kernels=unknown_kernels)
    return ConfigDrivenDispatcher(runtime, compiled, use_mvcc_cache=use_mvcc_cache, shards=shards)
