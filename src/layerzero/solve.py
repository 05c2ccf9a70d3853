"""Baked plans and warm-up: ``lz.solve`` (alias ``lz.compile``), ``PlanTable``, ``lz.warmup``.

``lz.solve`` runs selection once, ahead of time, for a fixed deployment's
shapes and writes the answers into a flat table keyed by operation, dtype,
device platform and shape bucket (``layerzero.tuning.buckets.bucket_of``: powers
of two for batch and sequence, exact heads / head dim / hidden size). A
deployment saves the table to a JSON file and installs it at start-up; from
then on a cache miss whose bucket is in the table builds its plan straight
from the table, with no selection. The table records the hardware fingerprint
and library versions it was made for; installing it elsewhere raises
``PlanMismatchError`` unless ``on_mismatch="dynamic"`` (ignore the table and
select dynamically, with a warning).

``lz.warmup`` runs each shape once through the operation so its plan is cached
before traffic (and before any CUDA graph capture).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerzero.context import SelectionContext, dtype_from_name
from layerzero.errors import ConfigError, InvalidInputError, PlanMismatchError
from layerzero.ops import canonical_operation, op_for
from layerzero.ops.names import operation_problem
from layerzero.registry import operation_matches
from layerzero.runtime import Runtime, get_runtime

__all__ = ["PlanTable", "solve", "compile", "warmup", "install_plan_table", "uninstall_plan_table"]

log = logging.getLogger("layerzero")

FORMAT_VERSION = 1
_MAX_ENTRIES = 100_000

ShapeSpec = SelectionContext | Mapping[str, Any]


def _bucket(operation: str, ctx: SelectionContext) -> str:
    from layerzero.tuning.buckets import bucket_of

    return bucket_of(operation, ctx)


def table_key(operation: str, ctx: SelectionContext) -> tuple[str, str, str, str]:
    """The key a baked table uses: operation, dtype name, platform, shape bucket."""
    return (operation, ctx.dtype_name or "-", ctx.platform, _bucket(operation, ctx))


def _environment(device: str) -> dict[str, Any]:
    from layerzero.tuning.fingerprint import hardware_fingerprint

    fp = hardware_fingerprint(device)
    return {"hardware": fp.to_dict(), "torch": torch.__version__,
            "backends": {b.name: b.version for b in get_runtime().backends.all() if b.available}}


@dataclass
class PlanTable:
    """A baked plan table: ``entries`` map (operation, dtype, platform, bucket) to ranked kernel ids."""

    environment: dict[str, Any]
    entries: dict[tuple[str, str, str, str], list[str]] = field(default_factory=dict)
    policy_digest: str = ""

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, operation: str, ctx: SelectionContext) -> list[str] | None:
        return self.entries.get(table_key(operation, ctx))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "environment": copy.deepcopy(self.environment),
                "policy_digest": self.policy_digest,
                "entries": [{"operation": o, "dtype": d, "platform": p, "bucket": b, "kernels": ks}
                            for (o, d, p, b), ks in sorted(self.entries.items())]}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return p

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan table") -> PlanTable:
        errors: list[str] = []
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a plan table must be a JSON object, got {type(data).__name__}")
        if type(data.get("format")) is not int or data.get("format") != FORMAT_VERSION:  # True == 1 == 1.0
            errors.append(f"format: must be {FORMAT_VERSION}, got {data.get('format')!r}")
        env = data.get("environment")
        if not isinstance(env, Mapping):
            errors.append("environment: must be an object")
        else:
            for key, kind in (("hardware", Mapping), ("backends", Mapping), ("torch", str)):
                if key in env and env[key] is not None and not isinstance(env[key], kind):
                    errors.append(f"environment.{key}: must be {'an object' if kind is Mapping else 'a string'}, "
                                  f"got {type(env[key]).__name__}")
        raw = data.get("entries")
        entries: dict[tuple[str, str, str, str], list[str]] = {}
        if not isinstance(raw, list):
            errors.append("entries: must be a list")
            raw = []
        if len(raw) > _MAX_ENTRIES:
            errors.append(f"entries: at most {_MAX_ENTRIES} entries, got {len(raw)}")
            raw = []
        for i, e in enumerate(raw):
            if not isinstance(e, Mapping):
                errors.append(f"entries[{i}]: must be an object")
                continue
            fields = [e.get(k) for k in ("operation", "dtype", "platform", "bucket")]
            kernels = e.get("kernels")
            if not all(isinstance(f, str) and 0 < len(f) < 512 for f in fields):
                errors.append(f"entries[{i}]: operation, dtype, platform and bucket must be short strings")
                continue
            if not isinstance(kernels, list) or not kernels or not all(isinstance(k, str) for k in kernels):
                errors.append(f"entries[{i}].kernels: must be a non-empty list of kernel ids")
                continue
            problem = _entry_problem(*fields)
            if problem is not None:
                errors.append(f"entries[{i}]: {problem}")
                continue
            if tuple(fields) in entries:
                errors.append(f"entries[{i}]: a second entry for ({', '.join(fields)}); each key may appear once")
                continue
            entries[tuple(fields)] = list(kernels)  # type: ignore[index]
        if errors:
            raise ConfigError(f"{source}: invalid plan table:\n  " + "\n  ".join(errors), errors=errors, source=source)
        return cls(dict(env or {}), entries, str(data.get("policy_digest", "")))

    @classmethod
    def load(cls, path: str | Path) -> PlanTable:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read plan table {p}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"plan table {p} is not UTF-8 text: {exc}") from None
        if len(text) > 64 * 2**20:
            raise ConfigError(f"plan table {p} is larger than 64 MiB")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer beyond Python's digit limit, nesting
            raise ConfigError(f"plan table {p} is not valid JSON: {type(exc).__name__}: {exc}") from None
        return cls.from_dict(data, str(p))

    def mismatch(self, device: str | None = None) -> list[str]:
        """How this machine differs from the one the table was made for (empty: it matches)."""
        platform = next((p for (_, _, p, _) in self.entries), "cpu")
        want = self.environment.get("hardware") or {}
        if device is None and platform == "cuda" and not torch.cuda.is_available():
            return [f"platform: table made for cuda ({want.get('device_name')!r}), this machine has no CUDA device"]
        here = _environment(device or platform)
        out = []
        have = here["hardware"]
        for k in ("platform", "device_name", "compute_capability", "driver_version", "cuda_version", "cpu_model"):
            if want.get(k) != have.get(k):
                out.append(f"{k}: table made for {want.get(k)!r}, this machine has {have.get(k)!r}")
        if self.environment.get("torch") != here["torch"]:
            out.append(f"torch: table made for {self.environment.get('torch')!r}, this machine has {here['torch']!r}")
        for name, version in (self.environment.get("backends") or {}).items():
            if here["backends"].get(name) != version:
                out.append(f"backend {name}: table made for {version!r}, this machine has "
                           f"{here['backends'].get(name)!r}")
        return out

    def install(self, *, on_mismatch: str = "error", runtime: Runtime | None = None) -> bool:
        """Put the table in force; see :func:`install_plan_table`."""
        return install_plan_table(self, on_mismatch=on_mismatch, runtime=runtime)


_PLATFORMS = ("cpu", "cuda", "mps", "xpu", "hip", "meta")


def _entry_problem(operation: str, dtype: str, platform: str, bucket: str) -> str | None:
    """Why an entry's key can never be looked up by a real call (an unknown operation, dtype or platform, a bucket
    that is no bucket), or None."""
    if canonical_operation(operation) != operation:
        return f"operation {operation!r} is not a canonical operation name ({canonical_operation(operation)!r})"
    problem = operation_problem(operation, (s.operation for s in get_runtime().kernels))
    if problem is not None:
        return problem
    if dtype != "-":
        try:
            dtype_from_name(dtype)
        except ValueError:
            return f"unknown dtype {dtype!r}"
    if platform not in _PLATFORMS:
        return f"platform must be one of {', '.join(_PLATFORMS)}, got {platform!r}"
    if bucket != "-" and not all("=" in part for part in bucket.split(";")):
        return f"bucket {bucket!r} is not a bucket (name=value;...)"
    return None


def _shape_fields(operation: str, shape: Mapping[str, Any], device: str | None, dtype: Any) -> dict[str, Any]:
    """A dict shape's SelectionContext fields, with the defaults of the call it stands for."""
    kw = dict(shape)
    kw.setdefault("device", device or "cpu")
    if dtype is not None:
        kw.setdefault("dtype", dtype)
    if operation == "attention.causal" or op_for(operation).family == "attention_paged":
        kw.setdefault("is_causal", True)  # the call's own default (lz.attention_paged is causal)
    if op_for(operation).family == "attention_paged":  # the page size is the context's hidden_size
        kw.setdefault("hidden_size", kw.pop("page_size", 16))  # 16: make_inputs' default
    return kw


