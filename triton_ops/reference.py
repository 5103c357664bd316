"""Plain references for the fast ops, with the same signatures. Tests compare against these.

They favour obviousness over memory: sparse_attention_reference builds the full [N, Nk] score
matrix, routed_mlp_reference loops over tokens. Gradients come from autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .routed_mlp import ACTIVATIONS, MlpSpec, MlpWeights, block_bounds


def sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: Optional[float] = None
) -> Tensor:
    """Dense softmax restricted to each row's listed keys; rows with no keys give zeros."""
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
    s = (q.float() @ k_full.transpose(-1, -2)) * scale
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
) -> Tensor:
    """Softmax attention where query i sees key j only if j's key block (j // block_n) is listed for
    i's query block (i // block_m) in block_idx [B, H or Hkv, ceil(N / block_m), Lb] (-1 = unused slot),
    j <= i when causal, and the mask (broadcastable to [B, H, N, Nk]) allows (i, j): a bool mask by
    True, an additive one by a value above MASK_FORBIDDEN_AT_OR_BELOW (lower forbids the key, not
    just down-weights it). Allowed keys get score q.k * scale (+ the additive mask). Rows with no
    allowed key give zeros."""
    s, allowed, listed = _scores_and_pairs(q, k, block_idx, scale, is_causal, bias, block_m, block_n)
    p = torch.softmax(s.masked_fill(~(allowed & listed), float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return (p @ _grouped(v, q.shape[1]).to(p.dtype)).to(q.dtype)


def _grouped(kv: Tensor, H: int) -> Tensor:
    """[B, Hkv, Nk, E] -> [B, H, Nk, E]: query head h reads kv head h // (H // Hkv)."""
    return kv.repeat_interleave(H // kv.shape[1], dim=1)


def _scores_and_pairs(q, k, block_idx, scale, is_causal, bias, block_m, block_n) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [B, H, N, Nk] (fp32, or the inputs' wider dtype) with an additive mask added, allowed [B, H, N, Nk] bool by the causal
    rule and the mask, listed [B, H, N, Nk] bool by block_idx) for the references above and below."""
    from .pq import MASK_FORBIDDEN_AT_OR_BELOW

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
    s = (q.to(acc) @ _grouped(k, H).to(acc).transpose(-1, -2)) * scale
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
) -> Tensor:
    """Exact attention (every allowed key: the dense output) whose gradients are the exact Jacobian
    masked to the (query, key) pairs block_idx lists, as block_sparse_attention_reference lists them:
    the scores of unlisted pairs and the values they read are detached, while the softmax is over
    every allowed key (so its normaliser and rowsum(dP * P) are the full ones). The semantics of the
    attention site's exact_forward backward."""
    s, allowed, listed = _scores_and_pairs(q, k, block_idx, scale, is_causal, bias, block_m, block_n)
    s = torch.where(listed, s, s.detach())
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    pick = (listed & allowed).to(p.dtype)
    vg = _grouped(v, q.shape[1]).to(p.dtype)
    return ((p * pick) @ vg + (p * (1 - pick)) @ vg.detach()).to(q.dtype)


def routed_mlp_reference(
    x: Tensor, weights: MlpWeights, spec: MlpSpec, block_mask: Tensor
) -> Tensor:
    """y_t = sum over the blocks b chosen for token t of block b's output, plus the output bias.

    x [T, d_in]; block_mask [T, n_blocks] bool. No LoRA dropout (the reference is deterministic)."""
    act = ACTIVATIONS[spec.activation]
    bounds = block_bounds(spec.hidden, spec.n_blocks)
    w = weights

    def project(xt: Tensor, W, b, A, Bm, scale: float, layout: str) -> Tensor:
        y = xt @ (W if layout == "io" else W.t())
        if b is not None:
            y = y + b
        if A is not None:
            y = y + (xt @ A.t()) @ Bm.t() * scale
        return y

    rows = []
    for t in range(x.shape[0]):
        xt = x[t : t + 1]
        h = project(xt, w.in_w, w.in_b, w.in_a, w.in_bb, spec.in_scale, spec.in_layout)
        if spec.gated:
            h = act(project(xt, w.gate_w, w.gate_b, w.gate_a, w.gate_bb, spec.gate_scale, spec.gate_layout)) * h
        else:
            h = act(h)
        keep = torch.zeros(spec.hidden, dtype=h.dtype, device=h.device)
        for b, (lo, hi) in enumerate(bounds):
            if block_mask[t, b]:
                keep[lo:hi] = 1.0
        h = h * keep
        rows.append(project(h, w.out_w, w.out_b, w.out_a, w.out_bb, spec.out_scale, spec.out_layout))
    if not rows:
        d_out = w.out_w.shape[1] if spec.out_layout == "io" else w.out_w.shape[0]
        return x.new_zeros(0, d_out)
    return torch.cat(rows)


def exact_forward_mlp_reference(
    x: Tensor, weights: MlpWeights, spec: MlpSpec, block_mask: Tensor
) -> Tensor:
    """The dense MLP's output whose gradients are the exact Jacobian masked to the routed (token,
    block) pairs: the pairs block_mask leaves out add their output with every input detached, except
    the out projection's LoRA B, which (applied once per layer to every block's h A_out^T) keeps its
    exact gradient. routed_mlp.exact_mlp_forward's semantics, as a per-token loop."""
    routed = routed_mlp_reference(x, weights, spec, block_mask)
    frozen = {n: (None if t is None else t.detach()) for n, t in weights._asdict().items()}
    frozen["out_b"] = None  # added once, by the routed part
    frozen["out_bb"] = weights.out_bb
    return routed + routed_mlp_reference(x.detach(), MlpWeights(**frozen), spec, ~block_mask)


def linear_cross_entropy_reference(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, chunk: int = 1024, return_logits: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """The dense form as Hugging Face writes it: the whole [T, V] logits, upcast, one cross_entropy.
    `chunk` is accepted for the same signature and ignored."""
    logits = torch.nn.functional.linear(h, W, b)  # [*, V]
    loss = torch.nn.functional.cross_entropy(
        logits.float().view(-1, W.shape[0]), labels.reshape(-1), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing)
    return loss, (logits if return_logits else None)


def compensation_reference(x: Tensor, skipped: Tensor, U: Tensor, V: Tensor, M: Tensor) -> Tensor:
    """routed_mlp.compensation as a per-token loop over the skipped blocks (gradients by autograd)."""
    T, nb = skipped.shape
    r = U.shape[1] // nb
    rows = []
    for t in range(T):
        y = x.new_zeros(V.shape[1])
        for b in range(nb):
            if skipped[t, b]:
                y = y + (x[t] @ U[:, b * r : (b + 1) * r]) @ V[b * r : (b + 1) * r] + M[b]
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, V.shape[1])
