"""Shape grids for ``layerzero tune`` and ``scripts/gpu_bench.py``, and the ``--shapes`` parser.

A grid is a list of :class:`SelectionContext` values for one operation. The
``default`` CUDA grid is the one the GPU benchmark reports (prefill and
decode, MHA / GQA / MQA, head dims 64, 128 and 256, bf16 and fp16, batch 1-64,
sequence 128-16k; rms_norm from 1 to 32k rows of 2k-8k; geglu (tanh, Gemma's MLP)
from 1 to 4k tokens of 16k-24k intermediate features; cross_entropy from 1k to 8k
tokens over vocabularies of 32k-128k; linear_cross_entropy from 512 to 16k training tokens of 2k-4k into
32k-128k). ``quick`` is a
handful of those shapes. CPU grids are small float32 shapes.

Decode shapes (one query token) belong to ``attention.full``: with SDPA's
upper-left causal alignment a causal single-token query would see only the
first key, so real decoding calls attention without ``is_causal``.
"""

from __future__ import annotations

from typing import Any

import torch

from layerzero.context import SelectionContext, dtype_from_name
from layerzero.ops import canonical_operation

__all__ = ["GRID_NAMES", "grid", "parse_shape", "contexts_for_shapes", "compiled_contexts", "ATTENTION_PREFILL", "ATTENTION_DECODE",
           "ROWS", "ATTENTION_FULL", "GEGLU_ROWS", "VOCAB_ROWS", "LCE_ROWS", "VARLEN", "PAGED"]

GRID_NAMES: tuple[str, ...] = ("quick", "default")

# (batch, seq, heads, kv_heads, head_dim): causal prefill.
ATTENTION_PREFILL: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 512, 32, 8, 128), (1, 2048, 32, 8, 128), (1, 8192, 32, 8, 128), (1, 16384, 32, 8, 128),
    (4, 1024, 32, 32, 128), (8, 512, 16, 16, 64), (16, 128, 12, 12, 64), (64, 128, 16, 16, 64),
    (2, 4096, 16, 16, 256), (1, 2048, 8, 8, 256),
)
# (batch, seq, heads, kv_heads, head_dim): non-causal (encoder-style) prefill, attention.full.
ATTENTION_FULL: tuple[tuple[int, int, int, int, int], ...] = ((8, 512, 16, 16, 64), (16, 128, 12, 12, 64))
# (batch, kv_len, heads, kv_heads, head_dim): one query token, attention.full.
ATTENTION_DECODE: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16384, 32, 8, 128), (8, 8192, 32, 4, 128), (32, 4096, 32, 8, 128), (64, 2048, 32, 8, 128),
    (16, 1024, 16, 16, 64), (4, 4096, 8, 1, 256),
)
# (rows, hidden): rms_norm / layer_norm / activations.
ROWS: tuple[tuple[int, int], ...] = (
    (1, 4096), (1, 8192), (128, 4096), (2048, 2048), (4096, 4096), (8192, 8192), (16384, 8192), (32768, 2048),
)
# (tokens, intermediate size): geglu, the tanh GELU of Gemma's MLP (Gemma 2B: 16384, 7B: 24576).
GEGLU_ROWS: tuple[tuple[int, int], ...] = ((1, 16384), (128, 16384), (2048, 16384), (4096, 24576))
# (tokens, vocabulary): cross_entropy over a language model's logits (Llama 2: 32000, Llama 3: 128256).
VOCAB_ROWS: tuple[tuple[int, int], ...] = ((1024, 32000), (4096, 32000), (4096, 128256), (8192, 128256))
# (tokens, hidden, vocabulary): linear_cross_entropy, an LM head and its loss in training (the Llama 1B
# shape: 4 x 2048 tokens of 2048 into 128256).
LCE_ROWS: tuple[tuple[int, int, int], ...] = ((512, 2048, 128256), (4096, 4096, 32000), (8192, 2048, 128256),
                                              (16384, 4096, 128256))
