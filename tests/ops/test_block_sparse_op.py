"""Block-sparse attention (the CPU/torch path) and block selection against the plain reference:
outputs and every gradient on awkward shapes; selection never lists a block no query may see."""

from __future__ import annotations

import pytest
import torch

from spt_compile.sparse_ops.attention.select import blocks_per_query, oracle_key_blocks, select_key_blocks
from spt_compile.sparse_ops.attention.block_sparse import (
    block_sparse_backward,
    block_sparse_backward_torch,
    block_sparse_forward,
    block_sparse_forward_torch,
    resolve_impl,
)
from spt_compile.sparse_ops.attention.reference import block_sparse_attention_reference


def random_blocks(B, S, n_qb, n_kb, Lb, gen, unused=0.2):
    """Distinct key blocks per row, a share of slots -1."""
    picked = torch.rand(B, S, n_qb, n_kb, generator=gen).argsort(-1)[..., :Lb]
    idx = torch.full((B, S, n_qb, Lb), -1, dtype=torch.int64)
    idx[..., : picked.shape[-1]] = picked
    idx[torch.rand(idx.shape, generator=gen) < unused] = -1
    return idx.to(torch.int32)


def make_mask(kind, B, N, gen):
    if kind is None:
        return None
    if kind == "pad-additive":  # the first sequence's last third is padding (HF's finfo.min)
        m = torch.zeros(B, 1, 1, N)
        m[0, ..., N - N // 3 :] = torch.finfo(torch.float32).min
        return m
    if kind == "bool":  # an explicit bool mask, some rows with nothing allowed
        m = torch.rand(B, 1, N, N, generator=gen) > 0.3
        m[:, :, 0] = False
        return m
    m = 0.5 * torch.randn(B, 1, N, N, generator=gen)  # additive, with forbidden entries
    m[torch.rand(B, 1, N, N, generator=gen) < 0.2] = float("-inf")
    return m


def check(B, H, Hkv, N, D, block_m, block_n, causal, mask_kind, Lb, grouped, seed=0, atol=3e-5, softcap=0.0,
          q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (q_scale * torch.randn(B, H, N, D, generator=gen)).requires_grad_()
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True) for _ in range(2))
    n_qb, n_kb = -(-N // block_m), -(-N // block_n)
    idx = random_blocks(B, Hkv if grouped else H, n_qb, n_kb, Lb, gen)
    mask = make_mask(mask_kind, B, N, gen)
    scale = D**-0.5
    out, lse = block_sparse_forward_torch(q.detach(), k.detach(), v.detach(), idx, scale, causal, mask, block_m, block_n,
                                          softcap=softcap)
    ref = block_sparse_attention_reference(q, k, v, idx, scale, causal, mask, block_m, block_n, softcap)
    dout = torch.randn(ref.shape, generator=gen)
    grads = block_sparse_backward_torch(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, scale, causal, mask,
                                        block_m, block_n, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    assert torch.isfinite(lse).logical_or(out.abs().sum(-1) == 0).all(), "a row without keys must output zeros"
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("N", [1, 17, 100, 257])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("H,Hkv", [(1, 1), (3, 1)])
def test_matches_reference_causal(N, D, H, Hkv):
    check(B=2, H=H, Hkv=Hkv, N=N, D=D, block_m=16, block_n=16, causal=True, mask_kind=None, Lb=3, grouped=False)


@pytest.mark.parametrize("mask_kind", ["pad-additive", "bool", "additive"])
@pytest.mark.parametrize("grouped", [False, True])
def test_masks_and_gqa_groups(mask_kind, grouped):
    check(B=2, H=6, Hkv=2, N=100, D=80, block_m=32, block_n=16, causal=False, mask_kind=mask_kind, Lb=4,
          grouped=grouped, seed=1)


def test_more_slots_than_blocks_and_causal_mask_together():
    check(B=1, H=3, Hkv=1, N=70, D=64, block_m=16, block_n=32, causal=True, mask_kind="additive", Lb=9,
          grouped=True, seed=2)


@pytest.mark.parametrize("causal,mask_kind", [(True, None), (False, "additive"), (True, "pad-additive")])
def test_soft_capped_scores_match_reference(causal, mask_kind):
    """Gemma-2's cap * tanh(scores / cap) before the mask, outputs and gradients (through the cap's
    slope); q scaled up so that most scores pass the cap's linear range."""
    check(B=2, H=6, Hkv=2, N=100, D=80, block_m=32, block_n=16, causal=causal, mask_kind=mask_kind, Lb=4,
          grouped=True, seed=5, softcap=2.0, q_scale=6.0)


@pytest.mark.parametrize("shape", ["1H", "B1", "B11"])
@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 0.0), (True, 2.0)])
def test_learned_bias_gradient_matches_reference(shape, causal, softcap):
    """A learned additive bias (T5's relative bias in full fine-tuning): backward returns d(bias), the
    score gradient at the listed pairs, summed over the dims the bias broadcasts over, in its shape."""
    gen = torch.Generator().manual_seed(7)
    B, H, Hkv, N, D, bm = 2, 4, 2, 70, 32, 16
    q = (3.0 * torch.randn(B, H, N, D, generator=gen)).requires_grad_()
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True) for _ in range(2))
    dims = {"1H": (1, H, N, N), "B1": (B, 1, N, N), "B11": (B, 1, 1, N)}[shape]
    bias = torch.randn(dims, generator=gen)
    bias[..., 3] = torch.finfo(torch.float32).min  # a forbidden key: no gradient there
    bias.requires_grad_()
    n_b = -(-N // bm)
    idx = random_blocks(B, Hkv, n_b, n_b, 3, gen)
    ref = block_sparse_attention_reference(q, k, v, idx, D**-0.5, causal, bias, bm, bm, softcap)
    dout = torch.randn(ref.shape, generator=gen)
    want = torch.autograd.grad(ref, (q, k, v, bias), dout)
    out, lse = block_sparse_forward_torch(q.detach(), k.detach(), v.detach(), idx, D**-0.5, causal, bias.detach(), bm,
                                          bm, softcap=softcap)
    got = block_sparse_backward_torch(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, D**-0.5, causal,
                                      bias.detach(), bm, bm, softcap=softcap, bias_grad=True)
    assert got[3].shape == bias.shape and got[3].dtype == bias.dtype
    assert want[3].abs().max() > 0.01 and (got[3][..., 3] == 0).all()
    for name, g, r in zip(("q", "k", "v", "bias"), got, want):
        torch.testing.assert_close(g, r, atol=3e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_selection_with_a_per_head_mask_shared_by_the_batch():
    """A mask [1, H, N, Nk] (a per-head bias, batch-broadcast) with GQA groups sharing lists: the same
    lists as the mask expanded to [B, H, N, Nk] (the group reduction had reshaped it with B, and failed)."""
    gen = torch.Generator().manual_seed(9)
    B, H, Hkv, N, D = 2, 4, 2, 80, 16
    q, k = torch.randn(B, H, N, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen)
    mask = torch.randn(1, H, N, N, generator=gen).masked_fill(torch.rand(1, H, N, N, generator=gen) < 0.3,
                                                               float("-inf"))
    real = torch.ones(B, N, dtype=torch.bool)
    lb = blocks_per_query(torch.full((B,), N), 0.5, None, 16, 5)
    got = select_key_blocks(q, k, D**-0.5, lb, False, mask, real, 16, 16)
    want = select_key_blocks(q, k, D**-0.5, lb, False, mask.expand(B, H, N, N), real, 16, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("N,diag_first", [(256, True), (256, False), (257, True)])
def test_selected_blocks_causal_fast_path_matches_reference(N, diag_first):
    """select_key_blocks lists each query block's diagonal block first; told so (diag_first), the
    torch path masks the causal pattern on that tile only (N = 256: whole blocks), else, or with a
    partial last block (N = 257), it masks every tile. Both must be exact."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hkv, D = 2, 6, 2, 64
    q = torch.randn(B, H, N, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True) for _ in range(2))
    real = torch.ones(B, N, dtype=torch.bool)
    lb = blocks_per_query(torch.full((B,), N), 0.25, None, 16, -(-N // 16))
    idx = select_key_blocks(q.detach(), k.detach(), D**-0.5, lb, True, None, real, 16, 16)
    assert idx.shape == (B, Hkv, -(-N // 16), int(lb.max()))
    assert (idx[..., 0] == torch.arange(idx.shape[2]).view(1, 1, -1)).all(), "diagonal block in slot 0"
    out, lse = block_sparse_forward(q.detach(), k.detach(), v.detach(), idx, D**-0.5, True, None, 16, 16, impl="torch",
                                    diag_first=diag_first)
    ref = block_sparse_attention_reference(q, k, v, idx, D**-0.5, True, None, 16, 16)
    dout = torch.randn(ref.shape, generator=gen)
    grads = block_sparse_backward(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, D**-0.5, True, None, 16, 16,
                                  impl="torch", diag_first=diag_first)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=3e-5, rtol=1e-4)


def test_every_block_listed_equals_dense_attention():
    """density 1.0: every visible block is listed, so block-sparse attention is exact attention."""
    gen = torch.Generator().manual_seed(4)
    B, H, Hkv, N, D = 1, 9, 3, 150, 64
    q, k, v = (torch.randn(B, h, N, D, generator=gen) for h in (H, Hkv, Hkv))
    lb = blocks_per_query(torch.full((B,), N), 1.0, None, 64, 3)
    idx = select_key_blocks(q, k, D**-0.5, lb, True, None, torch.ones(B, N, dtype=torch.bool), 64, 64)
    out, _ = block_sparse_forward_torch(q, k, v, idx, D**-0.5, True, None, 64, 64)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_dropout_is_replayed_in_backward():
    """With dropout the gradients must be those of the same dropped weights: check against a
    numerical derivative of the forward with the same seed (double precision, tiny shape)."""
    gen = torch.Generator().manual_seed(5)
    B, H, Hkv, N, D = 1, 2, 1, 20, 16
    q, k, v = (torch.randn(B, h, N, D, generator=gen, dtype=torch.float64) for h in (H, Hkv, Hkv))
    idx = random_blocks(B, H, 2, 2, 2, gen, unused=0.0)
    args = (0.25, True, None, 16, 16, 0.3, 7)
    out, lse = block_sparse_forward_torch(q, k, v, idx, *args)
    again, _ = block_sparse_forward_torch(q, k, v, idx, *args)
    torch.testing.assert_close(out, again)  # same seed, same mask
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dq, dk, dv = block_sparse_backward_torch(dout, q, k, v, idx, out, lse, *args)
    direction = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    eps = 1e-6
    plus, _ = block_sparse_forward_torch(q + eps * direction, k, v, idx, *args)
    minus, _ = block_sparse_forward_torch(q - eps * direction, k, v, idx, *args)
    numeric = ((plus - minus) * dout).sum() / (2 * eps)
    torch.testing.assert_close((dq * direction).sum(), numeric, atol=1e-6, rtol=1e-5)
    assert (dq != 0).any() and (dk != 0).any() and (dv != 0).any()


def test_selection_never_lists_a_block_no_query_may_see():
    gen = torch.Generator().manual_seed(6)
    B, H, Hkv, N, D, bs = 2, 4, 2, 200, 32, 16
    q, k = torch.randn(B, H, N, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen)
    real = torch.ones(B, N, dtype=torch.bool)
    real[1, 120:] = False  # sequence 1 is padded after 120 keys
    mask = torch.zeros(B, 1, 1, N).masked_fill(~real.view(B, 1, 1, N), torch.finfo(torch.float32).min)
    lengths = real.sum(-1)
    lb = blocks_per_query(lengths, 0.2, None, bs, -(-N // bs))
    assert lb.tolist() == [3, 2]  # ceil(0.2 * 200 / 16), ceil(0.2 * 120 / 16)
    idx = select_key_blocks(q, k, D**-0.5, lb, True, mask, real, bs, bs)
    listed = idx.long()
    qb = torch.arange(idx.shape[2]).view(1, 1, -1, 1)
    assert ((listed < 0) | (listed <= qb)).all(), "a causal query block never lists a later key block"
    assert ((listed[1] < 0) | (listed[1] * bs < 120)).all(), "padding-only blocks are never listed"
    assert (idx[1, ..., 2:] == -1).all(), "sequence 1 uses only its own 2 slots"
    assert (idx[0, :, 5] >= 0).all(), "a query block with enough visible blocks fills its slots"


def test_pooled_selection_is_close_to_the_oracle_on_structured_keys():
    """Keys in a few blocks align with the queries: the pooled proxy must find those blocks."""
    gen = torch.Generator().manual_seed(7)
    B, H, N, D, bs = 1, 1, 256, 32, 32
    direction = torch.randn(D, generator=gen)
    q = torch.randn(B, H, N, D, generator=gen) * 0.1 + direction
    k = torch.randn(B, H, N, D, generator=gen) * 0.1
    hot = [2, 5]
    for b in hot:
        k[0, 0, b * bs : (b + 1) * bs] += direction
    lb = torch.tensor([4])
    real = torch.ones(B, N, dtype=torch.bool)
    idx = select_key_blocks(q, k, D**-0.5, lb, False, None, real, bs, bs)
    oracle = oracle_key_blocks(q, k, D**-0.5, lb, False, None, bs, bs)
    for row in range(idx.shape[2]):
        assert set(hot) <= set(idx[0, 0, row].tolist()), f"query block {row} misses a hot block"
        assert set(hot) <= set(oracle[0, 0, row].tolist())


def test_impl_choice(monkeypatch):
    assert resolve_impl("torch", torch.device("cuda")) == "torch"
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("SPT_ATTENTION_IMPL", "reference")
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("SPT_ATTENTION_IMPL", "cuda-please")
    with pytest.raises(ValueError, match="SPT_ATTENTION_IMPL"):
        resolve_impl("auto", torch.device("cpu"))


def test_packed_rows_budget_and_sink_per_sequence():
    """A block-diagonal mask (sequences packed into one row): each query block gets its own
    sequence's budget and first block as sink; one sequence per row (causal, padding) gives None."""
    from spt_compile.sparse_ops.attention.select import packed_blocks_per_query
    from spt_compile.sparse_ops.attention.pq import real_key_mask

    lengths = (32, 16, 48)  # aligned to blocks of 16: starts at blocks 0, 2, 3
    seg = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    N = len(seg)
    allowed = (seg.view(-1, 1) == seg.view(1, -1)) & torch.ones(N, N, dtype=torch.bool).tril()
    mask = allowed.view(1, 1, N, N)
    budget, sink = packed_blocks_per_query(mask, real_key_mask(mask, 1, N), N, 0.5, None, 16, 16)
    # density 1/2: ceil(16 / 16) = 1 block for 32 keys, 1 for 16, ceil(24 / 16) = 2 for 48
    assert budget.tolist() == [[1, 1, 1, 2, 2, 2]]
    assert sink.tolist() == [[0, 0, 2, 3, 3, 3]]
    # Not aligned (13, 40): the second sequence spans 4 blocks where alone it spans 3, and gets one more.
    seg = torch.cat([torch.zeros(13, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    mask = (seg.view(-1, 1) == seg.view(1, -1)).view(1, 1, 53, 53)
    budget, sink = packed_blocks_per_query(mask, real_key_mask(mask, 1, 53), 53, 1.0, None, 16, 16)
    assert budget.tolist() == [[4, 4, 4, 4]] and sink.tolist() == [[0, 0, 0, 0]]
    # One sequence per row: causal, right padding -> no packing.
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    pad = causal.clone()
    pad[:, 30:] = False
    mask = torch.stack([causal, pad]).view(2, 1, 40, 40)
    assert packed_blocks_per_query(mask, real_key_mask(mask, 2, 40), 40, 0.5, None, 16, 16) is None
