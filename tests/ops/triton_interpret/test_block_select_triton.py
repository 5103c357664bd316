"""Triton block selection vs the PyTorch selection (block_select.select_key_blocks).

Runs only under TRITON_INTERPRET=1 (tests/ops/test_triton_interpret.py runs this folder in a subprocess).
Random inputs make exact ties between key-block scores unlikely, so both must list the same blocks;
the slots are compared as sets (ties may be ordered differently), slot 0 exactly (the diagonal block).
"""

from __future__ import annotations

import pytest
import torch

from spt_compile.sparse_ops.attention.select import mask_tiles, select_blocks, select_key_blocks
from spt_compile.sparse_ops.attention.select_triton import select_key_blocks_triton
from spt_compile.sparse_ops.attention.pq import real_key_mask

# (N, D, H, Hkv, causal, block, mask kind, per-batch key budgets, per_group)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0) = -inf: wanted

CASES = [
    (1, 64, 1, 1, True, 16, None, (5, 5), True),
    (17, 80, 3, 1, True, 16, "pad", (17, 9), True),
    (100, 64, 3, 1, False, 16, None, (40, 40), False),
    (100, 80, 1, 1, True, 32, "mask", (30, 30), True),
    (257, 64, 3, 1, True, 16, "pad", (64, 33), True),
    (257, 64, 4, 2, False, 32, "mask", (100, 100), False),
    (257, 80, 3, 3, True, 16, None, (300, 300), True),  # budget above the key blocks there are
]


