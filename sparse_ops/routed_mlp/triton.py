"""Routed MLP in Triton: gather -> grouped GEMM -> scatter, forward and backward.

Same semantics as the torch path (forward.py; hard routing, weight 1 per chosen block; every block chosen is the
dense MLP), same saved pre-activations in the same layout (each routed block's [n_b, F_b] gate then
up, or its single pre-activation, block after block), so either backward can read what either
forward saved. No LoRA dropout here: callers fall back to the torch path for that (spt_compile/sites/mlp_impl.py).

Shapes (T tokens, K = d_in, F hidden, N = d_out, r LoRA rank, nb blocks, S = routed (block, token)
pairs = sum of the per-block token counts n_b):
    x [T, K], block_mask [T, nb] bool, y [T, N]
    tok [S] int32      token ids sorted by block, then token (route_tokens' order)
    grouped buffers    [S rows, F_b columns] per block, block after block (pre, h, dg / du)

Kernels (one program per (token tile of one block, column tile)):
  * _up_kernel: gathers x rows by tok and computes gate and up (or the single pre-activation) for
    its block's columns, + bias + the LoRA delta (x A^T, computed densely once, times the block's
    rows of B), stores the pre-activations (saved for backward) and the activated hidden h.
  * _scatter_kernel: out[tok] += P_b @ M[lo:hi, :] for a grouped P (h, or dg / du): the down
    projection (M = W_out^T), dx (M = W_gate, W_in; two products in one program), and the small
    rank-r reductions (h A_out^T, du B_in, dg B_gate). A token's blocks are handled by different
    programs, so out is fp32 and updated with atomic adds: deterministic alternatives either
    store every (block, token) output ([S, N] fp32: 268 MB at the 7B shape with 8192 tokens, 50%)
    and sum it, or give one program all of a token tile's blocks, whose tokens chose different
    blocks (each block's GEMM would run over the whole tile: nb/k times the FLOPs). The price is
    that summation order, so the last bits of y and dx, can change from run to run.
  * _dh_kernel: backward of the hidden layer for one block's tile: dh = dy[tok] W_out[:, lo:hi]
    (+ the LoRA term), through the activation using the saved pre-activations -> dg, du (grouped),
    and h (grouped, only if the out projection's weight or LoRA grads are wanted).
  * _wgrad_kernel: out[lo:hi, :] += P_b^T @ Q[tok] over a chunk of the block's rows: the grads of
    W_in / W_gate / B_in / B_gate (P = du / dg, Q = x or x A^T) and of W_out / A_out (P = h,
    Q = dy or dy B_out). Chunks of rows go to different programs (parallelism when few blocks),
    adding into fp32 with atomics.
Everything dense and rank-r (x A^T, dy B_out, dt A, dy^T t) stays in torch: small GEMMs.
With the clustering's permutation (`perm`: block-order unit i is the weights' unit perm[i]) every kernel
reads a unit's weight row or column, bias and LoRA factor at perm[i] and writes its gradients there
(_unit_ids), so no weight is copied into block order; the grouped buffers stay in block order.

Accumulation is fp32 everywhere; tl.dot takes the compute dtype (bf16/fp16 on tensor cores; fp32
with exact "ieee" products, or TF32 where torch's matmuls would use it). Returned tensors have the
dtypes of the inputs they belong to; the saved pre-activations have x's dtype (as the op's fake says).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_runs_on
from ..attention.block_sparse_triton import _dot  # fp32-accumulated tl.dot with the interpreter's bf16 workaround
from .spec import ACTIVATIONS, MlpSpec, MlpWeights, block_bounds, out_features

# Activation codes the kernels switch on (constexpr), by MlpSpec.activation.
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "quick_gelu": 4, "relu2": 5}
assert set(ACT_CODES) == set(ACTIVATIONS)

# Module constants a kernel reads must be tl.constexpr; write them on the right of a product
# (constexpr * tensor does not convert under the interpreter).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tl has no tanh in every Triton version


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) for fp32 z; codes as ACT_CODES."""
    if ACT == 0:
        a = tl.maximum(z, 0.0)
    elif ACT == 1:
        a = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 2:
        a = 0.5 * z * (1.0 + _tanh((z + 0.044715 * z * z * z) * _TANH_C))
    elif ACT == 3:
        a = z * tl.sigmoid(z)
    elif ACT == 4:
        a = z * tl.sigmoid(1.702 * z)
    else:
        r = tl.maximum(z, 0.0)
        a = r * r
    return a


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)) for fp32 z."""
    if ACT == 0:
        a = tl.maximum(z, 0.0)
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        a = z * cdf
        d = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == 2:
        t = _tanh((z + 0.044715 * z * z * z) * _TANH_C)
        a = 0.5 * z * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _TANH_C * (1.0 + 3.0 * 0.044715 * z * z)
    elif ACT == 3:
        s = tl.sigmoid(z)
        a = z * s
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        s = tl.sigmoid(1.702 * z)
        a = z * s
        d = s + 1.702 * z * s * (1.0 - s)
    else:
        r = tl.maximum(z, 0.0)
        a = r * r
        d = 2.0 * r
    return a, d


@triton.jit
def _tile_info(TILE_BLOCK, TILE_ROW0, BLOCK_INFO, nb, n_tiles, n_col, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """The program's token tile and column tile, from a 1-D grid of n_tiles * n_col programs ordered in
    groups of GROUP_M token tiles (the usual L2 swizzle: programs running together share GROUP_M tiles
    of gathered rows and a band of weight columns, instead of every program of a wave streaming a
    different part of x or of the weights). Returns the tile's block b, grouped rows (offs_r), row mask,
    the block's first grouped row, its first hidden unit lo, its width Fb, and the column tile.
    BLOCK_INFO int64 [4, nb]: row start, row end, lo, hi."""
    pid = tl.program_id(0)
    in_group = GROUP_M * n_col
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(n_tiles - first, GROUP_M)
    pid_m = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    b = tl.load(TILE_BLOCK + pid_m).to(tl.int64)
    row0 = tl.load(TILE_ROW0 + pid_m).to(tl.int64)
    rstart = tl.load(BLOCK_INFO + b)
    rend = tl.load(BLOCK_INFO + nb + b)
    lo = tl.load(BLOCK_INFO + 2 * nb + b)
    Fb = tl.load(BLOCK_INFO + 3 * nb + b) - lo
    offs_r = row0 + tl.arange(0, BLOCK_M)
    return b, offs_r, offs_r < rend, rstart, lo, Fb, pid_n


@triton.jit
def _unit_ids(UNITS, f, mask, PERMUTED: tl.constexpr):
    """Where the weights keep each hidden unit of block order f: UNITS[f] under a clustering
    permutation (its units in block order), f itself without one. The kernels read weight rows or
    columns and write gradients at these indices, so no weight is put in block order per call."""
    if PERMUTED:
        f = tl.load(UNITS + f, mask=mask, other=0)
    return f


@triton.jit
def _gathered_gemm(acc, X, tok, rmask, sx_t, sx_k, W, f, cmask, sw_k, sw_f, K,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BM, BN] += X[tok, :] @ W[:, f] over K: x rows gathered by token id; W[k, f] at
    W + k * sw_k + f * sw_f (either weight layout, by strides)."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        xt = tl.load(X + tok[:, None] * sx_t + offs_k[None, :] * sx_k, mask=rmask[:, None] & kmask[None, :],
                     other=0.0)  # [BM, BK]
        wt = tl.load(W + offs_k[:, None] * sw_k + f[None, :] * sw_f, mask=kmask[:, None] & cmask[None, :],
                     other=0.0)  # [BK, BN]
        acc += _dot(xt, wt, PRECISION, UPCAST)
    return acc


@triton.jit
def _lora_add(acc, L, tok, rmask, sl_t, sl_r, BB, f, cmask, sb_r, sb_f, R, scale,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += (L[tok, :R] @ BB[:R, f]) * scale: the rank-r LoRA term of one tile (BB[j, f] at
    BB + j * sb_r + f * sb_f)."""
    offs_j = tl.arange(0, BLOCK_R)
    jmask = offs_j < R
    lt = tl.load(L + tok[:, None] * sl_t + offs_j[None, :] * sl_r, mask=rmask[:, None] & jmask[None, :], other=0.0)
    bt = tl.load(BB + offs_j[:, None] * sb_r + f[None, :] * sb_f, mask=jmask[:, None] & cmask[None, :], other=0.0)
    return acc + _dot(lt, bt, PRECISION, UPCAST) * scale


