"""Compensation (ffn_compensate): a rank-r prediction of what the skipped blocks would add."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compensation(x: Tensor, skipped: Tensor, U: Tensor, V: Tensor, M: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """What the blocks a token skips are predicted to add (ffn_compensate): for each skipped block b,
    x U_b V_b + M_b. x [T, d_in], skipped [T, nb] bool, U [d_in, nb * r] (U_b: columns b r : (b + 1) r),
    V [nb * r, d_out] (V_b: rows b r : (b + 1) r), M [nb, d_out] -> [T, d_out] in x's dtype (written
    into `out` if given; it may be a strided view). One GEMM into every block's rank-r coordinates,
    masked, one GEMM out, with the skip indicators as extra coordinates and M as V's extra rows (a
    separate [T, nb] x [nb, d_out] product and the add took a quarter of the term's time on this
    CPU): T (d_in + d_out) nb r multiply-adds (SmolLM2, 4 blocks, r 32: 148k per token)."""
    T, nb = skipped.shape
    nbr = U.shape[1]
    C = x.new_empty(T, nbr + nb)  # [the skipped blocks' coordinates (others 0) | skip indicators]
    torch.mm(x, U, out=C[:, :nbr])
    s = skipped.to(x.dtype)
    C[:, :nbr].view(T, nb, -1).mul_(s[:, :, None])
    C[:, nbr:] = s
    VM = torch.cat([V, M])  # [nb r + nb, d_out]
    return C @ VM if out is None else torch.mm(C, VM, out=out)


def compensation_input_grad(dy: Tensor, skipped: Tensor, U: Tensor, V: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """d(x) of compensation(x, skipped, U, V, M) (U, V and M are constants): [T, d_in] (written into
    `out` if given)."""
    T, nb = skipped.shape
    dt = (dy @ V.t()).view(T, nb, -1).mul_(skipped.to(dy.dtype)[:, :, None])  # [T, nb, r]
    return dt.view(T, -1) @ U.t() if out is None else torch.mm(dt.view(T, -1), U.t(), out=out)
