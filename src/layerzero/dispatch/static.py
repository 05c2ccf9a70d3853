"""STATIC mode: a fixed operation -> kernel table, resolved once, no selection at call time.

Two ways to build one:

* ``StaticDispatcherBuilder().with_kernel(fn, operation="rms_norm", default=True).build()``:
  ``fn`` is a :class:`KernelSpec`, a plain callable (wrapped into a spec of backend
  ``"custom"``) or a registered kernel id. Without ``with_registries(...)`` the
  dispatcher gets a runtime of its own, so ``with_config(enable_telemetry=False)``
  does not change ``lz.*``.
* ``create_static_dispatcher(config=DispatchConfig(mode=STATIC, static_kernel_map={...}))``:
  kernel ids looked up in the registry (the global one by default, sharing the
  global runtime's breakers and telemetry with ``lz.*``).

Every named kernel is checked when the dispatcher is built (it exists, serves
the operation, its library is installed); a bad entry fails then, with every
problem listed, never at the first call. ``dispatcher.resolve(operation)``
returns the kernel callable itself, so a hot loop can call it with no dispatch
cost at all. ``dispatch()`` keeps the breaker check and fallback: further
kernels given for the same operation (``default=False``) are its fallbacks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.runtime.config import DispatchConfig, DispatchMode
from layerzero.dispatch.dispatcher import Dispatcher, compile_dispatch, new_result, perf_ns
from layerzero.dispatch.runtimes import runtime_for
from layerzero.dispatch.generic import AttentionInputs, attention_inputs, hot_key, kwargs_key, map_inputs
from layerzero.dispatch.result import NOT_TIMED, DispatchResult, DispatchTiming, stamp
from layerzero.errors import ConfigError, InvalidInputError, KernelNotSupportedError, NoKernelError
from layerzero.ops import operation_problem
from layerzero.ops.contract import LOOKUP_ERRORS
from layerzero.registry import (
    BackendRegistry,
    KernelRegistry,
    get_global_backend_registry,
    get_global_kernel_registry,
    operation_matches,
)
from layerzero.runtime import Runtime
from layerzero.selection.plan import ExecutionPlan
from layerzero.spec import KernelSpec

__all__ = ["StaticDispatcher", "StaticDispatcherBuilder", "create_static_dispatcher", "check_static_map"]

_NO_CONTEXT = SelectionContext()
_ABSENT: Any = object()  # ``is_causal`` not given


class StaticDispatcher(Dispatcher):
    """Dispatch through a fixed table (see the module docstring).

    Args:
        runtime: the runtime whose breakers, telemetry and config apply.
        table: operation -> kernels (the first is the default, the rest its fallbacks, in order).
    """

    mode = DispatchMode.STATIC
    shares_plan_cache = True  # it caches nothing: plans are built once per operation

    def __init__(self, runtime: Runtime, table: Mapping[str, tuple[KernelSpec, ...]]) -> None:
        super().__init__(runtime)
        self._table: dict[str, tuple[KernelSpec, ...]] = {op: tuple(specs) for op, specs in table.items()}
        self._plans: dict[str, ExecutionPlan] = {}
        # operation (or generic.kwargs_key of it and its options) -> (its plan, the q/k/v names it was called
        # with): the hot path's one lookup
        self._hot: dict[Hashable, tuple[ExecutionPlan, AttentionInputs]] = {}
        # the same for calls whose one option is ``is_causal=`` (a bool), by (operation, is_causal)
        self._hot_causal: dict[tuple[str, bool], tuple[ExecutionPlan, AttentionInputs]] = {}
        self._bind_all()

    def _bind_all(self) -> None:
        self._plans = {op: self.make_plan(op, self._op(op), specs, _NO_CONTEXT, source="static")
                       for op, specs in self._table.items()}
        self._hot = {}
        self._hot_causal = {}
        self._serving: dict[Hashable, int | tuple[str, tuple[Any, ...]]] = {}  # see _first_serving

    def _sync(self) -> None:
        # A config change rebinds the runners (telemetry, breakers, timing); the table itself stays.
        rt = self.runtime
        self._config_seen = rt.config
        self._timed = rt.config.record_timing
        self._bind_all()
        self._version = rt.version

    def invalidate(self) -> None:
        """Rebind every operation's runner (the table does not change)."""
        self._bind_all()

    @property
    def operations(self) -> tuple[str, ...]:
        """The operations this dispatcher serves."""
        return tuple(self._table)

    def serves(self, operation: str) -> bool:
        return isinstance(operation, str) and operation in self._table

    def kernels_for(self, operation: str) -> tuple[KernelSpec, ...]:
        """The default kernel and its fallbacks for ``operation``."""
        specs = self._table.get(operation)
        if specs is None:
            raise self._missing(operation)
        return specs

    def resolve(self, operation: str) -> Callable[..., Any]:
        """The default kernel's callable itself (``resolve(op) is fn``): call it directly in a hot loop.

        It takes the operation's canonical arguments (``(q, k, v, attn_mask, is_causal, dropout_p, scale,
        window)`` for attention, ``(x, weight, eps)`` for rms_norm, ...); for a user operation, the
        keyword arguments it was written with.
        """
        return self.kernels_for(operation)[0].impl

    def _missing(self, operation: str) -> NoKernelError:
        served = ", ".join(sorted(self._table)) or "none"
        return NoKernelError(f"the static dispatcher has no kernel for {operation!r} (it serves: {served}); add one "
                             f"with StaticDispatcherBuilder().with_kernel(...) or DispatchConfig.static_kernel_map",
                             operation=operation)

    def dispatch(self, operation: str, inputs: Mapping[str, Any], context: SelectionContext | None = None, *,
                 is_causal: Any = _ABSENT, **kwargs: Any) -> DispatchResult:
        """Run the table's kernel for ``operation`` (``context`` is accepted and unused: nothing is selected)."""
        rt = self.runtime
        if rt.version != self._version:
            self._sync()
        t0 = perf_ns() if self._timed else 0
        try:  # (plan, names) of an attention operation seen with plain q, k, v and these options (if any)
            if not kwargs:  # no option, or ``is_causal=`` alone (named: no options dict, no generic key to build)
                hot = self._hot.get(operation) if is_causal is _ABSENT else \
                    self._hot_causal.get((operation, is_causal)) if is_causal.__class__ is bool else None
            else:
                if is_causal is not _ABSENT:
                    kwargs["is_causal"], is_causal = is_causal, _ABSENT
                hot = self._hot.get(kwargs_key(operation, kwargs))
        except TypeError:  # an unhashable operation or option value: the full path reports it
            hot = None
        if hot is not None and type(inputs) is dict and len(inputs) == 3:
            # ---- hot path: q, k, v by known names (BSHD: as BHSD views) straight into the kernel's arguments --
            plan, fast = hot
            try:
                q = inputs[fast.q_name]
                k = inputs[fast.k_name]
                v = inputs[fast.v_name]
                if fast.bshd:
                    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                # the contract's shape relations (None, a non-tensor: False); what they do not admit takes the
                # full mapping, which validates
                hit = fast.admits(q, k, v) or fast.shapes_admit(operation, q, k, v, None, None, None, None, None)
            except (KeyError, AttributeError, TypeError, IndexError, RuntimeError):  # other names, not tensors
                hit = False
            if hit:
                t1 = perf_ns() if t0 else 0
                if plan.gate.blocked:
                    return self._hot_detour(plan, fast, q, k, v, None, operation, t0, t1)
                plan.stats.calls += 1
                try:
                    out = plan.fn(q, k, v, None, fast.is_causal, fast.dropout_p, fast.scale, fast.window)
                except Exception as exc:
                    return self._hot_detour(plan, fast, q, k, v, exc, operation, t0, t1)
                r = new_result(DispatchResult)
                r.output = out.transpose(1, 2) if fast.bshd else out
                r.kernel_id, r.operation = plan.kernels[0].kernel_id, operation
                r.fallback_used, r.attempts, r.cached = False, 1, True
                r.mode = "static"
                r.stamps = (t0, t0, t1, t1, (t := perf_ns()), t) if t0 else NOT_TIMED
                return r
        if is_causal is not _ABSENT:  # the full path maps it as any option
            kwargs["is_causal"] = is_causal
        plan = self._plans.get(operation) if isinstance(operation, str) else None
        if plan is None:
            raise self._missing(operation)
        args, bshd = map_inputs(plan.op, operation, inputs, kwargs)
        if not plan.op.admits(operation, args):  # what the contract's guards do not admit is validated first
            plan.op.validate(operation, args)
        start = self._first_serving(plan, operation, args)
        t1 = perf_ns() if t0 else 0
        ran = None
        if plan.gate.blocked or start:
            note = rt.last_run
            note.value = None
            out = plan.run(*args) if not start else rt.executor.run(plan, args, start)
            ran = note.value
        else:
            plan.stats.calls += 1
            try:
                out = plan.fn(*args)
            except Exception as exc:
                note = rt.last_run
                note.value = None
                out = rt.recover(plan, args, 0, exc)
                ran = note.value
        t4 = perf_ns() if t0 else 0
        if bshd:
            out = out.transpose(1, 2)
        if hot is None and not start and plan.op.family == "attention" and _hot_safe(plan.kernels[0]):
            self._remember(plan, operation, inputs, kwargs)
        return self._result(out, plan, ran, operation, _timing(t0, t1, t4, perf_ns() if t0 else 0), True)

    def _first_serving(self, plan: ExecutionPlan, operation: str, args: tuple[Any, ...]) -> int:
        """The index of the table's first kernel for ``operation`` whose declared constraints admit this call (a
        window, interleaved rope, a softcap, a head size: a kernel handed an option it does not implement may
        ignore it and return a wrong answer without a word), or :class:`KernelNotSupportedError` naming every
        kernel's reasons. Memoized per exact plan key (the options, dtypes and shapes), so the hot path's
        entries, made only where the default kernel serves, never skip it."""
        if plan.op.calls is None:  # a user operation: its kernels take its keyword arguments, as they are
            return 0
        try:  # the exact key (options, dtypes, shapes) and what the key leaves out that a spec checks
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            key: Hashable = (operation, plan.op.keys(operation, args)[1],
                             torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
                             all(t.is_contiguous() for t in tensors), torch.are_deterministic_algorithms_enabled())
            found = self._serving.get(key)
        except LOOKUP_ERRORS:
            key, found = None, None
        if found is None:  # the first call of this exact key: validated, as a plan-cache miss is
            plan.op.validate(operation, args)
            ctx = plan.op.context(operation, args)
            refusals = [(spec, spec.check(ctx)) for spec in plan.kernels]
            found = next((i for i, (_, reasons) in enumerate(refusals) if not reasons), None)
            if found is None:  # the refusal, kept as its parts (a kept exception would collect tracebacks)
                detail = "; ".join(f"{spec.kernel_id}: " + "; ".join(str(r) for r in reasons)
                                   for spec, reasons in refusals)
                found = (f"{operation}: the static table's kernels cannot run this call: {detail}",
                         tuple(r for _, reasons in refusals for r in reasons))
            if key is not None:
                if len(self._serving) >= 4096:
                    self._serving.clear()
                self._serving[key] = found
        if isinstance(found, tuple):
            raise KernelNotSupportedError(f"{found[0]} (inputs: {plan.op.describe(args)})",
                                          kernel_id=plan.kernels[0].kernel_id, reasons=list(found[1]))
        return found

    def _remember(self, plan: ExecutionPlan, operation: str, inputs: Mapping[str, Any], kwargs: dict[str, Any]
                  ) -> None:
        """Give these input names (and options) a hot-path entry, after a call went the full way."""
        if len(self._hot) + len(self._hot_causal) >= 4096:
            return
        fast = attention_inputs(plan.op, operation, inputs, kwargs)
        if fast is None:
            return
        if len(kwargs) == 1 and kwargs.get("is_causal").__class__ is bool:
            self._hot_causal[operation, kwargs["is_causal"]] = (plan, fast.copy())
        else:
            self._hot[hot_key(operation, kwargs)] = (plan, fast.copy())


