"""Exact attention with dropout (sparse_ops/attention/exact_dropout.py): the weights are SDPA's, each
kept one scaled by the mask's factor, the dropped share is p, the mask is a function of the seed, and
gradients are those of the same dropped weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spt_compile.sparse_ops.attention.exact_dropout import attention_with_dropout
from spt_compile.sparse_ops.dropout import drop_share, scale_of


def _inputs(B, H, Hkv, N, Nk, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, gen


def _masks(B, N, Nk, gen):
    allowed = torch.rand(B, 1, N, Nk, generator=gen) > 0.3
    allowed[0, 0, 1] = False  # a row with no key: 0, as SDPA's math kernel gives
    additive = torch.where(allowed, torch.randn(B, 1, N, Nk, generator=gen), torch.tensor(float("-inf")))
    return {"none": (None, False), "causal": (None, True), "bool": (allowed, False), "additive": (additive, False)}


@pytest.mark.parametrize("form", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_kept_weights_are_sdpas_scaled_and_the_share_dropped_is_p(form, dtype, heads):
    """v = identity makes the output the dropped weights themselves [B, H, N, Nk]: where kept they
    are SDPA's weights times the factor, and about p of the allowed ones are 0."""
    H, Hkv = heads
    B, N, Nk, D, p = 2, 37, 37, 8, 0.3
    q, k, gen = _inputs(B, H, Hkv, N, Nk, D, dtype)
    v = torch.eye(Nk, dtype=dtype).expand(B, Hkv, Nk, Nk)
    mask, causal = _masks(B, N, Nk, gen)[form]
    got = attention_with_dropout(q, k, v, mask, causal, D**-0.5, p, seed=11).double()
    weights = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal,
                                             scale=D**-0.5, enable_gqa=H != Hkv)
    kept = got != 0
    tol = dict(atol=1e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[kept], weights[kept] * scale_of(p, torch.float64), **tol)
    allowed = weights > 0
    share = 1 - (kept & allowed).sum().item() / allowed.sum().item()
    n = allowed.sum().item()
    assert abs(share - drop_share(p)) < 5 * (p * (1 - p) / n) ** 0.5
    if form in ("bool", "additive"):
        assert (got[0, :, 1] == 0).all()


def test_the_seed_decides_the_mask_and_tiny_p_is_sdpa():
    q, k, gen = _inputs(1, 2, 2, 16, 16, 8, torch.float32)
    v = torch.randn(1, 2, 16, 8, generator=gen)
    a = attention_with_dropout(q, k, v, None, True, 0.3, 0.2, seed=3)
    assert torch.equal(a, attention_with_dropout(q, k, v, None, True, 0.3, 0.2, seed=3))
    assert not torch.equal(a, attention_with_dropout(q, k, v, None, True, 0.3, 0.2, seed=4))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(attention_with_dropout(q, k, v, None, True, 0.3, 1e-9, seed=3), exact)


def test_gradients_are_those_of_the_dropped_weights():
    """fp64 gradcheck of q, k, v and an additive mask's gradient path at a fixed seed (the mask is a
    function of the seed, so the function is deterministic)."""
    q, k, gen = _inputs(1, 4, 2, 9, 11, 4, torch.float64)
    v = torch.randn(1, 2, 11, 3, generator=gen, dtype=torch.float64)
    mask = torch.randn(1, 1, 9, 11, generator=gen, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q_, k_, v_: attention_with_dropout(q_, k_, v_, mask, False, 0.5, 0.25, 7),
                                    inputs)
