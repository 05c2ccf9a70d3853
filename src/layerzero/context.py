"""SelectionContext: everything kernel selection looks at, as one frozen value.

A context is built from tensors on a cache miss (``from_attention`` and
friends) or written out by hand (tests, ``layerzero explain``, policy tools):

    SelectionContext(batch_size=8, seq_len=2048, dtype=torch.float16,
                     device="cuda", compute_capability=(9, 0), is_causal=True)

Nothing here queries hardware when the caller states it, so selection can be
tested for a fake sm_90 GPU on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from layerzero.errors import InvalidInputError

__all__ = ["SelectionContext", "DTYPE_NAMES", "dtype_from_name", "dtype_name", "bucket_pow2"]

_MISSING: Any = object()

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}
_DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
_DTYPE_BY_NAME.update({"fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
                       "fp32": torch.float32, "float": torch.float32, "fp64": torch.float64,
                       "double": torch.float64})


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.").lower()
    try:
        return _DTYPE_BY_NAME[key]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPE_BY_NAME)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, ``torch.int8`` -> ``"int8"``: the names messages and conditions use."""
    return DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def bucket_pow2(n: int | None) -> int | None:
    """Round ``n`` up to the next power of two (1 -> 1, 5 -> 8); None stays None."""
    if n is None or n <= 1:
        return n
    return 1 << (n - 1).bit_length()


_cc_cache: dict[int, tuple[int, int] | None] = {}


def _cuda_capability(index: int | None) -> tuple[int, int] | None:
    idx = 0 if index is None else index
    if idx not in _cc_cache:
        try:
            _cc_cache[idx] = tuple(torch.cuda.get_device_capability(idx)) if torch.cuda.is_available() else None  # type: ignore[assignment]
        except Exception:  # a broken driver means "unknown", never a crash in selection
            _cc_cache[idx] = None
    return _cc_cache[idx]


def _capability(dev: torch.device, given: Any) -> tuple[int, int] | None:
    """``compute_capability`` as a ``(major, minor)`` pair: probed on CUDA when not given, ``90`` -> ``(9, 0)``."""
    if given is _MISSING:
        return _cuda_capability(dev.index) if dev.type == "cuda" else None
    if isinstance(given, int):
        return (given // 10, given % 10)
    return None if given is None else (int(given[0]), int(given[1]))


_SIZES = ("batch_size", "seq_len", "seq_len_q", "seq_len_k", "num_heads", "num_kv_heads", "head_dim", "head_dim_v",
          "hidden_size", "num_tokens")
_FLAGS = ("is_causal", "softcap", "sinks", "alibi", "requires_grad", "deterministic", "is_contiguous",
          "cuda_graph_capturing", "compiling", "interleaved")
_CHOICES = {"layout": (None, "BHSD", "BSHD"), "mask_kind": ("none", "bool", "additive"), "approximate": ("none", "tanh")}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _problems(given: dict[str, Any]) -> list[str]:
    """Every problem of the constructor's arguments (a string where a size belongs would reach selection's
    comparisons as a bare TypeError; ``bool("false")`` is True)."""
    out = [f"{n} must be an int >= 0 or None, got {given[n]!r}" for n in _SIZES  # (a traced SymInt passes)
           if given[n] is not None and not isinstance(given[n], torch.SymInt) and not (_is_int(given[n])
                                                                                        and given[n] >= 0)]
    out += [f"{n} must be a bool, got {given[n]!r}" for n in _FLAGS
            if not (isinstance(given[n], bool) or given[n] in (0, 1) and _is_int(given[n]))]
    out += [f"{n} must be one of {', '.join(map(repr, c))}, got {given[n]!r}" for n, c in _CHOICES.items()
            if not isinstance(given[n], (str, type(None))) or given[n] not in c]
    cc, window, p, scale = (given[n] for n in ("compute_capability", "window", "dropout_p", "scale"))
    if not (cc is _MISSING or cc is None or _is_int(cc) and cc >= 0 or isinstance(cc, (tuple, list)) and len(cc) == 2
            and all(_is_int(c) and c >= 0 for c in cc)):
        out.append(f"compute_capability must be (major, minor), an int like 90, or None, got {cc!r}")
    if window is not None and not (_is_int(window) and window >= 1):
        out.append(f"window must be an int >= 1 or None, got {window!r}")
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):  # (False is 0.0, as the ops read it)
        out.append(f"dropout_p must be a number in [0, 1), got {p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        out.append(f"scale must be a number or None, got {scale!r}")
    tp_size, tp_rank = given["tp_size"], given["tp_rank"]
    if not (_is_int(tp_size) and tp_size >= 1 and _is_int(tp_rank) and 0 <= tp_rank < tp_size):
        out.append(f"tp_size must be an int >= 1 and tp_rank an int in [0, tp_size), got {tp_size!r} and {tp_rank!r}")
    return out


def _device(device: Any) -> torch.device:
    try:
        return device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"SelectionContext: device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, "
                                f"got {device!r} ({exc})") from None


