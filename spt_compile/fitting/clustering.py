"""Neuron clustering for the routed FFN: put hidden units that fire together into the same block.

With contiguous blocks, even the best possible block choice per token keeps little of the MLP's
output (SmolLM2, 2 of 4 blocks: relative error 0.49 for an oracle), while choosing the same number
of individual units per token would err by 0.09: the units a token needs are spread over all
blocks. Grouping co-active units raises what a block choice can keep (0.49 -> 0.37 oracle, 0.51 ->
0.39 with the backend's router; benchmarks/research/routing_analysis.py).

Method: each unit's profile is its importance |h_j(t)| * ||W_out[:, j]|| over calibration tokens t,
normalised; balanced spherical k-means groups profiles into n_blocks clusters of equal size (as equal
as F allows), so blocks keep equal cost. The result is a permutation of the hidden units; the
weights are never modified (see routed_mlp.permute_hidden).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _capacities(n: int, k: int) -> list[int]:
    """Cluster sizes equal to routed_mlp.block_bounds' block sizes."""
    edges = [round(i * n / k) for i in range(k + 1)]
    return [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]


def _balanced_assign(sim: Tensor, capacities: list[int]) -> Tensor:
    """Greedy: take (unit, cluster) pairs from the most similar down, while the unit is free and the
    cluster has room. sim [F, k] -> assignment [F] int64."""
    Fn, k = sim.shape
    order = sim.flatten().argsort(descending=True).tolist()
    assign = [-1] * Fn
    room = list(capacities)
    left = Fn
    for idx in order:
        j, c = divmod(idx, k)
        if assign[j] < 0 and room[c] > 0:
            assign[j] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign, dtype=torch.int64)


def cluster_neurons(importance: Tensor, n_blocks: int, iters: int = 15,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """importance [n_tokens, F] (>= 0) -> perm [F] int64: the units of block b are
    perm[lo_b:hi_b] for routed_mlp.block_bounds(F, n_blocks)."""
    Fn = importance.shape[1]
    if n_blocks <= 1 or Fn <= n_blocks:
        return torch.arange(Fn)
    profiles = F.normalize(importance.detach().float().cpu().t(), dim=-1)  # [F, n_tokens]
    caps = _capacities(Fn, n_blocks)
    # Farthest-point start (a random unit, then each next the one least similar to those chosen):
    # a random balanced start can leave two groups sharing a centroid for good.
    chosen = [int(torch.randint(Fn, (1,), generator=generator))]
    for _ in range(1, n_blocks):
        closest = (profiles @ profiles[chosen].t()).amax(dim=1)  # [F]
        chosen.append(int(closest.argmin()))
    centroids = profiles[chosen]
    assign = None
    for _ in range(iters):
        new = _balanced_assign(profiles @ F.normalize(centroids, dim=-1).t(), caps)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack([profiles[assign == c].mean(0) for c in range(n_blocks)])
    # Stable within a cluster: units keep their relative order.
    return torch.cat([(assign == c).nonzero().squeeze(1) for c in range(n_blocks)])
