"""Fitting ffn_compensate's predictors: per block, a rank-r linear prediction of its output from the
MLP input, for the tokens that skip it (applied by sparse_ops/routed_mlp/compensation.py)."""

from __future__ import annotations

import torch
from torch import Tensor

# The compensation's ridge strength, relative to the mean feature energy (x^2, uncentred, as RIDGE).
# Stronger than the router's by measurement: fitted on 2048 tokens (the buffer), SmolLM2's 4-of-2
# predictors err by 0.393 (rank 64) / 0.388 (rank 16) at 1e-3, 0.338 / 0.373 at 0.1, 0.351 / 0.380
# at 1.0 (benchmarks/research/ffn_compensation.py --fit-tokens 2048 --ridge ...; 0.457 uncompensated).
COMP_RIDGE = 0.1


def _top_right_vectors(Fm: Tensor, r: int, iters: int = 4) -> Tensor:
    """The top-r right singular vectors of Fm [n, d], as rows [r', d] (r' = min(r, n, d)). For r well
    below the rank, a randomized range finder (Halko et al.: `iters` power steps on r + 8 columns from
    a fixed seed, then an eigendecomposition of size r + 8): a full one of Fm's smaller Gram matrix
    took 2 s per block at d 576 on this CPU, most of a fit."""
    n, d = Fm.shape
    k = r + 8
    if k >= min(n, d):
        if n < d:  # through the smaller Gram matrix
            top = Fm.T @ torch.linalg.eigh(Fm @ Fm.T)[1][:, -r:]
            return (top / top.norm(dim=0).clamp(min=1e-30)).T
        return torch.linalg.eigh(Fm.T @ Fm)[1][:, -r:].T
    gen = torch.Generator(device=Fm.device).manual_seed(0)
    Q = torch.randn(d, k, generator=gen, device=Fm.device, dtype=Fm.dtype)
    for _ in range(iters):
        Q = torch.linalg.qr(Fm.T @ (Fm @ Q)).Q
    B = Fm @ Q  # [n, k]
    return (Q @ torch.linalg.eigh(B.T @ B)[1][:, -r:]).T


def fit_compensation(x: Tensor, outs: Tensor, skipped: Tensor, rank: int,
                     ridge: float = COMP_RIDGE) -> tuple[Tensor, Tensor, Tensor]:
    """Per block, a rank-`rank` linear predictor of its output from x, fitted on the tokens that skip
    it (what it must stand in for there, not on average): x [n, d_in], outs [n, nb, d_out] (each
    block's output), skipped [n, nb] bool -> U [d_in, nb r], V [nb r, d_out], M [nb, d_out] (fp32, CPU;
    routed_mlp.compensation's layout), r = min(rank, d_in, d_out).

    Reduced-rank ridge regression, in fp32 on outs' device (the ridge bounds the condition number
    by about 10 d_in): the ridge solution W from [x, 1] (the bias unregularised, as fit_router;
    strength `ridge`), projected on the top-r right singular vectors of its centred fitted values;
    M keeps the fitted mean. A block no token skips gets zeros (never used)."""
    n, nb, d_out = outs.shape
    d = x.shape[1]
    r = min(rank, d, d_out)
    dev = outs.device
    U = torch.zeros(d, nb * r, device=dev)
    V = torch.zeros(nb * r, d_out, device=dev)
    M = torch.zeros(nb, d_out, device=dev)
    x = x.to(device=dev, dtype=torch.float32)
    skipped = skipped.to(dev)
    for b in range(nb):
        rows = skipped[:, b].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xb, yb = x[rows], outs[rows, b].float()
        mean = xb.mean(0)
        xc = xb - mean
        G = xc.T @ xc
        lam = ridge * (xb * xb).sum(0).mean().clamp(min=1e-12)  # as fit_router's: uncentred energy
        G.diagonal().add_(lam)
        A = torch.linalg.solve(G, xc.T @ (yb - yb.mean(0)))  # [d, d_out]; centring = an unregularised bias
        Vr = _top_right_vectors(xc @ A, r)  # [r', d_out]; r' < r when fewer tokens than r skip the block
        k = Vr.shape[0]
        U[:, b * r : b * r + k] = A @ Vr.T
        V[b * r : b * r + k] = Vr
        M[b] = yb.mean(0) - mean @ U[:, b * r : b * r + k] @ Vr
    return U.cpu(), V.cpu(), M.cpu()
