"""From a ``dispatch()`` inputs dict to kernel arguments and a plan-cache key.

Operations of a known family (``attention.*``, ``rms_norm``, ...) go through
their :class:`~layerzero.ops.base.OpDef`: ``args_from_inputs`` maps the
documented input names to the canonical positional arguments, and the cache
key is the exact-shape key the ``lz.*`` hot path uses (:meth:`OpDef.keys`),
so ``dispatch()`` and ``lz.*`` share cached plans. Attention inputs given with
``layout="BSHD"`` are handed over as transposed views and the output is
transposed back. :class:`AttentionInputs` is what the dispatchers' hot paths
keep per operation and options (:func:`kwargs_key`) to skip this mapping on
later calls.

An operation with no family (a user's own operation name served by a user
kernel) uses :data:`GENERIC`: its kernels are called with the inputs as keyword
arguments, and its key is the inputs' names, shapes, dtypes and devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any

import torch

from layerzero import forksafe
from layerzero.accel import dispatch_method
from layerzero.context import SelectionContext
from layerzero.dispatch.result import NOT_TIMED, DispatchResult
from layerzero.errors import InvalidInputError
from layerzero.ops import OPS
from layerzero.ops.attention import ATTENTION
from layerzero.ops.base import OpDef, describe_tensor
from layerzero.selection.cache import MVCCPlanCache, PlanCache
from layerzero.spec import KernelSpec

__all__ = ["GenericOp", "GENERIC", "op_for_dispatch", "map_inputs", "key_for", "keys_for",
           "AttentionInputs", "attention_inputs", "OpInputs", "op_inputs", "NO_MEMO", "kwargs_kernel", "INPUT_NAMES",
           "HOT_OPTIONS", "kwargs_key", "hot_key", "compiled_dispatch", "DISPATCH_DOC",
           "CONTEXT_MARKER", "context_key"]

# The names ``dispatch()`` accepts per family (first match wins; ``None`` values count as absent).
INPUT_NAMES: dict[str, str] = {
    "attention": "query|q, key|k, value|v, attn_mask|mask, is_causal, dropout_p, scale, window, layout",
    "rms_norm": "x|input|hidden_states, weight|w, eps",
    "layer_norm": "x|input|hidden_states, weight|w, bias|b, eps",
    "rope": "x|input|q, cos, sin, interleaved",
    "swiglu": "gate|x, up|y",
    "geglu": "gate|x, up|y, approximate",
    "gelu": "x|input, approximate",
    "silu": "x|input",
    "sample": "logits|x, temperature, top_k, top_p, generator",
    "cross_entropy": "logits|input|x, target|labels, ignore_index, label_smoothing, reduction",
    "linear_cross_entropy": "hidden|hidden_states|input|x, weight|lm_head_weight|w, target|labels, bias, ignore_index, "
                            "label_smoothing, reduction, softcap",
}

#: ``Dispatcher.dispatch``'s arguments and errors (its docstring stays one line so the hot path reads whole).
DISPATCH_DOC = """
    Args:
        operation: ``"attention.causal"``, ``"rms_norm"``, ... or a user operation name.
        inputs: tensors by name (``query``/``q``, ``key``/``k``, ``value``/``v``, ``x``/``input``,
            ``weight``, ``bias``, ...; see ``layerzero.dispatch.generic.INPUT_NAMES``).
        context: a :class:`SelectionContext` to select with instead of one built from the tensors
            (reuse one object across calls: plans are cached per context object).
        **kwargs: more inputs or options (``is_causal``, ``scale``, ``eps``, ``layout="BSHD"``, ...).

    Raises:
        InvalidInputError: malformed inputs (names the operation and every input).
        NoKernelError: no kernel can run the call (lists every candidate's reasons).
        AllKernelsFailedError: every kernel tried raised (lists each attempt and its error).
"""

_QKV = frozenset({"query", "q", "key", "k", "value", "v"})


class GenericOp(OpDef):
    """An operation without a built-in family: kernels take the inputs as keyword arguments.

    The canonical argument tuple is ``(inputs_dict,)``; kernels in its plans are
    wrapped by :func:`kwargs_kernel` so each is called as ``fn(**inputs)``.
    """

    family = ""
    arg_names = ("inputs",)

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        if len(args) != 1 or not isinstance(args[0], Mapping):
            raise InvalidInputError(f"{operation}: inputs must be a dict of named arguments, got {args!r}")

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        for value in args[0].values():
            if isinstance(value, torch.Tensor):
                return SelectionContext.from_rows(value)
        return SelectionContext()

    def reference(self, operation: str, args: tuple[Any, ...]) -> Any:
        raise NotImplementedError(f"{operation} has no reference implementation")

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
                         ) -> tuple[Any, ...]:
        return ({**inputs, **kwargs} if kwargs else dict(inputs),)

    def describe(self, args: Any) -> str:
        if len(args) == 1 and isinstance(args[0], Mapping):
            return ", ".join(f"{k}={describe_tensor(v)}" for k, v in args[0].items())
        return super().describe(args)


GENERIC = GenericOp()


def op_for_dispatch(operation: str) -> OpDef:
    """The op definition of ``operation``'s family, or :data:`GENERIC` for a family layerzero does not know."""
    if not isinstance(operation, str) or not operation:
        raise InvalidInputError(f"dispatch(): operation must be a non-empty string, got {operation!r}")
    return OPS.get(operation.split(".", 1)[0], GENERIC)


class _Slot:
    """A stand-in input value used once per input-name set to learn where each input lands."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


Template = tuple[tuple[Any, ...], tuple[tuple[str, int], ...]]
_templates: dict[tuple[str, tuple[str, ...]], Template | None] = {}


def _template(op: OpDef, operation: str, names: tuple[str, ...], kwargs: Mapping[str, Any] | None = None
              ) -> Template | None:
    """Where ``op.args_from_inputs`` puts each input, learned from the op itself with stand-in values (and
    ``kwargs``, the call's options, as they are).

    Usable only when every input is passed through to exactly one argument position untouched (none is
    read as a flag or number), so the result is the op's own mapping with the tensors dropped in.
    """
    slots = {n: _Slot(n) for n in names}
    try:
        args = op.args_from_inputs(operation, slots, kwargs or {})
    except Exception:  # the op looks inside a value (float(eps), ...): map every call the normal way
        return None
    positions = [(a.name, i) for i, a in enumerate(args) if isinstance(a, _Slot)]
    if sorted(n for n, _ in positions) != sorted(names):
        return None
    return tuple(None if isinstance(a, _Slot) else a for a in args), tuple(positions)


_UNSEEN: Any = object()


def _fill(found: Template, inputs: Mapping[str, Any]) -> tuple[Any, ...] | None:
    template, positions = found
    out = list(template)
    for name, i in positions:
        value = inputs[name]
        if value is None:  # None means "absent" to the op: let it decide
            return None
        out[i] = value
    return tuple(out)


def _args(op: OpDef, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """``op.args_from_inputs``, with a name it does not read (``is_casual=True``) or a value it cannot convert
    (``eps="a"``) reported as bad input."""
    op.check_names(operation, inputs, kwargs)
    try:
        return op.args_from_inputs(operation, inputs, kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        given = ", ".join(f"{k}={describe_tensor(v)}" for k, v in {**inputs, **kwargs}.items())
        raise InvalidInputError(f"{operation}: an input has the wrong type or value ({exc}) "
                                f"(inputs: {given})") from None


def _first_sight(op: OpDef, operation: str, inputs: dict[str, Any], tkey: tuple[str, tuple[str, ...]]
                 ) -> tuple[Any, ...]:
    """Map the normal way, and keep a template only if it gives exactly the same arguments."""
    real = _args(op, operation, inputs, {})
    found = _template(op, operation, tkey[1])
    if found is not None:
        filled = _fill(found, inputs)
        if filled is None or len(filled) != len(real) or any(
                a is not b and not (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)
                for a, b in zip(filled, real, strict=True)):
            found = None
    if len(_templates) < 4096:
        _templates[tkey] = found
    return real


def map_inputs(op: OpDef, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
               ) -> tuple[tuple[Any, ...], bool]:
    """``(canonical args, transposed)``: ``transposed`` means the output must go back to BSHD."""
    if not kwargs and type(inputs) is dict and "layout" not in inputs and op is not GENERIC:
        tkey = (operation, tuple(inputs))
        found = _templates.get(tkey, _UNSEEN)
        if found is _UNSEEN:
            return _first_sight(op, operation, inputs, tkey), False
        if found is not None:
            filled = _fill(found, inputs)
            if filled is not None:
                return filled, False
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        raise InvalidInputError(f"dispatch({operation!r}): inputs must be a dict of tensors keyed by name "
                                f"(for example {{'query': q, 'key': k, 'value': v}}), got {type(inputs).__name__}")
    if op.family != "attention":
        return _args(op, operation, inputs, kwargs), False
    layout = kwargs["layout"] if "layout" in kwargs else inputs.get("layout", "BHSD")
    if layout == "BHSD":
        return _args(op, operation, inputs, kwargs), False
    if layout != "BSHD":
        raise InvalidInputError(f"{operation}: layout must be 'BHSD' or 'BSHD', got {layout!r}")
    moved = {n: (t.transpose(1, 2) if n in _QKV and isinstance(t, torch.Tensor) and t.dim() == 4 else t)
             for n, t in inputs.items()}
    extra = {n: (t.transpose(1, 2) if n in _QKV and isinstance(t, torch.Tensor) and t.dim() == 4 else t)
             for n, t in kwargs.items()}
    return _args(op, operation, moved, extra), True


def key_for(op: OpDef, operation: str, args: tuple[Any, ...]) -> Hashable | None:
    """The plan-cache key for ``args`` (``None``: not cacheable, e.g. a non-tensor where a tensor belongs)."""
    return keys_for(op, operation, args)[1]


def keys_for(op: OpDef, operation: str, args: tuple[Any, ...]) -> tuple[Hashable | None, Hashable | None]:
    """``(family, key)``: the shape-free and the exact-shape plan-cache keys the ``lz.*`` hot path builds for
    ``args`` (:meth:`OpDef.keys`). ``family`` is None for an operation without shape-free plans (the generic
    op, a family without keys); ``key`` is None when the call is not cacheable (a non-tensor where a tensor
    belongs: validation names it)."""
    try:
        if op is GENERIC:
            return None, (operation, "generic", *(
                (n, v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else (n, type(v))
                for n, v in args[0].items()))
        try:
            family, key = op.keys(operation, args)
        except NotImplementedError:  # an op family without its own keys
            family = key = None
        if key is None:
            key = (operation, *((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else type(a)
                                for a in args))
        return family, key
    except (AttributeError, TypeError, IndexError, ValueError, RuntimeError):  # malformed: validation names it
        return None, None


NO_MEMO: tuple[None, None, None] = (None, None, None)

#: The ``dispatch()`` options a hot-path entry may carry, each with the exact types it may have there: the
#: canonical ones the attention contract's guards admit (``is_causal=1`` or ``numpy.True_``, which the full path
#: turns into ``True``, maps in full every time; so does any other option).
HOT_OPTIONS: dict[str, tuple[type, ...]] = {"is_causal": (bool,), "dropout_p": (float,),
                                            "scale": (float, int, type(None)), "window": (int, type(None)),
                                            "layout": (str,)}
_OPTIONS: Any = object()
#: What the plan-cache keys of calls given a context hold after the operation (see :func:`context_key`).
CONTEXT_MARKER = "explicit-context"


def context_key(operation: str, context: Any, key: Hashable) -> tuple[Any, ...]:
    """The plan-cache key of a call given ``context`` whose exact key is ``key``: ``(operation, CONTEXT_MARKER,
    id(context), key)``, a plan per context object and exact call (its ``plan.context`` is that object; the
    compiled path builds the same tuple)."""
    return (operation, CONTEXT_MARKER, id(context), key)


def kwargs_key(operation: str, kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """The hot-path key of a call with options: the operation, then each option's name, exact type and value.

    The type keeps apart what compares equal (``is_causal=1`` or ``numpy.True_`` is not ``is_causal=True``,
    ``window=2.0`` is not ``window=2``): such a call misses, maps in full and gets the first call's answer.
    Hashing it raises ``TypeError`` for an unhashable value (the caller then takes the full path). It starts
    with a marker of its own, so no operation name (a tuple given as one) equals it.
    """
    key: tuple[Any, ...] = (_OPTIONS, operation)
    for name, value in kwargs.items():
        key += (name, value.__class__, value)
    return key


def hot_key(operation: str, kwargs: Mapping[str, Any]) -> Hashable | None:
    """The key a call's hot-path entry is kept under: the operation alone for a call without options, else
    :func:`kwargs_key`; None when an option is not one an entry may carry (:data:`HOT_OPTIONS`)."""
    if not kwargs:
        return operation
    if all(v.__class__ in HOT_OPTIONS.get(n, ()) for n, v in kwargs.items()):
        return kwargs_key(operation, kwargs)
    return None


class AttentionInputs:
    """An input-name set (and options) of an attention operation that hands ``q``, ``k`` and ``v`` straight to
    the kernel arguments ``(q, k, v, None, is_causal, dropout_p, scale, window)``, the rest being constants.

    The dispatchers' cached hot path reads the three tensors by name (``inputs[entry.q_name]``, a
    ``KeyError`` when the dict has other names), as BHSD views when the call said ``layout="BSHD"``
    (``bshd``: the output goes back with one more transpose, as the full path does), and builds the same
    cache keys as ``lz.attention`` without mapping the dict again. Each dispatcher keeps its own copy
    (:meth:`copy`): ``memo`` is that dispatcher's ``(dtype, plan, kernel_id)`` of the shape-free plan it found
    last for CPU tensors (see ``Dispatcher.dispatch``; :data:`NO_MEMO` when none), valid until the runtime's
    version changes.
    """

    __slots__ = ("q_name", "k_name", "v_name", "is_causal", "dropout_p", "scale", "window", "bshd", "direct_ok",
                 "memo", "cmemo", "shapes_admit", "admits", "find")

    def __init__(self, names: tuple[str, str, str], is_causal: bool, dropout_p: float, scale: Any,
                 window: Any, bshd: bool = False) -> None:
        self.q_name, self.k_name, self.v_name = names
        self.is_causal = is_causal
        self.dropout_p = dropout_p
        self.scale = scale
        self.window = window
        self.bshd = bshd
        self.direct_ok = scale is None  # ``plan.direct(q, k, v)`` (PyTorch's SDPA) needs the default scale
        self.memo: tuple[Any, Any, Any] = NO_MEMO  # one tuple, so that threads never see a torn memo
        # the compiled path's memo of the exact-key plans it found last, the latest first (an own cache, or a
        # given context): ``memo_plan`` in _accel_lookup.c says when one stands for the cache read
        self.cmemo: Any = None
        # the attention contract's shape relations, checked per call; its scalar guards hold for the constants
        # above (an entry is made only then: ``_attention_entry``)
        self.shapes_admit = ATTENTION.calls.shapes_admit
        # their compiled form (layerzero.accel), for plain tensors: ``admits(q, k, v)`` (False: does not hold, or
        # not a plain tensor: ask ``shapes_admit``) and ``find(plans, operation, q, k, v, is_causal, dropout_p,
        # window)`` (the plan the contract's lookup finds, or None: look up in Python)
        compiled = ATTENTION.calls.compiled
        self.admits = compiled.admits if compiled is not None else _no_compiled_admits
        self.find = compiled.find if compiled is not None else None

    def copy(self) -> AttentionInputs:
        """The same mapping with an empty plan memo (one per dispatcher)."""
        return AttentionInputs((self.q_name, self.k_name, self.v_name), self.is_causal, self.dropout_p,
                               self.scale, self.window, self.bshd)

    def tensors(self, inputs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        """``(q, k, v)`` from ``inputs``, as BHSD views for a BSHD entry (``KeyError`` when a name is missing;
        what a transpose raises for a non-tensor or a tensor of rank < 3)."""
        q, k, v = inputs[self.q_name], inputs[self.k_name], inputs[self.v_name]
        return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if self.bshd else (q, k, v)

    def args(self, q: Any, k: Any, v: Any) -> tuple[Any, ...]:
        """The kernel arguments for BHSD ``q``, ``k``, ``v``."""
        return (q, k, v, None, self.is_causal, self.dropout_p, self.scale, self.window)

    def family(self, operation: str, q: torch.Tensor) -> tuple[Any, ...]:
        """The shape-free key (as built inline on the hot path)."""
        return (operation, q.dtype, q.is_cpu or q.device, self.is_causal, self.dropout_p, self.window, None)


class OpInputs:
    """An input-name set of an operation with a call contract other than attention (``rms_norm``, ``layer_norm``,
    ``rope``, ...) whose inputs all go untouched to kernel argument positions, the other arguments being the
    op's defaults: the dispatchers' hot path fills the arguments by name and finds the plan with the contract's
    own lookup (the plan ``lz.*`` runs), without mapping the dict again.

    ``names[i]`` is the input that goes to argument ``i``, or None (the default ``template[i]`` goes there);
    ``size`` is the number of inputs. ``lookup``, ``keys`` and ``admits`` are the contract's
    (:class:`~layerzero.ops.contract.ContractFunctions`); ``hit`` its compiled form, where it has one (the norms:
    the compiled dispatch method looks their plans up with it), else None. ``cmemo``: the compiled path's memo of
    the exact-key plans it found last (see ``AttentionInputs``); each dispatcher keeps its own copy (:meth:`copy`).
    """

    __slots__ = ("names", "template", "size", "lookup", "keys", "admits", "hit", "cmemo", "_calls")

    def __init__(self, names: tuple[str | None, ...], template: tuple[Any, ...], calls: Any) -> None:
        self.names = names
        self.template = template
        self.size = sum(n is not None for n in names)
        self.lookup, self.keys, self.admits, self.hit = calls.lookup, calls.keys, calls.admits, calls.compiled
        self.cmemo: Any = None
        self._calls = calls

    def copy(self) -> OpInputs:
        """The same mapping with an empty memo (one per dispatcher)."""
        return OpInputs(self.names, self.template, self._calls)

    def fill(self, inputs: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The kernel arguments (``KeyError`` for another name; None when an input is None: the op decides what
        that means, on the full path)."""
        args = list(self.template)
        for i, name in enumerate(self.names):
            if name is not None:
                value = args[i] = inputs[name]
                if value is None:
                    return None
        return tuple(args)


def op_inputs(op: OpDef, operation: str, inputs: Mapping[str, Any]) -> OpInputs | None:
    """The :class:`OpInputs` of this input-name set, after ``inputs`` were mapped (the template
    :func:`map_inputs` learned and checked on first sight), or None: attention (see :func:`attention_inputs`), no
    call contract, or inputs the op reads as flags or numbers."""
    calls = getattr(op, "calls", None)
    if calls is None or op is GENERIC or op.family == "attention" or type(inputs) is not dict:
        return None
    found = _templates.get((operation, tuple(inputs)))
    if found is None:
        return None
    template, positions = found
    names: list[str | None] = [None] * len(template)
    for name, i in positions:
        names[i] = name
    return OpInputs(tuple(names), template, calls)


def compiled_dispatch(method: Any, kind: str) -> Any:
    """The compiled form of a dispatcher's ``dispatch`` (the lines under "hot path" in ``Dispatcher.dispatch``,
    ``kind="select"``, or ``StaticDispatcher.dispatch``, ``kind="static"``; :func:`layerzero.accel.dispatch_method`),
    or None without the extension. The Python method stays the definition: the compiled form serves the cached
    attention hit and hands every other call to it; tests/test_accel_dispatch.py holds the two equal."""
    return dispatch_method(kind, ATTENTION.calls.compiled, method, AttentionInputs, OpInputs, DispatchResult,
                           NOT_TIMED, _OPTIONS, CONTEXT_MARKER, (PlanCache, MVCCPlanCache))


def _no_compiled_admits(q: Any, k: Any, v: Any) -> bool:
    """Without the compiled hot path, every call asks the contract's Python guard."""
    return False


_attention_inputs: dict[tuple[Any, ...], AttentionInputs | None] = {}


def attention_inputs(op: OpDef, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any] | None = None
                     ) -> AttentionInputs | None:
    """The :class:`AttentionInputs` for this input-name set (and these options) of an attention operation, or
    None when its calls need the full mapping (a mask, a flag or number given as an input, other names, an
    option outside :data:`HOT_OPTIONS` or of another type there, a layout other than ``"BHSD"``/``"BSHD"``).

    Call it after ``inputs`` were mapped and dispatched successfully: it checks, on these very inputs,
    that its arguments and keys are the op's own (:meth:`OpDef.args_from_inputs`, :meth:`OpDef.keys`).
    """
    if op.family != "attention" or type(inputs) is not dict or len(inputs) != 3:
        return None
    options = kwargs or {}
    key = hot_key(operation, options)
    if key is None or options.get("layout", "BHSD") not in ("BHSD", "BSHD"):
        return None
    tkey = (key, tuple(inputs))
    found = _attention_inputs.get(tkey, _UNSEEN)
    if found is not _UNSEEN:
        return found
    # without options, the template map_inputs learned on first sight; with them, one learned with them
    template = _templates.get(tkey) if not options else _template(op, operation, tkey[1], options)
    entry = _attention_entry(op, operation, inputs, options, template)
    if len(_attention_inputs) < 4096:
        _attention_inputs[tkey] = entry
    return entry