compile_dispatch(StaticDispatcher, "static")

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


_SHAPE_LIMITS = ("head_dim_min", "head_dim_max", "head_dim_multiple", "max_seq_len", "max_batch_size",
                 "max_hidden_size", "extra_check")


def _hot_safe(spec: KernelSpec) -> bool:
    """Whether calls may reach ``spec`` through the hot path, which checks the contract's shape relations only
    (no key: no dtype, no validation, no declared limit): it takes every float dtype, and either declares itself
    shape-free (it runs every shape its operation accepts, or raises) or declares no shape limit at all (a plain
    callable). A kernel declaring limits (a dtype, a longest sequence) is served by the full path, whose memo
    checks them per exact key."""
    if spec.dtypes is not None and not _FLOATS <= spec.dtypes:
        return False
    return spec.shape_free or (all(getattr(spec, name) is None for name in _SHAPE_LIMITS)
                               and spec.supports_gqa and spec.supports_mqa and not spec.head_dim_v_equal)


def _timing(t0: int, t1: int, t4: int, t5: int) -> DispatchTiming:
    """A static dispatch's timing (nothing is looked up: the plan is the table's), or NOT_TIMED when off.
    ``t4``/``t5`` 0: the kernel has just returned (the slow and recovery paths)."""
    if not t0:
        return NOT_TIMED
    now = perf_ns()
    return stamp(DispatchTiming, (t0, t1, t1, t1, t4 or now, t5 or now))


