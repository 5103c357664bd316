"""Fitting PQ codebooks: batched k-means and the online step."""

from __future__ import annotations

import torch

from spt_compile.fitting import pq_codebooks


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -6.0]])
    x = (centers[torch.arange(300) % 3] + 0.1 * torch.randn(300, 2, generator=gen))[None]
    found = pq_codebooks.kmeans(x, 3, iters=20, generator=gen)[0]
    dist = torch.cdist(centers, found).min(dim=1).values
    assert dist.max() < 0.1


def test_ema_update_moves_codewords_toward_assigned_means():
    codebooks = torch.zeros(1, 1, 2, 2)
    codebooks[0, 0, 1] = torch.tensor([10.0, 10.0])
    keys = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # all nearest to codeword 0
    new = pq_codebooks.ema_update(codebooks, keys, decay=0.5)
    torch.testing.assert_close(new[0, 0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(new[0, 0, 1], torch.tensor([10.0, 10.0]))  # no keys: unchanged


def test_fit_codebooks_fits_each_head_and_subspace_on_its_own():
    """Keys whose subspaces sit at different offsets per head: each (head, subspace) codebook lands on
    its own offset, not on a pooled mean."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([[0.0, 10.0], [-10.0, 20.0]])  # [Hkv, S]
    keys = torch.randn(2, 64, 2, 3, generator=gen) * 0.01 + offsets[:, None, :, None]  # [Hkv, n, S, dsub]
    cb = pq_codebooks.fit_codebooks(keys.reshape(2, 64, 6), dsub=3, K=4, iters=5, generator=gen)
    assert cb.shape == (2, 2, 4, 3)
    torch.testing.assert_close(cb.mean(dim=(2, 3)), offsets, atol=0.02, rtol=0)
