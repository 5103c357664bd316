"""Exact attention with dropout on its weights, the masks drawn as sparse_ops/dropout.py draws them.

SDPA with dropout_p > 0 runs its math kernel on a CPU: the [B, H, N, Nk] weights, then `dropout`,
whose bernoulli_ calls mt19937 once per weight (about 7 ns each here), then the product with V. The
site replays that call in backward under a forked RNG to get the same mask, so each training call
draws the mask twice. This is the same computation with the mask drawn from 16-bit uniforms (about
2 ns a weight) from the call's seed: backward replays it by calling it
again, without touching torch's global RNG. The dropout distribution is SDPA's with p on a 2^-16 grid
(at most 2^-17 from p) and kept weights scaled by 1 / (1 - that share): the expected output is exact.
The masks differ from SDPA's, as the site's seeded ones already did.

Shapes: q [B, H, N, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (H a multiple of Hkv: GQA, as SDPA's
enable_gqa), mask None, bool (True = attend) or additive, broadcastable to [B, H, N, Nk];
is_causal: key j allowed for query i iff j <= i (top-left, as SDPA). -> [B, H, N, Dv] in q's dtype;
a row with no allowed key is 0 (SDPA's math kernel's safe softmax). Half inputs are computed in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dropout import draw_keep, keep_scale


def _safe_softmax(s: Tensor) -> Tensor:
    """softmax over the last dim with 0 for rows that are all -inf (SDPA's math kernel's rule)."""
    return torch.ops.aten._safe_softmax(s, -1)  # in torch since 2.5


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                           scale: float, p: float, seed: int) -> Tensor:
    """softmax(q k^T * scale + mask) with dropout (the mask of `seed`), times v; see the module
    docstring. Differentiable; calling it again with the same seed draws the same mask."""
    acc = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, Nk, *]
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)  # [B, H, N, Nk]
    N, Nk = s.shape[-2:]
    if is_causal:
        above = torch.ones(N, Nk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(above, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
    weights = _safe_softmax(s)
    weights = weights * keep_scale(draw_keep(weights.shape, p, seed, q.device), p, acc)
    return torch.matmul(weights, v.to(acc)).to(q.dtype)
