"""Exact softmax attention over a per-query list of keys: SDDMM -> sparse softmax -> SpMM.

Shapes (letters as in the rest of the package):
    q        [B, H, N, D]      queries
    k        [B, Hkv, Nk, D]   keys; query head h reads kv head h // G, G = H // Hkv (GQA, no copies)
    v        [B, Hkv, Nk, Dv]  values
    indices  [B, H, N, L]      key positions per query, -1 marks an unused slot
    out      [B, H, N, Dv]
    lse      [B, H, N]         log-sum-exp of each row's scores (fp32 or wider), -inf for a row with no keys

This is the plain PyTorch path: it works on query chunks so that the gathered keys and values
([B, H, C, L, D] per chunk) stay within a fixed budget, and never builds an N x Nk matrix. Backward
recomputes the scores from q, k, v, indices and lse (flash-attention style) instead of saving them.
A row whose slots are all -1 yields zeros and zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dropout import draw_keep, keep_scale, stream_seed
from .softcap import capped, check_softcap


def bias_grad_buffer(bias: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """(a zero gradient (fp32 or wider) of the additive bias [B|1, H|1, N|1, Nk], its strides over the expanded
    [B, H, N, Nk]: 0 along broadcast dims, so the gradient sums over them as it is scattered)."""
    dbias = torch.zeros(bias.shape, device=bias.device, dtype=torch.promote_types(bias.dtype, torch.float32))
    sizes = list(bias.shape)
    strides = [0 if n == 1 else st for n, st in zip(sizes, dbias.stride())]
    return dbias, tuple(strides)

# Elements of one gathered [B, H, C, L, D] chunk (2**24 fp32 values = 64 MiB), at most 128 rows.
_CHUNK_ELEMENTS = 1 << 24
_MAX_ROWS = 128


def rows_per_chunk(B: int, H: int, N: int, L: int, D: int) -> int:
    """Query rows per chunk; depends on shapes only, so forward and backward chunk alike."""
    per_row = max(1, B * H * max(L, 1) * max(D, 1))
    return max(1, min(N, _MAX_ROWS, _CHUNK_ELEMENTS // per_row))


def _flat_key_index(idx: Tensor, Hkv: int, Nk: int) -> tuple[Tensor, Tensor]:
    """Map key positions [B, H, C, L] to rows of k.reshape(B * Hkv * Nk, D), plus a validity mask."""
    B, H = idx.shape[0], idx.shape[1]
    G = H // Hkv
    valid = idx >= 0
    b = torch.arange(B, device=idx.device).view(B, 1, 1, 1)
    kv_head = (torch.arange(H, device=idx.device) // G).view(1, H, 1, 1)
    flat = (b * Hkv + kv_head) * Nk + idx.clamp(min=0).long()
    return flat, valid


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def _dropout_scale(shape, p: float, seed: int, chunk_start: int, device, dtype) -> Tensor:
    """The dropout scale of one chunk's weights [shape] in dtype (0 or 1 / (1 - drop_share(p)): the
    16-bit masks of sparse_ops/dropout.py), reproducible from (seed, chunk_start) in backward."""
    return keep_scale(draw_keep(shape, p, stream_seed(seed, chunk_start), device), p, dtype)


def _gather_chunk(q, k_rows, v_rows, indices, r0, r1, Hkv, Nk, acc):
    """Rows r0:r1: (idx, flat, valid, q, gathered k, gathered v), the last three in `acc` dtype."""
    idx = indices[:, :, r0:r1]
    flat, valid = _flat_key_index(idx, Hkv, Nk)
    return idx, flat, valid, q[:, :, r0:r1].to(acc), k_rows[flat].to(acc), v_rows[flat].to(acc)


def _chunk_scores(
    qc: Tensor, kg: Tensor, valid: Tensor, idx: Tensor, scale: float, bias: Optional[Tensor], r0: int, r1: int,
    softcap: float = 0.0, slope: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """(scores of one chunk at its listed keys: [B, H, C, L] fp32, soft-capped (softcap.py), bias
    added, -inf at unused slots; the cap's slope where asked, else None)."""
    s, d = capped(torch.einsum("bhcd,bhcld->bhcl", qc, kg) * scale, softcap, slope)
    if bias is not None:
        B, H = idx.shape[0], idx.shape[1]
        b = bias.expand(B, H, bias.shape[2], bias.shape[3])[:, :, r0:r1]
        if b.shape[2] == 1:  # a bias broadcast over queries
            b = b.expand(-1, -1, r1 - r0, -1)
        s = s + torch.gather(b, -1, idx.clamp(min=0).long()).to(s.dtype)
    return s.masked_fill(~valid, float("-inf")), d


def sparse_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    scale: float,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, H, N, Dv] in q's dtype, lse [B, H, N] in the accumulation dtype). `bias` is an
    additive mask broadcastable to [B, H, N, Nk], read only at the listed keys; dropout applies to the
    normalised weights; softcap > 0 caps the scaled scores before the bias (softcap.py)."""
    B, H, N, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    L = indices.shape[-1]
    out = q.new_zeros(B, H, N, Dv)
    acc = _acc(q.dtype)
    lse = torch.full((B, H, N), float("-inf"), device=q.device, dtype=acc)
    if N == 0 or L == 0:
        return out, lse
    k_rows = k.reshape(B * Hkv * Nk, D)
    v_rows = v.reshape(B * Hkv * Nk, Dv)
    C = rows_per_chunk(B, H, N, L, max(D, Dv))
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        idx, flat, valid, qc, kg, vg = _gather_chunk(q, k_rows, v_rows, indices, r0, r1, Hkv, Nk, acc)
        s, _ = _chunk_scores(qc, kg, valid, idx, scale, bias, r0, r1, softcap)  # kg [B, H, C, L, D]
        row_lse = torch.logsumexp(s, dim=-1)  # [B, H, C]
        p = torch.exp(s - torch.nan_to_num(row_lse, neginf=0.0)[..., None])  # 0 at unused slots
        if dropout_p > 0.0:
            p = p * _dropout_scale(p.shape, dropout_p, seed, r0, q.device, acc)
        out[:, :, r0:r1] = torch.einsum("bhcl,bhcld->bhcd", p, vg).to(q.dtype)
        lse[:, :, r0:r1] = row_lse
    return out, lse


def sparse_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    softcap: float = 0.0,
    bias_grad: bool = False,
) -> tuple[Tensor, ...]:
    """Gradients (dq, dk, dv) of sparse_attention_forward, recomputing scores chunk by chunk; and
    d(bias) in the bias's shape and dtype when bias_grad (a learned additive bias: the score gradient
    at the listed keys, summed over the bias's broadcast dims)."""
    B, H, N, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    L = indices.shape[-1]
    acc = _acc(q.dtype)
    dq = torch.zeros(B, H, N, D, device=q.device, dtype=acc)
    dk_rows = torch.zeros(B * Hkv * Nk, D, device=q.device, dtype=acc)
    dv_rows = torch.zeros(B * Hkv * Nk, Dv, device=q.device, dtype=acc)
    dbias, strides = bias_grad_buffer(bias) if bias_grad else (None, None)
    if N > 0 and L > 0:
        k_rows = k.reshape(B * Hkv * Nk, D)
        v_rows = v.reshape(B * Hkv * Nk, Dv)
        C = rows_per_chunk(B, H, N, L, max(D, Dv))
        for r0 in range(0, N, C):
            r1 = min(N, r0 + C)
            idx, flat, valid, qc, kg, vg = _gather_chunk(q, k_rows, v_rows, indices, r0, r1, Hkv, Nk, acc)
            s, slope = _chunk_scores(qc, kg, valid, idx, scale, bias, r0, r1, softcap, slope=True)
            p = torch.exp(s - torch.nan_to_num(lse[:, :, r0:r1], neginf=0.0)[..., None])
            do = dout[:, :, r0:r1].to(acc)  # [B, H, C, Dv]
            # rowsum(dO * O) equals rowsum(P * dP) with or without dropout (O = P_drop V).
            delta = (do * out[:, :, r0:r1].to(acc)).sum(-1)  # [B, H, C]
            dp = torch.einsum("bhcd,bhcld->bhcl", do, vg)
            if dropout_p > 0.0:
                keep = _dropout_scale(p.shape, dropout_p, seed, r0, q.device, acc)
                p_used, dp = p * keep, dp * keep
            else:
                p_used = p
            ds = p * (dp - delta[..., None])  # [B, H, C, L]; 0 at unused slots since p is
            if dbias is not None:  # d(bias) is d(scores after the cap): before the cap's slope
                sb, sh, sm, sn = strides
                at = (torch.arange(B, device=q.device).view(B, 1, 1, 1) * sb
                      + torch.arange(H, device=q.device).view(1, H, 1, 1) * sh
                      + torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1) * sm + idx.long().clamp(min=0) * sn)
                dbias.view(-1).index_add_(0, at.reshape(-1), ds.reshape(-1).to(dbias.dtype))  # unused slots: ds 0
            if slope is not None:  # through the cap: d(capped) / d(scaled scores)
                ds = ds * slope
            dq[:, :, r0:r1] = torch.einsum("bhcl,bhcld->bhcd", ds, kg) * scale
            dk_rows.index_add_(0, flat.reshape(-1), (ds[..., None] * qc[..., None, :]).reshape(-1, D) * scale)
            dv_rows.index_add_(0, flat.reshape(-1), (p_used[..., None] * do[..., None, :]).reshape(-1, Dv))
    grads = (
        dq.to(q.dtype),
        dk_rows.view(B, Hkv, Nk, D).to(k.dtype),
        dv_rows.view(B, Hkv, Nk, Dv).to(v.dtype),
    )
    return grads + (dbias.to(bias.dtype),) if bias_grad else grads


