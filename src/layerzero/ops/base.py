"""OpDef: what the runtime needs to know about an operation family.

An op family (attention, rms_norm, ...) turns user arguments into the
canonical positional arguments every kernel of that family receives,
validates them (``InvalidInputError`` naming the operation and every input's
shape, dtype and device), builds the :class:`SelectionContext`, checks a
kernel's output shape and dtype, computes a float64 reference, and makes
fresh random inputs for tests, tuning and benchmarks.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

from layerzero.context import SelectionContext
from layerzero.errors import InvalidInputError
from layerzero.ops.contract import CallContract, ContractFunctions, build

__all__ = ["OpDef", "describe_tensor", "describe_args", "describe_inputs", "require_tensor", "pick", "layout_problem",
           "tensor_problem", "default_generator", "finite_number", "shown", "kind", "option_flag", "option_number",
           "largest", "FLOAT_MAX", "dense_guard", "number_guard", "GUARD_NAMES", "MAX_WINDOW", "window_problem"]

#: The largest finite float: a contract guard's ``-FLOAT_MAX <= x <= FLOAT_MAX`` holds for a finite float and for
#: an int a float holds (not for NaN, inf or ``10**400``, which ``float()`` cannot convert).
FLOAT_MAX = sys.float_info.max


def shown(x: Any) -> str:
    """``repr(x)`` for a message, a huge int by its size (``10**400`` has 401 digits), and a scalar of another
    library by its type too (``np.float32(0.5)``: a Python number is what the option takes)."""
    text = repr(x)
    if len(text) > 40 and isinstance(x, int):
        return f"an int of {len(str(abs(x)))} digits"
    if type(x).__module__ != "builtins" and not isinstance(x, torch.Tensor):
        return f"{text} (a {kind(x)}, not a Python scalar)"
    return text


def largest(t: torch.Tensor) -> float:
    """``max |t|`` as a float (0 for an empty tensor; it reads the data: verify mode only)."""
    return float(t.detach().abs().amax()) if t.numel() else 0.0


def kind(x: Any) -> str:
    """The type of ``x`` as a message names it: ``bool``, ``numpy.bool``, ``torch.Tensor``."""
    tp = type(x)
    return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"


def _autocast_dtype(got: torch.dtype, device: torch.device) -> bool:
    """Whether ``got`` is a dtype autocast, enabled for ``device``'s type, makes a kernel return: its lower
    precision, or float32 (what PyTorch's own functions return under autocast: SDPA in bfloat16, cross-entropy
    in float32). Not a kernel fault: the breaker must not count it."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return False
        return got in (torch.get_autocast_dtype(device.type), torch.float32)
    except (TypeError, RuntimeError, AttributeError):  # an older torch without the device-type forms
        return False