def _contexts(operation: str, shapes: Iterable[ShapeSpec], device: str | None, dtype: Any) -> list[SelectionContext]:
    out = []
    for s in shapes:
        if isinstance(s, SelectionContext):
            ctx = s
        elif isinstance(s, Mapping):
            kw = _shape_fields(operation, s, device, dtype)
            try:
                ctx = SelectionContext(**kw)
            except TypeError as exc:
                raise InvalidInputError(f"solve/warmup: bad shape {dict(s)!r} for {operation}: {exc}") from None
        else:
            raise InvalidInputError(f"solve/warmup: a shape is a SelectionContext or a dict of its fields, "
                                    f"got {type(s).__name__}")
        out.append(ctx)
    return out


def call_context(operation: str, ctx: SelectionContext) -> SelectionContext:
    """The context a real call of the shape ``ctx`` describes builds, which its table entry must be keyed by: a
    shape's fields need not be the ones the call's context reads (a rope call counts rows as batch x heads x
    sequence, a sample call its rows as tokens), so the call's inputs are made, on the meta device, and read.
    The device, capability and mode flags stay ``ctx``'s."""
    op = op_for(operation)
    try:
        real = op.context(operation, op.make_inputs(operation, ctx.replace(device="meta")))
    except Exception:  # no meta form of this call: the shape as given
        return ctx
    return real.replace(device=ctx.device, compute_capability=ctx.compute_capability,
                        requires_grad=ctx.requires_grad, deterministic=ctx.deterministic, compiling=ctx.compiling,
                        cuda_graph_capturing=ctx.cuda_graph_capturing)