# -- building --------------------------------------------------------------------------------------------------

_ID_BAD = re.compile(r"[^a-z0-9_]+")


def _spec_for_callable(fn: Callable[..., Any], operation: str, taken: set[str], kernel_id: str | None) -> KernelSpec:
    if kernel_id is None:
        base = _ID_BAD.sub("_", getattr(fn, "__name__", "kernel").lower()).strip("_") or "kernel"
        if not base[0].isalpha():
            base = f"custom_{base}"
        kernel_id, n = base, 2
        while kernel_id in taken:
            kernel_id, n = f"{base}_{n}", n + 1
    # a plain callable takes the canonical arguments, window among them: it is its own to honour (a KernelSpec
    # declares what a kernel supports; softcap, sinks and ALiBi would be arguments a plain callable never takes)
    return KernelSpec(kernel_id, operation, "custom", fn, supports_window=True,
                      description=f"static kernel {getattr(fn, '__qualname__', fn)!r}")


def _check_entry(where: str, spec: KernelSpec, operation: str, backends: BackendRegistry, errors: list[str]) -> None:
    problem = operation_problem(operation, (spec.operation,))
    if problem is not None:
        errors.append(f"{where}: {problem}")
    elif not operation_matches(spec.operation, operation):
        errors.append(f"{where}: kernel {spec.kernel_id!r} implements {spec.operation!r}, not {operation!r}")
    why = backends.unavailable_reason(spec.backend)
    if why is not None:
        errors.append(f"{where}: kernel {spec.kernel_id!r} cannot run here: {why.message}")


