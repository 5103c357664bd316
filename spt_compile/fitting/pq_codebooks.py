"""Fitting product-quantization codebooks for token selection: batched k-means at calibration, an
online k-means step on training calls. Shapes as in sparse_ops/attention/pq.py."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spt_compile.sparse_ops.attention.pq import pq_encode


def kmeans(x: Tensor, K: int, iters: int = 10, generator: Optional[torch.Generator] = None) -> Tensor:
    """Independent k-means problems in a batch: x [M, n, d] -> centroids [M, K, d] (Lloyd's, fp32).
    Starts from K distinct random samples (repeated when n < K); empty clusters keep their centroid."""
    M, n, d = x.shape
    x = x.float()
    order = torch.rand(M, n, generator=generator, device="cpu").argsort(dim=1).to(x.device)
    pick = order[:, torch.arange(K, device=x.device) % max(n, 1)]  # [M, K]
    c = torch.gather(x, 1, pick[..., None].expand(M, K, d)).clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=-1)  # [M, n]
        sums = torch.zeros_like(c).scatter_add_(1, assign[..., None].expand(M, n, d), x)
        counts = torch.zeros(M, K, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
        c = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], c)
    return c


def fit_codebooks(keys: Tensor, dsub: int, K: int, iters: int = 10, generator=None) -> Tensor:
    """k-means codebooks per kv head and subspace: keys [Hkv, n, D] -> [Hkv, S, K, dsub]."""
    Hkv, n, D = keys.shape
    S = D // dsub
    sub = keys.view(Hkv, n, S, dsub).permute(0, 2, 1, 3).reshape(Hkv * S, n, dsub)
    return kmeans(sub, K, iters, generator).view(Hkv, S, K, dsub)


def ema_update(codebooks: Tensor, keys: Tensor, decay: float) -> Tensor:
    """One online k-means step: move each codeword toward the mean of the keys assigned to it.
    keys [Hkv, n, D]; codewords with no keys stay where they are."""
    Hkv, n, D = keys.shape
    _, S, K, dsub = codebooks.shape
    codes = pq_encode(keys[None], codebooks)[0].long()  # [Hkv, n, S]
    xs = keys.float().view(Hkv, n, S, dsub)
    onehot = torch.nn.functional.one_hot(codes, K).float()  # [Hkv, n, S, K]
    counts = onehot.sum(1)  # [Hkv, S, K]
    sums = torch.einsum("hnsk,hnsd->hskd", onehot, xs)
    means = sums / counts.clamp(min=1)[..., None]
    moved = decay * codebooks.float() + (1 - decay) * means
    return torch.where(counts[..., None] > 0, moved, codebooks.float())