@dataclass(frozen=True, slots=True, init=False)
class SelectionContext:
    """What selection looks at for one call. Frozen, slotted and hashable.

    Args (all keyword-only, all optional):
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        compute_capability: ``(9, 0)`` or ``90``; looked up for a real CUDA device when omitted.
        dtype: a ``torch.dtype`` or its name (``"bfloat16"``).
        batch_size, seq_len (sets both seq_len_q and seq_len_k), seq_len_q, seq_len_k,
        num_heads, num_kv_heads, head_dim, head_dim_v: attention geometry.
        hidden_size, num_tokens: last dimension and row count for norms / activations / sampling.
        layout: ``"BHSD"`` or ``"BSHD"``.
        is_causal, mask_kind (``"none"``, ``"bool"``, ``"additive"``), dropout_p, scale, window.
        softcap, sinks, alibi: whether the attention call has a logit softcap, attention sinks, ALiBi slopes.
        requires_grad, deterministic, is_contiguous, cuda_graph_capturing, compiling.
        interleaved (rope), approximate (gelu), tp_size, tp_rank.
    """

    platform: str
    device_index: int | None
    compute_capability: tuple[int, int] | None
    dtype: torch.dtype | None
    batch_size: int | None
    seq_len_q: int | None
    seq_len_k: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    head_dim_v: int | None
    hidden_size: int | None
    num_tokens: int | None
    layout: str | None
    is_causal: bool
    mask_kind: str
    dropout_p: float
    scale: float | None
    window: int | None
    softcap: bool
    sinks: bool
    alibi: bool
    requires_grad: bool
    deterministic: bool
    is_contiguous: bool
    cuda_graph_capturing: bool
    compiling: bool
    interleaved: bool
    approximate: str
    tp_size: int
    tp_rank: int

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        compute_capability: tuple[int, int] | int | None = _MISSING,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        seq_len: int | None = None,
        seq_len_q: int | None = None,
        seq_len_k: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        head_dim_v: int | None = None,
        hidden_size: int | None = None,
        num_tokens: int | None = None,
        layout: str | None = None,
        is_causal: bool = False,
        mask_kind: str = "none",
        dropout_p: float = 0.0,
        scale: float | None = None,
        window: int | None = None,
        softcap: bool = False,
        sinks: bool = False,
        alibi: bool = False,
        requires_grad: bool = False,
        deterministic: bool = False,
        is_contiguous: bool = True,
        cuda_graph_capturing: bool = False,
        compiling: bool = False,
        interleaved: bool = False,
        approximate: str = "none",
        tp_size: int = 1,
        tp_rank: int = 0,
    ) -> None:
        problems = _problems(locals())
        dev = _device(device)
        try:
            dtype = dtype_from_name(dtype) if dtype is not None else None
        except (ValueError, TypeError) as exc:
            problems.insert(0, f"dtype: {exc}")
        if problems:
            raise InvalidInputError("SelectionContext: " + "; ".join(problems))
        platform = dev.type
        compute_capability = _capability(dev, compute_capability)
        if seq_len is not None:
            seq_len_q = seq_len if seq_len_q is None else seq_len_q
            seq_len_k = seq_len if seq_len_k is None else seq_len_k
        if num_heads is not None and num_kv_heads is None:
            num_kv_heads = num_heads
        if head_dim is not None and head_dim_v is None:
            head_dim_v = head_dim
        values = dict(
            platform=platform, device_index=dev.index, compute_capability=compute_capability,
            dtype=dtype,
            batch_size=batch_size, seq_len_q=seq_len_q, seq_len_k=seq_len_k, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, head_dim_v=head_dim_v, hidden_size=hidden_size,
            num_tokens=num_tokens, layout=layout, mask_kind=mask_kind, dropout_p=float(dropout_p),
            scale=None if scale is None else float(scale), window=window, approximate=approximate,
            tp_size=int(tp_size), tp_rank=int(tp_rank),
            # the flags, as bools
            is_causal=bool(is_causal), softcap=bool(softcap), sinks=bool(sinks), alibi=bool(alibi),
            requires_grad=bool(requires_grad), deterministic=bool(deterministic), is_contiguous=bool(is_contiguous),
            cuda_graph_capturing=bool(cuda_graph_capturing), compiling=bool(compiling), interleaved=bool(interleaved),
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def _of_tensor(cls, t: torch.Tensor, **given: Any) -> SelectionContext:
        """The constructor's work for ``from_attention`` / ``from_rows``, whose values come from tensors and from
        arguments validation has passed: no checks (they were most of a miss's context cost), the same fields."""
        unknown = given.keys() - _TRUSTED_NAMES
        if unknown:
            raise TypeError(f"SelectionContext got unexpected keyword arguments {sorted(unknown)}")
        self = object.__new__(cls)
        dev = t.device
        cap = _cuda_capability(dev.index) if dev.type == "cuda" else None
        put = object.__setattr__
        for name, value in _TRUSTED_DEFAULTS:
            put(self, name, given.get(name, value))
        put(self, "platform", dev.type)
        put(self, "device_index", dev.index)
        put(self, "compute_capability", cap)
        put(self, "dtype", t.dtype)
        if self.num_heads is not None and self.num_kv_heads is None:
            put(self, "num_kv_heads", self.num_heads)
        if self.head_dim is not None and self.head_dim_v is None:
            put(self, "head_dim_v", self.head_dim)
        if self.scale is not None:
            put(self, "scale", float(self.scale))
        put(self, "dropout_p", float(self.dropout_p))
        for name in _FLAGS:
            if name in given:
                put(self, name, bool(given[name]))
        return self

    # -- derived fields (also visible to policy conditions) -----------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.platform, self.device_index)

    @property
    def sm(self) -> int:
        """Compute capability as an integer (80, 90); 0 when there is none (CPU)."""
        cc = self.compute_capability
        return cc[0] * 10 + cc[1] if cc else 0

    @property
    def seq_len(self) -> int | None:
        return self.seq_len_q

    @property
    def dtype_name(self) -> str | None:
        return None if self.dtype is None else dtype_name(self.dtype)

    @property
    def is_gqa(self) -> bool:
        return bool(self.num_heads and self.num_kv_heads and self.num_kv_heads not in (1, self.num_heads))

    @property
    def is_mqa(self) -> bool:
        return bool(self.num_heads and self.num_kv_heads == 1 and self.num_heads > 1)

    def replace(self, **changes: Any) -> SelectionContext:
        """A copy with some fields changed (``device=`` accepted like the constructor)."""
        kwargs = self.as_kwargs()
        if "device" in changes and "compute_capability" not in changes:
            kwargs.pop("compute_capability")
        kwargs.update(changes)
        return SelectionContext(**kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["device"] = torch.device(out.pop("platform"), out.pop("device_index"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (dtype by name, device as a string), plus ``sm`` and ``seq_len``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = self.dtype_name
        out["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        out["device"] = str(self.device)
        out["sm"] = self.sm
        out["seq_len"] = self.seq_len
        return out

    def bucketed(self) -> SelectionContext:
        """The same context with batch and sequence lengths rounded up to powers of two."""
        return self.replace(
            batch_size=bucket_pow2(self.batch_size),
            seq_len_q=bucket_pow2(self.seq_len_q),
            seq_len_k=bucket_pow2(self.seq_len_k),
            num_tokens=bucket_pow2(self.num_tokens),
        )

    # -- builders from tensors (used on cache misses) ------------------------
    @classmethod
    def from_attention(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        dropout_p: float = 0.0,
        scale: float | None = None,
        layout: str = "BHSD",
        window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> SelectionContext:
        """Context for ``lz.attention``; q/k/v must already be validated 4-D tensors."""
        if layout == "BSHD":
            b, sq, h, d = q.shape
            sk, hkv = k.shape[1], k.shape[2]
        else:
            b, h, sq, d = q.shape
            hkv, sk = k.shape[1], k.shape[2]
        if attn_mask is None:
            mask_kind = "none"
        elif attn_mask.dtype == torch.bool:
            mask_kind = "bool"
        else:
            mask_kind = "additive"
        return cls._of_tensor(
            q,
            batch_size=b,
            seq_len_q=sq,
            seq_len_k=sk,
            num_heads=h,
            num_kv_heads=hkv,
            head_dim=d,
            head_dim_v=v.shape[-1],
            layout=layout,
            is_causal=is_causal,
            mask_kind=mask_kind,
            dropout_p=dropout_p,
            scale=scale,
            window=window,
            softcap=softcap is not None,
            sinks=sinks is not None,
            alibi=alibi_slopes is not None,
            requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            is_contiguous=q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
            cuda_graph_capturing=_capturing(q),
            compiling=_compiling(),
        )

    @classmethod
    def from_rows(cls, x: torch.Tensor, *, requires_grad: bool | None = None, **extra: Any) -> SelectionContext:
        """Context for row-wise ops (norms, activations, rope, sampling): last dim is hidden."""
        hidden = x.shape[-1] if x.dim() else 1
        rows = x.numel() // hidden if hidden else 0
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and x.requires_grad
        return cls._of_tensor(
            x,
            hidden_size=hidden,
            num_tokens=rows,
            batch_size=x.shape[0] if x.dim() > 1 else 1,
            requires_grad=requires_grad,
            deterministic=torch.are_deterministic_algorithms_enabled(),
            is_contiguous=x.is_contiguous(),
            cuda_graph_capturing=_capturing(x),
            compiling=_compiling(),
            **extra,
        )


#: Every field ``_of_tensor`` fills from its arguments, with the constructor's defaults (the device, dtype and
#: compute capability come from the tensor): read off the constructor, so that the two cannot drift apart.
_TRUSTED_DEFAULTS: tuple[tuple[str, Any], ...] = tuple(
    (name, p.default) for name, p in inspect.signature(SelectionContext.__init__).parameters.items()
    if name in {f.name for f in dataclasses.fields(SelectionContext)} and name not in ("dtype", "compute_capability"))
_TRUSTED_NAMES = frozenset(name for name, _ in _TRUSTED_DEFAULTS)


def _capturing(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:
        return False


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:
        return False
