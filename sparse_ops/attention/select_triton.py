"""Block selection in Triton: the pooled-key proxy of select.py in two kernel launches.

The PyTorch selection (select.select_key_blocks) is about a hundred small operations per call
at N=8192 (pooling, one score GEMM, softmax, masks, top-k, per chunk of query blocks). On a GPU
each is a kernel launch of a few microseconds of work, so the host spends milliseconds launching
what the device does in tens of microseconds, and the [B, H, rows, n_kb] scores take memory. Here:
  * _pool_kernel, one program per (b, kv head, key block): the mean of the block's real keys and
    log(number of real keys);
  * _select_kernel, one program per (b, selection head, query block): scores q . k_bar * scale +
    log n_j for each of the query block's rows (and each query head of the group), softmax over key
    blocks, the largest share any row gives each block, the forced sink and diagonal blocks, the
    visibility masks, and a top-Lb by repeated arg-max (Lb is a few tens at most). Nothing of size
    rows x n_kb leaves the program.
Same semantics and output as select_key_blocks (descending score, so the diagonal block sits in
slot 0; -1 for unused slots). Ties between equal scores may be broken differently, and with bf16/fp16
inputs the scores come from tensor-core products (fp32 accumulation), so blocks whose scores differ
by less than that rounding may be swapped.

Long rows: _select_kernel holds a row's key blocks in one program's registers, so for n_kb =
ceil(Nk / block_n) above MAX_KEY_BLOCKS (N > 16384 in 64-blocks) _long_score_kernel computes the same
scores MAX_KEY_BLOCKS at a time (two passes per query head: the softmax statistics, then the shares)
into a [B, S, n_qb, n_kb] buffer, and one torch.topk picks the blocks: still a fixed number of
launches, no sync.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .select import _FORCED_DIAG, _FORCED_SINK, budget_on_device, n_blocks

MAX_KEY_BLOCKS = 256  # [block_m, 256] fp32 scores and a [256, D] k_bar tile per program
_FORCED_DIAG_C = tl.constexpr(_FORCED_DIAG)
_FORCED_SINK_C = tl.constexpr(_FORCED_SINK)


@triton.jit
def _pool_kernel(
    K, REAL, KBAR, LOGC,
    stride_kb, stride_kh, stride_kn, stride_kd,
    Hkv, Nk, D, n_kb,
    HAS_REAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """KBAR[b, kvh, j] = mean of the real keys of key block j (0 if none); LOGC[b, j] = log(count)
    (-inf for a block of padding only), written by the kv head 0 program."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seq = offs_n < Nk
    if HAS_REAL:
        w = tl.load(REAL + b * Nk + offs_n, mask=in_seq, other=0).to(tl.float32)  # [BN] 1 = real key
    else:
        w = in_seq.to(tl.float32)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=in_seq[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)  # [BN, BD]
    count = tl.sum(w, axis=0)
    k_bar = tl.sum(k * w[:, None], axis=0) / tl.maximum(count, 1.0)  # [BD]
    tl.store(KBAR + (bh * n_kb + j) * D + offs_d, k_bar, mask=offs_d < D)
    if kvh == 0:
        tl.store(LOGC + b * n_kb + j, tl.log(count))


