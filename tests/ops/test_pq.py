"""Product quantization and key selection: what may never be selected, and how many keys are."""

from __future__ import annotations

import pytest
import torch

from spt_compile.fitting.pq_codebooks import fit_codebooks
from spt_compile.sparse_ops.attention import pq


def test_encode_decode_reconstructs_with_enough_codewords():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 50, 16, generator=gen)  # [B, Hkv, N, D]
    codebooks = fit_codebooks(keys.transpose(0, 1).reshape(3, 100, 16), dsub=4, K=100, iters=5, generator=gen)
    assert codebooks.shape == (3, 4, 100, 4)
    codes = pq.pq_encode(keys, codebooks)
    assert codes.shape == (2, 3, 50, 4) and codes.dtype == torch.uint8
    # 100 codewords for 100 points per subspace: k-means seeded on the points reconstructs them well
    err = (pq.pq_decode(codes, codebooks) - keys).norm() / keys.norm()
    assert err < 0.2


def _select(B=2, H=4, Hkv=2, N=40, D=8, per_batch=(10, 10), causal=True, mask=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    idx = pq.select_keys(q, k, 0.3, torch.as_tensor(per_batch), causal, mask)
    return q, k, idx


def test_causal_selection_never_picks_the_future_and_keeps_short_rows_whole():
    _, _, idx = _select(per_batch=(10, 6))
    N = idx.shape[2]
    assert idx.shape == (2, 4, N, 10)
    row = torch.arange(N).view(1, 1, N, 1)
    assert ((idx <= row) | (idx == -1)).all()
    counts = (idx >= 0).sum(-1)  # [B, H, N]
    expect = torch.minimum(torch.arange(N) + 1, torch.tensor([[10], [6]])).view(2, 1, N)
    assert torch.equal(counts, expect.expand_as(counts))
    taken = idx[idx >= 0]
    for b, h, i in [(0, 0, 3), (1, 2, 30)]:
        chosen = idx[b, h, i][idx[b, h, i] >= 0]
        assert chosen.unique().numel() == chosen.numel()  # no duplicates
    assert taken.numel() > 0


def test_per_query_budgets_select_as_each_budget_alone():
    """A [B, N] budget (packed rows: each query budgeted by its own sequence) lists, for every query,
    what a [B] budget of that value lists for it, with -1 beyond its own budget."""
    gen = torch.Generator().manual_seed(3)
    budget = torch.randint(1, 12, (2, 40), generator=gen)
    q, k, idx = _select(causal=False, per_batch=budget, seed=4)
    assert idx.shape[-1] == int(budget.max())
    for L in budget.unique().tolist():
        alone = pq.select_keys(q, k, 0.3, torch.tensor([L, L]), False)  # [B, H, N, L]
        b, i = (budget == L).nonzero(as_tuple=True)
        assert torch.equal(idx[b, :, i, :L], alone[b, :, i])
        assert (idx[b, :, i, L:] == -1).all()


def test_exact_keys_give_the_exact_top_l():
    q, k, idx = _select(causal=False, per_batch=(5, 5))
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k.repeat_interleave(2, dim=1))
    want = scores.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.long().sort(-1).values, want)


def test_boolean_and_additive_masks_are_honoured():
    B, N = 2, 24
    allowed = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(3)) > 0.5
    allowed[:, :, :, 0] = True
    _, _, idx = _select(N=N, causal=False, mask=allowed, per_batch=(N, N))
    hit = torch.zeros(B, 4, N, N + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, N, idx).long(), True)[..., :N]
    assert torch.equal(hit, allowed.expand(B, 4, N, N)), "every allowed key, and only those, at L = N"
    additive = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    _, _, idx2 = _select(N=N, causal=False, mask=additive, per_batch=(N, N))
    assert torch.equal(idx2.sort(-1).values, idx.sort(-1).values)


def test_padding_keys_are_not_real_and_density_uses_real_length():
    B, N = 2, 16
    key_ok = torch.ones(B, N, dtype=torch.bool)
    key_ok[1, 10:] = False  # right padding
    mask = key_ok[:, None, None, :].expand(B, 1, N, N)
    real = pq.real_key_mask(mask, B, N)
    assert torch.equal(real, key_ok)
    L = pq.keys_per_query(real.sum(-1), density=0.25, top_l=None)
    assert L.tolist() == [4, 3]  # ceil(0.25 * 16), ceil(0.25 * 10)
    assert pq.keys_per_query(real.sum(-1), density=0.25, top_l=12).tolist() == [12, 10]
    _, _, idx = _select(N=N, mask=mask, per_batch=tuple(L.tolist()))
    assert (idx[1] < 10).all()
    assert ((idx[1] >= 0).sum(-1) <= 3).all()


@pytest.mark.parametrize("density", [1e-6, 1.0])
def test_keys_per_query_bounds(density):
    L = pq.keys_per_query(torch.tensor([0, 1, 7]), density, None)
    assert L.tolist() == ([0, 1, 1] if density < 1 else [0, 1, 7])


def test_code_agreement_proxy_counts_equal_codes():
    from spt_compile.sparse_ops.attention.pq import code_onehots, pq_encode

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, N, D = 2, 4, 2, 30, 16
    q, k = torch.randn(B, H, N, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen)
    cb = fit_codebooks(k[0], 4, 8, 5, gen)  # [Hkv, S=4, K=8, 4]
    q1, k1 = code_onehots(q, k, cb)
    counts = q1 @ k1.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)  # [B, H, N, N]
    q_codes = pq_encode(q.reshape(B, Hkv, 2 * N, D), cb).view(B, H, N, 4)
    k_codes = pq_encode(k, cb).repeat_interleave(2, dim=1)
    want = (q_codes[:, :, :, None, :] == k_codes[:, :, None, :, :]).sum(-1).float()
    torch.testing.assert_close(counts, want)
    assert counts.max() <= 4 and counts.min() >= 0


def test_near_ties_keep_the_earliest_keys_whatever_the_rounding():
    """Keys with equal PQ codes score equal only up to rounding (another GEMM shape, another thread
    count, another column of the same product): scores a few units in the last place apart at the
    budget's boundary still count as tied, and the earliest keys are kept, as for exact ties. Keys
    further apart than that are ranked by score."""
    from spt_compile.sparse_ops.attention.pq import TIE_TOLERANCE, _ties_by_position

    base = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.2, 0.1]])  # three keys at 0.1 (equal codes)
    for wiggle in ([0.0, 0.0, 0.0], [3e-8, -2e-8, 1e-8], [-3e-8, 0.0, 3e-8]):
        s = base.clone()
        s[0, [1, 3, 5]] += torch.tensor(wiggle)
        vals, idx = s.topk(4, dim=-1)
        vals, idx = _ties_by_position(s, vals, idx, torch.tensor([[4]]))
        assert sorted(idx[0].tolist()) == [0, 1, 2, 4], (wiggle, idx)  # 0.5, 0.3, 0.2 and the earliest 0.1
    s = base.clone()
    s[0, 5] += 4 * TIE_TOLERANCE * 0.5  # clearly above the others at 0.1: ranked by its score
    vals, idx = s.topk(4, dim=-1)
    vals, idx = _ties_by_position(s, vals, idx, torch.tensor([[4]]))
    assert sorted(idx[0].tolist()) == [0, 2, 4, 5]
