"""Block-sparse flash attention in Triton: forward, and backward with separate dq and dk/dv kernels.

Shapes (letters as in the rest of the package):
    q          [B, H, N, D]        queries
    k          [B, Hkv, Nk, D]     keys; query head h reads kv head h // G, G = H // Hkv (GQA in the
                                   kernel: no repeat_kv copies)
    v          [B, Hkv, Nk, Dv]    values
    block_idx  [B, S, Mb, Lb]      int32 key-block numbers per query block, Mb = ceil(N / block_m), one
                                   list per selection head: query head h reads list h // (H / S) (S = H,
                                   or Hkv when a GQA group shares its lists);
                                   key block j covers keys j*block_n .. j*block_n + block_n - 1 (the
                                   last one partial); -1 marks an unused slot
    bias       broadcastable to [B, H, N, Nk], optional: added to the scaled scores; a value at or
               below MASK_FORBIDDEN_AT_OR_BELOW (compared in the bias dtype, as the reference does)
               forbids the key; no gradient for bias
    softcap    0.0, or the cap of soft-capped scores (softcap.py): cap * tanh(q.k * scale / cap), before
               the bias (SOFTCAP: backward scales ds by the cap's slope, recomputed with the scores)
    out        [B, H, N, Dv]       in q's dtype; 0 for a row with no allowed key
    lse        [B, H, N]           float32, natural-log log-sum-exp of the row's scaled+biased scores
                                   over its allowed keys; -inf for a row with no allowed key

The semantics are those of reference.block_sparse_attention_reference (causal is top-left aligned:
key j is allowed for query i iff j <= i).

Design. One program per (b, h, query block) of block_m rows: the forward walks the row's listed key
blocks in slot order with an online softmax and saves only out and lse. Backward recomputes
p = exp(s - lse) tile by tile instead of saving the [N, Nk] probabilities:
  * dq kernel, one program per (b, h, query block), over the same listed key blocks; it also computes
    delta = rowsum(dout * out) for its rows, which the dk/dv kernel reads (PACK_GQA_DQ: the packed
    variant, a GQA group's heads sharing a list in one program, loads each k/v tile once per group);
  * dk/dv kernel, one program per (b, kv head, key block, piece of query blocks): it reads the lists
    of its query blocks (every selection head of its kv head) straight from block_idx, and for each
    list naming its key block adds that tile's share into fp32 dk/dv with atomics. Checking a list
    is one load of Lb numbers, so no reverse index is built (it was three more launches: a count with
    atomics, a prefix sum and a placement). One program per key block would be deterministic but
    serial where it matters: the sink block is listed by every query block, and on an H200 (SmolLM2
    heads, N=8192) that one program made the dk/dv kernel 7x slower than the dq kernel, so the query
    blocks are split into pieces of HEAD_BLOCKS_PER_PROGRAM / (H / Hkv). Key blocks nobody listed
    get zeros. Under torch.use_deterministic_algorithms(True), and where a key block's column is short
    (DIRECT_UP_TO_HEAD_BLOCKS: N up to 8192 at SmolLM2's and LLaMA-7B's heads, where a later H200 run
    of the list-reading kernel measured it no slower), each key block gets one program, which stores
    its sum in k's dtype: no atomics, the same bits every run, slower on the sink block at long N.
Everything in the forward and backward is sized by the shapes alone, so a call never waits for the
device; on an H200 the PyTorch-level index building it replaces was 40 of the ~100 launches of a
forward + backward (host time, not GPU time, was what made the op slower than FlashAttention).
All inputs are read through their strides (callers may pass transposed views). Accumulation is fp32;
tl.dot takes the inputs' own dtype (fp16/bf16 tensor cores), and fp32 inputs use exact "ieee" dot
products unless allow_tf32 is set. Scores are carried in base 2 (exp2 is one instruction on GPU).

Checked on an H200 (Triton 3.6, torch 2.11) against the reference, and on the CPU under
TRITON_INTERPRET=1. B=2, H=16, Hkv=4, N=8192, D=128, bf16, 64 x 64 blocks, 16 of 128 key blocks per
query block: forward 0.55 ms (dense SDPA forward 1.66 ms), backward 2.7 ms. Limit: fp32 inputs with
block_m = 128 and a 128-wide head tile need more shared memory than an H100/H200 has in the dk/dv
kernel; use block_m <= 64 for fp32 (bf16/fp16 run 128 x 64 fine).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pq import MASK_FORBIDDEN_AT_OR_BELOW

_LOG2E = 1.4426950408889634  # scores * log2(e) turn exp into exp2
# Kernels may read module globals only when they are tl.constexpr.
_LOG2E_C = tl.constexpr(_LOG2E)
_LN2_C = tl.constexpr(0.6931471805599453)


# --- kernels -----------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST (set only under TRITON_INTERPRET=1 for bf16): the interpreter
    multiplies bf16 tiles as their raw uint16 bits, so widen them first; the values are the same."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(base, offs_r, r_ok, stride_r, stride_c, n_cols, LO: tl.constexpr, COLS: tl.constexpr):
    """[R, COLS] tile of the matrix at base: rows offs_r (where r_ok), columns LO .. LO + COLS - 1
    (those below n_cols); 0 elsewhere. base is one pointer, or [R, 1] pointers (a head per row)."""
    offs_c = LO + tl.arange(0, COLS)
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=r_ok[:, None] & (offs_c[None, :] < n_cols), other=0.0)


@triton.jit
def _tile_t(base, offs_r, r_ok, stride_r, stride_c, n_cols, LO: tl.constexpr, COLS: tl.constexpr):
    """The transpose of _tile's tile, [COLS, R], loaded as such (k^T and v^T for the products)."""
    offs_c = LO + tl.arange(0, COLS)
    return tl.load(base + offs_c[:, None] * stride_c + offs_r[None, :] * stride_r,
                   mask=(offs_c[:, None] < n_cols) & r_ok[None, :], other=0.0)


