"""The MLP site's router: a ridge regression from the MLP input to each block's output norm, and
hard top-k routing by its scores. Pure functions of tensors; the site (sites/mlp.py) owns the state."""

from __future__ import annotations

import torch
from torch import Tensor

RIDGE = 1e-3  # ridge strength, relative to the mean feature energy


def fit_router(x: Tensor, norms: Tensor) -> Tensor:
    """Ridge regression from features [x, 1] to block output norms: x [n, d], norms [n, nb]
    -> weights [d + 1, nb] (fp32). Solved in fp64 on the CPU; the bias is not regularised."""
    X = torch.cat([x.double().cpu(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    G = X.T @ X
    d = x.shape[1]
    lam = RIDGE * G.diagonal()[:d].mean().clamp(min=1e-12)
    G[:d, :d] += lam * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(G, X.T @ norms.double().cpu()).float()


def router_scores(x: Tensor, router: Tensor) -> Tensor:
    """x [T, d] -> predicted block output norms [T, nb]."""
    return x.float() @ router[:-1] + router[-1]


def choose_blocks(scores: Tensor, active: int) -> Tensor:
    """Hard top-k routing: [T, nb] scores -> [T, nb] bool mask with `active` True per row."""
    top = scores.topk(active, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
