"""Block-sparse exact attention: each query block attends to its listed key blocks only.

The CPU implementation (plain PyTorch, block-batched): a chunk of query blocks gathers its listed key
and value tiles as contiguous [block_n, D] rows, and every score, softmax and product is a batched
matmul over [block_m, Lb * block_n] tiles. Memory is bounded by the chunk, never N x N. Backward
recomputes the scores from q, k, v, block_idx and lse (flash-attention style), so forward saves only
what dense flash attention saves plus the small block list. `impl` picks this path, the Triton kernels
(block_sparse_triton.py, CUDA) or the dense reference.

Shapes:
    q          [B, H, N, D]           query head h reads kv head h // (H // Hkv): GQA without copies
    k, v       [B, Hkv, Nk, D | Dv]
    block_idx  [B, H, n_qb, Lb] int32 key blocks per query block (block_m rows), -1 = unused slot;
                                      the listed blocks of one row are distinct
    bias       broadcastable to [B, H, N, Nk]: additive float (<= MASK_FORBIDDEN_AT_OR_BELOW forbids the
               key) or bool (True = allowed)
    softcap    0.0, or the cap of soft-capped scores (softcap.py): cap * tanh(q.k * scale / cap), then bias
    out        [B, H, N, Dv]; lse [B, H, N] fp32 (-inf for a row with no allowed key: out 0, grads 0)
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .select import n_blocks
from .pq import MASK_FORBIDDEN_AT_OR_BELOW
from .softcap import capped
from .token_sparse import _acc, _dropout_scale, bias_grad_buffer  # shared with the token path

IMPLS = ("auto", "triton", "torch", "reference")
IMPL_ENV = "SPT_ATTENTION_IMPL"
# Elements of the largest per-chunk temporary ([B, H, C, block_m, Lb * block_n] scores or the gathered
# [B, H, C, Lb * block_n, D] keys); 2**22 fp32 = 16 MiB keeps the working set near the caches.
_CHUNK_ELEMENTS = 1 << 22


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> $SPT_ATTENTION_IMPL if set, else triton on CUDA, torch elsewhere."""
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto")
        if impl not in IMPLS:
            raise ValueError(f"{IMPL_ENV}={impl!r}: must be one of {', '.join(IMPLS)}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    return impl


def _blocks_per_chunk(B: int, H: int, block_m: int, Lb: int, block_n: int, D: int) -> int:
    per_block = B * H * max(Lb, 1) * block_n * max(block_m, D)
    return max(1, _CHUNK_ELEMENTS // max(1, per_block))


class _Tiles:
    """k, v padded to whole key blocks and viewed as rows of tiles: [B * Hkv * n_kb, block_n * D]."""

    def __init__(self, k: Tensor, v: Tensor, block_n: int, acc: torch.dtype):
        B, Hkv, Nk, D = k.shape
        self.n_kb = n_blocks(Nk, block_n)
        pad = self.n_kb * block_n - Nk
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
        vp = torch.nn.functional.pad(v, (0, 0, 0, pad)) if pad else v
        self.k = kp.to(acc).reshape(B * Hkv * self.n_kb, block_n * D)
        self.v = vp.to(acc).reshape(B * Hkv * self.n_kb, block_n * v.shape[-1])
        self.B, self.Hkv, self.Nk, self.block_n = B, Hkv, Nk, block_n

    def flat(self, idx: Tensor) -> Tensor:
        """Tile rows of block numbers idx [B, S, C, Lb], S selection heads (H, or Hkv when a GQA
        group shares its selection); unused slots read tile 0 and are masked later."""
        B, S = idx.shape[:2]
        b = torch.arange(B, device=idx.device).view(B, 1, 1, 1)
        kv_head = (torch.arange(S, device=idx.device) // (S // self.Hkv)).view(1, S, 1, 1)
        return (b * self.Hkv + kv_head) * self.n_kb + idx.clamp(min=0).long()

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(flat rows, keys [B, S, C, Lb * block_n, D], values [.., Dv]) of the listed tiles."""
        flat = self.flat(idx)
        B, S, C, Lb = idx.shape
        kg = self.k[flat].view(B, S, C, Lb * self.block_n, -1)
        vg = self.v[flat].view(B, S, C, Lb * self.block_n, -1)
        return flat, kg, vg


class _Layout:
    """How query rows of a chunk are laid out: S selection heads, each serving Gs = H / S query heads
    whose rows are stacked into one [Gs * block_m] tile row set, so one GEMM serves the GQA group."""

    def __init__(self, q: Tensor, block_idx: Tensor, Hkv: int, block_m: int):
        B, H, N, _ = q.shape
        S = block_idx.shape[1]
        if S not in (H, Hkv) or H % S:
            raise ValueError(f"block_sparse_attention: block_idx has {S} heads; expected H={H} or Hkv={Hkv}")
        self.B, self.H, self.N, self.S, self.Gs, self.block_m = B, H, N, S, H // S, block_m

    def rows(self, x: Tensor, r0: int, C: int, acc) -> Tensor:
        """Rows r0 .. r0 + C * block_m of x [B, H, N, E] (zero past N) as [B, S, C, Gs * block_m, E]."""
        B, S, Gs, bm = self.B, self.S, self.Gs, self.block_m
        xc = x[:, :, r0 : r0 + C * bm].to(acc)
        if xc.shape[2] < C * bm:
            xc = torch.nn.functional.pad(xc, (0, 0, 0, C * bm - xc.shape[2]))
        E = xc.shape[-1]
        return xc.reshape(B, S, Gs, C, bm, E).transpose(2, 3)  # [B, S, C, Gs, bm, E]

    def flat_rows(self, t: Tensor) -> Tensor:
        """[B, S, C, (Gs,) block_m, E] -> [B, S, C, Gs * block_m, E]."""
        return t.reshape(*t.shape[:3], self.Gs * self.block_m, t.shape[-1])

    def unrows(self, t: Tensor, r1: int, r0: int) -> Tensor:
        """[B, S, C, Gs * block_m, E] -> [B, H, r1 - r0, E] (drops rows past N)."""
        B, S, C = t.shape[:3]
        t = t.view(B, S, C, self.Gs, self.block_m, t.shape[-1])
        t = t if self.Gs == 1 else t.transpose(2, 3)
        return t.reshape(B, self.H, C * self.block_m, t.shape[-1])[:, :, : r1 - r0]


def _chunk_mask(idx: Tensor, r0: int, lay: _Layout, Nk: int, block_n: int, is_causal: bool,
                bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The general mask of a chunk's scores [B, S, C, Gs * block_m, Lb * block_n]: (allowed bool,
    bias values there or None).

    Rows past N are not masked: their dout is zero-padded, so they add nothing to any gradient, and
    their outputs are dropped."""
    B, S, C, Lb = idx.shape
    bm, Gs, N = lay.block_m, lay.Gs, lay.N
    key_start = idx.long().clamp(min=0) * block_n  # [B, S, C, Lb]
    row = r0 + torch.arange(C * bm, device=idx.device).view(C, bm)  # [C, bm]
    slot_ok = (idx >= 0) & (key_start < Nk)  # [B, S, C, Lb]
    key_pos = (key_start[..., None] + torch.arange(block_n, device=idx.device)).view(B, S, C, 1, 1, Lb * block_n)
    allowed = slot_ok[..., None].expand(B, S, C, Lb, block_n).reshape(B, S, C, 1, 1, Lb * block_n) & (key_pos < Nk)
    if is_causal:
        allowed = allowed & (key_pos <= row.view(1, 1, C, 1, bm, 1))
    bias_vals = None
    if bias is not None:
        rows = row.view(-1).clamp(max=N - 1)
        b = bias.expand(B, lay.H, bias.shape[2], Nk)
        b = b[:, :, rows] if bias.shape[2] != 1 else b.expand(B, lay.H, C * bm, Nk)
        b = b.reshape(B, S, Gs, C, bm, Nk).transpose(2, 3)  # [B, S, C, Gs, bm, Nk]
        bias_vals = torch.gather(b, -1, key_pos.clamp(max=Nk - 1).expand(B, S, C, Gs, bm, Lb * block_n))
        if bias.dtype == torch.bool:  # True = allowed
            allowed, bias_vals = allowed & bias_vals, None
        else:
            allowed = allowed & (bias_vals > MASK_FORBIDDEN_AT_OR_BELOW)
            bias_vals = lay.flat_rows(bias_vals)
    allowed = allowed.expand(B, S, C, Gs, bm, Lb * block_n) if Gs > 1 else allowed
    return lay.flat_rows(allowed.expand(*allowed.shape[:4], bm, Lb * block_n)), bias_vals


def _tiles_simple(lay: _Layout, Nk: int, block_n: int, is_causal: bool, diag_first: bool) -> bool:
    """True when a chunk needs only per-slot masks and, if causal, the causal pattern on slot 0: the
    keys fill whole blocks (no partial last block to mask), and (causal) block_m == block_n, N == Nk
    and the caller promises `diag_first`: slot 0 holds each query block's diagonal block and every
    other slot an earlier one, as select_key_blocks lists them. Decided from shapes and that promise
    alone: checking the indices would read device data on the host every chunk."""
    if Nk % block_n:
        return False
    if not is_causal:
        return True
    return diag_first and lay.block_m == block_n and lay.N == Nk


def _add_bias_grad(dbias: Tensor, strides: tuple, ds: Tensor, idx: Tensor, r0: int, lay: _Layout, Nk: int,
                   block_n: int) -> None:
    """dbias (bias_grad_buffer's) += the chunk's score gradient ds [B, S, C, Gs * block_m, Lb * block_n]
    at the (head, row, key) each entry scores: d(scores) is d(bias), the bias being added to them. Unused
    slots and rows past N carry ds = 0 (p is 0 there) and are clamped onto real places."""
    B, S, C, _, L = ds.shape
    Gs, bm, N = lay.Gs, lay.block_m, lay.N
    dev = ds.device
    sb, sh, sm, sn = strides
    key = (idx.long().clamp(min=0)[..., None] * block_n + torch.arange(block_n, device=dev)).view(B, S, C, 1, 1, L)
    row = (r0 + torch.arange(C * bm, device=dev)).clamp(max=N - 1).view(1, 1, C, 1, bm, 1)
    head = (torch.arange(S, device=dev).view(S, 1) * Gs + torch.arange(Gs, device=dev)).view(1, S, 1, Gs, 1, 1)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1, 1)
    flat = b * sb + head * sh + row * sm + key.clamp(max=Nk - 1) * sn  # [B, S, C, Gs, bm, L]
    dbias.view(-1).index_add_(0, flat.reshape(-1), ds.reshape(-1).to(dbias.dtype))


def _causal_slots(lay: _Layout, Nk: int, block_n: int, is_causal: bool, diag_first: bool, qb0: int, C: int,
                  Lb: int) -> int:
    """How many of the list slots a chunk of query blocks qb0 .. qb0 + C - 1 needs: causal with square
    blocks and N == Nk, a query block i sees key blocks 0 .. i only, so with diag_first's layout (the
    listed blocks first, distinct, unused slots after them, as selection writes them) its slots past
    i + 1 are unused, and the chunk's past qb0 + C. An every-block list of a causal call then costs
    the lower triangle of tiles, not the square. Decided from shapes alone (no read of the lists)."""
    if is_causal and diag_first and lay.block_m == block_n and lay.N == Nk:
        return min(Lb, qb0 + C)
    return Lb


def _scores(qc: Tensor, kg: Tensor, idx: Tensor, qb0: int, r0: int, lay: _Layout, Nk: int, block_n: int,
            scale: float, is_causal: bool, bias: Optional[Tensor], diag_first: bool, softcap: float = 0.0,
            slope: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """qc [B, S, C, R, D] x kg [B, S, C, Lb * block_n, D] -> (scores [B, S, C, R, Lb * block_n], -inf
    where a key is not allowed, capped, then bias added; the cap's slope there, or None: no cap or
    not asked)."""
    s, d = capped(torch.matmul(qc * scale, kg.transpose(-1, -2)), softcap, slope)
    return _masked(s, idx, r0, lay, Nk, block_n, is_causal, bias, diag_first), d


def _masked(s: Tensor, idx: Tensor, r0: int, lay: _Layout, Nk: int, block_n: int, is_causal: bool,
            bias: Optional[Tensor], diag_first: bool) -> Tensor:
    """The chunk's scores s with the bias added and -inf where a key is not allowed (in place)."""
    if bias is None and _tiles_simple(lay, Nk, block_n, is_causal, diag_first):
        B, S, C, Lb = idx.shape
        s6 = s.view(B, S, C, s.shape[3], Lb, block_n)
        s6.masked_fill_((idx < 0).view(B, S, C, 1, Lb, 1), float("-inf"))  # unused slots (no sync to skip it)
        if is_causal:  # key j of the diagonal tile is after row i of it iff j > i
            r = torch.arange(s.shape[3], device=s.device) % lay.block_m
            s6[..., 0, :].masked_fill_(r.view(-1, 1) < torch.arange(block_n, device=s.device).view(1, -1),
                                        float("-inf"))
        return s
    allowed, bias_vals = _chunk_mask(idx, r0, lay, Nk, block_n, is_causal, bias)
    if bias_vals is not None:
        s.add_(bias_vals.to(s.dtype))
    return s.masked_fill_(~allowed, float("-inf"))


def block_sparse_forward_torch(q, k, v, block_idx, scale, is_causal=False, bias=None, block_m=64, block_n=64,
                               dropout_p=0.0, seed=0, diag_first=False, softcap=0.0) -> tuple[Tensor, Tensor]:
    B, H, N, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    acc = _acc(q.dtype)
    out = q.new_zeros(B, H, N, Dv)
    lse = torch.full((B, H, N), float("-inf"), device=q.device, dtype=torch.float32)
    lay = _Layout(q, block_idx, Hkv, block_m)
    n_qb, Lb = block_idx.shape[2], block_idx.shape[3]
    if N == 0 or Lb == 0 or Nk == 0:
        return out, lse
    tiles = _Tiles(k, v, block_n, acc)
    step = _blocks_per_chunk(B, H, block_m, Lb, block_n, max(D, Dv))
    for qb0 in range(0, n_qb, step):
        C = min(step, n_qb - qb0)
        r0, r1 = qb0 * block_m, min(N, (qb0 + C) * block_m)
        idx = block_idx[:, :, qb0 : qb0 + C, : _causal_slots(lay, Nk, block_n, is_causal, diag_first, qb0, C, Lb)]
        _, kg, vg = tiles.gather(idx)
        s, _ = _scores(lay.flat_rows(lay.rows(q, r0, C, acc)), kg, idx, qb0, r0, lay, Nk, block_n, scale, is_causal,
                       bias, diag_first, softcap)
        row_lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [B, S, C, R, 1]
        p = s.sub_(row_lse.nan_to_num(neginf=0.0)).exp_()  # 0 where not allowed
        if dropout_p > 0.0:
            p = p * _dropout_scale(p.shape, dropout_p, seed, qb0, q.device, acc)
        out[:, :, r0:r1] = lay.unrows(torch.matmul(p, vg), r1, r0).to(q.dtype)
        lse[:, :, r0:r1] = lay.unrows(row_lse, r1, r0)[..., 0].float()
    return out, lse


def block_sparse_backward_torch(dout, q, k, v, block_idx, out, lse, scale, is_causal=False, bias=None,
                                block_m=64, block_n=64, dropout_p=0.0, seed=0,
                                diag_first=False, softcap=0.0, bias_grad=False) -> tuple[Tensor, ...]:
    """(dq, dk, dv), and d(bias) in the bias's shape and dtype when bias_grad (an additive bias that is
    learned: its gradient is the score gradient at the listed pairs, summed over its broadcast dims)."""
    B, H, N, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    acc = _acc(q.dtype)
    lay = _Layout(q, block_idx, Hkv, block_m)
    n_qb, Lb = block_idx.shape[2], block_idx.shape[3]
    dq = torch.zeros(B, H, N, D, device=q.device, dtype=acc)
    S, n_kb = block_idx.shape[1], n_blocks(Nk, block_n)
    # dk, dv per selection head and key block; GQA groups are summed at the end.
    dk_acc = torch.zeros(B * S, n_kb, block_n * D, device=q.device, dtype=acc)
    dv_acc = torch.zeros(B * S, n_kb, block_n * Dv, device=q.device, dtype=acc)
    dbias, strides = bias_grad_buffer(bias) if bias_grad else (None, None)
    if N > 0 and Lb > 0 and Nk > 0:
        tiles = _Tiles(k, v, block_n, acc)
        step = _blocks_per_chunk(B, H, block_m, Lb, block_n, max(D, Dv))
        # rowsum(dO * O) equals rowsum(P * dP) with or without dropout (O = P_drop V).
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # [B, H, N, 1]
        lse_rows = lse.nan_to_num(neginf=0.0)[..., None]  # [B, H, N, 1]
        for qb0 in range(0, n_qb, step):
            C = min(step, n_qb - qb0)
            r0, r1 = qb0 * block_m, min(N, (qb0 + C) * block_m)
            idx = block_idx[:, :, qb0 : qb0 + C, : _causal_slots(lay, Nk, block_n, is_causal, diag_first, qb0, C, Lb)]
            _, kg, vg = tiles.gather(idx)
            qc = lay.flat_rows(lay.rows(q, r0, C, acc))  # [B, S, C, R, D]
            s, slope = _scores(qc, kg, idx, qb0, r0, lay, Nk, block_n, scale, is_causal, bias, diag_first, softcap,
                               slope=True)
            p = s.sub_(lay.flat_rows(lay.rows(lse_rows, r0, C, torch.float32)).to(acc)).exp_()
            do = lay.flat_rows(lay.rows(dout, r0, C, acc))  # [B, S, C, R, Dv]
            dp = torch.matmul(do, vg.transpose(-1, -2))  # [B, S, C, R, Lb * block_n]
            if dropout_p > 0.0:
                keep = _dropout_scale(p.shape, dropout_p, seed, qb0, q.device, acc)
                p_used, dp = p * keep, dp * keep
            else:
                p_used = p
            dvg = torch.matmul(p_used.transpose(-1, -2), do)  # [B, S, C, Lb * block_n, Dv]
            ds = p.mul_(dp.sub_(lay.flat_rows(lay.rows(delta, r0, C, acc))))  # in place: p is done
            if dbias is not None:  # d(bias) is d(scores after the cap): before the cap's slope
                _add_bias_grad(dbias, strides, ds, idx, r0, lay, Nk, block_n)
            if slope is not None:  # through the cap: d(capped) / d(scaled scores)
                ds.mul_(slope)
            dq[:, :, r0:r1] = lay.unrows(torch.matmul(ds, kg), r1, r0) * scale
            dkg = torch.matmul(ds.transpose(-1, -2), qc * scale)  # [B, S, C, Lb * block_n, D]
            # Sum each listed tile's gradient into its key block with a one-hot GEMM: index_add_
            # over [block_n * D] rows runs one small kernel per row on CPU, ten times slower.
            onehot = torch.nn.functional.one_hot(idx.long().clamp(min=0), n_kb).to(acc)
            slots = idx.shape[-1]  # the chunk's (_causal_slots)
            onehot = (onehot * (idx >= 0)[..., None]).view(B * S, C * slots, n_kb).transpose(1, 2)
            dk_acc.baddbmm_(onehot, dkg.reshape(B * S, C * slots, block_n * D))
            dv_acc.baddbmm_(onehot, dvg.reshape(B * S, C * slots, block_n * Dv))
    G = S // Hkv
    dk = dk_acc.view(B, Hkv, G, n_kb * block_n, D).sum(2)[:, :, :Nk]
    dv = dv_acc.view(B, Hkv, G, n_kb * block_n, Dv).sum(2)[:, :, :Nk]
    grads = dq.to(q.dtype), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
    return grads + (dbias.to(bias.dtype),) if bias_grad else grads


def additive(bias: Optional[Tensor]) -> Optional[Tensor]:
    """A bool mask (True = allowed) as the additive float mask the Triton kernels read."""
    if bias is None or bias.dtype != torch.bool:
        return bias
    return torch.zeros(bias.shape, device=bias.device).masked_fill_(~bias, float("-inf"))


def block_sparse_forward(q, k, v, block_idx, scale, is_causal=False, bias=None, block_m=64, block_n=64,
                         dropout_p=0.0, seed=0, impl="auto", diag_first=False, softcap=0.0) -> tuple[Tensor, Tensor]:
    """(out, lse) by the chosen implementation. The Triton kernels have no dropout: with dropout_p > 0
    the torch path runs (same results, slower on GPU). diag_first: block_idx lists, for causal
    attention, each query block's diagonal block in slot 0, earlier blocks after it and unused slots
    (-1) last (what select_key_blocks makes), so the torch path masks only the diagonal tile and
    skips the slots no query block of a chunk can use (_causal_slots); False: any layout."""
    impl = resolve_impl(impl, q.device)
    if impl == "reference" and dropout_p == 0.0:  # lse unused: backward differentiates the reference
        from .reference import block_sparse_attention_reference

        out = block_sparse_attention_reference(q, k, v, block_idx, scale, is_causal, bias, block_m, block_n, softcap)
        return out, torch.zeros(q.shape[:3], device=q.device)
    if impl == "triton" and dropout_p == 0.0:
        from .block_sparse_triton import block_sparse_forward_triton

        return block_sparse_forward_triton(q, k, v, block_idx, scale, is_causal,
                                           additive(bias), block_m, block_n, softcap=softcap)
    return block_sparse_forward_torch(q, k, v, block_idx, scale, is_causal, bias, block_m, block_n, dropout_p, seed,
                                      diag_first, softcap)


def block_sparse_backward(dout, q, k, v, block_idx, out, lse, scale, is_causal=False, bias=None, block_m=64,
                          block_n=64, dropout_p=0.0, seed=0, impl="auto",
                          diag_first=False, softcap=0.0, bias_grad=False) -> tuple[Tensor, ...]:
    """(dq, dk, dv), and d(bias) when bias_grad (torch and reference paths: the Triton kernels compute
    none, so a learned bias runs the torch path)."""
    impl = resolve_impl(impl, q.device)
    if impl == "reference" and dropout_p == 0.0:
        from .reference import block_sparse_attention_reference

        if bias_grad:
            _, vjp = torch.func.vjp(lambda q_, k_, v_, b_: block_sparse_attention_reference(
                q_, k_, v_, block_idx, scale, is_causal, b_, block_m, block_n, softcap), q, k, v, bias)
            return vjp(dout)
        _, vjp = torch.func.vjp(lambda q_, k_, v_: block_sparse_attention_reference(
            q_, k_, v_, block_idx, scale, is_causal, bias, block_m, block_n, softcap), q, k, v)
        return vjp(dout)
    if impl == "triton" and dropout_p == 0.0 and not bias_grad:
        from .block_sparse_triton import block_sparse_backward_triton

        return block_sparse_backward_triton(dout, q, k, v, block_idx, out, lse, scale,
                                            is_causal, additive(bias), block_m, block_n, softcap=softcap)
    return block_sparse_backward_torch(dout, q, k, v, block_idx, out, lse, scale, is_causal, bias, block_m,
                                       block_n, dropout_p, seed, diag_first, softcap, bias_grad)