def finite_number(x: Any) -> bool:
    """An int or float (not a bool) that a float holds finitely (``10**400`` is not: ``float()`` overflows).

    Under torch.compile a float option that took a second value is a symbolic float (Dynamo's automatic
    dynamic): ``math.isfinite`` cannot be traced on it, the guards' comparison with :data:`FLOAT_MAX` can (NaN,
    inf and ``10**400`` fail it, as they fail ``math.isfinite``)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.SymInt, torch.SymFloat)):
        return False
    if isinstance(x, (torch.SymInt, torch.SymFloat)) or torch.compiler.is_compiling():
        return bool(-FLOAT_MAX <= x <= FLOAT_MAX)
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def dense_guard(*names: str, shapes_keyed: bool = False) -> str:
    """A call contract's guard text: each named tensor argument has a layout kernels take, as
    :func:`layout_problem` says (strided and not nested, or jagged); a name ending in ``?`` may be None. The keys
    carry dtypes and shapes, not layouts: without it a sparse or nested tensor would reach a cached plan's kernel,
    which may return a sparse result instead of failing. ``shapes_keyed``: every named tensor's shape is in the
    plan key, which a nested tensor of the strided layout cannot give (it has no sizes), so the guard need not
    ask (one attribute read per tensor instead of two)."""
    terms = []
    for name in names:
        n = name.rstrip("?")
        term = (f"({n}.layout is STRIDED or {n}.layout is JAGGED)" if shapes_keyed else
                f"({n}.layout is STRIDED and not {n}.is_nested or {n}.layout is JAGGED)")
        terms.append(f"({n} is None or {term})" if name.endswith("?") else term)
    return " and ".join(terms)


def number_guard(name: str, optional: bool = False) -> str:
    """A call contract's guard text: the keyed option ``name`` is a number validation takes
    (:func:`finite_number`; ``int`` and ``float`` at once). A key compares ``np.float32(0.5) == 0.5`` and
    ``True == 1``, so the value that found a plan may be of a class the first call refuses."""
    term = f"({name}.__class__ is float or {name}.__class__ is int or finite_number({name}))"
    return f"({name} is None or {term})" if optional else term


#: The names :func:`dense_guard` and :func:`number_guard` texts read (a contract's ``namespace`` includes them).
GUARD_NAMES: dict[str, Any] = {"STRIDED": torch.strided, "JAGGED": torch.jagged, "finite_number": finite_number}


#: The longest sliding window an attention call may ask for: FlashAttention's window is an int32, and the masks'
#: int64 arithmetic (``j > i - window``) wraps past 2**63 (every key masked, silently).
MAX_WINDOW = 2**31 - 1


def window_problem(window: Any) -> str | None:
    """Why ``window`` is not a sliding window attention takes (a positive int up to :data:`MAX_WINDOW`), or None."""
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return f"window must be a positive int or None, got {shown(window)}"
    if window > MAX_WINDOW:
        return (f"window={shown(window)} is beyond {MAX_WINDOW}, the longest window the kernels take; a window "
                f"longer than every sequence is no window at all: pass None")
    return None


def describe_tensor(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        dt = str(t.dtype).removeprefix("torch.")
        try:
            shape: Any = tuple(t.shape)
        except RuntimeError:  # a nested tensor of the strided layout has no sizes
            shape = "nested"
        return f"Tensor(shape={shape}, dtype={dt}, device={t.device})"
    if t is None:
        return "None"
    return f"{type(t).__name__}"


def describe_args(names: Sequence[str], args: Sequence[Any]) -> str:
    return ", ".join(f"{n}={describe_tensor(a)}" for n, a in zip(names, args, strict=False))


def describe_inputs(inputs: Mapping[Any, Any]) -> str:
    """:func:`describe_args` of a ``dispatch()`` inputs mapping, by its own names."""
    return describe_args([str(n) for n in inputs], list(inputs.values()))


def require_tensor(op: str, name: str, value: Any, names: Sequence[str], args: Sequence[Any]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__} "
                                f"(inputs: {describe_args(names, args)})")
    return value


def layout_problem(name: str, t: torch.Tensor) -> str | None:
    """Why ``t`` cannot go to a kernel as it is (a sparse or nested-strided tensor), or None.

    Rejected here, a bad layout is the caller's error; reaching a kernel it would count as that
    kernel's failure on its circuit breaker.
    """
    layout = t.layout
    if layout is torch.strided:
        if t.is_nested:
            return f"{name} is a nested tensor of the strided layout (use layout=torch.jagged or pad it)"
        return None
    if layout is torch.jagged:
        return None
    return f"{name} must be a dense tensor, got layout={layout} (call .to_dense())"


def tensor_problem(name: str, t: Any) -> str | None:
    """Why ``t`` is not a tensor a kernel can take (not a tensor, or a layout :func:`layout_problem` names)."""
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    return layout_problem(name, t)


def default_generator(device: torch.device) -> torch.Generator | None:
    """The generator PyTorch's random functions draw from on ``device`` when given none."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None


_MISSING = object()


def pick(inputs: Mapping[str, Any], *names: str, default: Any = _MISSING, operation: str = "?") -> Any:
    """First present key of ``inputs`` among ``names``, never testing a tensor's truth value."""
    for n in names:
        if n in inputs and inputs[n] is not None:
            return inputs[n]
    if default is _MISSING:
        raise InvalidInputError(f"{operation}: inputs need one of {', '.join(repr(n) for n in names)}; "
                                f"got keys {sorted(inputs)}")
    return default


