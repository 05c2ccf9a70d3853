"""Call contracts: what one operation's cached calls depend on, declared once.

A :class:`CallContract` says, for one ``lz.*`` operation:

* ``family``: the plan key without shapes (the operation, dtypes, device and the flags selection looks at);
* ``shape``: what the exact-shape key adds to it (the shapes);
* ``reads``: statements that read what the guards and keys share (``qb, qh, qsq, qd = qs = q.shape``: one
  unpacking reads a shape once and checks its rank for free); they run inside the lookup's ``try``, so what
  they raise (a 3-D ``q`` does not unpack) sends the call down the validating path;
* ``shape_free``: whether a family may have one plan for all its shapes (:mod:`layerzero.runtime.family`);
* ``family_guard``: the shape relations validation checks, tested before a shape-free plan serves a call
  (a shape-free key carries no shapes, so a 3-D ``q`` or a batch-1 ``q`` beside batch-2 ``k`` must not reach
  the kernel through it); when it fails the call looks up its exact-shape key, which has never been
  cached for shapes validation rejects;
* ``guard``: cheap per-call checks on what neither key carries exactly (``is_causal=1`` hashes like
  ``True``, ``window=2.0`` like ``2``, ``scale`` is not keyed at all); when it fails the call takes the
  slow path, which validates, so a bad value is named exactly as on a first call;
* ``direct`` / ``direct_when``: the direct-call form of the plan (PyTorch's function itself, no adapter frame).

:func:`build` turns a contract into code, as :mod:`dataclasses` turns fields into methods: the public op
function with its whole cached path inline (no helper frame on the hot path), and, from the very same
expressions, :class:`ContractFunctions` for every other entry point (``dispatch()``, static dispatch,
``Runtime.run_exact``, ``inspection.cache_keys``, warm-up, the bench). ``op.calls.source`` holds the
generated code, so a reader can see an op's fast path whole: ``print(lz.ops.RMS_NORM.calls.source)``.
Where a contract names a ``compiled`` form (attention and the norms, :mod:`layerzero.accel`), the public
function is a builtin that serves the common cached hit as this code does and hands every other call to it.

What the keys and guards leave out (another device for ``k``, a dtype mismatch between ``q`` and ``v``, a
sparse tensor) makes the kernel raise; the runtime's executor then validates before it blames anyone
(:mod:`layerzero.runtime.executor`), so those inputs get the first call's answer too.
"""

from __future__ import annotations

import ast
import linecache
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerzero.accel import entry as compiled_entry
from layerzero.errors import LayerZeroError
from layerzero.policy.scope import LIVE, SCOPE

__all__ = ["CallContract", "ContractFunctions", "build", "LOOKUP_ERRORS"]

#: What building a key from malformed arguments raises (a float where a tensor belongs, an unhashable value).
LOOKUP_ERRORS = (AttributeError, TypeError, IndexError, RuntimeError, ValueError, ArithmeticError)


@dataclass(frozen=True)
class CallContract:
    """The declaration of one operation's cached call (see the module docstring).

    Every expression is Python over the canonical argument names in ``args`` (and ``operation``).

    Args:
        name: the public function's name (``"rms_norm"``).
        signature: its parameter list as written in ``def`` (``"x, weight=None, eps=1e-6"``).
        args: the canonical kernel arguments, in order (``"x, weight, eps"``); the last may be ``*rest``, a
            tuple of optional trailing arguments the prologue sets (attention's variants).
        operation: an expression for the operation name (a quoted constant, or a name the prologue sets).
        family: the shape-free part of the key.
        shape: the shapes the exact key adds (``"x.shape"``; several comma-separated).
        reads: statements binding names that ``family_guard`` and ``shape`` reuse (``""`` when none).
        shape_free: whether a family plan is looked up before the exact key.
        family_guard: the shape relations a shape-free plan needs (``"True"`` when there are none).
        guard: checks on values the keys do not carry exactly (``"True"`` when there are none).
        direct: the direct-call expression, used when ``plan.direct`` is set and ``direct_when`` holds.
        direct_when: when the direct form applies (``"scale is None"``).
        prologue: statements run first (argument normalisation: attention's layout and operation name).
        result: the expression returned (``"out"``; attention transposes BSHD back).
        namespace: the names the expressions use besides the arguments.
        doc: the public function's docstring.
        compiled: ``compiled(runtime)`` returns the compiled form of the cached hit (:mod:`layerzero.accel`), or
            None where there is none. The public function is then the compiled entry, which binds the arguments,
            serves the common cached hit and hands every other call, unchanged, to the generated entry.
    """

    name: str
    signature: str
    args: str
    operation: str
    family: str
    shape: str
    reads: str = ""
    shape_free: bool = False
    family_guard: str = "True"
    guard: str = "True"
    direct: str | None = None
    direct_when: str = "True"
    prologue: str = ""
    result: str = "out"
    namespace: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    compiled: Callable[[Any], Any] | None = None


