"""The ridge router and top-k routing, as pure functions."""

from __future__ import annotations

import torch

from spt_compile.fitting.router import choose_blocks, fit_router, router_scores


def test_fit_router_recovers_an_affine_map():
    """Noise-free norms that are an affine function of x: the ridge fit (weak, relative to the features'
    energy) predicts them to within the ridge's shrinkage, bias included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen)
    W, b = torch.randn(6, 3, generator=gen), torch.tensor([5.0, -2.0, 0.5])
    norms = x @ W + b
    router = fit_router(x, norms)
    assert router.shape == (7, 3) and router.dtype == torch.float32
    torch.testing.assert_close(router_scores(x, router), norms, atol=0.05, rtol=0.01)
    torch.testing.assert_close(router[-1], b, atol=0.02, rtol=0)  # the bias is not shrunk


def test_fit_router_is_defined_for_constant_features():
    """A feature that never varies (or is always 0) makes X^T X singular without the ridge."""
    x = torch.zeros(10, 4)
    x[:, 0] = torch.arange(10.0)
    router = fit_router(x, x[:, :1] * 2 + 1)
    assert torch.isfinite(router).all()
    torch.testing.assert_close(router_scores(x, router)[:, 0], x[:, 0] * 2 + 1, atol=0.05, rtol=0)


def test_choose_blocks_keeps_the_top_k_per_row():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 1.0, -1.0]])
    mask = choose_blocks(scores, 2)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [2, 2, 2]
    assert mask[:2].tolist() == [[False, True, True, False], [True, True, False, False]]
    assert mask[2, 2] and not mask[2, 3]  # a tie for second place: the largest is in, the smallest out