def solve(plan: Mapping[str, Sequence[ShapeSpec]], *, device: str | None = None, dtype: Any = None,
          path: str | Path | None = None) -> PlanTable:
    """Bake selection for a fixed deployment.

    Args:
        plan: ``{operation: [shape, ...]}``; a shape is a :class:`SelectionContext` or a dict of its
            fields (``{"batch_size": 8, "seq_len": 2048, "num_heads": 32, "num_kv_heads": 8,
            "head_dim": 128}``).
        device / dtype: defaults for dict shapes.
        path: also save the table there.

    Example:
        >>> table = lz.solve({"rms_norm": [{"hidden_size": 4096, "num_tokens": 8}]}, dtype="float32")
        >>> table.save("plans.json"); lz.PlanTable.load("plans.json").install()
    """
    rt = get_runtime()
    platforms = set()
    entries: dict[tuple[str, str, str, str], list[str]] = {}
    for operation, shapes in plan.items():
        op_for(operation)
        operation = canonical_operation(operation)  # the name real calls look the table up by
        for shape_ctx in _contexts(operation, shapes, device, dtype):
            if shape_ctx.dtype is None:  # keyed under dtype "-", which no call looks up: the entry would never apply
                raise InvalidInputError(f"solve(): a shape of {operation} has no dtype; pass dtype= (or the "
                                        f"shape's 'dtype') so that its entry applies to real calls")
            ctx = call_context(operation, shape_ctx)
            sel = rt.select(operation, ctx)
            entries[table_key(operation, ctx)] = [k.kernel_id for k in sel.ranked]
            platforms.add(ctx.platform)
    if len(platforms) > 1:
        raise InvalidInputError(f"solve(): one table is for one device type, got {sorted(platforms)}")
    dev = device or (next(iter(platforms)) if platforms else "cpu")
    table = PlanTable(_environment(dev), entries, rt.current_policy().digest)
    if path is not None:
        table.save(path)
    return table


compile = solve  # noqa: A001  (the SPEC's name: lz.compile bakes a plan table)