class ContractFunctions:
    """What :func:`build` generates for one contract.

    Attributes:
        entry: the public op function (``lz.rms_norm``): ``python_entry``, or the compiled entry around it.
        python_entry: the generated entry (the whole call path in Python).
        lookup: ``lookup(plans, operation, *args) -> (plan | None, family | None, key | None)``: the cached
            plan a call may use, exactly as ``entry`` finds it (guards included); ``key`` is None when a
            guard failed (the call must go the slow, validating way and is not cached).
        keys: ``keys(operation, *args) -> (family | None, key)``: the plan-cache keys (raises on malformed
            arguments).
        admits: ``admits(operation, *args) -> bool``: whether the guards hold (static dispatch runs its fixed
            kernel only then, and validates otherwise).
        shapes_admit: ``family_guard`` alone (truthy or falsy, not necessarily a bool), for callers whose scalar arguments are fixed (the dispatchers'
            attention entries check ``scalars_admit`` once, when they are made, and this per call).
        scalars_admit: ``guard`` alone.
        compiled: the compiled hit (:mod:`layerzero.accel`) serving ``entry``'s cached hits, or None.
        source: the generated code.
    """

    __slots__ = ("entry", "python_entry", "lookup", "keys", "admits", "shapes_admit", "scalars_admit", "compiled",
                 "source")

    def __init__(self, namespace: Mapping[str, Any], entry: Callable[..., Any], python_entry: Callable[..., Any],
                 compiled: Any, source: str) -> None:
        self.entry = entry
        self.python_entry = python_entry
        self.lookup = namespace["lookup"]
        self.keys = namespace["keys"]
        self.admits = namespace["admits"]
        self.shapes_admit = namespace["shapes_admit"]
        self.scalars_admit = namespace["scalars_admit"]
        self.compiled = compiled
        self.source = source


_ENTRY = '''\
def {name}({signature}):
{prologue}    # ---- cached hot path: key -> plan -> kernel (declared in {name}'s CallContract) ----
    try:
        family = {family}
        scope = SCOPE.get() if LIVE.scopes else None
        plans = RT.plans.data if scope is None else scope.plans
{lookup_body}        if plan is not None and not ({guard}):
            plan = key = None  # a value the key does not carry exactly: the slow path validates it
    except LOOKUP_ERRORS:  # not a plain tensor, an unhashable value: validation names it
        plan = key = family = None
    if plan is None:
        out = RT.miss(OP, {operation}, key, ({args},), {miss_family})
    elif plan.gate.blocked:
        out = plan.run({args})
    else:
        plan.stats.calls += 1
        try:
            out = {call}
        except Exception as exc:
            out = RT.recover(plan, ({args},), 0, exc)
    return {result}


def lookup(plans, operation, {args}):
    try:
        family = {family}
{lookup_body}        if plan is not None and not ({guard}):
            return None, family, None
    except LOOKUP_ERRORS:
        return None, None, None
    return plan, {miss_family}, key


def keys(operation, {args}):
    family = {family}
{reads_4}    return {miss_family}, (family, {shape})


def admits(operation, {args}):
    return bool(shapes_admit(operation, {args}) and ({guard}))


def shapes_admit(operation, {args}):
    try:
{reads_8}        return {family_guard}
    except LOOKUP_ERRORS:
        return False


def scalars_admit(operation, {args}):
    return {guard}
'''

