"""Load balancing of the router (ffn_balance): a per-block bias on the router's scores, fitted so
that each block's share of the selections moves toward ffn_active / ffn_blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from .router import choose_blocks

BALANCE_ITERS = 200  # dual-ascent steps of fit_balance (2048 buffered tokens: a few ms per site)


def fit_balance(scores: Tensor, active: int, strength: float, iters: int = BALANCE_ITERS) -> Tensor:
    """Per-block bias c [nb] (fp32) for load balancing: top-`active` of (scores - c) over these tokens
    gives block b a share of the selections moved `strength` of the way from its unbiased share
    toward active / nb. scores [n, nb] (the router's, on its buffered tokens).

    Dual ascent on the counts: a block picked too often has its bias raised, one picked too rarely
    lowered, in steps of the scores' spread that shrink geometrically; the bias with the smallest
    worst miss is kept (counts are integers, so the targets are met only up to a token or so)."""
    S = scores.detach().double().cpu()
    n, nb = S.shape
    c = torch.zeros(nb, dtype=torch.float64)
    if n == 0 or strength <= 0 or active >= nb:
        return c.float()
    counts = choose_blocks(S, active).sum(0).double()
    fair = n * active / nb
    target = (1 - strength) * counts + strength * fair
    spread = S.std(dim=0).mean().clamp(min=1e-12)
    best, best_miss = c.clone(), float((counts - target).abs().max())
    for i in range(iters):
        step = spread * 0.5 * (0.02 ** (i / max(iters - 1, 1)))  # 0.5 -> 0.01 of the spread
        c += step * (counts - target) / fair
        counts = choose_blocks(S - c, active).sum(0).double()
        miss = float((counts - target).abs().max())
        if miss < best_miss:
            best, best_miss = c.clone(), miss
    return (best - best.mean()).float()  # a common shift changes no choice
