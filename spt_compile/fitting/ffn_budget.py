"""Per-layer MLP budgets (the `ffn_budget` option): how many blocks each layer's tokens get, so that
the model's routed MLPs cost a given share of the dense MLPs' matmul FLOPs for the least total error.

Each MLP site measures, when it fits its router, its *error curve*: the relative squared error of its
output when every token keeps the router's top-k blocks, for k = 0 .. n_blocks (error_curve). The
allocation (allocate) then hands out blocks one at a time, each to the layer where it removes the most
error per FLOP, until the budget is spent. A layer whose output is concentrated in few blocks gives
its share to one that is not; a sensitive layer may end dense.

Pure functions on tensors and lists, no site state: sites/mlp.py feeds them and keeps the results.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch
from torch import Tensor


def error_curve(outs: Tensor, scores: Tensor) -> Tensor:
    """outs [n, nb, d_out] (each block's output for n tokens), scores [n, nb] (the router's) ->
    [nb + 1] fp64: for k blocks per token (the top-k by score), sum over tokens of |dense - kept|^2
    over sum of |dense|^2. Entry 0 is 1 (nothing kept), entry nb is 0 (dense)."""
    n, nb, _ = outs.shape
    outs = outs.double()
    dense = outs.sum(1)  # [n, d_out]
    energy = (dense * dense).sum().clamp(min=1e-300)
    order = scores.double().argsort(dim=1, descending=True)  # [n, nb], best block first
    ranked = outs.gather(1, order[:, :, None].expand_as(outs))  # blocks in each token's rank order
    kept = torch.cumsum(ranked, dim=1)  # [n, nb, d_out]: the top-1, top-2, ... sums
    err = ((dense[:, None, :] - kept) ** 2).sum(dim=(0, 2)) / energy  # [nb]
    return torch.cat([torch.ones(1, dtype=torch.float64), err.cpu()]).clamp(min=0.0)


def block_flops(d_in: int, d_out: int, hidden: int, n_blocks: int, gated: bool) -> float:
    """Matmul FLOPs of one block for one token (forward; backward scales the same way): the input
    projection(s) into the block's hidden units and the output projection out of them."""
    width = hidden / n_blocks
    return 2.0 * width * (d_in * (2 if gated else 1) + d_out)


def allocate(curves: Sequence[Tensor], flops: Sequence[float], budget: float) -> list[int]:
    """Blocks per token for each layer: curves[i] is layer i's error_curve ([nb_i + 1]), flops[i] one of
    its blocks' FLOPs. Every layer gets at least one block; then, greedily, the block with the largest
    error drop per FLOP that still fits, until sum(k_i flops_i) <= budget * sum(nb_i flops_i) admits
    no more. budget 1.0 gives every layer every block."""
    if len(curves) != len(flops):
        raise ValueError(f"allocate: {len(curves)} error curves but {len(flops)} FLOP counts")
    if not 0 < budget <= 1:
        raise ValueError(f"allocate: budget must be in (0, 1]; got {budget}")
    sizes = [c.numel() - 1 for c in curves]
    cap = budget * sum(nb * f for nb, f in zip(sizes, flops)) * (1 + 1e-9)  # rounding slack only
    k = [min(1, nb) for nb in sizes]
    used = sum(ki * f for ki, f in zip(k, flops))

    def gain(i: int) -> float:  # error removed per FLOP by layer i's next block
        return float(curves[i][k[i]] - curves[i][k[i] + 1]) / flops[i]

    heap = [(-gain(i), i) for i in range(len(curves)) if k[i] < sizes[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if used + flops[i] > cap:
            continue  # this layer's block does not fit; a cheaper layer's might
        k[i] += 1
        used += flops[i]
        if k[i] < sizes[i]:
            heapq.heappush(heap, (-gain(i), i))
    return k


def flop_share(k: Sequence[int], sizes: Sequence[int], flops: Sequence[float]) -> float:
    """The share of the dense MLPs' matmul FLOPs an allocation k costs (sizes: blocks per layer)."""
    return sum(ki * f for ki, f in zip(k, flops)) / sum(nb * f for nb, f in zip(sizes, flops))