_SHAPE_FREE_LOOKUP = '''\
{reads}        plan = plans.get(family) if {family_guard} else None
        key = None
        if plan is None:
            key = (family, {shape})
            plan = plans.get(key)
'''

_EXACT_LOOKUP = '''\
{reads}        key = (family, {shape})
        plan = plans.get(key)
'''


def _indent(block: str, spaces: int) -> str:
    pad = " " * spaces
    return "".join(pad + line if line.strip() else line for line in block.splitlines(keepends=True))


_CODE_FIELDS = ("family", "shape", "reads", "family_guard", "guard", "direct", "direct_when", "prologue", "result",
                "operation", "args")
_BUILTINS_USED = frozenset({"len", "bool", "isinstance"})


def _check(contract: CallContract) -> None:
    """Refuse a declaration that does more than read its arguments: no dunder names, and calls only of
    methods, of the namespace's names and of a few builtins (the generated code is ours; this keeps it so)."""
    allowed = _BUILTINS_USED | set(contract.namespace)
    for name in _CODE_FIELDS:
        text = getattr(contract, name)
        if not text:
            continue
        if name == "args":  # a parameter list, which may end in ``*rest``: parsed as a tuple display
            text = f"({text.strip()},)"
        tree = ast.parse(text.strip(), mode="exec" if name in ("prologue", "reads") else "eval")
        for node in ast.walk(tree):
            ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
            if "__" in ident and ident != "__class__":
                raise LayerZeroError(f"CallContract {contract.name}.{name}: dunder name {ident!r} is not allowed")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in allowed:
                raise LayerZeroError(f"CallContract {contract.name}.{name}: call of {node.func.id!r} is not allowed")


def build(contract: CallContract, op: Any, runtime: Any) -> ContractFunctions:
    """Generate the op function and its lookup, keys and admits functions from ``contract``.

    ``op`` is the operation's :class:`~layerzero.ops.base.OpDef` and ``runtime`` the runtime its calls use.
    """
    c = contract
    _check(c)
    reads = c.reads.strip("\n") + "\n" if c.reads.strip() else ""
    fill = {"family_guard": c.family_guard, "shape": c.shape, "reads": _indent(reads, 8)}
    lookup_body = (_SHAPE_FREE_LOOKUP if c.shape_free else _EXACT_LOOKUP).format(**fill)
    direct = c.direct
    call = f"plan.fn({c.args})" if direct is None else (
        f"{direct} if plan.direct is not None and {c.direct_when} else plan.fn({c.args})")
    prologue = _indent(c.prologue.strip("\n") + "\n", 4) if c.prologue.strip() else ""
    source = _ENTRY.format(name=c.name, signature=c.signature, prologue=prologue, family=c.family,
                           lookup_body=lookup_body, guard=c.guard, operation=c.operation, args=c.args,
                           miss_family="family" if c.shape_free else "None", call=call, result=c.result,
                           shape=c.shape, family_guard=c.family_guard, reads_4=_indent(reads, 4),
                           reads_8=_indent(reads, 8))
    filename = f"<layerzero call contract: {c.name}>"
    namespace: dict[str, Any] = {"SCOPE": SCOPE, "LIVE": LIVE, "RT": runtime, "OP": op,
                                 "LOOKUP_ERRORS": LOOKUP_ERRORS, **c.namespace}
    exec(compile(source, filename, "exec"), namespace)  # our own declarations, never user input
    # tracebacks and inspect.getsource show the generated lines
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    python_entry = namespace[c.name]
    python_entry.__doc__ = c.doc
    python_entry.__module__ = module = getattr(op, "__module__", __name__)
    hit = c.compiled(runtime) if c.compiled is not None else None
    entry = python_entry if hit is None else compiled_entry(hit, python_entry, f"{c.name}({c.signature})\n--\n\n{c.doc}",
                                                            module)
    return ContractFunctions(namespace, entry, python_entry, hit, source)