@triton.jit
def _select_kernel(
    Q, KBAR, LOGC, LB, TILES, SINK, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_tb, stride_ts, stride_tm, stride_lb, stride_lq,
    S, Gs, G, Hkv, N, Nk, D, n_kb, n_qb, Lb, lb_all, scale,
    IS_CAUSAL: tl.constexpr, HAS_LB: tl.constexpr, HAS_TILES: tl.constexpr, HAS_SINK: tl.constexpr,
    PRECISION: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NKB: tl.constexpr,
):
    """OUT[b, s, qb, :Lb]: the top key blocks of query block qb for selection head s (query heads
    s * Gs .. s * Gs + Gs - 1), best first, -1 past the row's budget or its visible blocks."""
    qb = tl.program_id(0)
    bs = tl.program_id(1)
    b = bs // S
    s = bs % S
    kvh = (s * Gs) // G
    offs_j = tl.arange(0, NKB)
    offs_d = tl.arange(0, BLOCK_D)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    j_ok = offs_j < n_kb

    kbar = tl.load(KBAR + ((b * Hkv + kvh) * n_kb + offs_j[:, None]) * D + offs_d[None, :],
                   mask=j_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [NKB, BD] fp32
    logc = tl.load(LOGC + b * n_kb + offs_j, mask=j_ok, other=float("-inf"))  # [NKB]
    j_start = offs_j * BLOCK_N
    hidden = (~row_ok)[:, None] | (logc == float("-inf"))[None, :]  # [BM, NKB]
    if IS_CAUSAL:  # a query sees block j iff j starts at or before it
        hidden = hidden | (j_start[None, :] > rows[:, None])

    share = tl.zeros([NKB], dtype=tl.float32)
    for g in range(0, Gs):
        h = s * Gs + g
        q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if LOW_PRECISION:  # bf16/fp16 q: tensor cores, fp32 accumulation
            sc = tl.dot(q, tl.trans(kbar.to(q.dtype)))
        else:
            sc = tl.dot(q.to(tl.float32), tl.trans(kbar), input_precision=PRECISION)
        sc = sc * scale + logc[None, :]  # [BM, NKB]
        sc = tl.where(hidden, float("-inf"), sc)
        m = tl.max(sc, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(sc - m[:, None])  # 0 where hidden
        total = tl.sum(p, axis=1)
        p = p / tl.where(total == 0.0, 1.0, total)[:, None]  # a row that sees nothing shares 0
        share = tl.maximum(share, tl.max(p, axis=0))

    # The sink block and the diagonal block (holding the query block's last row) rank first.
    last_row = tl.minimum(qb * BLOCK_M + BLOCK_M - 1, tl.minimum(N, Nk) - 1)
    diag = tl.maximum(last_row, 0) // BLOCK_N
    if HAS_SINK:  # packed rows: the first block of this query block's sequence
        sink = tl.load(SINK + b * n_qb + qb)
    else:
        sink = 0
    score = share + tl.where(offs_j == diag, _FORCED_DIAG_C, tl.where(offs_j == sink, _FORCED_SINK_C, 0.0))
    visible = j_ok & (logc > float("-inf"))
    if IS_CAUSAL:
        visible = visible & (j_start <= tl.minimum(qb * BLOCK_M + BLOCK_M - 1, N - 1))
    if HAS_TILES:
        tiles = tl.load(TILES + b * stride_tb + s * stride_ts + qb * stride_tm + offs_j, mask=j_ok, other=0)
        visible = visible & (tiles != 0)
    score = tl.where(visible, score, float("-inf"))

    if HAS_LB:
        budget = tl.load(LB + b * stride_lb + qb * stride_lq)
    else:
        budget = lb_all
    out_row = OUT + ((b * S + s) * n_qb + qb) * Lb
    for slot in range(0, Lb):
        best = tl.max(score, axis=0)
        at = tl.argmax(score, axis=0)
        keep = (best > float("-inf")) & (slot < budget)
        tl.store(out_row + slot, tl.where(keep, at, -1).to(tl.int32))
        score = tl.where(offs_j == at, float("-inf"), score)


@triton.jit
def _row_scores(Q, KBAR, LOGC, b, h, kvh, Hkv, n_kb, c0, rows, row_ok, offs_d, N, D, scale,
                stride_qb, stride_qh, stride_qm, stride_qd,
                IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, LOW_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Query head h's scores q . k_bar * scale + log n_j of key blocks c0 .. c0 + CHUNK - 1 for the
    query block's rows, -inf where hidden: [BLOCK_M, CHUNK] fp32."""
    offs_j = c0 + tl.arange(0, CHUNK)
    j_ok = offs_j < n_kb
    kbar = tl.load(KBAR + ((b * Hkv + kvh) * n_kb + offs_j[:, None]) * D + offs_d[None, :],
                   mask=j_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [CHUNK, BD] fp32
    logc = tl.load(LOGC + b * n_kb + offs_j, mask=j_ok, other=float("-inf"))
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if LOW_PRECISION:
        sc = tl.dot(q, tl.trans(kbar.to(q.dtype)))
    else:
        sc = tl.dot(q.to(tl.float32), tl.trans(kbar), input_precision=PRECISION)
    hidden = (~row_ok)[:, None] | (logc == float("-inf"))[None, :]
    if IS_CAUSAL:
        hidden = hidden | ((offs_j * BLOCK_N)[None, :] > rows[:, None])
    return tl.where(hidden, float("-inf"), sc * scale + logc[None, :])


@triton.jit
def _long_score_kernel(
    Q, KBAR, LOGC, TILES, SINK, SCORE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_tb, stride_ts, stride_tm,
    S, Gs, G, Hkv, N, Nk, D, n_kb, n_qb, scale,
    IS_CAUSAL: tl.constexpr, HAS_TILES: tl.constexpr, HAS_SINK: tl.constexpr,
    PRECISION: tl.constexpr, LOW_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """SCORE[b, s, qb, :n_kb]: _select_kernel's ranking score of every key block (share, forced
    blocks, -inf where not visible) for rows too long for one program's registers: CHUNK key blocks
    at a time, per query head of the group a pass for each row's softmax statistics (online max and
    sum) and a pass for the shares (max with the earlier heads' in SCORE), then one pass adding the
    forced blocks and the visibility. The top-Lb is left to the caller (one torch.topk)."""
    qb = tl.program_id(0)
    bs = tl.program_id(1)
    b = bs // S
    s = bs % S
    kvh = (s * Gs) // G
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    score_row = SCORE + ((b * S + s) * n_qb + qb) * n_kb
    for g in range(0, Gs):
        h = s * Gs + g
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, n_kb, CHUNK):
            sc = _row_scores(Q, KBAR, LOGC, b, h, kvh, Hkv, n_kb, c0, rows, row_ok, offs_d, N, D, scale,
                             stride_qb, stride_qh, stride_qm, stride_qd, IS_CAUSAL, PRECISION, LOW_PRECISION,
                             BLOCK_N, CHUNK)
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(sc - m_ref[:, None]), axis=1)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        inv = 1.0 / tl.where(l == 0.0, 1.0, l)  # a row that sees nothing shares 0
        for c0 in range(0, n_kb, CHUNK):
            sc = _row_scores(Q, KBAR, LOGC, b, h, kvh, Hkv, n_kb, c0, rows, row_ok, offs_d, N, D, scale,
                             stride_qb, stride_qh, stride_qm, stride_qd, IS_CAUSAL, PRECISION, LOW_PRECISION,
                             BLOCK_N, CHUNK)
            share = tl.max(tl.exp(sc - m_ref[:, None]) * inv[:, None], axis=0)  # [CHUNK]
            j_ok = c0 + offs_c < n_kb
            if g > 0:
                share = tl.maximum(share, tl.load(score_row + c0 + offs_c, mask=j_ok, other=0.0))
            tl.store(score_row + c0 + offs_c, share, mask=j_ok)
    last_row = tl.minimum(qb * BLOCK_M + BLOCK_M - 1, tl.minimum(N, Nk) - 1)
    diag = tl.maximum(last_row, 0) // BLOCK_N
    if HAS_SINK:
        sink = tl.load(SINK + b * n_qb + qb)
    else:
        sink = 0
    for c0 in range(0, n_kb, CHUNK):
        offs_j = c0 + offs_c
        j_ok = offs_j < n_kb
        share = tl.load(score_row + offs_j, mask=j_ok, other=0.0)
        logc = tl.load(LOGC + b * n_kb + offs_j, mask=j_ok, other=float("-inf"))
        score = share + tl.where(offs_j == diag, _FORCED_DIAG_C, tl.where(offs_j == sink, _FORCED_SINK_C, 0.0))
        visible = j_ok & (logc > float("-inf"))
        if IS_CAUSAL:
            visible = visible & (offs_j * BLOCK_N <= tl.minimum(qb * BLOCK_M + BLOCK_M - 1, N - 1))
        if HAS_TILES:
            tiles = tl.load(TILES + b * stride_tb + s * stride_ts + qb * stride_tm + offs_j, mask=j_ok, other=0)
            visible = visible & (tiles != 0)
        tl.store(score_row + offs_j, tl.where(visible, score, float("-inf")), mask=j_ok)


def fits_one_program(Nk: int, block_n: int) -> bool:
    """Whether a row's key blocks fit _select_kernel's registers (else _long_score_kernel + topk)."""
    return n_blocks(Nk, block_n) <= MAX_KEY_BLOCKS


def select_key_blocks_triton(
    q: Tensor,
    k: Tensor,
    scale: float,
    budget_lb: Tensor,
    is_causal: bool,
    tiles: Optional[Tensor],
    real: Optional[Tensor],
    block_m: int,
    block_n: int,
    per_group: bool = True,
    sink: Optional[Tensor] = None,
    budget_dev: Optional[Tensor] = None,
    Lb: Optional[int] = None,
) -> Tensor:
    """As block_select.select_key_blocks (sink [B, n_qb] for packed rows, else None); `tiles` is the explicit mask's per-tile visibility
    [B, S | 1, n_qb, n_kb] bool (None without a mask) and `real` [B, Nk] bool (None: every key real).
    budget_lb [B] or [B, n_qb] (packed rows) int64 on the CPU: a batch whose query blocks all get the
    same budget passes it as a number, so no host-to-device copy waits on the stream; otherwise
    budget_dev, the caller's device copy (select.budget_on_device), or one made here. budget_lb None:
    budget_dev [B, n_qb] alone and Lb given (nothing read on the host: a fixed output shape)."""
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    S = Hkv if per_group else H
    n_qb, n_kb = n_blocks(N, block_m), n_blocks(Nk, block_n)
    if Lb is None:
        Lb = int(budget_lb.max()) if budget_lb.numel() else 0
    if Lb == 0 or N == 0 or Nk == 0:
        return torch.full((B, S, n_qb, Lb), -1, dtype=torch.int32, device=q.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    k_bar = torch.empty(B, Hkv, n_kb, D, device=q.device, dtype=torch.float32)
    log_count = torch.empty(B, n_kb, device=q.device, dtype=torch.float32)
    real_arg = real.to(torch.int8) if real is not None else log_count  # never read without HAS_REAL
    _pool_kernel[(n_kb, B * Hkv)](
        k, real_arg, k_bar, log_count, *k.stride(), Hkv, Nk, D, n_kb,
        HAS_REAL=real is not None, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
    )
    budget = budget_dev if budget_lb is None else budget_on_device(budget_lb, q.device, B, n_qb, budget_dev)
    uniform = isinstance(budget, int)
    lb_t = log_count if uniform else budget
    lb_strides = (0, 0) if uniform else lb_t.stride()
    if tiles is not None:
        tiles_t = tiles.to(torch.int8).expand(B, S, n_qb, n_kb)
        t_strides = tiles_t.stride()[:3]
        if tiles_t.stride(3) != 1:
            tiles_t = tiles_t.contiguous()
            t_strides = tiles_t.stride()[:3]
    else:
        tiles_t, t_strides = log_count, (0, 0, 0)
    sink_t = log_count if sink is None else sink.to(device=q.device, dtype=torch.int32).contiguous()
    # Half-precision q scores on tensor cores: exact fp32 ("ieee") products of a [64, 128] x
    # [128, 128] tile ran 7.7 ms per call at LLaMA-7B's shape (N=8192) on an H200, more than the
    # attention itself. The interpreter multiplies bf16 tiles wrongly (block_sparse_triton._dot),
    # so it keeps fp32 there.
    low = q.dtype in (torch.bfloat16, torch.float16) and os.environ.get("TRITON_INTERPRET") != "1"
    if not fits_one_program(Nk, block_n):
        return _select_long(q, k_bar, log_count, tiles_t, t_strides, sink_t, sink is not None, tiles is not None,
                            budget if uniform else 0, lb_t, uniform, Lb, S, Nk, is_causal, scale, low, block_m,
                            block_n, BLOCK_D)
    out = torch.empty((B, S, n_qb, Lb), dtype=torch.int32, device=q.device)  # the kernel writes every slot
    NKB = max(16, triton.next_power_of_2(n_kb))
    _select_kernel[(n_qb, B * S)](
        q, k_bar, log_count, lb_t, tiles_t, sink_t, out,
        *q.stride(), *t_strides, *lb_strides,
        S, H // S, H // Hkv, Hkv, N, Nk, D, n_kb, n_qb, Lb, budget if uniform else 0, float(scale),
        IS_CAUSAL=bool(is_causal), HAS_LB=not uniform, HAS_TILES=tiles is not None,
        HAS_SINK=sink is not None, PRECISION="ieee", LOW_PRECISION=low,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=BLOCK_D, NKB=NKB,
        num_warps=4 if NKB <= 64 else 8,
    )
    return out


def _select_long(q, k_bar, log_count, tiles_t, t_strides, sink_t, has_sink, has_tiles, budget_lb_int, lb_t, uniform, Lb,
                 S, Nk, is_causal, scale, low, block_m, block_n, BLOCK_D) -> Tensor:
    """The selection for rows of more than MAX_KEY_BLOCKS key blocks: every block's score by
    _long_score_kernel ([B, S, n_qb, n_kb] fp32 in memory: 1 MB per (b, s) at N=32768 in 64-blocks),
    then one top-k and the budget's mask, all on the device (no sync; launches independent of N)."""
    B, H, N, D = q.shape
    Hkv, n_kb = k_bar.shape[1], k_bar.shape[2]
    n_qb = n_blocks(N, block_m)
    score = torch.empty(B, S, n_qb, n_kb, device=q.device, dtype=torch.float32)
    _long_score_kernel[(n_qb, B * S)](
        q, k_bar, log_count, tiles_t, sink_t, score,
        *q.stride(), *t_strides,
        S, H // S, H // Hkv, Hkv, N, Nk, D, n_kb, n_qb, float(scale),
        IS_CAUSAL=bool(is_causal), HAS_TILES=has_tiles, HAS_SINK=has_sink, PRECISION="ieee", LOW_PRECISION=low,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=BLOCK_D, CHUNK=MAX_KEY_BLOCKS, num_warps=8,
    )
    vals, idx = score.topk(min(Lb, n_kb), dim=-1)  # [B, S, n_qb, Lb'] best first (diagonal, sink, shares)
    slot = torch.arange(vals.shape[-1], device=q.device)
    budget = budget_lb_int if uniform else lb_t.view(B, 1, n_qb, 1)
    out = torch.where((vals > float("-inf")) & (slot < budget), idx, -1).to(torch.int32)
    return out if out.shape[-1] == Lb else torch.nn.functional.pad(out, (0, Lb - out.shape[-1]), value=-1)


__all__ = ["select_key_blocks_triton", "fits_one_program", "MAX_KEY_BLOCKS"]
