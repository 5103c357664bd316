"""Plain references of the attention kernels, with the kernels' signatures. Tests compare against them.

They favour obviousness over memory: each builds the full [N, Nk] score matrix; gradients come from
autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .pq import MASK_FORBIDDEN_AT_OR_BELOW


def sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: Optional[float] = None, softcap: float = 0.0
) -> Tensor:
    """Dense softmax restricted to each row's listed keys; rows with no keys give zeros. softcap > 0:
    the scaled scores are soft-capped first, cap * tanh(s / cap)."""
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    if scale is None:
        scale = D**-0.5
    k_full = k.repeat_interleave(G, dim=1).float()  # [B, H, Nk, D]
    v_full = v.repeat_interleave(G, dim=1).float()
    allowed = torch.zeros(B, H, N, Nk + 1, dtype=torch.bool, device=q.device)
    # slot -1 lands in the extra column Nk, which is dropped below
    allowed.scatter_(-1, torch.where(indices < 0, Nk, indices).long(), True)
    allowed = allowed[..., :Nk]
    s = _capped((q.float() @ k_full.transpose(-1, -2)) * scale, softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no keys
    return (p @ v_full).to(q.dtype)


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    scale: Optional[float] = None,
    is_causal: bool = False,
    bias: Optional[Tensor] = None,
    block_m: int = 64,
    block_n: int = 64,
    softcap: float = 0.0,
) -> Tensor:
    """Softmax attention where query i sees key j only if j's key block (j // block_n) is listed for
    i's query block (i // block_m) in block_idx [B, H or Hkv, ceil(N / block_m), Lb] (-1 = unused slot),
    j <= i when causal, and the mask (broadcastable to [B, H, N, Nk]) allows (i, j): a bool mask by
    True, an additive one by a value above MASK_FORBIDDEN_AT_OR_BELOW (lower forbids the key, not
    just down-weights it). Allowed keys get score q.k * scale (soft-capped to cap * tanh(. / cap) when
    softcap > 0), plus the additive mask. Rows with no allowed key give zeros."""
    s, allowed, listed = _scores_and_pairs(q, k, block_idx, scale, is_causal, bias, block_m, block_n, softcap)
    p = torch.softmax(s.masked_fill(~(allowed & listed), float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return (p @ _grouped(v, q.shape[1]).to(p.dtype)).to(q.dtype)


def _grouped(kv: Tensor, H: int) -> Tensor:
    """[B, Hkv, Nk, E] -> [B, H, Nk, E]: query head h reads kv head h // (H // Hkv)."""
    return kv.repeat_interleave(H // kv.shape[1], dim=1)


def _capped(s: Tensor, softcap: float) -> Tensor:
    """cap * tanh(s / cap), out of place (autograd differentiates it); s itself when softcap is 0."""
    return torch.tanh(s / softcap) * softcap if softcap else s


def _scores_and_pairs(q, k, block_idx, scale, is_causal, bias, block_m, block_n,
                      softcap=0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [B, H, N, Nk] (fp32, or the inputs' wider dtype), soft-capped, with an additive mask
    added; allowed [B, H, N, Nk] bool by the causal rule and the mask; listed [B, H, N, Nk] bool by
    block_idx) for the references above and below."""
    B, H, N, D = q.shape
    Nk = k.shape[2]
    if scale is None:
        scale = D**-0.5
    n_kb = -(-Nk // block_n)
    if block_idx.shape[1] != H:  # one list per GQA group (block_idx [B, Hkv, ...]) serves its heads
        block_idx = block_idx.repeat_interleave(H // block_idx.shape[1], dim=1)
    blocks = torch.zeros(B, H, block_idx.shape[2], n_kb + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(block_idx < 0, n_kb, block_idx).long(), True)  # -1 -> extra column
    q_block = torch.arange(N, device=q.device) // block_m
    k_block = torch.arange(Nk, device=q.device) // block_n
    listed = blocks[:, :, q_block][..., k_block]  # [B, H, N, Nk]
    allowed = torch.ones(1, 1, N, Nk, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed & (torch.arange(Nk, device=q.device).view(1, -1) <= torch.arange(N, device=q.device).view(-1, 1))
    acc = torch.promote_types(q.dtype, torch.float32)
    s = _capped((q.to(acc) @ _grouped(k, H).to(acc).transpose(-1, -2)) * scale, softcap)
    if bias is not None and bias.dtype == torch.bool:  # True = allowed
        allowed = allowed & bias
    elif bias is not None:
        s = s + bias.to(acc)
        allowed = allowed & (bias > MASK_FORBIDDEN_AT_OR_BELOW)
    return s, allowed.expand(B, H, N, Nk), listed


def exact_forward_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    scale: Optional[float] = None,
    is_causal: bool = False,
    bias: Optional[Tensor] = None,
    block_m: int = 64,
    block_n: int = 64,
    softcap: float = 0.0,
) -> Tensor:
    """Exact attention (every allowed key: the dense output) whose gradients are the exact Jacobian
    masked to the (query, key) pairs block_idx lists, as block_sparse_attention_reference lists them:
    the scores of unlisted pairs and the values they read are detached, while the softmax is over
    every allowed key (so its normaliser and rowsum(dP * P) are the full ones). The semantics of the
    attention site's exact_forward backward."""
    s, allowed, listed = _scores_and_pairs(q, k, block_idx, scale, is_causal, bias, block_m, block_n, softcap)
    s = torch.where(listed, s, s.detach())
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    pick = (listed & allowed).to(p.dtype)
    vg = _grouped(v, q.shape[1]).to(p.dtype)
    return ((p * pick) @ vg + (p * (1 - pick)) @ vg.detach()).to(q.dtype)