@triton.jit
def _up_kernel(
    X, TOK, TILE_BLOCK, TILE_ROW0, BLOCK_INFO, PRE_OFF, H_OFF, PRE, HID, UNITS,
    WU, BU, LU, BBU, WG, BG, LG, BBG,
    sx_t, sx_k, swu_k, swu_f, slu_t, slu_r, sbu_r, sbu_f, swg_k, swg_f, slg_t, slg_r, sbg_r, sbg_f,
    nb, n_tiles, n_col, K, RU, RG, scale_u, scale_g,
    GATED: tl.constexpr, BIAS_U: tl.constexpr, LORA_U: tl.constexpr, BIAS_G: tl.constexpr,
    LORA_G: tl.constexpr, ACT: tl.constexpr, PERMUTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (token tile of block b, column tile): u = x W_u^T + b_u + (x A_u^T) B_u^T s_u on the block's
    units (and g likewise), PRE <- (g, u) or (u,), HID <- act(g) * u or act(u). PRE_OFF [2, nb]:
    where block b's g (row 0) and u (row 1) start in PRE; H_OFF [nb] where its h starts in HID."""
    b, offs_r, rmask, rstart, lo, Fb, pid_n = _tile_info(TILE_BLOCK, TILE_ROW0, BLOCK_INFO, nb, n_tiles, n_col,
                                                         BLOCK_M, GROUP_M)
    tok = tl.load(TOK + offs_r, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < Fb
    f = _unit_ids(UNITS, lo + cols, cmask, PERMUTED)  # hidden units of this tile, as the weights index them
    u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u = _gathered_gemm(u, X, tok, rmask, sx_t, sx_k, WU, f, cmask, swu_k, swu_f, K, PRECISION, UPCAST, BLOCK_K)
    if BIAS_U:
        u += tl.load(BU + f, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if LORA_U:
        u = _lora_add(u, LU, tok, rmask, slu_t, slu_r, BBU, f, cmask, sbu_r, sbu_f, RU, scale_u,
                      PRECISION, UPCAST, BLOCK_R)
    # Grouped position of (row, unit): block b's [n_b, Fb] segment, row-major.
    grp = (offs_r - rstart)[:, None] * Fb + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if GATED:
        g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        g = _gathered_gemm(g, X, tok, rmask, sx_t, sx_k, WG, f, cmask, swg_k, swg_f, K, PRECISION, UPCAST, BLOCK_K)
        if BIAS_G:
            g += tl.load(BG + f, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if LORA_G:
            g = _lora_add(g, LG, tok, rmask, slg_t, slg_r, BBG, f, cmask, sbg_r, sbg_f, RG, scale_g,
                          PRECISION, UPCAST, BLOCK_R)
        tl.store(PRE + tl.load(PRE_OFF + b) + grp, g.to(PRE.dtype.element_ty), mask=omask)
        tl.store(PRE + tl.load(PRE_OFF + nb + b) + grp, u.to(PRE.dtype.element_ty), mask=omask)
        h = _act(g, ACT) * u
    else:
        tl.store(PRE + tl.load(PRE_OFF + nb + b) + grp, u.to(PRE.dtype.element_ty), mask=omask)
        h = _act(u, ACT)
    tl.store(HID + tl.load(H_OFF + b) + grp, h.to(HID.dtype.element_ty), mask=omask)


@triton.jit
def _scatter_kernel(
    P1, M1, P2, M2, OUT, TOK, TILE_BLOCK, TILE_ROW0, BLOCK_INFO, P1_OFF, P2_OFF, UNITS,
    sm1_f, sm1_n, sm2_f, sm2_n, so_t, so_n, nb, n_tiles, n_col, N,
    TWO: tl.constexpr, PERMUTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[tok, n] += P1_b[rows, :] @ M1[lo:hi, n] (+ P2_b @ M2 when TWO), fp32 atomics: P grouped
    (block b's [n_b, Fb] segment starts at P*_OFF[b]); M[f, n] at M + f * sm_f + n * sm_n, f as
    _unit_ids gives it."""
    b, offs_r, rmask, rstart, lo, Fb, pid_n = _tile_info(TILE_BLOCK, TILE_ROW0, BLOCK_INFO, nb, n_tiles, n_col,
                                                         BLOCK_M, GROUP_M)
    tok = tl.load(TOK + offs_r, mask=rmask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    row_base = (offs_r - rstart) * Fb  # [BM]
    p1 = P1 + tl.load(P1_OFF + b)
    if TWO:
        p2 = P2 + tl.load(P2_OFF + b)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Fb, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < Fb
        pmask = rmask[:, None] & kmask[None, :]
        mmask = kmask[:, None] & nmask[None, :]
        fk = _unit_ids(UNITS, lo + offs_k, kmask, PERMUTED)  # [BK]
        pt = tl.load(p1 + row_base[:, None] + offs_k[None, :], mask=pmask, other=0.0)  # [BM, BK]
        mt = tl.load(M1 + fk[:, None] * sm1_f + offs_n[None, :] * sm1_n, mask=mmask, other=0.0)
        acc += _dot(pt, mt, PRECISION, UPCAST)
        if TWO:
            pt2 = tl.load(p2 + row_base[:, None] + offs_k[None, :], mask=pmask, other=0.0)
            mt2 = tl.load(M2 + fk[:, None] * sm2_f + offs_n[None, :] * sm2_n, mask=mmask, other=0.0)
            acc += _dot(pt2, mt2, PRECISION, UPCAST)
    # relaxed: nothing reads OUT until the kernel has finished, so no ordering is needed
    tl.atomic_add(OUT + tok[:, None] * so_t + offs_n[None, :] * so_n, acc, mask=rmask[:, None] & nmask[None, :],
                  sem="relaxed")


@triton.jit
def _dh_kernel(
    DY, TOK, TILE_BLOCK, TILE_ROW0, BLOCK_INFO, PRE_OFF, H_OFF, PRE, DZ, HID, UNITS,
    WO, DT, AO,
    sdy_t, sdy_n, swo_n, swo_f, sdt_t, sdt_r, sao_r, sao_f,
    nb, n_tiles, n_col, N, R,
    GATED: tl.constexpr, LORA_O: tl.constexpr, WRITE_H: tl.constexpr, ACT: tl.constexpr,
    PERMUTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (token tile of block b, column tile of its units): dh = dy[tok] @ W_out[:, f] + dt[tok] @ A_out[:, f]
    (dt = dy B_out s_out, the LoRA path), then through the activation with the saved PRE:
    gated DZ <- (dg, du) at PRE_OFF's places, plain DZ <- du; HID <- h if WRITE_H."""
    b, offs_r, rmask, rstart, lo, Fb, pid_n = _tile_info(TILE_BLOCK, TILE_ROW0, BLOCK_INFO, nb, n_tiles, n_col,
                                                         BLOCK_M, GROUP_M)
    tok = tl.load(TOK + offs_r, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < Fb
    f = _unit_ids(UNITS, lo + cols, cmask, PERMUTED)
    dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dh = _gathered_gemm(dh, DY, tok, rmask, sdy_t, sdy_n, WO, f, cmask, swo_n, swo_f, N, PRECISION, UPCAST, BLOCK_K)
    if LORA_O:
        dh = _lora_add(dh, DT, tok, rmask, sdt_t, sdt_r, AO, f, cmask, sao_r, sao_f, R, 1.0,
                       PRECISION, UPCAST, BLOCK_R)
    grp = (offs_r - rstart)[:, None] * Fb + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    u_at = tl.load(PRE_OFF + nb + b) + grp
    u = tl.load(PRE + u_at, mask=omask, other=0.0).to(tl.float32)
    if GATED:
        g_at = tl.load(PRE_OFF + b) + grp
        g = tl.load(PRE + g_at, mask=omask, other=0.0).to(tl.float32)
        a, da = _act_grad(g, ACT)
        tl.store(DZ + g_at, (dh * u * da).to(DZ.dtype.element_ty), mask=omask)
        tl.store(DZ + u_at, (dh * a).to(DZ.dtype.element_ty), mask=omask)
        h = a * u
    else:
        a, da = _act_grad(u, ACT)
        tl.store(DZ + u_at, (dh * da).to(DZ.dtype.element_ty), mask=omask)
        h = a
    if WRITE_H:
        tl.store(HID + tl.load(H_OFF + b) + grp, h.to(HID.dtype.element_ty), mask=omask)


@triton.jit
def _wgrad_kernel(
    P, Q, OUT, TOK, CHUNK_BLOCK, CHUNK_ROW0, BLOCK_INFO, P_OFF, UNITS,
    sq_t, sq_c, so_f, so_c, nb, C, chunk, scale,
    PERMUTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[unit, c] += scale * sum over the chunk's rows of P_b[row, f] * Q[tok[row], c], fp32 atomics, unit
    the weights' index of block-order unit lo + f (_unit_ids).
    Program (chunk, unit tile, column tile); a chunk is up to `chunk` grouped rows of one block."""
    pid = tl.program_id(0)
    b = tl.load(CHUNK_BLOCK + pid).to(tl.int64)
    row0 = tl.load(CHUNK_ROW0 + pid).to(tl.int64)
    rstart = tl.load(BLOCK_INFO + b)
    rend = tl.minimum(tl.load(BLOCK_INFO + nb + b), row0 + chunk)
    lo = tl.load(BLOCK_INFO + 2 * nb + b)
    Fb = tl.load(BLOCK_INFO + 3 * nb + b) - lo
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < Fb
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    p = P + tl.load(P_OFF + b)
    acc = tl.zeros([BLOCK_F, BLOCK_C], dtype=tl.float32)
    for r0 in range(row0, rend, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        rmask = offs_r < rend
        tok = tl.load(TOK + offs_r, mask=rmask, other=0).to(tl.int64)
        pt = tl.load(p + (offs_r - rstart)[None, :] * Fb + cols[:, None], mask=fmask[:, None] & rmask[None, :],
                     other=0.0)  # P^T [BF, BK]
        qt = tl.load(Q + tok[:, None] * sq_t + offs_c[None, :] * sq_c, mask=rmask[:, None] & cmask[None, :],
                     other=0.0)  # [BK, BC]
        acc += _dot(pt, qt, PRECISION, UPCAST)
    units = _unit_ids(UNITS, lo + cols, fmask, PERMUTED)
    tl.atomic_add(OUT + units[:, None] * so_f + offs_c[None, :] * so_c, acc * scale,
                  mask=fmask[:, None] & cmask[None, :], sem="relaxed")


# --- routing metadata ----------------------------------------------------------------------------


@dataclass
class Routing:
    """Everything the kernels need to find a block's rows, in one place (see routing())."""

    counts: list[int]  # tokens per block (host)
    tok: Tensor  # [S] int32, token ids sorted by block then token
    info: Tensor  # [4, nb] int64: grouped row start, row end, first unit lo, unit end hi
    bounds: list[tuple[int, int]]
    tile_block: Tensor  # [n_tiles] int32: each token tile's block
    tile_row0: Tensor  # [n_tiles] int32: its first grouped row
    chunk_block: Tensor  # [n_chunks] int32, row chunks for the weight-grad kernel
    chunk_row0: Tensor
    pre_off: Tensor  # [2, nb] int64: where block b's g / u start in the saved pre-activations
    h_off: Tensor  # [nb] int64: where block b's rows start in a [n_b, Fb] grouped buffer
    pre_off_host: list[list[int]]
    pre_numel: int
    h_numel: int
    max_width: int  # the widest block
    units: Optional[Tensor] = None  # [F] int64: block-order unit i is the weights' unit units[i] (None: i)

    @property
    def rows(self) -> int:
        return self.tok.numel()

    def unit_args(self) -> tuple[Tensor, bool]:
        """The kernels' (UNITS, PERMUTED) arguments (a placeholder pointer when there is no permutation)."""
        return (self.tok, False) if self.units is None else (self.units, True)


def routing(block_mask: Tensor, spec: MlpSpec, block_m: int, chunk: int, counts: Optional[list[int]] = None,
            units: Optional[Tensor] = None) -> Routing:
    """Routing metadata: tokens sorted by chosen block, counts, offsets, tile lists. block_mask
    [T, nb] bool. One host sync (the counts, which size every buffer), none if `counts` is given
    (backward reads forward's from meta). units: the clustering permutation [F] (block-order unit i is
    the weights' unit units[i]), read by the kernels in place of a permuted copy of the weights."""
    T, nb = block_mask.shape
    dev = block_mask.device
    if counts is None:
        counts = block_mask.sum(0).tolist()  # the one host sync of the layer's forward
    S = sum(counts)
    # Block-major flat mask: position b * T + t. A stable sort that puts chosen entries first keeps
    # them in (block, token) order, as route_tokens' nonzero does, with no sync for the size.
    flat = block_mask.t().reshape(-1)
    order = torch.sort((~flat).to(torch.uint8), stable=True).indices[:S]
    tok = (order % max(T, 1)).to(torch.int32)
    bounds = block_bounds(spec.hidden, nb)
    widths = [hi - lo for lo, hi in bounds]
    n_pre = 2 if spec.gated else 1
    row_start, pre_off, h_off, tiles, chunks = [], [[], []], [], [], []
    r = pe = he = 0
    for b, n in enumerate(counts):
        row_start.append(r)
        pre_off[0].append(pe)  # gated: g first, then u (as the torch path saves them)
        pre_off[1].append(pe + (n * widths[b] if spec.gated else 0))
        h_off.append(he)
        tiles += [(b, r + i) for i in range(0, n, block_m)]
        chunks += [(b, r + i) for i in range(0, n, chunk)]
        r += n
        pe += n_pre * n * widths[b]
        he += n * widths[b]
    row_end = [s + n for s, n in zip(row_start, counts)]
    ints = torch.tensor(
        [row_start, row_end, [lo for lo, _ in bounds], [hi for _, hi in bounds], pre_off[0], pre_off[1], h_off],
        dtype=torch.int64).to(dev)  # one small host-to-device copy
    tiles = torch.tensor(tiles or [(0, 0)], dtype=torch.int32).to(dev)
    chunks = torch.tensor(chunks or [(0, 0)], dtype=torch.int32).to(dev)
    return Routing(counts, tok, ints[:4].contiguous(), bounds, tiles[:, 0].contiguous(), tiles[:, 1].contiguous(),
                   chunks[:, 0].contiguous(), chunks[:, 1].contiguous(), ints[4:6].contiguous(),
                   ints[6].contiguous(), pre_off, pe, he, max(widths) if widths else 0,
                   None if units is None else units.to(device=dev, dtype=torch.int64).contiguous())


# --- launch configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    block_m: int = 128  # token rows per program
    block_n: int = 128  # output columns per program
    block_k: int = 64  # reduction step
    chunk: int = 1024  # grouped rows per weight-grad program
    num_warps: int = 8
    num_stages: int = 3


# Output columns per program of the bf16/fp16 CUDA tiles. Compiled for sm_90 with Triton 3.6
# (LLaMA-7B's MLP, 8192 tokens, SwiGLU with LoRA; benchmarks/results/kernel_resources_sm90.json),
# 128 x 128 tiles spill: the dh kernel 3088 bytes a thread (its epilogue holds dh, both
# pre-activations, the activation and its derivative, each a [128, 128] fp32 tile), the two-product
# dx scatter 208-248; at 128 x 64 the dh kernel spills 128, the scatter none. Stays 128 until a GPU
# times 64 (bench_ffn.py's spt-50%-triton-sparse-forward-n64, gpu_check.sh step 3).
CUDA_BLOCK_N = 128


def default_tiles(device: torch.device, dtype: torch.dtype) -> Tiles:
    """128 x 128 x 64 bf16/fp16 tiles on CUDA, 8 warps, 3-stage pipeline (tensor cores; a stage of the
    gated up kernel is an x tile and two 64-wide weight tiles, 32 KB; of the two-product dx scatter,
    four 16 KB tiles, so that one runs 2 stages: see _launch_scatter). fp32 (exact "ieee" products,
    for checks more than speed) halves block_k and pipelines 2 deep, so every kernel stays well inside
    an H100's 227 KB of shared memory. Under the interpreter, small tiles: it is slow per program and
    per element alike, and small tiles exercise the edge masks."""
    if device.type != "cuda":
        return Tiles(32, 32, 32, 64, 4, 1)
    if dtype == torch.float32:
        return Tiles(128, 128, 32, 1024, 8, 2)
    return Tiles(block_n=CUDA_BLOCK_N)


# Token tiles per L2 group (_tile_info): 8 tiles of 128 gathered rows (8 MB of x at d_in 4096, bf16)
# beside a band of weight columns stay within an H100's 50 MB L2.
GROUP_M = 8


def _dot_args(dtype: torch.dtype) -> dict:
    """PRECISION: fp32 GEMMs use TF32 tensor cores exactly when torch's own fp32 matmuls on CUDA would
    (torch.backends.cuda.matmul.allow_tf32), so ffn_impl does not change the precision; else exact
    "ieee" products. UPCAST: the interpreter's bf16 workaround (see _dot)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    tf32 = dtype == torch.float32 and not interpreted and torch.backends.cuda.matmul.allow_tf32
    return dict(PRECISION="tf32" if tf32 else "ieee", UPCAST=interpreted and dtype == torch.bfloat16)


def _rank_tile(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))  # tl.dot needs >= 16 on every side


def _wk(W: Tensor, layout: str, hidden_side: str) -> tuple[Tensor, int, int]:
    """(W, stride over the other side, stride over hidden units) of a projection weight: in/gate W is
    [F, K] ("oi") or [K, F] ("io"); out W is [N, F] ("oi") or [F, N] ("io")."""
    s0, s1 = W.stride()
    if hidden_side == "rows":  # in / gate: units index rows of "oi"
        return (W, s1, s0) if layout == "oi" else (W, s0, s1)
    return (W, s0, s1) if layout == "oi" else (W, s1, s0)  # out: units index columns of "oi"


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's for fp32 activations under autocast, else x's."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _c(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


# --- forward ----------------------------------------------------------------------------------


def _check_deterministic() -> None:
    """The kernels sum a token's blocks and the weight-gradient chunks with atomics, so their last bits
    can change from run to run: under torch.use_deterministic_algorithms(True) that is an error (a
    warning with warn_only=True), as PyTorch does for its own such ops."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = ("spt option ffn_impl='triton': the routed MLP's Triton kernels add with atomics, which is not "
               "deterministic, and torch.use_deterministic_algorithms(True) is set; use ffn_impl='torch' (the "
               "default) or 'grouped'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def _check(x: Tensor, spec: MlpSpec) -> None:
    """Clear errors for what the kernels cannot do (callers fall back to the torch path before this)."""
    _check_deterministic()
    if spec.draws_dropout:
        raise ValueError("routed_mlp_triton: dropout (LoRA's, or over the hidden layer) is not implemented in the "
                         "kernels; use the torch path")
    if not triton_runs_on(x.device):
        raise ValueError(f"routed_mlp_triton: the kernels need CUDA tensors (got {x.device}); on the CPU use "
                         "ffn_impl='torch', or set TRITON_INTERPRET=1 before importing triton (tests)")


def routed_mlp_forward_triton(
    x: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor, cdtype: Optional[torch.dtype] = None,
    tiles: Optional[Tiles] = None, perm: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, list[int]]:
    """-> (y [T, N] in x.dtype, pre (flat, x.dtype, routed_mlp_forward's `saved` layout), counts per block).
    x [T, K]; block_mask [T, nb] bool; cdtype: the GEMMs' dtype (default x's). perm [F]: the hidden units
    in block order (the clustering), as routed_mlp_forward's: the kernels read the weights through it,
    the result is that of permute_hidden(w, spec, perm) without the copy."""
    _check(x, spec)
    cd = cdtype or x.dtype
    tiles = tiles or default_tiles(x.device, cd)
    T, K = x.shape
    N = out_features(w, spec)
    rt = routing(block_mask, spec, tiles.block_m, tiles.chunk, units=perm)
    pre = x.new_empty(rt.pre_numel)
    y32 = torch.zeros(T, N, device=x.device, dtype=torch.float32)
    if rt.rows > 0:
        xc = x.to(cd)
        h = torch.empty(rt.h_numel, device=x.device, dtype=cd)
        _launch_up(xc, w, spec, rt, pre, h, cd, tiles)
        W, s_n, s_f = _wk(_c(w.out_w, cd), spec.out_layout, "cols")  # M[f, n] = W_out[n, f]
        _launch_scatter(h, rt.h_off, W, s_f, s_n, None, None, 0, 0, y32, rt, cd, tiles)
        if w.out_a is not None:
            t = _rank_reduce(h, rt.h_off, w.out_a, "a", rt, T, cd, tiles)  # sum_b h_b A_out[:, lo:hi]^T [T, r]
            y32 += (t @ w.out_bb.float().t()) * spec.out_scale
    if w.out_b is not None:
        y32 += w.out_b.float()
    return y32.to(x.dtype), pre, rt.counts


def _launch_up(xc, w, spec, rt, pre, h, cd, tiles):
    RU = w.in_a.shape[0] if w.in_a is not None else 1
    RG = w.gate_a.shape[0] if w.gate_a is not None else 1
    dummy = xc
    WU, swu_k, swu_f = _wk(_c(w.in_w, cd), spec.in_layout, "rows")
    lu = bbu = lg = bbg = WG = dummy
    swg_k = swg_f = 0
    if w.in_a is not None:
        lu, bbu = xc @ _c(w.in_a, cd).t(), _c(w.in_bb, cd)  # x A^T [T, r], once, densely
    if spec.gated:
        WG, swg_k, swg_f = _wk(_c(w.gate_w, cd), spec.gate_layout, "rows")
        if w.gate_a is not None:
            lg, bbg = xc @ _c(w.gate_a, cd).t(), _c(w.gate_bb, cd)
    # Gated: two fp32 accumulators per program, so half-width column tiles keep the registers of one
    # 128 x 128 tile (the x tile is shared by gate and up, so the intensity is the same).
    block_n = max(16, tiles.block_n // 2) if spec.gated else tiles.block_n
    n_tiles, n_col = rt.tile_block.numel(), triton.cdiv(rt.max_width, block_n)
    units, permuted = rt.unit_args()
    _up_kernel[(n_tiles * n_col,)](
        xc, rt.tok, rt.tile_block, rt.tile_row0, rt.info, rt.pre_off, rt.h_off, pre, h, units,
        WU, dummy if w.in_b is None else w.in_b, lu, bbu,
        WG, dummy if w.gate_b is None else w.gate_b, lg, bbg,
        *xc.stride(), swu_k, swu_f, *_st(lu, w.in_a), *_bst(bbu, w.in_a), swg_k, swg_f,
        *_st(lg, w.gate_a), *_bst(bbg, w.gate_a),
        len(rt.counts), n_tiles, n_col, xc.shape[1], RU, RG, float(spec.in_scale), float(spec.gate_scale),
        GATED=spec.gated, BIAS_U=w.in_b is not None, LORA_U=w.in_a is not None,
        BIAS_G=w.gate_b is not None, LORA_G=w.gate_a is not None, ACT=ACT_CODES[spec.activation],
        PERMUTED=permuted, **_dot_args(cd), BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_K=tiles.block_k,
        BLOCK_R=_rank_tile(max(RU, RG)), GROUP_M=GROUP_M, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def _st(t: Tensor, present) -> tuple[int, int]:
    """Strides of a [T, r] LoRA input (0, 0 when absent: never read)."""
    return t.stride() if present is not None else (0, 0)


def _bst(bb: Tensor, present) -> tuple[int, int]:
    """LoRA B [F, r] read as BB[j, f]: (stride over r, stride over units)."""
    return (bb.stride(1), bb.stride(0)) if present is not None else (0, 0)


def _launch_scatter(P1, off1, M1, sm1_f, sm1_n, P2, M2, sm2_f, sm2_n, out, rt, cd, tiles, off2=None):
    """out [T, Nout] fp32 += grouped P1 @ M1[lo:hi] (+ P2 @ M2)."""
    N = out.shape[1]
    two = P2 is not None
    block_n = tiles.block_n if N > 16 else _rank_tile(N)
    n_tiles, n_col = rt.tile_block.numel(), triton.cdiv(N, block_n)
    units, permuted = rt.unit_args()
    _scatter_kernel[(n_tiles * n_col,)](
        P1, M1, P2 if two else P1, M2 if two else M1, out, rt.tok, rt.tile_block, rt.tile_row0, rt.info,
        off1, off2 if two else off1, units, sm1_f, sm1_n, sm2_f, sm2_n, *out.stride(), len(rt.counts), n_tiles,
        n_col, N, TWO=two, PERMUTED=permuted, **_dot_args(cd), BLOCK_M=tiles.block_m, BLOCK_N=block_n,
        BLOCK_K=tiles.block_k, GROUP_M=GROUP_M,
        num_warps=tiles.num_warps if block_n > 32 else 4, num_stages=min(tiles.num_stages, 2) if two else tiles.num_stages,
    )


def _rank_reduce(P: Tensor, off: Tensor, lora: Tensor, kind: str, rt: Routing, T: int, cd, tiles) -> Tensor:
    """sum over blocks of P_b @ (the block's rows of a LoRA factor), scattered to tokens: [T, r] fp32.
    kind "a": lora is A_out [r, F] (M[f, j] = A[j, f]); kind "b": lora is B [F, r] (M[f, j] = B[f, j])."""
    L = lora.to(cd)
    r = L.shape[0] if kind == "a" else L.shape[1]
    sm_f, sm_n = (L.stride(1), L.stride(0)) if kind == "a" else L.stride()
    out = torch.zeros(T, r, device=P.device, dtype=torch.float32)
    _launch_scatter(P, off, L, sm_f, sm_n, None, None, 0, 0, out, rt, cd, tiles)
    return out


# --- backward ---------------------------------------------------------------------------------


def _launch_wgrad(P, off, Q, out, so_f, so_c, scale, rt, cd, tiles):
    """out (fp32, viewed through so_f, so_c as [F, C]) [lo:hi] += scale * P_b^T Q[tok]."""
    C = Q.shape[1]
    block_c = tiles.block_n if C > 16 else _rank_tile(C)
    grid = (rt.chunk_block.numel(), triton.cdiv(rt.max_width, tiles.block_n), triton.cdiv(C, block_c))
    units, permuted = rt.unit_args()
    _wgrad_kernel[grid](
        P, Q, out, rt.tok, rt.chunk_block, rt.chunk_row0, rt.info, off, units, *Q.stride(), so_f, so_c,
        len(rt.counts), C, tiles.chunk, float(scale),
        PERMUTED=permuted, **_dot_args(cd), BLOCK_F=tiles.block_n, BLOCK_C=block_c, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps if block_c > 32 else 4, num_stages=tiles.num_stages,
    )


def routed_mlp_backward_triton(
    dy: Tensor, x: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor, needs_x: bool, needs: MlpWeights,
    pre: Tensor, counts: Optional[list[int]] = None, cdtype: Optional[torch.dtype] = None,
    tiles: Optional[Tiles] = None, perm: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], MlpWeights]:
    """Gradients of routed_mlp_forward_triton from the pre-activations it saved: (dx or None, grads per
    slot; None where not needed or absent), in the dtypes of x and the weights. counts: forward's
    tokens per block (saves the host sync). perm: the forward's; the gradients are with respect to w
    itself (written at each unit's own rows or columns: nothing to un-permute)."""
    _check(x, spec)
    cd = cdtype or x.dtype
    tiles = tiles or default_tiles(x.device, cd)
    T, K = x.shape
    rt = routing(block_mask, spec, tiles.block_m, tiles.chunk, counts, units=perm)
    want = {s for s, (t, n) in zip(MlpWeights._fields, zip(w, needs)) if t is not None and n}
    acc = {s: torch.zeros(getattr(w, s).shape, device=x.device, dtype=torch.float32) for s in want}
    dx32 = torch.zeros(T, K, device=x.device, dtype=torch.float32) if needs_x else None
    if "out_b" in want:
        acc["out_b"] += dy.float().sum(0)
    if rt.rows > 0:
        xc, dyc = x.to(cd), dy.to(cd)
        lora_o = w.out_a is not None
        dt = (dyc @ _c(w.out_bb, cd)) * spec.out_scale if lora_o else None  # dL/d(h A_out^T) [T, r]
        need_h = bool(want & {"out_w", "out_a", "out_bb"})
        dz = torch.empty(rt.pre_numel, device=x.device, dtype=cd)  # dg, du in pre's layout
        h = torch.empty(rt.h_numel if need_h else 1, device=x.device, dtype=cd)
        _launch_dh(dyc, w, spec, rt, pre, dz, h, dt, need_h, cd, tiles)
        # out projection's grads from h (grouped) and dy / dt (gathered by the kernel)
        if "out_w" in want:  # oi [N, F]: element (f, n) at n * s0 + f; io [F, N]
            g = acc["out_w"]
            so_f, so_c = (g.stride(1), g.stride(0)) if spec.out_layout == "oi" else g.stride()
            _launch_wgrad(h, rt.h_off, dyc, g, so_f, so_c, 1.0, rt, cd, tiles)
        if "out_a" in want:  # [r, F]
            g = acc["out_a"]
            _launch_wgrad(h, rt.h_off, dt, g, g.stride(1), g.stride(0), 1.0, rt, cd, tiles)
        if "out_bb" in want:  # dy^T (sum_b h_b A_out^T) s_out
            t = _rank_reduce(h, rt.h_off, w.out_a, "a", rt, T, cd, tiles)
            acc["out_bb"] += (dy.float().t() @ t) * spec.out_scale
        # input projections: dz rows are (g, u) of pre's layout
        projs = [("in", rt.pre_off[1])] + ([("gate", rt.pre_off[0])] if spec.gated else [])
        if needs_x:
            (p1, o1), *rest = projs
            W1, s1n, s1f = _wk(_c(getattr(w, f"{p1}_w"), cd), getattr(spec, f"{p1}_layout"), "rows")
            if rest:
                (p2, o2), = rest
                W2, s2n, s2f = _wk(_c(getattr(w, f"{p2}_w"), cd), getattr(spec, f"{p2}_layout"), "rows")
                _launch_scatter(dz, o1, W1, s1f, s1n, dz, W2, s2f, s2n, dx32, rt, cd, tiles, off2=o2)
            else:
                _launch_scatter(dz, o1, W1, s1f, s1n, None, None, 0, 0, dx32, rt, cd, tiles)
        for p, off in projs:
            A, Bm, scale = getattr(w, f"{p}_a"), getattr(w, f"{p}_bb"), getattr(spec, f"{p}_scale")
            if f"{p}_w" in want:  # oi [F, K]; io [K, F]
                g = acc[f"{p}_w"]
                so_f, so_c = g.stride() if getattr(spec, f"{p}_layout") == "oi" else (g.stride(1), g.stride(0))
                _launch_wgrad(dz, off, xc, g, so_f, so_c, 1.0, rt, cd, tiles)
            if f"{p}_b" in want:
                acc[f"{p}_b"] += _bias_grad(dz, rt.pre_off_host[1 if p == "in" else 0], rt)
            if A is None:
                continue
            if f"{p}_bb" in want:  # [F, r] += dz_b^T (x A^T) s
                g = acc[f"{p}_bb"]
                _launch_wgrad(dz, off, xc @ _c(A, cd).t(), g, *g.stride(), scale, rt, cd, tiles)
            if needs_x or f"{p}_a" in want:
                dtp = _rank_reduce(dz, off, Bm, "b", rt, T, cd, tiles) * scale  # d(x A^T) [T, r] fp32
                if needs_x:
                    dx32 += dtp @ A.float()
                if f"{p}_a" in want:
                    acc[f"{p}_a"] += (dtp.to(cd).t() @ xc).float()
    dx = None if dx32 is None else dx32.to(x.dtype)
    return dx, MlpWeights(**{s: (acc[s].to(getattr(w, s).dtype) if s in acc else None) for s in MlpWeights._fields})


def _bias_grad(dz: Tensor, offs: list[int], rt: Routing) -> Tensor:
    """Per-block column sums of a grouped buffer, placed at the block's units: [F] fp32."""
    F_total = rt.bounds[-1][1]
    out = torch.zeros(F_total, device=dz.device, dtype=torch.float32)
    for b, (lo, hi) in enumerate(rt.bounds):
        n = rt.counts[b]
        if n:
            sums = dz[offs[b]: offs[b] + n * (hi - lo)].view(n, hi - lo).float().sum(0)  # [Fb]
            if rt.units is None:
                out[lo:hi] += sums
            else:
                out.index_add_(0, rt.units[lo:hi], sums)
    return out


def _launch_dh(dyc, w, spec, rt, pre, dz, h, dt, need_h, cd, tiles):
    lora = w.out_a is not None
    WO, swo_n, swo_f = _wk(_c(w.out_w, cd), spec.out_layout, "cols")  # WO[n, f] at n * swo_n + f * swo_f
    ao = _c(w.out_a, cd) if lora else dyc
    R = w.out_a.shape[0] if lora else 1
    n_tiles, n_col = rt.tile_block.numel(), triton.cdiv(rt.max_width, tiles.block_n)
    units, permuted = rt.unit_args()
    _dh_kernel[(n_tiles * n_col,)](
        dyc, rt.tok, rt.tile_block, rt.tile_row0, rt.info, rt.pre_off, rt.h_off, pre, dz, h, units,
        WO, dt if lora else dyc, ao,
        *dyc.stride(), swo_n, swo_f, *(dt.stride() if lora else (0, 0)), *(ao.stride() if lora else (0, 0)),
        len(rt.counts), n_tiles, n_col, dyc.shape[1], R,
        GATED=spec.gated, LORA_O=lora, WRITE_H=need_h, ACT=ACT_CODES[spec.activation], PERMUTED=permuted,
        **_dot_args(cd),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=_rank_tile(R),
        GROUP_M=GROUP_M, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