# (batch, longest sequence, heads, kv_heads, head_dim): causal packed batches, attention_varlen.
VARLEN: tuple[tuple[int, int, int, int, int], ...] = (
    (8, 2048, 32, 8, 128), (16, 4096, 32, 8, 128), (64, 1024, 16, 16, 64), (4, 8192, 32, 8, 128),
)
# (batch, seq_q, context, heads, kv_heads, head_dim): paged decode (seq_q 1) and chunked prefill, pages of 16.
PAGED: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 1, 4096, 32, 8, 128), (16, 1, 8192, 32, 8, 128), (64, 1, 2048, 32, 8, 128), (8, 1, 32768, 32, 8, 128),
    (4, 256, 4096, 32, 8, 128),
)
_QUICK_PREFILL = ((1, 2048, 32, 8, 128), (8, 512, 16, 16, 64))
_QUICK_DECODE = ((32, 4096, 32, 8, 128),)
_QUICK_ROWS = ((128, 4096), (4096, 4096), (16384, 8192))

_CPU_ATTN = ((1, 128, 8, 8, 64), (2, 256, 8, 2, 64))
_CPU_DECODE = ((4, 256, 8, 8, 64),)
_CPU_ROWS = ((1, 1024), (256, 1024), (2048, 2048))
_CPU_VOCAB = ((8, 1000), (256, 4096))
_CPU_LCE = ((64, 64, 4096), (512, 128, 8192))
_CPU_VARLEN = ((4, 128, 8, 2, 64), (8, 64, 8, 8, 64))
_CPU_PAGED = ((4, 1, 256, 8, 2, 64), (2, 16, 256, 8, 8, 64))


def _ragged(operation: str, device: str, dt: torch.dtype, cuda: bool, quick: bool) -> list[SelectionContext]:
    """attention_varlen / attention_paged contexts (causal; the paged page size, 16, is ``hidden_size``)."""
    if canonical_operation(operation) == "attention_varlen":
        shapes = (VARLEN[:1] if quick else VARLEN) if cuda else (_CPU_VARLEN[:1] if quick else _CPU_VARLEN)
        return [_attn(device, dt, b, s, s, h, hkv, d, True) for b, s, h, hkv, d in shapes]
    rows = (PAGED[1:2] if quick else PAGED) if cuda else (_CPU_PAGED[:1] if quick else _CPU_PAGED)
    return [_attn(device, dt, b, sq, sk, h, hkv, d, True).replace(hidden_size=16, num_tokens=b * sq)
            for b, sq, sk, h, hkv, d in rows]


def _attn(device: str, dtype: torch.dtype, b: int, sq: int, sk: int, h: int, hkv: int, d: int, causal: bool
          ) -> SelectionContext:
    return SelectionContext(device=device, dtype=dtype, batch_size=b, seq_len_q=sq, seq_len_k=sk, num_heads=h,
                            num_kv_heads=hkv, head_dim=d, is_causal=causal, layout="BHSD")


def _rows(device: str, dtype: torch.dtype, n: int, hidden: int, **extra: Any) -> SelectionContext:
    return SelectionContext(device=device, dtype=dtype, num_tokens=n, hidden_size=hidden, batch_size=n, **extra)