def _lookup(where: str, kernel_id: str, registry: KernelRegistry, errors: list[str]) -> KernelSpec | None:
    spec = registry.find(kernel_id)
    if spec is None:
        import difflib

        close = difflib.get_close_matches(kernel_id, [s.kernel_id for s in registry], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (layerzero list shows every kernel)"
        errors.append(f"{where}: unknown kernel {kernel_id!r}{hint}")
    return spec


def _table_from_map(config: DispatchConfig, registry: KernelRegistry, backends: BackendRegistry,
                    errors: list[str]) -> dict[str, list[KernelSpec]]:
    table: dict[str, list[KernelSpec]] = {}
    for operation, kernel_id in config.static_kernel_map.items():
        where = f"static_kernel_map[{operation!r}]"
        spec = _lookup(where, kernel_id, registry, errors)
        if spec is not None:
            _check_entry(where, spec, operation, backends, errors)
            table[operation] = [spec]
    return table


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("static dispatch table is invalid:\n  " + "\n  ".join(errors), errors=errors)


def create_static_dispatcher(config: DispatchConfig | None = None, kernel_registry: KernelRegistry | None = None,
                             backend_registry: BackendRegistry | None = None, *,
                             runtime: Runtime | None = None) -> StaticDispatcher:
    """A STATIC dispatcher for ``config.static_kernel_map`` (operation -> kernel id).

    Raises:
        ConfigError: listing every entry whose kernel is unknown, serves another operation, or cannot run here.

    Example:
        >>> d = create_static_dispatcher(DispatchConfig(mode=DispatchMode.STATIC,
        ...                                             static_kernel_map={"rms_norm": "torch_rms_norm"}))
        >>> d.resolve("rms_norm")  # the kernel callable itself
    """
    if runtime is None:
        check_static_map(config, kernel_registry, backend_registry)  # before the config is applied anywhere
        runtime = runtime_for(kernel_registry, backend_registry, config)
    cfg = config if config is not None else runtime.config
    errors: list[str] = []
    table = _table_from_map(cfg, runtime.kernels, runtime.backends, errors)
    _raise(errors)
    return StaticDispatcher(runtime, {op: tuple(specs) for op, specs in table.items()})


def check_static_map(config: DispatchConfig | None, kernel_registry: KernelRegistry | None = None,
                     backend_registry: BackendRegistry | None = None) -> None:
    """Raise :class:`ConfigError` listing every bad ``static_kernel_map`` entry (nothing is changed)."""
    if config is None or not config.static_kernel_map:
        return
    errors: list[str] = []
    _table_from_map(config, kernel_registry if kernel_registry is not None else get_global_kernel_registry(),
                    backend_registry if backend_registry is not None else get_global_backend_registry(), errors)
    _raise(errors)


class StaticDispatcherBuilder:
    """Builds a :class:`StaticDispatcher` kernel by kernel.

    Example:
        >>> dispatcher = (StaticDispatcherBuilder()
        ...               .with_kernel(flash_attn, operation="attention.causal", default=True)
        ...               .with_kernel(rms_norm, operation="rms_norm", default=True)
        ...               .with_config(enable_telemetry=False)
        ...               .build())
        >>> dispatcher.resolve("rms_norm") is rms_norm
        True
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, Any, bool, str | None]] = []
        self._config: DispatchConfig | None = None
        self._registries: tuple[KernelRegistry | None, BackendRegistry | None] | None = None

    def with_kernel(self, kernel: KernelSpec | Callable[..., Any] | str, operation: str | None = None,
                    default: bool = False, *, kernel_id: str | None = None) -> StaticDispatcherBuilder:
        """Add a kernel for ``operation``.

        Args:
            kernel: a :class:`KernelSpec`, a plain callable taking the operation's canonical arguments, or the
                id of a registered kernel.
            operation: the operation it serves (defaults to the spec's own operation).
            default: the kernel ``dispatch``/``resolve`` use for the operation; the others are fallbacks in the
                order added (without any default, the first added is the default).
            kernel_id: the id for a plain callable (default: its ``__name__``).
        """
        if operation is None:
            if not isinstance(kernel, KernelSpec):
                raise InvalidInputError("with_kernel(): operation= is required unless kernel is a KernelSpec")
            operation = kernel.operation
        if not isinstance(operation, str) or not operation:
            raise InvalidInputError(f"with_kernel(): operation must be a non-empty string, got {operation!r}")
        if not (isinstance(kernel, (KernelSpec, str)) or callable(kernel)):
            raise InvalidInputError(f"with_kernel(): kernel must be a KernelSpec, a callable or a kernel id, "
                                    f"got {type(kernel).__name__}")
        self._entries.append((operation, kernel, bool(default), kernel_id))
        return self

    def with_config(self, config: DispatchConfig | None = None, **fields: Any) -> StaticDispatcherBuilder:
        """Set the config (mode is always STATIC); ``fields`` change single settings."""
        base = config if config is not None else (self._config or DispatchConfig.from_env())
        self._config = base.replace(mode=DispatchMode.STATIC, **fields)
        return self

    def with_registries(self, kernel_registry: KernelRegistry | None = None,
                        backend_registry: BackendRegistry | None = None) -> StaticDispatcherBuilder:
        """Build on these registries' runtime (the global ones: share breakers and telemetry with ``lz.*``)
        instead of a private runtime; kernel ids are looked up there, callables are registered there."""
        self._registries = (kernel_registry, backend_registry)
        return self

    def build(self) -> StaticDispatcher:
        """The dispatcher. Raises :class:`ConfigError` listing every bad entry."""
        config = self._config or DispatchConfig.from_env(mode=DispatchMode.STATIC)
        if self._registries is not None:
            rt = runtime_for(*self._registries, config)
            lookup, backends, target = rt.kernels, rt.backends, rt.kernels
        else:  # a runtime of its own: its config (say, telemetry off) must not change lz.*
            rt = Runtime(KernelRegistry(), BackendRegistry(), config)
            lookup, backends, target = get_global_kernel_registry(), get_global_backend_registry(), rt.kernels
        errors: list[str] = []
        table = _table_from_map(config, lookup, backends, errors)
        from_map = set(table)
        defaults: dict[str, int] = {}
        taken = {s.kernel_id for s in target} | {s.kernel_id for specs in table.values() for s in specs}
        made: dict[tuple[int, str], KernelSpec] = {}
        for i, (operation, kernel, default, kid) in enumerate(self._entries):
            where = f"with_kernel #{i + 1} ({operation!r})"
            if isinstance(kernel, KernelSpec):
                spec: KernelSpec | None = kernel
            elif isinstance(kernel, str):
                spec = _lookup(where, kernel, lookup, errors)
            else:
                spec = made.get((id(kernel), operation))
                if spec is None:
                    spec = _spec_for_callable(kernel, operation, taken, kid)
                    made[(id(kernel), operation)] = spec
                    taken.add(spec.kernel_id)
            if spec is None:
                continue
            _check_entry(where, spec, operation, backends, errors)
            specs = table.setdefault(operation, [])
            if default:
                if operation in defaults or operation in from_map:
                    errors.append(f"{where}: {operation!r} already has a default kernel "
                                  f"({specs[0].kernel_id!r}); pass default=False to add a fallback")
                    continue
                defaults[operation] = i
                specs.insert(0, spec)
            else:
                specs.append(spec)
        _raise(errors)
        if self._registries is None:  # the private registry lists the table's kernels (shared ones stay untouched)
            for specs in table.values():
                for spec in specs:
                    if spec.kernel_id not in target:
                        target.register(spec)
        return StaticDispatcher(rt, {op: tuple(specs) for op, specs in table.items()})