def option_flag(inputs: Mapping[str, Any], name: str, operation: str, default: bool = False) -> bool:
    """A dispatch() flag option (``is_causal``, ``interleaved``): absent or None is ``default``; a bool, a numpy
    bool or the int 0 or 1 reads as itself. A string is refused: ``bool("False")`` is True."""
    value = inputs.get(name)
    if value is None:
        return default
    if not (isinstance(value, bool) or isinstance(value, int) and value in (0, 1)
            or kind(value) in ("numpy.bool", "numpy.bool_")):
        raise InvalidInputError(f"{operation}: {name} must be a bool, got {shown(value)} "
                                f"(inputs: {describe_inputs(inputs)})")
    return bool(value)


def option_number(inputs: Mapping[str, Any], name: str, default: float, operation: str) -> Any:
    """A dispatch() number option (``eps``, ``dropout_p``, ``temperature``) as a float; absent: ``default``. A
    string is refused (``float("1e-5")`` would take it); what is not a number is left for validation to name."""
    value = inputs.get(name, default)
    if isinstance(value, (str, bytes)):
        raise InvalidInputError(f"{operation}: {name} must be a number, got {shown(value)} "
                                f"(inputs: {describe_inputs(inputs)})")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return value


#: Every input name some op reads (:attr:`OpDef.input_aliases`): what a ``dispatch()`` inputs dict may hold.
_ANY_OP_NAMES: set[str] = set()