def grid(operation: str, name: str = "default", *, device: str = "cuda",
         dtypes: tuple[torch.dtype, ...] | None = None) -> list[SelectionContext]:
    """The contexts of grid ``name`` for ``operation`` on ``device``.

    Args:
        operation: ``attention.causal``, ``attention.full``, ``attention.decode``, ``rms_norm``, ``layer_norm``,
            ``swiglu``, ``geglu`` (tanh form), ``silu``, ``gelu``, ``rope``, ``cross_entropy`` (hidden size =
            vocabulary), ``linear_cross_entropy`` (hidden size = vocabulary, head_dim = hidden width; training),
            ``attention_varlen`` (causal packed batches) or ``attention_paged`` (decode and chunked prefill over
            pages of 16 tokens).
        name: ``"quick"`` or ``"default"``.
        device: ``"cuda"`` (bf16 and fp16 by default) or ``"cpu"`` (float32).
        dtypes: override the dtypes.

    Example:
        >>> len(grid("attention.causal", "default"))  # 10 shapes x bf16, fp16
        20
    """
    if name not in GRID_NAMES:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRID_NAMES)}")
    cuda = torch.device(device).type == "cuda"
    if dtypes is None:
        dtypes = (torch.bfloat16, torch.float16) if cuda else (torch.float32,)
    quick = name == "quick"
    family = canonical_operation(operation).split(".", 1)[0]  # attention.paged is attention_paged
    out: list[SelectionContext] = []
    for dt in dtypes:
        if family == "attention":
            causal = operation.endswith(".causal")
            decode = operation.endswith(".decode") or operation == "attention.full"
            if cuda:
                prefill = _QUICK_PREFILL if quick else ATTENTION_PREFILL
                dec = _QUICK_DECODE if quick else ATTENTION_DECODE
            else:
                prefill, dec = (_CPU_ATTN[:1] if quick else _CPU_ATTN), _CPU_DECODE
            if operation == "attention.full":
                prefill = prefill[:1] if quick else (ATTENTION_FULL if cuda else prefill)
            if not operation.endswith(".decode"):
                for b, s, h, hkv, d in prefill:
                    out.append(_attn(device, dt, b, s, s, h, hkv, d, causal))
            if decode and not causal:
                for b, sk, h, hkv, d in dec:
                    out.append(_attn(device, dt, b, 1, sk, h, hkv, d, False))
        elif family in ("attention_varlen", "attention_paged"):
            out += _ragged(operation, device, dt, cuda, quick)
        elif family == "rope":
            for b, s, h, _hkv, d in (_QUICK_PREFILL if quick else ATTENTION_PREFILL[:6]) if cuda else _CPU_ATTN:
                out.append(SelectionContext(device=device, dtype=dt, batch_size=b, seq_len=s, num_heads=h,
                                            head_dim=d, hidden_size=d, num_tokens=b * h * s))
        elif family == "cross_entropy":
            rows = (VOCAB_ROWS[1:2] if quick else VOCAB_ROWS) if cuda else (_CPU_VOCAB[:1] if quick else _CPU_VOCAB)
            for n, vocab in rows:
                out.append(_rows(device, dt, n, vocab))
        elif family == "linear_cross_entropy":
            lce = (LCE_ROWS[2:3] if quick else LCE_ROWS) if cuda else (_CPU_LCE[:1] if quick else _CPU_LCE)
            for n, hidden, vocab in lce:
                out.append(_rows(device, dt, n, vocab, head_dim=hidden, requires_grad=True))
        elif family == "geglu":
            rows = (GEGLU_ROWS[2:3] if quick else GEGLU_ROWS) if cuda else (_CPU_ROWS[:2] if quick else _CPU_ROWS)
            for n, hidden in rows:
                out.append(_rows(device, dt, n, hidden, approximate="tanh"))
        else:
            rows = (_QUICK_ROWS if quick else ROWS) if cuda else (_CPU_ROWS[:2] if quick else _CPU_ROWS)
            for n, hidden in rows:
                out.append(_rows(device, dt, n, hidden))
    return out


_ALIASES = {
    "b": "batch_size", "batch": "batch_size", "batch_size": "batch_size",
    "s": "seq_len", "seq": "seq_len", "seq_len": "seq_len",
    "sq": "seq_len_q", "seq_q": "seq_len_q", "seq_len_q": "seq_len_q",
    "sk": "seq_len_k", "seq_k": "seq_len_k", "seq_len_k": "seq_len_k", "kv_len": "seq_len_k",
    "h": "num_heads", "heads": "num_heads", "num_heads": "num_heads",
    "kv": "num_kv_heads", "hkv": "num_kv_heads", "kv_heads": "num_kv_heads", "num_kv_heads": "num_kv_heads",
    "d": "head_dim", "head_dim": "head_dim",
    "rows": "num_tokens", "n": "num_tokens", "tokens": "num_tokens", "num_tokens": "num_tokens",
    "hidden": "hidden_size", "hidden_size": "hidden_size",
    "dtype": "dtype",
    "grad": "requires_grad", "requires_grad": "requires_grad",
}


