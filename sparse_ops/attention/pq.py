"""Product quantization of keys and PQ-guided key selection (plain PyTorch path). The codebooks are
fitted in spt_compile/fitting/pq_codebooks.py.

Each head dimension D is split into S = D / dsub subspaces; each subspace has K codewords, so a key
is stored as S small codes and decodes to k_hat. The selection proxy is the asymmetric inner product
q . k_hat = sum_s q_s . codeword_s[code_s] (exact query, quantized key).

Shapes: codebooks [Hkv, S, K, dsub]; keys [B, Hkv, Nk, D]; codes [B, Hkv, Nk, S] (uint8).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# An additive mask value at or below this forbids the key: HF masks use finfo.min, old BERT -10000;
# exp(-1e4) is 0 in fp32, so dense attention gives such a key no weight either.
MASK_FORBIDDEN_AT_OR_BELOW = -1.0e4

# Elements of one [B, H, C, Nk] proxy-score chunk (64 MiB in fp32), and at most this many query rows
# per chunk: memory grows with N, never with N x N.
_SCORE_CHUNK_ELEMENTS = 1 << 24
MAX_ROWS_PER_CHUNK = 128


def pq_encode(keys: Tensor, codebooks: Tensor) -> Tensor:
    """Nearest codeword per subspace: keys [B, Hkv, Nk, D] -> codes [B, Hkv, Nk, S] uint8."""
    B, Hkv, Nk, D = keys.shape
    _, S, K, dsub = codebooks.shape
    xs = keys.float().view(B, Hkv, Nk, S, dsub)
    cb = codebooks.float()
    # ||x - c||^2 up to the per-key constant ||x||^2
    dist = (cb * cb).sum(-1)[None, :, None] - 2 * torch.einsum("bhnsd,hskd->bhnsk", xs, cb)
    return dist.argmin(dim=-1).to(torch.uint8)


def pq_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """codes [B, Hkv, Nk, S] -> reconstructed keys [B, Hkv, Nk, D] (fp32)."""
    B, Hkv, Nk, S = codes.shape
    dsub = codebooks.shape[-1]
    h = torch.arange(Hkv, device=codes.device).view(1, Hkv, 1, 1)
    s = torch.arange(S, device=codes.device).view(1, 1, 1, S)
    return codebooks.float()[h, s, codes.long()].reshape(B, Hkv, Nk, S * dsub)


def code_onehots(q: Tensor, k: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
    """The code-agreement proxy as an inner product: q and k encoded with the keys' codebooks (a
    query head uses its kv head's), one-hot per subspace, so q1 . k1 = number of subspaces whose
    codes agree. q [B, H, N, D] -> [B, H, N, S * K]; k [B, Hkv, Nk, D] -> [B, Hkv, Nk, S * K]."""
    B, H, N, D = q.shape
    Hkv, K = k.shape[1], codebooks.shape[2]
    q_codes = pq_encode(q.reshape(B, Hkv, (H // Hkv) * N, D), codebooks).view(B, H, N, -1)
    onehot = lambda codes: torch.nn.functional.one_hot(codes.long(), K).flatten(-2).float()  # noqa: E731
    return onehot(q_codes), onehot(pq_encode(k, codebooks))


def allowed_mask(mask: Optional[Tensor], r0: int, r1: int) -> Optional[Tensor]:
    """True where the explicit mask allows a key, for query rows r0:r1 (broadcast dims kept)."""
    if mask is None:
        return None
    m = mask[:, :, r0:r1] if mask.shape[2] != 1 else mask
    return m if m.dtype == torch.bool else m > MASK_FORBIDDEN_AT_OR_BELOW


def real_key_mask(mask: Tensor, B: int, Nk: int) -> Tensor:
    """Keys that some query may attend, i.e. not padding: [B, Nk] bool. The 4-D mask
    [B|1, H|1, N|1, Nk] is read in row chunks, so no full-size temporary is made."""
    rows = mask.shape[2]
    step = max(1, min(MAX_ROWS_PER_CHUNK, _SCORE_CHUNK_ELEMENTS // max(1, mask.shape[0] * mask.shape[1] * Nk)))
    any_allowed = torch.zeros(mask.shape[0], Nk, dtype=torch.bool, device=mask.device)
    for r0 in range(0, rows, step):
        any_allowed |= allowed_mask(mask, r0, min(rows, r0 + step)).any(dim=2).any(dim=1)
    return any_allowed.expand(B, Nk)


def keys_per_query(lengths: Tensor, density: float, top_l: Optional[int], min_keys: int = 0) -> Tensor:
    """L per sequence from its real key count (any shape, e.g. [B]): top_l, or ceil(density x
    length) but at least min_keys (the attention_min_keys floor) and 1 when the sequence has keys;
    never more than it has."""
    if top_l is not None:
        return torch.clamp(lengths, max=top_l)
    return torch.clamp(torch.ceil(lengths.double() * density).long(), min=max(1, min_keys)).minimum(lengths)


def select_keys(
    q: Tensor,
    k_proxy: Tensor,
    scale: float,
    budget_l: Tensor,
    is_causal: bool,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Top-L keys per query by proxy score q . k_proxy * scale (+ additive mask), never a forbidden
    key (after the query when causal, masked, or beyond the slots of its budget).

    q [B, H, N, D]; k_proxy [B, Hkv, Nk, D]; budget_l: keys per query, [B] (one per sequence) or
    [B, N] (per query: packed rows, whose sequences differ in length); mask bool (True = allowed) or
    additive, broadcastable to [B, H, N, Nk]. Returns indices [B, H, N, L] int32, L = the largest
    budget, -1 unused."""
    B, H, N, D = q.shape
    Hkv, Nk = k_proxy.shape[1], k_proxy.shape[2]
    G = H // Hkv
    L = int(budget_l.max()) if budget_l.numel() else 0
    indices = torch.full((B, H, N, L), -1, dtype=torch.int32, device=q.device)
    if L == 0 or N == 0:
        return indices
    row_l = budget_l.to(q.device).view(B, -1).expand(B, N)  # [B, N]
    slots = torch.arange(L, device=q.device)
    kp_t = k_proxy.float().transpose(-1, -2)  # [B, Hkv, D, Nk]
    C = max(1, min(N, MAX_ROWS_PER_CHUNK, _SCORE_CHUNK_ELEMENTS // max(1, B * H * Nk)))
    key_pos = torch.arange(Nk, device=q.device)
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G * (r1 - r0), D)
        s = (qc @ kp_t).view(B, H, r1 - r0, Nk) * scale
        allowed = allowed_mask(mask, r0, r1)
        if mask is not None and mask.dtype != torch.bool:
            s = s + (mask[:, :, r0:r1] if mask.shape[2] != 1 else mask).float()
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        if is_causal:
            future = key_pos.view(1, Nk) > torch.arange(r0, r1, device=q.device).view(-1, 1)
            s = s.masked_fill(future, float("-inf"))
        vals, idx = s.topk(L, dim=-1)
        chunk_l = row_l[:, r0:r1].reshape(B, 1, r1 - r0, 1)  # [B, 1, C, 1]
        vals, idx = _ties_by_position(s, vals, idx, chunk_l)
        idx = idx.masked_fill(torch.isneginf(vals) | (slots >= chunk_l), -1)
        indices[:, :, r0:r1] = idx.to(torch.int32)
    return indices


# Proxy scores this close (relative to the row's largest |score|) count as tied: far above fp32's
# rounding of a dot product of PQ-reconstructed keys (a few units in the last place), far below any
# difference that would matter for which keys a query attends to.
TIE_TOLERANCE = 2.0**-16


def _ties_by_position(s: Tensor, vals: Tensor, idx: Tensor, row_l: Tensor) -> tuple[Tensor, Tensor]:
    """Keys whose proxy scores tie (equal PQ codes) at a row's L_b-th place: keep the earliest
    positions, as any batch would. topk alone breaks such ties differently for different key counts
    and L, so a padded or packed sequence could pick another of the tied keys than it does alone.
    Equal codes give scores equal only up to rounding: the GEMM that forms them rounds differently
    for other shapes and thread counts, and even two columns of one product may differ in the last
    bits. So a tie is a score within TIE_TOLERANCE of the row's largest finite |score| of the L_b-th.
    s [..., Nk]; vals, idx [..., L] from s.topk(L), L = max L_b; row_l broadcasts to [..., 1]. Only
    rows with a tie at their L_b-th score are redone (slots past L_b stay for the caller to clear)."""
    L = vals.shape[-1]
    row_l = row_l.expand(*vals.shape[:-1], 1).clamp(min=1, max=L)
    t = vals.gather(-1, row_l - 1)  # [..., 1] the L_b-th score
    finite = torch.isfinite(s)
    tol = TIE_TOLERANCE * torch.where(finite, s.abs(), 0.0).amax(-1, keepdim=True)  # [..., 1]
    tied = ((s - t).abs() <= tol) & torch.isfinite(t)
    rows = tied.sum(-1) > 1
    if not bool(rows.any()):
        return vals, idx
    s_r, t_r, tied_r = s[rows], t[rows], tied[rows]  # [R, Nk], [R, 1], [R, Nk]
    above = (s_r > t_r) & ~tied_r
    room = row_l[rows] - above.sum(-1, keepdim=True)  # tied keys that fit
    keep = above | (tied_r & (tied_r.cumsum(-1) <= room))  # [R, Nk]: exactly L_b keys
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :L]
    new_vals = s_r.gather(-1, order)
    new_vals, by_score = new_vals.sort(dim=-1, descending=True, stable=True)  # best first, as topk lists
    vals, idx = vals.clone(), idx.clone()
    vals[rows], idx[rows] = new_vals, order.gather(-1, by_score)
    return vals, idx