class OpDef:
    """Base class of op families. Subclasses fill in the methods below.

    An op with a public ``lz.*`` function declares its :class:`CallContract` and binds it once
    (:meth:`bind_contract`); its plan keys, guards and lookup then come from that one declaration.
    """

    family: str = ""
    arg_names: tuple[str, ...] = ()
    #: The other names a ``dispatch()`` inputs dict or keyword may use (``query`` for ``q``, ``layout``); with
    #: :attr:`arg_names` they are every name :meth:`args_from_inputs` reads (:meth:`check_names` refuses the
    #: rest: a misspelled ``is_casual=True`` must not run non-causal attention). None: the op declares none
    #: and nothing is checked.
    input_aliases: tuple[str, ...] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.input_aliases is not None:
            _ANY_OP_NAMES.update(cls.arg_names, cls.input_aliases)
    #: The arguments a training call differentiates (the tuner times forward + backward through them for
    #: ``grad=1`` buckets); None: every floating-point tensor argument.
    grad_inputs: tuple[str, ...] | None = None
    contract: CallContract | None = None
    calls: ContractFunctions | None = None

    def bind_contract(self, contract: CallContract, runtime: Any) -> Callable[..., Any]:
        """Generate the op's entry function and lookups from ``contract``; returns the entry function."""
        self.contract = contract
        self.calls = build(contract, self, runtime)
        return self.calls.entry

    def check_names(self, operation: str, inputs: Mapping[Any, Any], kwargs: Mapping[str, Any]) -> None:
        """Refuse a keyword :meth:`args_from_inputs` would not read, and an input no op reads
        (``InvalidInputError`` naming each, with the closest name the operation takes, and all of them). An
        input another op reads passes: one dict may carry the inputs of several operations (the seed guide's
        warm-up dispatches the same dict to attention and rms_norm)."""
        if self.input_aliases is None:
            return
        known = (*self.arg_names, *self.input_aliases)
        unknown = [n for n in inputs if n not in _ANY_OP_NAMES] + [n for n in kwargs if n not in known]
        if not unknown:
            return
        problems = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
            problems.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InvalidInputError(f"{operation}: unknown input or option {', '.join(problems)}; {operation} takes "
                                f"{', '.join(known)} (inputs: {describe_inputs(inputs)})")

    def diagnose(self, operation: str, args: tuple[Any, ...]) -> None:
        """Checks of the values themselves (NaN logits, out-of-range class ids), too costly for every call
        (they read the data; on a GPU they synchronize): run only after a kernel raised, before the kernel is
        blamed. Raises :class:`InvalidInputError` naming the problem; returns None when it sees none."""
        return None

    def consumes_rng(self, operation: str, ctx: SelectionContext) -> bool:
        """Whether calls of this context draw random numbers (their plans restore the generator on failure)."""
        return False

    def generator(self, operation: str, args: tuple[Any, ...]) -> torch.Generator | None:
        """The random generator a call consumes (None for a deterministic call): its state is saved before
        a kernel runs and restored before the next kernel is tried, so a retry draws the same numbers."""
        return None

    def validate(self, operation: str, args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def context(self, operation: str, args: tuple[Any, ...]) -> SelectionContext:
        raise NotImplementedError

    def check_output(self, operation: str, args: tuple[Any, ...], out: Any) -> str | None:
        """A description of what is wrong with ``out``, or None if its shape/dtype/device are right."""
        return None

    def reference(self, operation: str, args: tuple[Any, ...]) -> Any:
        """The float64 PyTorch reference result for ``args``."""
        raise NotImplementedError

    def reference_applies(self, operation: str, args: tuple[Any, ...]) -> bool:
        """Whether :meth:`reference` is what a correct kernel returns for ``args`` (False when the
        result is random, e.g. attention with dropout); verify mode skips the comparison otherwise."""
        return True

    def make_inputs(self, operation: str, ctx: SelectionContext, generator: torch.Generator | None = None
                    ) -> tuple[Any, ...]:
        """Fresh random canonical arguments matching ``ctx`` (never zeros)."""
        raise NotImplementedError

    def args_from_inputs(self, operation: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]
                         ) -> tuple[Any, ...]:
        """Canonical args from a ``dispatch()`` inputs dict (documented names per operation)."""
        raise NotImplementedError

    def keys(self, operation: str, args: tuple[Any, ...]) -> tuple[Hashable | None, Hashable]:
        """``(family, key)``: the plan-cache keys the op's hot path builds for ``args`` (its contract's).

        ``key`` names one exact call shape; ``family`` (None for ops without shape-free plans) is the
        same without any shape: dtype, device and the flags selection looks at. The device is ``True``
        for a CPU tensor (``t.is_cpu or t.device``: a bool compares for free, a ``torch.device`` is
        built and compared on every call) and the ``torch.device`` otherwise.
        """
        if self.calls is None:
            raise NotImplementedError
        return self.calls.keys(operation, *args)

    def lookup(self, plans: Any, operation: str, args: tuple[Any, ...]) -> tuple[Any, Hashable, Hashable]:
        """``(plan | None, family, key)``: the cached plan the op's hot path would run for ``args``, guards
        included (see :class:`ContractFunctions`)."""
        if self.calls is None:
            raise NotImplementedError
        return self.calls.lookup(plans, operation, *args)

    def admits(self, operation: str, args: tuple[Any, ...]) -> bool:
        """Whether the contract's guards hold for ``args`` (True for an op without a contract)."""
        if self.calls is None:
            return True
        try:
            return self.calls.admits(operation, *args)
        except Exception:  # malformed arguments: not admitted, validation names them
            return False

    def describe(self, args: Sequence[Any]) -> str:
        return describe_args(self.arg_names, args)

    def invalid(self, operation: str, problem: str, args: Sequence[Any]) -> InvalidInputError:
        return InvalidInputError(f"{operation}: {problem} (inputs: {self.describe(args)})")

    def sample_contexts(self, operation: str, device: str = "cpu") -> list[SelectionContext]:
        """A small grid of contexts for tests, warm-up and tuning."""
        raise NotImplementedError

    def output_meta_check(self, operation: str, out: Any, shape: Sequence[int], dtype: torch.dtype,
                          device: torch.device) -> str | None:
        if not isinstance(out, torch.Tensor):
            return f"returned {type(out).__name__}, expected a Tensor"
        if tuple(out.shape) != tuple(shape):
            return f"returned shape {tuple(out.shape)}, expected {tuple(shape)}"
        if out.dtype != dtype and not _autocast_dtype(out.dtype, device):
            return f"returned dtype {out.dtype}, expected {dtype}"
        if out.device != device:
            return f"returned a tensor on {out.device}, expected {device}"
        return None
