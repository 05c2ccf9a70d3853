"""FlexAttention over a paged KV cache (``flex_attention_paged``).

* Against the float64 reference on the CPU through eager FlexAttention: decode and chunked prefill, GQA,
  causal / windowed / full, softcap, ragged lengths (down to ``seq_q`` itself), random page tables, a batch
  that is not a power of two.
* The block lists themselves, checked against the dense visibility rule: every visible token's page is
  listed for its query block, every page listed as full is visible to all its queries, none twice. (Eager
  FlexAttention evaluates the mask everywhere, so only this check and a compiled run see the lists.)
* One compiled run on the CPU (Inductor's C++ FlexAttention walks the block lists as the GPU kernel does).
"""

from __future__ import annotations

import random

import pytest
import torch

from layerzero.backends import flex_paged
from layerzero.backends.flex_paged import Q_BLOCK, flex_paged_kernel, page_blocks, paged_block_mask
from layerzero.context import SelectionContext
from layerzero.ops.attention_paged import page_table, paged_reference

pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _case(lens: list[int], sq: int, page: int, hq: int, hkv: int, seed: int, d: int = 16,
          spare: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    max_pages = -(-max(lens) // page) + spare  # wider than needed: entries past a sequence's pages are not read
    pages = sum(-(-n // page) for n in lens) + 5
    q = torch.randn(len(lens), sq, hq, d, generator=g)
    kc = torch.randn(pages, page, hkv, d, generator=g)
    vc = torch.randn(pages, page, hkv, d, generator=g)
    table = page_table(lens, page, max_pages, pages, g)
    # garbage past each sequence's pages: real pages of other sequences, which must stay unread
    for b, n in enumerate(lens):
        used = -(-n // page)
        table[b, used:] = torch.randint(0, pages, (max_pages - used,), generator=g, dtype=torch.int32)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32)


CASES = [
    # lens, seq_q, page, options
    ([37, 16, 1, 50], 1, 16, dict(is_causal=True)),              # decode; batch 4; a sequence of one token
    ([37, 16, 90], 1, 16, dict(is_causal=True)),                 # batch 3: padded to 4
    ([40, 9, 64], 5, 16, dict(is_causal=True)),                  # chunked prefill; seq_len == seq_q
    ([40, 33, 64], 3, 16, dict(is_causal=True, window=7)),       # window across page borders
    ([70, 20], 4, 32, dict(is_causal=True, window=40)),
    ([29, 47], 2, 16, dict(is_causal=False)),                    # every valid token visible
    ([48, 16], 1, 16, dict(is_causal=True, softcap=2.0)),
    ([300, 140], 140, 128, dict(is_causal=True)),                # two query blocks of 128
    ([300, 200], 150, 128, dict(is_causal=True, window=100)),
]


def _args(case_index: int, hq: int, hkv: int) -> tuple[tuple, dict]:
    lens, sq, page, kw = CASES[case_index]
    q, kc, vc, table, seq_lens = _case(lens, sq, page, hq, hkv, seed=case_index * 31 + hkv)
    return (q, kc, vc, table, seq_lens, kw.get("is_causal", True), None, kw.get("window"), kw.get("softcap")), kw


@pytest.mark.parametrize("case_index", range(len(CASES)))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_flex_paged_matches_the_float64_reference(case_index: int, hq: int, hkv: int) -> None:
    args, _ = _args(case_index, hq, hkv)
    out = flex_paged_kernel(*args, compiled=False)
    want = paged_reference(*(t.double() if t.is_floating_point() else t for t in args[:5]), *args[5:])
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def _visible(table: torch.Tensor, lens: list[int], sq: int, page: int, num_pages: int, is_causal: bool,
             window: int | None) -> torch.Tensor:
    """Dense ``(batch, seq_q, num_pages * page)``: which physical token each query attends to (the rule)."""
    vis = torch.zeros(len(lens), sq, num_pages * page, dtype=torch.bool)
    for b, n in enumerate(lens):
        for t in range(n):
            phys = int(table[b, t // page]) * page + t % page
            for i in range(sq):
                here = n - sq + i
                ok = (not (is_causal or window is not None)) or t <= here
                if window is not None:
                    ok = ok and t > here - window
                vis[b, i, phys] = ok
    return vis


@pytest.mark.parametrize("seed", range(12))
def test_the_block_lists_cover_every_visible_token_and_full_pages_are_fully_visible(seed: int) -> None:
    rng = random.Random(seed)
    page = rng.choice([16, 32, 128])
    sq = rng.choice([1, 2, 7, 130, 260]) if page == 128 else rng.choice([1, 3, 20])
    lens = [rng.randint(sq, sq + 3 * page) for _ in range(rng.randint(1, 5))]
    is_causal = rng.random() < 0.8
    window = rng.choice([None, None, 1, 5, page + 3]) if is_causal else None
    q, kc, vc, table, seq_lens = _case(lens, sq, page, 2, 1, seed)
    num_pages = kc.shape[0]
    batch = flex_paged._bucket(len(lens))
    full = rng.random() < 0.7
    kv_num, kv_idx, full_num, full_idx = page_blocks(table, seq_lens, sq, num_pages, page, is_causal, window, batch,
                                                     full=full)
    assert full or not full_num.any()
    vis = _visible(table, lens, sq, page, num_pages, is_causal, window)
    assert kv_num.shape == (batch, 1, -(-sq // Q_BLOCK)) and kv_idx.dtype == torch.int32
    for b in range(batch):
        for r in range(kv_num.shape[2]):
            partial = kv_idx[b, 0, r, :int(kv_num[b, 0, r])].tolist()
            full = full_idx[b, 0, r, :int(full_num[b, 0, r])].tolist()
            assert len(set(partial + full)) == len(partial) + len(full), (b, r, partial, full)
            if b >= len(lens):
                assert not partial and not full  # padding rows read nothing
                continue
            rows = vis[b, r * Q_BLOCK:(r + 1) * Q_BLOCK].view(-1, num_pages, page)  # (queries, pages, slots)
            needed = {p for p in range(num_pages) if bool(rows[:, p].any())}
            assert needed <= set(partial) | set(full), (b, r, sorted(needed - set(partial) - set(full)))
            for p in full:
                assert bool(rows[:, p].all()), (b, r, p)


def test_block_masks_are_cached_per_step_and_rebuilt_after_an_update() -> None:
    q, kc, vc, table, seq_lens = _case([20, 9], 1, 16, 2, 2, seed=0)
    first = paged_block_mask(table, seq_lens, 1, kc.shape[0], 16, True, None)
    assert paged_block_mask(table, seq_lens, 1, kc.shape[0], 16, True, None) is first
    assert paged_block_mask(table, seq_lens, 1, kc.shape[0], 16, True, 4) is not first
    seq_lens[0] += 1  # the next decode step, lengths updated in place
    assert paged_block_mask(table, seq_lens, 1, kc.shape[0], 16, True, None) is not first


def test_bad_tables_and_lengths_are_named_on_the_cpu() -> None:
    q, kc, vc, table, seq_lens = _case([20, 9], 1, 16, 2, 2, seed=1)
    table[1, 0] = kc.shape[0] + 3
    with pytest.raises(ValueError, match=r"block_table\[1\] holds page"):
        flex_paged_kernel(q, kc, vc, table, seq_lens, True, None, None, None, compiled=False)


@pytest.mark.parametrize("page,sq,why", [(8, 1, "multiple of 16"), (16, 128, "multiple of 128"),
                                         (64, 200, "multiple of 128")])
def test_page_sizes_the_kernels_cannot_block_are_rejected_with_the_reason(page: int, sq: int, why: str) -> None:
    ctx = SelectionContext(device="cuda", dtype=torch.bfloat16, batch_size=2, seq_len_q=sq, seq_len_k=1024,
                           num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=page, is_causal=True)
    spec = flex_paged.flex_paged_specs()[0]
    assert any(why in str(r) for r in flex_paged._check(ctx))
    ok = SelectionContext(device="cuda", dtype=torch.bfloat16, batch_size=2, seq_len_q=1, seq_len_k=1024,
                          num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=16, is_causal=True)
    assert not flex_paged._check(ok) and spec.kernel_id == "flex_attention_paged"


def test_compiled_on_the_cpu_walks_the_block_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's CPU FlexAttention reads only the listed pages and skips the mask on full ones, as the GPU
    kernel does: a wrong list would drop or leak tokens here."""
    pytest.importorskip("torch._inductor")
    for index, hkv in ((0, 2), (3, 1), (7, 2)):  # decode, a window, two query blocks with full pages
        args, _ = _args(index, 4, hkv)
        try:
            out = flex_paged_kernel(*args, compiled=True)
        except Exception as exc:  # no C++ toolchain for Inductor on this machine
            if "compiler" in str(exc).lower() or "InvalidCxxCompiler" in type(exc).__name__:
                pytest.skip(f"Inductor cannot compile on this CPU: {type(exc).__name__}")
            raise
        want = paged_reference(*(t.double() if t.is_floating_point() else t for t in args[:5]), *args[5:])
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_a_decode_loop_compiles_once_per_batch_bucket() -> None:
    """Serving: the lengths grow every step, the table widens at page borders and the batch moves within its
    power-of-two bucket; the compiled graph is reused (no recompile per step, so no recompile limit)."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(5)
    page, pages, hq, hkv, d = 16, 40, 4, 2, 16
    kc, vc = torch.randn(pages, page, hkv, d, generator=g), torch.randn(pages, page, hkv, d, generator=g)
    order = torch.randperm(pages, generator=g).to(torch.int32)
    try:
        flex_paged_kernel(torch.randn(4, 1, hq, d, generator=g), kc, vc, order[:8].view(4, 2),
                          torch.tensor([20, 3, 17, 9], dtype=torch.int32), True, None, None, None)
    except Exception as exc:
        if "compiler" in str(exc).lower() or "InvalidCxxCompiler" in type(exc).__name__:
            pytest.skip(f"Inductor cannot compile on this CPU: {type(exc).__name__}")
        raise
    before = counters["stats"]["unique_graphs"]
    for step in range(12):
        b = 3 + step % 2
        lens = [14 + step + 3 * i for i in range(b)]
        width = -(-max(lens) // page)
        table = order[: b * width].view(b, width)
        q = torch.randn(b, 1, hq, d, generator=g)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        out = flex_paged_kernel(q, kc, vc, table, seq_lens, True, None, None, None)
        want = paged_reference(q.double(), kc.double(), vc.double(), table, seq_lens)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - before <= 1  # at most the table width turning dynamic


def test_a_cached_layout_keeps_its_tensors_so_their_address_is_not_reused() -> None:
    """A fresh ``seq_lens`` each step may land at the freed address of the last one; while a mask is cached
    for the old tensor, that memory stays held, so the new tensor can never find the old mask."""
    import weakref

    q, kc, vc, table, seq_lens = _case([20, 9], 1, 16, 2, 2, seed=2)
    paged_block_mask(table, seq_lens, 1, kc.shape[0], 16, True, None)
    alive = weakref.ref(seq_lens)
    del seq_lens
    assert alive() is not None
    flex_paged.MASKS.clear()
    assert alive() is None


def test_a_pool_past_32_bit_offsets_is_declined_not_failed() -> None:
    """The kernel declines (the next kernel serves the call, nothing is counted) instead of failing to compile."""
    from layerzero.errors import KernelDeclinedError

    big = torch.empty(2**31 // (16 * 2 * 16), 16, 2, 16, dtype=torch.float16, device="meta")
    q = torch.empty(1, 1, 4, 16, dtype=torch.float16, device="meta")
    table = torch.zeros(1, 1, dtype=torch.int32, device="meta")
    with pytest.raises(KernelDeclinedError, match="32-bit offsets"):
        flex_paged_kernel(q, big, big, table, torch.ones(1, dtype=torch.int32, device="meta"), True, None, None,
                          None)


def test_a_cache_whose_pages_are_not_one_token_sequence_is_declined() -> None:
    """K and V interleaved per page (``(pages, 2, page, heads, d)``): the pool cannot be viewed as one key
    sequence without copying it, so the kernel declines (the gathering kernels serve such a cache)."""
    from layerzero.errors import KernelDeclinedError

    q, kc, vc, table, seq_lens = _case([20, 9], 1, 16, 2, 2, seed=3)
    both = torch.stack([kc, vc], 1)  # (pages, 2, page, heads, d)
    with pytest.raises(KernelDeclinedError, match="one strided sequence"):
        flex_paged_kernel(q, both[:, 0], both[:, 1], table, seq_lens, True, None, None, None, compiled=False)