def check_shapes(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> None:
    """Clear errors for the public op's inputs, naming the argument at fault."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sparse_attention: q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != D or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"sparse_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"sparse_attention: query heads ({H}) must be a multiple of kv heads ({k.shape[1]})")
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, N):
        raise ValueError(f"sparse_attention: indices must be [B, H, N, L] = [{B}, {H}, {N}, L]; got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64, torch.int16):
        raise ValueError(f"sparse_attention: indices must be an integer tensor; got {indices.dtype}")


# --- the public custom op: differentiable in q, k, v -------------------------------------------


@torch.library.custom_op("spt::sparse_attention", mutates_args=())
def _sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float,
                         softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    return sparse_attention_forward(q, k, v, indices, scale, softcap=softcap)


@_sparse_attention_op.register_fake
def _(q, k, v, indices, scale, softcap=0.0):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=_acc(q.dtype))


@torch.library.custom_op("spt::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, indices: Tensor, out: Tensor, lse: Tensor, scale: float,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    return sparse_attention_backward(dout, q, k, v, indices, out, lse, scale, softcap=softcap)


@_sparse_attention_backward_op.register_fake
def _(dout, q, k, v, indices, out, lse, scale, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, scale, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.scale, ctx.softcap = scale, softcap


def _backward(ctx, dout, dlse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    dq, dk, dv = _sparse_attention_backward_op(dout.contiguous(), q, k, v, indices, out, lse, ctx.scale, ctx.softcap)
    return dq, dk, dv, None, None, None


_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: Optional[float] = None,
                     softcap: float = 0.0) -> Tensor:
    """Exact softmax attention of each query over its listed keys (see the module docstring).

    q [B, H, N, D]; k, v [B, Hkv, Nk, D] with H % Hkv == 0; indices [B, H, N, L] key positions,
    -1 for an unused slot; softcap > 0 soft-caps the scaled scores to cap * tanh(s / cap). Returns
    out [B, H, N, D]; differentiable in q, k and v."""
    check_shapes(q, k, v, indices)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _sparse_attention_op(q, k, v, indices, float(scale), check_softcap(softcap))[0]