def _inputs(N, D, H, Hkv, mask_kind, gen):
    B = 2
    q = torch.randn(B, H, N, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen) + 0.3 * torch.randn(B, Hkv, 1, D, generator=gen)
    mask = None
    if mask_kind == "pad":  # bool key padding, the second sequence shorter
        keep = torch.ones(B, N, dtype=torch.bool)
        keep[1, max(1, N * 2 // 3):] = False
        mask = keep.view(B, 1, 1, N)
    elif mask_kind == "mask":  # additive, a band of forbidden keys per query
        i = torch.arange(N)
        band = ((i.view(-1, 1) - i.view(1, -1)).abs() % 37 > 30)
        mask = torch.zeros(B, 1, N, N).masked_fill(band, torch.finfo(torch.float32).min)
    return q, k, mask


def _case(case):
    """A case's inputs and the PyTorch selection: (q, k, mask, real, budgets, scale, want)."""
    N, D, H, Hkv, causal, block, mask_kind, budgets, per_group = case
    gen = torch.Generator().manual_seed(N * 7 + H)
    q, k, mask = _inputs(N, D, H, Hkv, mask_kind, gen)
    B = q.shape[0]
    real = torch.ones(B, N, dtype=torch.bool) if mask is None else real_key_mask(mask, B, N)
    n_kb = -(-N // block)
    lb = torch.tensor([min(n_kb, -(-b // block)) for b in budgets])
    scale = D ** -0.5
    return q, k, mask, real, lb, scale, select_key_blocks(q, k, scale, lb, causal, mask, real, block, block, per_group)


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-D{c[1]}-H{c[2]}:{c[3]}-{'causal' if c[4] else 'full'}-b{c[5]}-{c[6]}-g{int(c[8])}" for c in CASES])
def test_triton_selection_lists_the_same_blocks(case):
    N, D, H, Hkv, causal, block, mask_kind, budgets, per_group = case
    q, k, mask, real, lb, scale, want = _case(case)
    B = q.shape[0]
    tiles = None if mask is None else mask_tiles(mask, B, H, Hkv, N, N, block, block, per_group)
    got = select_key_blocks_triton(q, k, scale, lb, causal, tiles, None if mask is None else real, block, block,
                                   per_group)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.int32
    assert torch.equal(got[..., 0], want[..., 0])  # the diagonal block first
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    # The dispatcher takes the same path for impl="triton".
    assert torch.equal(select_blocks(q, k, scale, lb, causal, mask, real, block, block, "triton", per_group), got)


def test_rows_without_budget_or_keys_list_nothing():
    """A zero budget, N=0 and a batch row that is all padding give -1 everywhere they should."""
    gen = torch.Generator().manual_seed(3)
    q, k, mask = _inputs(40, 64, 3, 1, "pad", gen)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1] = False
    mask = keep.view(2, 1, 1, 40)
    real = real_key_mask(mask, 2, 40)
    lb = torch.tensor([2, 2])
    tiles = mask_tiles(mask, 2, 3, 1, 40, 40, 16, 16, True)
    got = select_key_blocks_triton(q, k, 0.125, lb, False, tiles, real, 16, 16)
    assert (got[1] == -1).all() and (got[0] >= 0).all()
    empty = select_key_blocks_triton(q[:, :, :0], k, 0.125, lb, False, None, None, 16, 16)
    assert empty.shape == (2, 1, 0, 2)


def _packed_mask(lengths: list[int], causal: bool) -> torch.Tensor:
    """[1, 1, N, N] bool block-diagonal mask of sequences packed into one row (causal inside each)."""
    seg = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    allowed = seg.view(-1, 1) == seg.view(1, -1)
    if causal:
        allowed &= torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    return allowed.view(1, 1, len(seg), len(seg))


@pytest.mark.parametrize("long", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_selection_of_packed_rows(causal, long, monkeypatch):
    """Packed rows: per-query-block budgets [B, n_qb] and each sequence's own sink block; long: more key
    blocks than one program holds (the limit lowered to 16), as test_long_rows_list_the_same_blocks."""
    from spt_compile.sparse_ops.attention import select_triton
    from spt_compile.sparse_ops.attention.select import packed_blocks_per_query

    if long:
        monkeypatch.setattr(select_triton, "MAX_KEY_BLOCKS", 16)
    lengths = [13, 40, 7, 80] + ([150] if long else [])  # not block-aligned: query blocks straddle sequences
    N, H, Hkv, D, block = sum(lengths), 3, 1, 64, 16
    gen = torch.Generator().manual_seed(5)
    q, k, _ = _inputs(N, D, H, Hkv, None, gen)
    mask = _packed_mask(lengths, causal).expand(2, 1, N, N)
    real = real_key_mask(mask, 2, N)
    budget, sink = packed_blocks_per_query(mask, real, N, 0.5, None, block, block)
    assert budget.shape == sink.shape == (2, -(-N // block)) and len(set(budget[0].tolist())) > 1
    want = select_key_blocks(q, k, 0.125, budget, causal, mask, real, block, block, True, sink)
    tiles = mask_tiles(mask, 2, H, Hkv, N, N, block, block, True)
    got = select_key_blocks_triton(q, k, 0.125, budget, causal, tiles, real, block, block, True, sink)
    assert torch.equal(got[..., 0], want[..., 0])
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


LONG_CASES = [  # more than 16 key blocks of 16: several chunks of the lowered limit, a partial last one
    (257, 64, 3, 1, True, 16, "pad", (64, 33), True),
    (300, 64, 4, 2, False, 16, "mask", (100, 100), False),
    (520, 80, 3, 3, True, 16, None, (300, 300), True),
    (520, 32, 2, 1, False, 16, "pad", (80, 48), True),
]


@pytest.mark.parametrize("case", LONG_CASES, ids=[f"N{c[0]}-H{c[2]}:{c[3]}-{'causal' if c[4] else 'full'}-{c[6]}-g{int(c[8])}"
                                                 for c in LONG_CASES])
def test_long_rows_list_the_same_blocks(case, monkeypatch):
    """Rows of more key blocks than one program holds (N > 16384 in 64-blocks) take _long_score_kernel
    and a top-k: the same blocks as the PyTorch selection. The limit is lowered to 16 key blocks here,
    so the chunked passes run (several chunks, a partial last one) at the interpreter's sizes."""
    from spt_compile.sparse_ops.attention import select_triton

    monkeypatch.setattr(select_triton, "MAX_KEY_BLOCKS", 16)
    N, D, H, Hkv, causal, block, mask_kind, budgets, per_group = case
    q, k, mask, real, lb, scale, want = _case(case)
    got = select_blocks(q, k, scale, lb, causal, mask, real, block, block, "triton", per_group)
    assert -(-N // block) > 16
    assert got.shape == want.shape and got.dtype == torch.int32
    assert torch.equal(got[..., 0], want[..., 0])  # the diagonal block first
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