def install_plan_table(table: PlanTable | str | Path, *, on_mismatch: str = "error",
                       runtime: Runtime | None = None) -> bool:
    """Install a baked table into the runtime (cached plans are dropped).

    Args:
        on_mismatch: ``"error"`` raises ``PlanMismatchError`` when the table was made for other hardware
            or library versions; ``"dynamic"`` logs a warning, installs nothing and keeps dynamic selection.

    Returns:
        True when the table is in force.
    """
    if on_mismatch not in ("error", "dynamic"):
        raise InvalidInputError(f"on_mismatch must be 'error' or 'dynamic', got {on_mismatch!r}")
    if not isinstance(table, PlanTable):
        table = PlanTable.load(table)
    rt = runtime or get_runtime()
    problems = table.mismatch()
    if problems:
        msg = "baked plan table does not match this machine:\n  " + "\n  ".join(problems)
        if on_mismatch == "error":
            raise PlanMismatchError(msg + "\n(re-run lz.solve here, or install with on_mismatch='dynamic')")
        log.warning("%s; using dynamic selection instead", msg.replace("\n", " "))
        return False
    _check_kernels(table, rt)  # a table made here: every kernel it names must exist here
    rt.baked = table
    rt.invalidate("baked plan table installed")
    return True


def _check_kernels(table: PlanTable, rt: Runtime) -> None:
    """Every kernel an entry ranks exists here and implements the entry's operation (``ConfigError`` listing
    each that does not): an edited table naming an attention kernel for rms_norm would hand it rms_norm's
    arguments and count its failures against it."""
    errors = []
    for (operation, dtype, platform, bucket), kernels in sorted(table.entries.items()):
        for kid in kernels:
            spec = rt.kernels.find(kid)
            where = f"entry ({operation}, {dtype}, {platform}, {bucket})"
            if spec is None:
                errors.append(f"{where}: unknown kernel {kid!r}")
            elif not operation_matches(spec.operation, operation):
                errors.append(f"{where}: kernel {kid!r} implements {spec.operation!r}, not {operation!r}")
    if errors:
        raise ConfigError("plan table names kernels it cannot use:\n  " + "\n  ".join(errors), errors=errors)


def uninstall_plan_table(runtime: Runtime | None = None) -> None:
    rt = runtime or get_runtime()
    rt.baked = None
    rt.invalidate("baked plan table removed")


def warmup(operation: str | Sequence[str], shapes: Sequence[ShapeSpec], *, device: str | None = None,
           dtype: Any = None, progress: bool = True) -> int:
    """Run each shape once through ``operation`` so its plan is cached (with a progress bar).

    Returns the number of plans now cached for those shapes.

    Example:
        >>> lz.warmup("attention.causal", [{"batch_size": 1, "seq_len": 128, "num_heads": 8, "head_dim": 64}])
    """
    from layerzero.inspection import cache_key

    ops = [canonical_operation(o) for o in ([operation] if isinstance(operation, str) else list(operation))]
    rt = get_runtime()
    jobs = [(o, ctx) for o in ops for ctx in _contexts(o, shapes, device, dtype)]
    done = 0
    bar = None
    if progress and jobs:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("layerzero warmup", total=len(jobs))
    try:
        for o, ctx in jobs:
            op = op_for(o)
            args = _warmup_inputs(rt, op, o, ctx)
            key = cache_key(o, args)
            rt.miss(op, o, key, args)
            done += key is not None and key in rt.visible_plans()
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return done


def _warmup_inputs(rt: Runtime, op: Any, operation: str, ctx: SelectionContext) -> tuple[Any, ...]:
    """Inputs of the call ``ctx`` describes, made on its device; what cannot run here raises as ``solve`` does
    (``NoKernelError`` for a dtype no kernel takes), or ``InvalidInputError`` naming the shape."""
    if ctx.platform == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"warmup(): {operation} on device cuda, which this machine does not have")
    try:
        return op.make_inputs(operation, ctx)  # type: ignore[no-any-return]
    except Exception as exc:
        rt.select(operation, call_context(operation, ctx))  # no kernel at all for it: NoKernelError, as solve's
        raise InvalidInputError(f"warmup(): cannot make inputs of {operation} for {ctx.to_dict()}: "
                                f"{type(exc).__name__}: {exc}") from exc
