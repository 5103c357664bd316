"""One chunk's cross-entropy and its d(logits) in one Triton kernel: the GPU path of chunked.py.

The torch path forms each chunk's loss and gradient in about 15 launches, each a full pass over the
chunk's [C, V] logits (max, subtract, exp, sum, log, gather, scale, scatter, cast). This kernel makes
two passes over each row and writes everything the chunk loop needs:

    z      [C, V]  the chunk's logits in h's dtype, rows at any stride (read only)
    y      [C]     labels; ignore_index marks a row without a loss
    scale  [C]     fp32 d(loss)/d(row loss) (0 on ignored rows); read only when WRITE_GRAD
    lse    [C]     fp32 out: natural-log log-sum-exp of the row (-inf for a row of -inf)
    loss   [C]     fp32 out: the row's loss, 0 on ignored rows
    g      [C, V]  out, when WRITE_GRAD: scale * (softmax - smoothed one-hot), in g's dtype (h's, for
                   the chunk's d(h) and d(W) GEMMs); may be z itself (each program reads a value of its
                   row in pass 2 before it writes the same place)

Pass 1 is an online softmax over the row (running max and sum; the sum of the logits too when label
smoothing needs their mean); pass 2 writes the gradient. One program per row: a row of 49152 fp32
logits is 192 KB, read twice. Numerics as chunked.py's torch path (fp32 statistics of the logits
rounded to h's dtype); the sums run in another order, so results agree to fp32 rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_BLOCK_V = 1024  # logits per step of a row


@triton.jit
def _ce_rows_kernel(
    Z, stride_zm, Y, SCALE, LSE, LOSS, G, stride_gm, V, ignore_index, eps,
    SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_zm
    offs0 = tl.arange(0, BLOCK_V)
    y = tl.load(Y + row).to(tl.int64)
    valid = y != ignore_index

    # pass 1: running max m and sum l of exp(z - m); the sum of z for label smoothing's mean
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)  # per lane, reduced at the end
    l = tl.zeros([BLOCK_V], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + offs0
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp(-inf - -inf) = NaN
        l = l * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
        if SMOOTHING:
            zsum += tl.where(offs < V, z, 0.0)
    row_max = tl.max(m, axis=0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a row of -inf: lse = -inf, as torch
    total = tl.sum(l * tl.exp(m - row_max), axis=0)
    lse = row_max + tl.log(total)
    z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    loss = lse - z_y
    if SMOOTHING:
        loss = (1.0 - eps) * loss + eps * (lse - tl.sum(zsum, axis=0) / V)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    if WRITE_GRAD:  # pass 2: scale * (softmax - (1 - eps) * one-hot - eps / V)
        s = tl.where(valid, tl.load(SCALE + row), 0.0)
        g_row = G + row * stride_gm
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + offs0
            z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            g = s * tl.exp(z - lse)
            if SMOOTHING:
                g -= s * eps / V
            g -= tl.where(offs == y, s * (1.0 - eps), 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty, fp_downcast_rounding="rtne"), mask=offs < V)


def chunk_cross_entropy_triton(z: Tensor, y: Tensor, ignore_index: int, eps: float, scale: Tensor | None,
                               lse: Tensor, loss: Tensor, g: Tensor | None) -> None:
    """Fills lse [C] and loss [C] (fp32, contiguous) of the logits z [C, V] (unit stride along V) with
    labels y [C]; with scale [C] fp32 and g [C, V] (unit stride along V; may be z) also g = d(loss)/
    d(logits) for row weights scale. One launch."""
    C, V = z.shape
    if C == 0:
        return
    if z.stride(1) != 1 or (g is not None and g.stride(1) != 1):
        raise ValueError("chunk_cross_entropy_triton: the logits and the gradient need unit stride along the vocabulary")
    write = g is not None
    _ce_rows_kernel[(C,)](
        z, z.stride(0), y, scale if write else lse, lse, loss, g if write else z, g.stride(0) if write else 0,
        V, int(ignore_index), float(eps),
        SMOOTHING=eps > 0.0, WRITE_GRAD=write, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(V)),
        num_warps=8 if V >= 8192 else 4,
    )