def _attention_entry(op: OpDef, operation: str, inputs: dict[str, Any], options: Mapping[str, Any],
                     found: Template | None) -> AttentionInputs | None:
    if found is None:
        return None
    template, positions = found
    where = dict(positions)
    if len(template) != 8 or sorted(where.values()) != [0, 1, 2] or template[3] is not None:
        return None
    names = tuple(sorted(where, key=where.__getitem__))
    entry = AttentionInputs(names, *template[4:], bshd=options.get("layout") == "BSHD")  # type: ignore[misc]
    try:
        q, k, v = entry.tensors(inputs)
        args = entry.args(q, k, v)
        given = dict(zip(names, (q, k, v)))  # as map_inputs hands them over (BSHD: the transposed views)
        if args != tuple(_args(op, operation, given, options)):  # identity for the tensors, == for the constants
            return None
        if not ATTENTION.calls.scalars_admit(operation, *args):  # the hot path checks only shapes per call
            return None
        family, key = op.keys(operation, args)
        fam = entry.family(operation, q)
        hash(fam)
        if family != fam or key != (fam, q.shape, k.shape, v.shape, None):
            return None
    except Exception:  # inputs the op does not take as they are: keep the full mapping
        return None
    return entry


_wrapped: dict[tuple[int, str], tuple[KernelSpec, KernelSpec]] = {}
_wrapped_lock = forksafe.module_lock()


def kwargs_kernel(spec: KernelSpec) -> KernelSpec:
    """The same spec (same id, same breaker) with an impl that takes ``(inputs_dict,)`` and calls ``fn(**inputs)``."""
    if getattr(spec.impl, "takes_inputs_dict", False):  # already this form (a plan's kernels, made again)
        return spec
    key = (id(spec.impl), spec.kernel_id)
    hit = _wrapped.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    fn = spec.impl

    def call_with_kwargs(inputs: Mapping[str, Any]) -> Any:
        return fn(**inputs)

    call_with_kwargs.__name__ = getattr(fn, "__name__", spec.kernel_id)
    call_with_kwargs.takes_inputs_dict = True  # type: ignore[attr-defined]
    wrapped = dataclasses.replace(spec, impl=call_with_kwargs, specialize=None) if _has_specialize(spec) \
        else dataclasses.replace(spec, impl=call_with_kwargs)
    with _wrapped_lock:
        if len(_wrapped) > 4096:
            _wrapped.clear()
        _wrapped[key] = (spec, wrapped)
    return wrapped


def _has_specialize(spec: KernelSpec) -> bool:
    return any(f.name == "specialize" for f in dataclasses.fields(spec))