@triton.jit
def _store_tile(base, val, offs_r, r_ok, stride_r, stride_c, n_cols, LO: tl.constexpr, COLS: tl.constexpr,
                ATOMIC: tl.constexpr):
    """Store (or atomically add, fp32) val [R, COLS] where _tile would load it from."""
    offs_c = LO + tl.arange(0, COLS)
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    ok = r_ok[:, None] & (offs_c[None, :] < n_cols)
    if ATOMIC:
        tl.atomic_add(ptrs, val, mask=ok)
    else:
        tl.store(ptrs, val.to(base.dtype.element_ty), mask=ok)


@triton.jit
def _mask_tile(s, bias_ptr, offs_m, offs_n, N, Nk, stride_bias_m, stride_bias_n, forbid_at,
               IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """s with -inf at forbidden (row, key) places: past N or Nk, above the diagonal (causal), a bias at or
    below forbid_at; the bias added (in base 2) where it is allowed."""
    allowed = (offs_m[:, None] < N) & (offs_n[None, :] < Nk)
    if IS_CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
    if HAS_BIAS:
        b_ptrs = bias_ptr + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n
        bias = tl.load(b_ptrs, mask=allowed, other=0.0).to(tl.float32)
        allowed = allowed & (bias > forbid_at)
        # Zero forbidden biases before scaling: finfo.min * log2(e) would overflow to -inf.
        s = s + tl.where(allowed, bias, 0.0) * _LOG2E_C
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp2: 1 - 2 / (e^2x + 1) is exactly 1 where e^2x overflows and -1 where it
    underflows (no NaN at either end); near 0 its absolute error is about fp32's epsilon."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E_C)) + 1.0)


@triton.jit
def _scores_tile(
    q, q2, k_base, bias_ptr, offs_m, offs_n, N, Nk, D, stride_kn, stride_kd, qk_scale2,
    stride_bias_m, stride_bias_n, forbid_at, cap2,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """(base-2 scores [BLOCK_M, BLOCK_N] of one (query tile, key tile), -inf where forbidden; the
    soft cap's slope 1 - tanh^2 there, or the scores again (unused) without SOFTCAP). SOFTCAP: the
    scaled scores are capped to cap * tanh(. / cap) before the bias; cap2 is the cap in base 2
    (cap * log2(e)), so s / cap2 is the natural scores over the cap.
    q [BLOCK_M, BLOCK_D] is loaded, and q2 [BLOCK_M, BLOCK_D2] the head dim's tail tile when
    BLOCK_D2 > 0 (split head tiles; else q2 is unused); k_base points at k[b, kv head, 0, 0];
    bias_ptr at bias[b, h, 0, 0]; a bias <= forbid_at forbids its key.
    Without a bias only tiles that cross the causal diagonal or the end of the rows or keys are masked
    (a run-time branch per tile): the others, most of a long row's, skip the comparisons and the select."""
    n_ok = offs_n < Nk
    kt = _tile_t(k_base, offs_n, n_ok, stride_kn, stride_kd, D, 0, BLOCK_D)  # [BD, BN]
    s = _dot(q, kt, PRECISION, UPCAST)  # fp32
    if BLOCK_D2 > 0:
        kt2 = _tile_t(k_base, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, BLOCK_D2)  # [BD2, BN]
        s += _dot(q2, kt2, PRECISION, UPCAST)
    s = s * qk_scale2
    slope = s
    if SOFTCAP:
        t = _tanh(s / cap2)
        s = t * cap2
        slope = 1.0 - t * t
    if HAS_BIAS:
        s = _mask_tile(s, bias_ptr, offs_m, offs_n, N, Nk, stride_bias_m, stride_bias_n, forbid_at, IS_CAUSAL, True)
    else:
        # the tile's first query row and last key (offs_m and offs_n are contiguous runs)
        m0 = tl.min(offs_m, axis=0)
        n1 = tl.max(offs_n, axis=0)
        edge = (tl.max(offs_m, axis=0) >= N) | (n1 >= Nk)
        if IS_CAUSAL:
            edge = edge | (n1 > m0)
        if edge:
            s = _mask_tile(s, bias_ptr, offs_m, offs_n, N, Nk, stride_bias_m, stride_bias_n, forbid_at, IS_CAUSAL,
                           False)
    return s, slope


@triton.jit
def _fwd_kernel(
    Q, K, V, BLOCK_IDX, BIAS, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_il,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, G, GS, N, Nk, D, Dv, Mb, Lb, qk_scale2, forbid_at, cap2,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: b * stride can pass 2**31 on long inputs
    mb = pid % Mb
    bh = pid // Mb
    b = bh // H
    h = bh % H
    kvh = h // G
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N

    q_base = Q + b * stride_qb + h * stride_qh
    q = _tile(q_base, offs_m, row_ok, stride_qm, stride_qd, D, 0, BLOCK_D)  # [BM, BD]
    q2 = q
    if BLOCK_D2 > 0:
        q2 = _tile(q_base, offs_m, row_ok, stride_qm, stride_qd, D, BLOCK_D, BLOCK_D2)  # [BM, BD2]
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
    idx_base = BLOCK_IDX + b * stride_ib + (h // GS) * stride_ih + mb * stride_im  # GS heads share a list

    # Causal: a key block starting at or after kv_end lies wholly above the diagonal of this tile.
    kv_end = Nk
    if IS_CAUSAL:
        kv_end = tl.minimum(Nk, mb * BLOCK_M + BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc2 = acc
    if BLOCK_DV2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], dtype=tl.float32)
    for slot in range(0, Lb):
        kb = tl.load(idx_base + slot * stride_il).to(tl.int64)
        if (kb >= 0) & (kb * BLOCK_N < kv_end):
            offs_n = kb * BLOCK_N + offs_n0
            s, _ = _scores_tile(q, q2, k_base, bias_base, offs_m, offs_n, N, Nk, D, stride_kn, stride_kd, qk_scale2,
                                stride_bias_m, stride_bias_n, forbid_at, cap2, IS_CAUSAL, HAS_BIAS, PRECISION, UPCAST,
                                BLOCK_D, BLOCK_D2, SOFTCAP)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with nothing allowed so far keeps m = -inf; shift by 0 there so that
            # exp2(-inf - -inf) never makes a NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # 0 at forbidden keys
            l_i = l_i * alpha + tl.sum(p, axis=1)
            n_ok = offs_n < Nk
            v = _tile(v_base, offs_n, n_ok, stride_vn, stride_vd, Dv, 0, BLOCK_DV)  # [BN, BDV]
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            if BLOCK_DV2 > 0:
                v2 = _tile(v_base, offs_n, n_ok, stride_vn, stride_vd, Dv, BLOCK_DV, BLOCK_DV2)  # [BN, BDV2]
                acc2 = acc2 * alpha[:, None] + _dot(p.to(v2.dtype), v2, PRECISION, UPCAST)
            m_i = m_new

    has_key = l_i > 0.0
    denom = tl.where(has_key, l_i, 1.0)[:, None]  # empty rows: acc is 0, so out is 0
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * _LN2_C, float("-inf"))
    o_base = OUT + b * stride_ob + h * stride_oh
    _store_tile(o_base, acc / denom, offs_m, row_ok, stride_om, stride_od, Dv, 0, BLOCK_DV, False)
    if BLOCK_DV2 > 0:
        _store_tile(o_base, acc2 / denom, offs_m, row_ok, stride_om, stride_od, Dv, BLOCK_DV, BLOCK_DV2, False)
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=row_ok)


@triton.jit
def _dq_over_list(
    q, q2, do, do2, delta, lse2, k_base, v_base, bias_ptr, idx_base, offs_m, kv_end,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_il, stride_bias_m, stride_bias_n,
    N, Nk, D, Dv, Lb, qk_scale2, forbid_at, cap2,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Unscaled (dq [ROWS, BLOCK_D], dq2 [ROWS, BLOCK_D2]) fp32 of a tile of query rows (q, do and
    their tail tiles q2, do2 where BLOCK_D2 / BLOCK_DV2 > 0; delta and lse2 [ROWS]; positions offs_m)
    over the key blocks its list names (idx_base: the list's slot 0), those starting before kv_end:
    sum of ds @ k, ds = p * (dout @ v^T - delta). dq2 is dq, unused, without a tail. bias_ptr: the
    rows' bias at [b, h] (a pointer, or [ROWS, 1] pointers when the rows' heads differ)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    dq2 = dq
    if BLOCK_D2 > 0:
        dq2 = tl.zeros([ROWS, BLOCK_D2], dtype=tl.float32)
    for slot in range(0, Lb):
        kb = tl.load(idx_base + slot * stride_il).to(tl.int64)
        if (kb >= 0) & (kb * BLOCK_N < kv_end):
            offs_n = kb * BLOCK_N + offs_n0
            n_ok = offs_n < Nk
            s, slope = _scores_tile(q, q2, k_base, bias_ptr, offs_m, offs_n, N, Nk, D, stride_kn, stride_kd,
                                    qk_scale2, stride_bias_m, stride_bias_n, forbid_at, cap2, IS_CAUSAL, HAS_BIAS,
                                    PRECISION, UPCAST, BLOCK_D, BLOCK_D2, SOFTCAP)
            p = tl.exp2(s - lse2[:, None])  # [ROWS, BN]; 0 at forbidden keys
            vt = _tile_t(v_base, offs_n, n_ok, stride_vn, stride_vd, Dv, 0, BLOCK_DV)  # [BDV, BN]
            dp = _dot(do, vt, PRECISION, UPCAST)
            if BLOCK_DV2 > 0:
                vt2 = _tile_t(v_base, offs_n, n_ok, stride_vn, stride_vd, Dv, BLOCK_DV, BLOCK_DV2)  # [BDV2, BN]
                dp += _dot(do2, vt2, PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:  # through the cap
                ds = ds * slope
            k = _tile(k_base, offs_n, n_ok, stride_kn, stride_kd, D, 0, BLOCK_D)  # [BN, BD]
            dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
            if BLOCK_D2 > 0:
                k2 = _tile(k_base, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, BLOCK_D2)  # [BN, BD2]
                dq2 += _dot(ds.to(k2.dtype), k2, PRECISION, UPCAST)
    return dq, dq2


@triton.jit
def _dq_rows_in(
    q_base, o_base, do_base, offs_m, row_ok,
    stride_qm, stride_qd, stride_om, stride_od, stride_dom, stride_dod, D, Dv,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr,
):
    """A dq program's rows: (q, q2, do, do2, delta = rowsum(dout * out) in fp32). The bases are
    pointers or [R, 1] pointers; q2 / do2 are the tail tiles, or q / do (unused) without one."""
    q = _tile(q_base, offs_m, row_ok, stride_qm, stride_qd, D, 0, BLOCK_D)  # [R, BD]
    do = _tile(do_base, offs_m, row_ok, stride_dom, stride_dod, Dv, 0, BLOCK_DV)  # [R, BDV]
    o = _tile(o_base, offs_m, row_ok, stride_om, stride_od, Dv, 0, BLOCK_DV)  # [R, BDV]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # [R]
    q2 = q
    do2 = do
    if BLOCK_D2 > 0:
        q2 = _tile(q_base, offs_m, row_ok, stride_qm, stride_qd, D, BLOCK_D, BLOCK_D2)  # [R, BD2]
    if BLOCK_DV2 > 0:
        do2 = _tile(do_base, offs_m, row_ok, stride_dom, stride_dod, Dv, BLOCK_DV, BLOCK_DV2)  # [R, BDV2]
        o2 = _tile(o_base, offs_m, row_ok, stride_om, stride_od, Dv, BLOCK_DV, BLOCK_DV2)
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), axis=1)
    return q, q2, do, do2, delta


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, BLOCK_IDX, BIAS, OUT, DOUT, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_il,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, G, GS, N, Nk, D, Dv, Mb, Lb, qk_scale2, scale, forbid_at, cap2,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """dq = scale * sum over listed key blocks of ds @ k, ds = p * (dout @ v^T - delta), where
    delta = rowsum(dout * out) is the softmax-gradient correction rowsum(p * dp), one number per row.
    The program computes delta for its rows and stores it in DELTA for the dk/dv kernel launched after
    it (no separate launch). LSE and DELTA are contiguous [B, H, N] float32."""
    pid = tl.program_id(0).to(tl.int64)
    mb = pid % Mb
    bh = pid // Mb
    b = bh // H
    h = bh % H
    kvh = h // G
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N

    q, q2, do, do2, delta = _dq_rows_in(
        Q + b * stride_qb + h * stride_qh, OUT + b * stride_ob + h * stride_oh,
        DOUT + b * stride_dob + h * stride_doh, offs_m, row_ok,
        stride_qm, stride_qd, stride_om, stride_od, stride_dom, stride_dod, D, Dv,
        BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2)
    tl.store(DELTA + bh * N + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E_C)  # empty rows: p is 0 anyway
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
    idx_base = BLOCK_IDX + b * stride_ib + (h // GS) * stride_ih + mb * stride_im  # GS heads share a list
    kv_end = Nk
    if IS_CAUSAL:
        kv_end = tl.minimum(Nk, mb * BLOCK_M + BLOCK_M)

    dq, dq2 = _dq_over_list(q, q2, do, do2, delta, lse2, k_base, v_base, bias_base, idx_base, offs_m, kv_end,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_il, stride_bias_m, stride_bias_n,
                            N, Nk, D, Dv, Lb, qk_scale2, forbid_at, cap2, IS_CAUSAL, HAS_BIAS, PRECISION, UPCAST,
                            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, SOFTCAP)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _store_tile(dq_base, dq * scale, offs_m, row_ok, stride_dqm, stride_dqd, D, 0, BLOCK_D, False)
    if BLOCK_D2 > 0:
        _store_tile(dq_base, dq2 * scale, offs_m, row_ok, stride_dqm, stride_dqd, D, BLOCK_D, BLOCK_D2, False)


@triton.jit
def _bwd_dq_packed_kernel(
    Q, K, V, BLOCK_IDX, BIAS, OUT, DOUT, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_il,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, G, GS, S, N, Nk, D, Dv, Mb, Lb, qk_scale2, scale, forbid_at, cap2,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr, HEADS: tl.constexpr, SUB_M: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """_bwd_dq_kernel with the GS query heads that share a list packed into one tile (GQA lists):
    one program per (b, selection head, query block, piece of SUB_M rows), whose HEADS * SUB_M
    rows are SUB_M query positions of each of the GS heads (HEADS = GS rounded up to a power of two;
    the rows of heads past GS are masked). Each listed key block's k and v tiles are loaded once for
    all the heads, and the score and gradient products are HEADS times taller. Row r is head
    sel * GS + r // SUB_M at position mb * BLOCK_M + piece * SUB_M + r % SUB_M."""
    PIECES: tl.constexpr = BLOCK_M // SUB_M
    pid = tl.program_id(0).to(tl.int64)
    piece = pid % PIECES
    rest = pid // PIECES
    mb = rest % Mb
    bs = rest // Mb
    b = bs // S
    sel = bs % S
    kvh = (sel * GS) // G  # the list's heads all read one kv head (_check)
    r = tl.arange(0, HEADS * SUB_M)
    head = sel * GS + r // SUB_M  # [R]
    offs_m = mb * BLOCK_M + piece * SUB_M + r % SUB_M  # [R]
    row_ok = ((r // SUB_M) < GS) & (offs_m < N)

    q, q2, do, do2, delta = _dq_rows_in(  # [R, 1] row bases: each row's head
        Q + b * stride_qb + head[:, None] * stride_qh, OUT + b * stride_ob + head[:, None] * stride_oh,
        DOUT + b * stride_dob + head[:, None] * stride_doh, offs_m, row_ok,
        stride_qm, stride_qd, stride_om, stride_od, stride_dom, stride_dod, D, Dv,
        BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2)
    row_at = (b * H + head) * N + offs_m  # [R]: rows of the contiguous [B, H, N] LSE and DELTA
    tl.store(DELTA + row_at, delta, mask=row_ok)
    lse = tl.load(LSE + row_at, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E_C)  # empty and masked rows: p is 0 or unused
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    bias_rows = BIAS + b * stride_bias_b + head[:, None] * stride_bias_h  # [R, 1]: each row's head
    idx_base = BLOCK_IDX + b * stride_ib + sel * stride_ih + mb * stride_im
    kv_end = Nk
    if IS_CAUSAL:  # the piece's last row is its highest position
        kv_end = tl.minimum(Nk, mb * BLOCK_M + (piece + 1) * SUB_M)

    dq, dq2 = _dq_over_list(q, q2, do, do2, delta, lse2, k_base, v_base, bias_rows, idx_base, offs_m, kv_end,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_il, stride_bias_m, stride_bias_n,
                            N, Nk, D, Dv, Lb, qk_scale2, forbid_at, cap2, IS_CAUSAL, HAS_BIAS, PRECISION, UPCAST,
                            HEADS * SUB_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, SOFTCAP)

    dq_rows = DQ + b * stride_dqb + head[:, None] * stride_dqh  # [R, 1]
    _store_tile(dq_rows, dq * scale, offs_m, row_ok, stride_dqm, stride_dqd, D, 0, BLOCK_D, False)
    if BLOCK_D2 > 0:
        _store_tile(dq_rows, dq2 * scale, offs_m, row_ok, stride_dqm, stride_dqd, D, BLOCK_D, BLOCK_D2, False)


@triton.jit
def _listed(BLOCK_IDX, sel, mb, nb, stride_ih, stride_im, stride_il, Lb, BLOCK_L: tl.constexpr):
    """Whether the list of (selection head sel, query block mb) names key block nb (lists hold
    distinct key blocks, as selection makes them). BLOCK_IDX points at batch row b."""
    offs_l = tl.arange(0, BLOCK_L)
    lst = tl.load(BLOCK_IDX + sel * stride_ih + mb * stride_im + offs_l * stride_il, mask=offs_l < Lb, other=-1)
    return tl.max((lst == nb).to(tl.int32), axis=0) > 0


@triton.jit
def _store_dkdv(dk_base, dv_base, dk, dk2, dv, dv2, offs_n, col_ok, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                D, Dv, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D2: tl.constexpr,
                BLOCK_DV2: tl.constexpr, ATOMIC: tl.constexpr):
    """A key block's dk and dv rows (and their tail tiles), stored or atomically added."""
    _store_tile(dk_base, dk, offs_n, col_ok, stride_dkn, stride_dkd, D, 0, BLOCK_D, ATOMIC)
    _store_tile(dv_base, dv, offs_n, col_ok, stride_dvn, stride_dvd, Dv, 0, BLOCK_DV, ATOMIC)
    if BLOCK_D2 > 0:
        _store_tile(dk_base, dk2, offs_n, col_ok, stride_dkn, stride_dkd, D, BLOCK_D, BLOCK_D2, ATOMIC)
    if BLOCK_DV2 > 0:
        _store_tile(dv_base, dv2, offs_n, col_ok, stride_dvn, stride_dvd, Dv, BLOCK_DV, BLOCK_DV2, ATOMIC)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, BLOCK_IDX, BIAS, DOUT, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_il,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Hkv, SG, GS, N, Nk, D, Dv, Mb, Lb, Nb, qk_scale2, scale, forbid_at, cap2,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr,
    BLOCK_L: tl.constexpr, QBLOCKS_PER_PROGRAM: tl.constexpr, DIRECT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program per (b, kv head, key block nb, piece): piece j covers query blocks
    j * QBLOCKS_PER_PROGRAM onwards, for each of the kv head's SG selection heads (GS query heads share
    a selection head's list). It reads those lists straight from BLOCK_IDX, and for each that names nb
    adds dv += p^T @ dout and dk += scale * ds^T @ q into fp32 DK, DV with atomics. No reverse index
    is built: checking a list is one load of Lb numbers, and most (list, key block) pairs do not
    match. A sink block listed by every query block still spreads over Mb / QBLOCKS_PER_PROGRAM
    programs, so no program walks all of them. DIRECT (QBLOCKS_PER_PROGRAM = Mb: one program per key
    block, for torch.use_deterministic_algorithms): the program holds its key block's whole sum and
    stores it in DK's and DV's own dtypes, zeros included: no atomics, the same bits every run.
    BLOCK_D2 / BLOCK_DV2 > 0: the head dims' tail tiles, carried beside the lead ones (dk2, dv2)."""
    pid = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    nb = pid % Nb
    bkv = pid // Nb
    b = bkv // Hkv
    kvh = bkv % Hkv
    mb_lo = piece * QBLOCKS_PER_PROGRAM
    mb_hi = tl.minimum(mb_lo + QBLOCKS_PER_PROGRAM, Mb)
    if IS_CAUSAL:  # query blocks that end at or before the key block starts see none of it
        mb_lo = tl.maximum(mb_lo, (nb * BLOCK_N) // BLOCK_M)
    idx_b = BLOCK_IDX + b * stride_ib

    n_listed = 0  # first pass: only list reads, so a program with nothing to do loads no k/v tile
    for sel in range(kvh * SG, kvh * SG + SG):
        for mb in range(mb_lo, mb_hi):
            n_listed += _listed(idx_b, sel, mb, nb, stride_ih, stride_im, stride_il, Lb, BLOCK_L).to(tl.int32)

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < Nk
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dk2 = dk
    dv2 = dv
    if BLOCK_D2 > 0:
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    if BLOCK_DV2 > 0:
        dv2 = tl.zeros([BLOCK_N, BLOCK_DV2], dtype=tl.float32)
    if n_listed > 0:
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        vt = _tile_t(v_base, offs_n, col_ok, stride_vn, stride_vd, Dv, 0, BLOCK_DV)  # v^T [BDV, BN]
        vt2 = vt
        if BLOCK_DV2 > 0:
            vt2 = _tile_t(v_base, offs_n, col_ok, stride_vn, stride_vd, Dv, BLOCK_DV, BLOCK_DV2)  # [BDV2, BN]
        for sel in range(kvh * SG, kvh * SG + SG):
            for mb in range(mb_lo, mb_hi):
                if _listed(idx_b, sel, mb, nb, stride_ih, stride_im, stride_il, Lb, BLOCK_L):
                    offs_m = mb * BLOCK_M + offs_m0
                    row_ok = offs_m < N
                    for h in range(sel * GS, sel * GS + GS):  # every query head reading this list
                        bh = b * H + h
                        q_base = Q + b * stride_qb + h * stride_qh
                        do_base = DOUT + b * stride_dob + h * stride_doh
                        q = _tile(q_base, offs_m, row_ok, stride_qm, stride_qd, D, 0, BLOCK_D)  # [BM, BD]
                        do = _tile(do_base, offs_m, row_ok, stride_dom, stride_dod, Dv, 0, BLOCK_DV)  # [BM, BDV]
                        q2 = q
                        do2 = do
                        if BLOCK_D2 > 0:
                            q2 = _tile(q_base, offs_m, row_ok, stride_qm, stride_qd, D, BLOCK_D, BLOCK_D2)
                        if BLOCK_DV2 > 0:
                            do2 = _tile(do_base, offs_m, row_ok, stride_dom, stride_dod, Dv, BLOCK_DV, BLOCK_DV2)
                        lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=float("-inf"))
                        lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E_C)
                        delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
                        bias_base = BIAS + b * stride_bias_b + h * stride_bias_h
                        s, slope = _scores_tile(q, q2, k_base, bias_base, offs_m, offs_n, N, Nk, D, stride_kn,
                                                stride_kd, qk_scale2, stride_bias_m, stride_bias_n, forbid_at, cap2,
                                                IS_CAUSAL, HAS_BIAS, PRECISION, UPCAST, BLOCK_D, BLOCK_D2, SOFTCAP)
                        p = tl.exp2(s - lse2[:, None])  # [BM, BN]; 0 at forbidden keys and padded rows
                        pt = tl.trans(p).to(do.dtype)
                        dv += _dot(pt, do, PRECISION, UPCAST)
                        dp = _dot(do, vt, PRECISION, UPCAST)
                        if BLOCK_DV2 > 0:
                            dv2 += _dot(pt, do2, PRECISION, UPCAST)
                            dp += _dot(do2, vt2, PRECISION, UPCAST)
                        ds = p * (dp - delta[:, None])
                        if SOFTCAP:  # through the cap
                            ds = ds * slope
                        dst = tl.trans(ds).to(q.dtype)  # ds^T [BN, BM]
                        dk += _dot(dst, q, PRECISION, UPCAST)
                        if BLOCK_D2 > 0:
                            dk2 += _dot(dst, q2, PRECISION, UPCAST)

    dk_base = DK + b * stride_dkb + kvh * stride_dkh
    dv_base = DV + b * stride_dvb + kvh * stride_dvh
    if DIRECT:  # the only program of its key block: it stores the whole sum, zeros included
        _store_dkdv(dk_base, dv_base, dk * scale, dk2 * scale, dv, dv2, offs_n, col_ok,
                    stride_dkn, stride_dkd, stride_dvn, stride_dvd, D, Dv, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, False)
    elif n_listed > 0:
        _store_dkdv(dk_base, dv_base, dk * scale, dk2 * scale, dv, dv2, offs_n, col_ok,
                    stride_dkn, stride_dkd, stride_dvn, stride_dvd, D, Dv, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, True)


# --- launchers ---------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_m: int, block_n: int) -> None:
    """Clear errors for the inputs the kernels cannot take."""
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_sparse_triton: {name} must be a power of two >= 16 (tl.dot's minimum); "
                             f"got {size}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"block_sparse_triton: q, k, v must be 4-D; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"block_sparse_triton: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"block_sparse_triton: query heads ({H}) must be a multiple of kv heads ({Hkv})")
    Mb = triton.cdiv(N, block_m)
    S = block_idx.shape[1] if block_idx.dim() == 4 else 0
    if block_idx.dim() != 4 or (block_idx.shape[0], block_idx.shape[2]) != (B, Mb) or not (
            S and H % S == 0 and (H // Hkv) % (H // S) == 0):
        raise ValueError(f"block_sparse_triton: block_idx must be [B, S, ceil(N / block_m), Lb] = [{B}, S, {Mb}, Lb] "
                         f"with S = H ({H}), Hkv ({Hkv}) or between (each list serves query heads of one kv "
                         f"head); got {tuple(block_idx.shape)}")


def _tile_d(d: int) -> int:
    """Head-size tile: the next power of two, at least 16 (tl.dot's minimum); padding is masked."""
    return max(16, triton.next_power_of_2(d))


# Head sizes between powers of two (80, 96) in two tiles, a power of two and a tail (64 + 16, 64 + 32),
# instead of one tile padded to the next power of two (128: 60% / 33% of each product's inner or
# outer size spent on zeros). Compiled for sm_90 at D 80 with Triton 3.6 (kernel_resources_sm90.json)
# it needs 18 / 28 / 68.5 KB of shared memory in the forward / dq / dk-dv kernels against 32 / 48 /
# 104.5, and 156 / 205 registers in the first two against 220 / 255 (dq spilling 24 bytes). Off until a
# GPU run times it against padding (gpu_check.sh step 2, Phi-2's heads); correct either way
# (tests/ops/triton_interpret, under TRITON_INTERPRET=1).
SPLIT_HEAD_TILES = False


def _head_tiles(d: int) -> tuple[int, int]:
    """(lead, tail) tile widths covering head size d: lead a power of two, tail 0 (one tile of lead,
    padded) or a power of two >= 16 (tl.dot's minimum) that covers d - lead. Split only where it
    covers fewer columns than the padded tile: 80 -> (64, 16), 96 -> (64, 32), 112 -> (128, 0)."""
    padded = _tile_d(d)
    if not SPLIT_HEAD_TILES or padded == d or padded <= 16:
        return padded, 0
    lead = padded // 2
    tail = max(16, triton.next_power_of_2(d - lead))
    return (lead, tail) if lead + tail < padded else (padded, 0)


def _tile_args(D: int, Dv: int) -> dict:
    """The kernels' head-tile constexprs for head sizes D (q, k) and Dv (v)."""
    (bd, bd2), (bdv, bdv2) = _head_tiles(D), _head_tiles(Dv)
    return dict(BLOCK_D=bd, BLOCK_D2=bd2, BLOCK_DV=bdv, BLOCK_DV2=bdv2)


def _bias_args(bias: Optional[Tensor], B: int, H: int, N: int, Nk: int, like: Tensor):
    """(tensor, 4 strides over [B, H, N, Nk], forbid_at). Broadcast dims get stride 0, so no copy is
    made. forbid_at is MASK_FORBIDDEN_AT_OR_BELOW rounded to the bias dtype, as the reference's
    `bias > threshold` compares in that dtype: in bf16 -1e4 becomes -9984, so a bf16 bias of -9984
    (which is what -1e4 rounds to) is forbidden too."""
    if bias is None:
        return like, (0, 0, 0, 0), 0.0  # never read: HAS_BIAS is False
    forbid_at = MASK_FORBIDDEN_AT_OR_BELOW
    if bias.is_floating_point():
        forbid_at = torch.tensor(forbid_at, dtype=bias.dtype).item()
    return bias, bias.expand(B, H, N, Nk).stride(), float(forbid_at)


def _cap2(softcap: float) -> float:
    """The soft cap in the kernels' base-2 scores (1.0, unread, without one: SOFTCAP is then False)."""
    return float(softcap) * _LOG2E if softcap else 1.0


def _dot_args(q: Tensor, allow_tf32: bool) -> dict:
    """PRECISION: 'ieee' = exact fp32 products, 'tf32' only on request (tl.dot's input_precision, in
    Triton since 3.0). UPCAST: the interpreter's bf16 tl.dot workaround (see _dot)."""
    return dict(
        PRECISION="tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee",
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.bfloat16,
    )


def _launch_args(q: Tensor, block_m: int, block_n: int, D: int, Dv: int) -> dict:
    """num_warps and num_stages. fp32 tiles of 64 x 128 pipelined 3 deep overflow shared memory in
    the dk/dv kernel (247 KB asked vs 227 KB on an H200), so wide fp32 tiles are not pipelined."""
    wide = max(block_m, block_n) * max(_tile_d(D), _tile_d(Dv)) >= 64 * 128
    return dict(
        num_warps=4 if block_m * block_n <= 64 * 64 else 8,
        num_stages=1 if (wide and q.element_size() >= 4) else 2,
    )


def block_sparse_forward_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    scale: float,
    is_causal: bool,
    bias: Optional[Tensor],
    block_m: int,
    block_n: int,
    allow_tf32: bool = False,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """-> (out [B, H, N, Dv] in q.dtype, lse [B, H, N] float32); lse = -inf for a row with no allowed
    key, whose out is 0. Inputs may be any strided views; nothing is copied. softcap > 0: scores
    soft-capped (softcap.py) before the bias."""
    _check(q, k, v, block_idx, block_m, block_n)
    B, H, N, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Mb, Lb = block_idx.shape[2], block_idx.shape[3]
    if B * H * N == 0 or Lb == 0:  # nothing to attend to (and no zero-size tensors reach the kernel)
        return q.new_zeros(B, H, N, Dv), torch.full((B, H, N), float("-inf"), device=q.device, dtype=torch.float32)
    out = q.new_empty(B, H, N, Dv)  # the kernel writes every row, empty ones included
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    bias_t, bias_strides, forbid_at = _bias_args(bias, B, H, N, Nk, q)
    _fwd_kernel[(B * H * Mb,)](
        q, k, v, block_idx, bias_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *block_idx.stride(), *bias_strides, *out.stride(), *lse.stride(),
        H, H // Hkv, H // block_idx.shape[1], N, Nk, D, Dv, Mb, Lb, float(scale) * _LOG2E, forbid_at,
        _cap2(softcap), IS_CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, **_dot_args(q, allow_tf32),
        BLOCK_M=block_m, BLOCK_N=block_n, **_tile_args(D, Dv), **_launch_args(q, block_m, block_n, D, Dv),
        SOFTCAP=bool(softcap),
    )
    return out, lse


# Query blocks per dk/dv program, times the query heads reading one kv head: a sink block (listed by
# every query block) spreads over many programs, and each program still amortises loading its k/v tile.
HEAD_BLOCKS_PER_PROGRAM = 16
# Up to this many head tiles in a key block's column (query blocks x query heads per kv head), the
# dk/dv kernel runs one program per key block (DIRECT: no atomics, no fp32 buffers, fills or casts),
# as under deterministic algorithms. On an H200 (gpu_check.sh, commit 9af3c06) a whole attention call
# took the same or less time that way at every point measured, up to 384 (SmolLM2 heads 9/3 at
# N=8192: 2.76 vs 2.71 ms; N=4096: 2.17 vs 2.45; LLaMA-7B heads at 8192: 10.03 vs 10.78) and its peak
# memory was about half (259 vs 516 MiB at the 7B shape); longer columns keep the split, unmeasured.
DIRECT_UP_TO_HEAD_BLOCKS = 384


# dq with the query heads that share a list packed into one tile (_bwd_dq_packed_kernel: k and v
# tiles loaded once per GQA group instead of once per head, products up to 128 rows tall). Off until
# a GPU run times it against the per-head kernel (bench_attention.py's spt-block-triton-packed-dq);
# correct either way (tests/ops/triton_interpret, under TRITON_INTERPRET=1).
PACK_GQA_DQ = False
PACKED_DQ_ROWS = 128  # rows of a packed dq tile: heads (a power of two) x query positions

# Launch settings of the dk/dv kernel (None: _launch_args's, as the other kernels). Compiled for
# sm_90 with the device machine's Triton 3.6 at N 8192, bf16, 64 x 64 tiles
# (benchmarks/results/kernel_resources_sm90.json), its two fp32 accumulators spill at the default 4
# warps, 2 stages: 136 bytes a thread at SmolLM2's heads, 856 at D 80 / 96 / 128 (one 128-wide tile).
# On 8 warps and 1 stage (DKDV_UNSPILLED) 0 and 48 (0 at D 80 with SPLIT_HEAD_TILES); its loop over
# (list, head) pairs has a run-time branch, so the pipelining that stages buy matters less than in dq.
# Unset until a GPU times it (bench_attention.py's spt-block-triton-dkdv-8warps; gpu_check.sh 1 and 2).
DKDV_UNSPILLED = {"num_warps": 8, "num_stages": 1}
DKDV_LAUNCH: Optional[dict] = None


def _dq_packing(heads_per_list: int, block_m: int) -> Optional[tuple[int, int]]:
    """(HEADS, SUB_M) of the packed dq kernel for lists shared by heads_per_list query heads, or None:
    the per-head kernel (one head per list, or packing off)."""
    if not PACK_GQA_DQ or heads_per_list <= 1:
        return None
    heads = triton.next_power_of_2(heads_per_list)
    return heads, min(block_m, max(16, PACKED_DQ_ROWS // heads))  # powers of two: SUB_M divides block_m


def block_sparse_backward_triton(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    is_causal: bool,
    bias: Optional[Tensor],
    block_m: int,
    block_n: int,
    allow_tf32: bool = False,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv) in the dtypes of q, k, v: gradients of block_sparse_forward_triton's out
    (none for bias). No host sync, and four to six launches whatever the shapes: the zero fills of
    the fp32 dk and dv, dq over each query block's listed key blocks (computing delta on the way),
    dk/dv reading the same lists, and the casts of dk and dv to k's and v's dtype (none for fp32).
    Under torch.use_deterministic_algorithms(True), and wherever a key block's column holds at most
    DIRECT_UP_TO_HEAD_BLOCKS head tiles: two launches (dq, then dk/dv with one program per key block
    writing k's and v's dtypes), every gradient the same bits on every run; slower where one key
    block is listed by very many query blocks (the sink block at long N), as that program walks them
    all."""
    _check(q, k, v, block_idx, block_m, block_n)
    B, H, N, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Mb, Lb = block_idx.shape[2], block_idx.shape[3]
    Nb = triton.cdiv(Nk, block_n)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)  # every row is written
    # Under torch.use_deterministic_algorithms, or for short key-block columns, one dk/dv program per
    # key block stores its rows once, in k's and v's dtypes; else dk, dv accumulate in fp32 across
    # programs (atomic adds: the summation order may vary by run). Two buffers, not views of one: the
    # custom op that returns them may not return aliases.
    direct = torch.are_deterministic_algorithms_enabled() or Mb * (H // Hkv) <= DIRECT_UP_TO_HEAD_BLOCKS
    if direct:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    else:
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if B * H * N == 0 or Lb == 0 or Nk == 0:
        return dq.zero_(), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    S = block_idx.shape[1]
    lse = lse.float().contiguous()  # the kernels index LSE and DELTA as contiguous [B, H, N]
    delta = torch.empty(B, H, N, device=q.device, dtype=torch.float32)  # written by the dq kernel
    bias_t, bias_strides, forbid_at = _bias_args(bias, B, H, N, Nk, q)
    common = dict(
        IS_CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, **_dot_args(q, allow_tf32),
        BLOCK_M=block_m, BLOCK_N=block_n, **_tile_args(D, Dv), **_launch_args(q, block_m, block_n, D, Dv),
        SOFTCAP=bool(softcap),
    )
    cap2 = _cap2(softcap)
    packing = _dq_packing(H // S, block_m)
    if packing is None:
        _bwd_dq_kernel[(B * H * Mb,)](
            q, k, v, block_idx, bias_t, out, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *block_idx.stride(), *bias_strides, *out.stride(), *dout.stride(),
            *dq.stride(),
            H, H // Hkv, H // S, N, Nk, D, Dv, Mb, Lb, float(scale) * _LOG2E, float(scale), forbid_at, cap2,
            **common,
        )
    else:
        heads, sub_m = packing
        _bwd_dq_packed_kernel[(B * S * Mb * (block_m // sub_m),)](
            q, k, v, block_idx, bias_t, out, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *block_idx.stride(), *bias_strides, *out.stride(), *dout.stride(),
            *dq.stride(),
            H, H // Hkv, H // S, S, N, Nk, D, Dv, Mb, Lb, float(scale) * _LOG2E, float(scale), forbid_at, cap2,
            **{**common, **_launch_args(q, heads * sub_m, block_n, D, Dv)}, HEADS=heads, SUB_M=sub_m,
        )
    # Each query block stands for the H / Hkv query heads reading this kv head: fewer blocks per
    # program then, so the work of one program stays about HEAD_BLOCKS_PER_PROGRAM head tiles.
    per_program = Mb if direct else max(1, HEAD_BLOCKS_PER_PROGRAM // (H // Hkv))
    _bwd_dkdv_kernel[(B * Hkv * Nb, triton.cdiv(Mb, per_program))](
        q, k, v, block_idx, bias_t, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *block_idx.stride(), *bias_strides, *dout.stride(), *dk.stride(),
        *dv.stride(),
        H, Hkv, S // Hkv, H // S, N, Nk, D, Dv, Mb, Lb, Nb, float(scale) * _LOG2E, float(scale), forbid_at, cap2,
        BLOCK_L=max(16, triton.next_power_of_2(Lb)), QBLOCKS_PER_PROGRAM=per_program, DIRECT=direct,
        **{**common, **(DKDV_LAUNCH or {})},
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