def parse_shape(text: str) -> dict[str, Any]:
    """``"b=8,s=2048,h=32,kv=8,d=128"`` or ``"rows=4096,hidden=4096,dtype=bf16"`` -> context keyword args
    (``grad=1``: the training bucket, whose kernels the tuner times forward + backward).

    Raises:
        ValueError: an unknown key or a value that is not a positive integer (the message names it).
    """
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"shape {text!r}: {part!r} is not key=value")
        key, _, value = (x.strip() for x in part.partition("="))
        name = _ALIASES.get(key.lower())
        if name is None:
            raise ValueError(f"shape {text!r}: unknown key {key!r}; known keys: {', '.join(sorted(_ALIASES))}")
        if name == "dtype":
            out[name] = dtype_from_name(value)
            continue
        if name == "requires_grad":  # grad=1: the training bucket, timed forward + backward
            if value not in ("0", "1"):
                raise ValueError(f"shape {text!r}: {key}={value!r} must be 0 or 1")
            out[name] = value == "1"
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"shape {text!r}: {key}={value!r} is not an integer") from None
        if n < 1 or n > 1 << 24:
            raise ValueError(f"shape {text!r}: {key}={n} is out of range 1..{1 << 24}")
        out[name] = n
    if not out:
        raise ValueError(f"shape {text!r} is empty")
    return out


def contexts_for_shapes(operation: str, shapes: list[str], *, device: str,
                        dtypes: tuple[torch.dtype, ...]) -> list[SelectionContext]:
    """Contexts for ``operation`` from ``--shapes`` strings (shapes missing the op's dimensions are skipped).

    ``attention_varlen`` and ``attention_paged`` shapes are causal (packed training, decoding), the paged
    ones with pages of ``hidden=`` tokens (16 when not given).
    """
    family = canonical_operation(operation).split(".", 1)[0]
    ragged = family in ("attention_varlen", "attention_paged")
    out = []
    for text in shapes:
        kw = parse_shape(text)
        dts = (kw.pop("dtype"),) if "dtype" in kw else dtypes
        if family == "attention" or ragged:
            if not ({"seq_len", "seq_len_q", "seq_len_k"} & kw.keys()):
                continue
            kw.setdefault("batch_size", 1)
            kw.setdefault("num_heads", 8)
            kw.setdefault("head_dim", 64)
            if family == "attention_paged":
                kw.setdefault("hidden_size", 16)
            causal = operation.endswith(".causal") or ragged
            for dt in dts:
                out.append(SelectionContext(device=device, dtype=dt, is_causal=causal, layout="BHSD", **kw))
        else:
            if "hidden_size" not in kw:
                continue
            kw.setdefault("num_tokens", kw.get("batch_size", 1))
            kw.setdefault("batch_size", kw["num_tokens"])
            for dt in dts:
                out.append(SelectionContext(device=device, dtype=dt, **kw))
    return out


def compiled_contexts(operation: str, contexts: list[SelectionContext]) -> list[SelectionContext]:
    """``contexts`` as compiled-mode buckets (``compiling=True``, stored under ``;compiled=1``): the tuner
    times each kernel as a ``torch.compile`` graph runs it (Inductor's code for the native op, an opaque
    kernel inside the dispatched op).

    Raises:
        InvalidInputError: ``operation`` is not row-wise (attention under compile is ranked as in eager); a
            ``ValueError`` as the other problems of a grid.
    """
    from layerzero.integrations.compile.timed import compiled_family

    compiled_family(operation)
    return [c.replace(compiling=True) for c in contexts]
