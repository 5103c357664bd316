"""Ways real code writes attention, one small function per form, for the graph tests.

The first 30 are PyTorch Inductor's own list (torch/_inductor/fx_passes/fuse_attention.py,
`_sfdp_pattern_1` .. `_sfdp_pattern_30`), written as the torch code a model would contain (our
matcher reads the torch-level graph Dynamo produces, not the aten graph Inductor's matcher reads).
Every form is a function `f(q, k, v, mask, p)`:
    q, k, v  [B, H, N, D] ("bhnd"), [B, N, H, D] ("bnhd": the form permutes) or [B*H, N, D] ("3d")
    mask     None, or what `mask` names: "additive" [B, 1, N, N] float (0 / finfo.min, some random
             bias), "bool" [B, 1, N, N] True = allowed, "keep01" [B, N] 1 = real token (DistilBERT)
    p        dropout probability (the tests run 0.0 for numerics and 0.1 to see it carried over)
FORMS lists them with what the backend does: "matched", or "dense" and the reason explain gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

INV_SCALE = 4.0  # sqrt(D) for D = 16
SCALE = 1.0 / INV_SCALE


@dataclass(frozen=True)
class Form:
    name: str
    fn: Callable
    layout: str = "bhnd"  # "bhnd" | "bnhd" | "3d"
    mask: Optional[str] = None  # None | "additive" | "bool" | "keep01"
    dropout: bool = False  # the form has a dropout on the weights
    expect: str = "matched"  # "matched" | "dense"
    reason: str = ""  # a piece of explain's reason, for "dense"
    source: str = ""  # where the form comes from
    returns_kv: bool = False  # the form also returns (permuted) k and v, as Inductor's 18/22/23/26/27

    def __str__(self):
        return self.name


def _perm(q, k, v):
    return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)


def _perm_list(q, k, v):
    return q.permute([0, 2, 1, 3]), k.permute([0, 2, 1, 3]), v.permute([0, 2, 1, 3])


# --- Inductor's forms ----------------------------------------------------------------------------


def sfdp_1(q, k, v, mask, p):
    return torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1).matmul(v)


def sfdp_2(q, k, v, mask, p):
    return torch.matmul(q, k.transpose(-2, -1)).mul(SCALE).softmax(dim=-1).matmul(v)


def sfdp_3(q, k, v, mask, p):
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1), p=p).matmul(v)


def sfdp_4(q, k, v, mask, p):
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).mul(SCALE).softmax(dim=-1), p=p).matmul(v)


def sfdp_5(q, k, v, mask, p):
    w = torch.softmax((q @ k.transpose(-2, -1) / INV_SCALE) + mask, dim=-1)
    return w @ v


def sfdp_6(q, k, v, mask, p):
    w = torch.softmax((q @ k.transpose(-2, -1) / INV_SCALE) + mask, dim=-1)
    w = torch.dropout(w, p, True)
    return w @ v


def sfdp_7(q, k, v, mask, p):  # the fp16 model form: upcast scores, softmax in fp32, cast back
    dtype = q.dtype
    q, k, v = _perm(q, k, v)
    div = q @ k.transpose(-2, -1) / INV_SCALE
    div = div.to(torch.float32)
    w = torch.softmax(div, dim=-1)
    w = torch.dropout(w, p, True)
    w = w.to(dtype)
    v = v.to(w.dtype)
    return w @ v


def sfdp_8(q, k, v, mask, p):
    dtype = q.dtype
    q, k, v = _perm(q, k, v)
    div = q @ k.transpose(-2, -1) / INV_SCALE
    div = div.to(torch.float32)
    w = torch.softmax(div, dim=-1).to(dtype)
    v = v.to(w.dtype)
    return w @ v


def sfdp_9(q, k, v, mask, p):  # the query scaled before the product
    dtype = q.dtype
    q, k, v = _perm(q, k, v)
    q = q / INV_SCALE
    div = (q @ k.transpose(-2, -1)).to(torch.float32)
    w = torch.dropout(torch.softmax(div, dim=-1), p, True).to(dtype)
    return w @ v.to(w.dtype)


def sfdp_10(q, k, v, mask, p):
    dtype = q.dtype
    q, k, v = _perm(q, k, v)
    q = q / INV_SCALE
    div = (q @ k.transpose(-2, -1)).to(torch.float32)
    w = torch.softmax(div, dim=-1).to(dtype)
    return w @ v.to(w.dtype)


def sfdp_11(q, k, v, mask, p):
    q, k, v = _perm(q, k, v)
    return torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1).matmul(v)


def sfdp_12(q, k, v, mask, p):
    q, k, v = _perm(q, k, v)
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1), p=p).matmul(v)


def sfdp_13(q, k, v, mask, p):  # [B*H, N, D] through bmm, no scaling
    w = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    w = F.dropout(w, p=p)
    return torch.bmm(w, v)


def sfdp_14(q, k, v, mask, p):  # BERT-large
    q, k, v = _perm_list(q, k, v)
    return (torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE) + mask).softmax(dim=-1).matmul(v)


def _distilbert_mask(mask, scores, bs, k_len):
    return (mask == 0).view((bs, 1, 1, k_len)).expand_as(scores)


def sfdp_15(q, k, v, mask, p):  # DistilBERT: 1/0 mask, masked_fill with a -inf tensor
    dtype = q.dtype
    q, k, v = _perm_list(q, k, v)
    bs, k_len = q.size(0), k.size(-2)
    scores = (q @ k.transpose(-2, -1)).div(INV_SCALE)
    fill = torch.full((), -float("inf"), dtype=dtype, device=q.device)
    return torch.softmax(scores.masked_fill(_distilbert_mask(mask, scores, bs, k_len), fill), dim=-1) @ v


def sfdp_16(q, k, v, mask, p):  # BERT-large with dropout
    dtype = q.dtype
    q, k, v = _perm_list(q, k, v)
    w = F.dropout((torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE) + mask).softmax(dim=-1), p)
    return w.to(dtype=dtype).matmul(v)


def sfdp_17(q, k, v, mask, p):  # DistilBERT with dropout
    dtype = q.dtype
    q, k, v = _perm_list(q, k, v)
    bs, k_len = q.size(0), k.size(-2)
    scores = (q @ k.transpose(-2, -1)).div(INV_SCALE)
    fill = torch.full((), -float("inf"), dtype=dtype, device=q.device)
    w = torch.softmax(scores.masked_fill(_distilbert_mask(mask, scores, bs, k_len), fill), dim=-1)
    return F.dropout(w, p) @ v


def sfdp_18(q, k, v, mask, p):  # old HF GPT-2: 0-d tensors for the scale and the fill, returns k, v
    q, k, v = _perm_list(q, k, v)
    w = torch.matmul(q, k.permute(0, 1, 3, 2))
    w = w.div(torch.full([], INV_SCALE, dtype=w.dtype, device=w.device))
    fill = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
    w = torch.where(mask, w, fill)
    return F.dropout(w.softmax(dim=-1), p).matmul(v), k, v


def sfdp_19(q, k, v, mask, p):  # GPT-2 with a causal bool mask and an additive padding mask
    causal, additive = mask
    w = torch.matmul(q, k.permute(0, 1, 3, 2))
    w = w.div(torch.full([], INV_SCALE, dtype=w.dtype, device=w.device))
    fill = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
    w = torch.where(causal, w, fill)
    w = w + additive
    w = w.softmax(dim=-1).type(v.dtype)
    return F.dropout(w, p).matmul(v)


def sfdp_20(q, k, v, mask, p):  # DistilBERT (transformers 4.44): the query scaled first
    dtype = q.dtype
    q, k, v = _perm_list(q, k, v)
    bs, k_len = q.size(0), k.size(-2)
    q = q.div(INV_SCALE)
    scores = q @ k.transpose(-2, -1)
    fill = torch.full((), -float("inf"), dtype=dtype, device=q.device)
    w = torch.softmax(scores.masked_fill(_distilbert_mask(mask, scores, bs, k_len), fill), dim=-1)
    return F.dropout(w, p) @ v


def sfdp_21(q, k, v, mask, p):  # T5: no scaling, the bias added, fp32 softmax
    dtype_of = q
    q, k, v = _perm_list(q, k, v)
    score = torch.matmul(q, k.permute(0, 1, 3, 2))
    score = (score + mask).type_as(dtype_of)
    return score.float().softmax(dim=-1).type_as(dtype_of).matmul(v)


def sfdp_22(q, k, v, mask, p):
    return sfdp_21(q, k, v, mask, p), k.permute([0, 2, 1, 3]), v.permute([0, 2, 1, 3])


def sfdp_23(q, k, v, mask, p):  # T5 without a mask
    dtype_of = q
    q, k, v = _perm_list(q, k, v)
    score = torch.matmul(q, k.permute(0, 1, 3, 2))
    score = score.float().type_as(dtype_of)
    return score.float().softmax(dim=-1).type_as(dtype_of).matmul(v), k, v


def sfdp_24(q, k, v, mask, p):  # old (M)BART: bmm on [B*H, N, D], the mask added on a 4-D view
    bs, n_head, seq_len, head_size = q.shape
    q3 = q.view(bs * n_head, -1, head_size)
    k3 = k.reshape(bs * n_head, -1, head_size)
    v3 = v.reshape(bs * n_head, -1, head_size)
    w = torch.bmm(q3, k3.transpose(1, 2))
    w = w.view(bs, n_head, seq_len, -1) + mask
    w = w.view(bs * n_head, seq_len, -1)
    w = F.softmax(w, dim=-1)
    out = torch.bmm(w, v3)
    return out.view(bs, n_head, seq_len, head_size)


def sfdp_25(q, k, v, mask, p):  # T5 with dropout
    dtype_of = q
    q, k, v = _perm_list(q, k, v)
    score = torch.matmul(q, k.permute(0, 1, 3, 2)) + mask
    return F.dropout(score.float().softmax(dim=-1).type_as(dtype_of), p).matmul(v)


def sfdp_26(q, k, v, mask, p):
    return sfdp_25(q, k, v, mask, p), k.permute([0, 2, 1, 3]), v.permute([0, 2, 1, 3])


def sfdp_27(q, k, v, mask, p):  # T5 with dropout, no mask
    dtype_of = q
    q, k, v = _perm_list(q, k, v)
    score = torch.matmul(q, k.permute(0, 1, 3, 2))
    return F.dropout(score.float().softmax(dim=-1).type_as(dtype_of), p).matmul(v), k, v


def sfdp_28(q, k, v, mask, p):  # Visformer: 4 on non-contiguous inputs (the test feeds transposed views)
    return sfdp_4(q, k, v, mask, p)


def sfdp_29(q, k, v, mask, p):  # SDPA's math decomposition: sqrt(scale) on q and on K^T
    q, k, v = _perm_list(q, k, v)
    s = SCALE**0.5
    w = (q * s) @ (k.transpose(-2, -1) * s) + mask
    return torch.softmax(w, -1) @ v


def sfdp_30(q, k, v, mask, p):
    q, k, v = _perm_list(q, k, v)
    s = SCALE**0.5
    return torch.softmax((q * s) @ (k.transpose(-2, -1) * s), -1) @ v


# --- forms from other code --------------------------------------------------------------------------


def gpt2_reorder_and_upcast(q, k, v, mask, p):
    """transformers' GPT-2 with reorder_and_upcast_attn=True: baddbmm on [B*H, N, D] in fp32."""
    bsz, num_heads, q_len, dk = q.size()
    k_len = k.size(-2)
    w = torch.empty(bsz * num_heads, q_len, k_len, dtype=torch.float32, device=q.device)
    q3, k3 = q.reshape(-1, q_len, dk), k.transpose(-1, -2).reshape(-1, dk, k_len)
    w = torch.baddbmm(w, q3.float(), k3.float(), beta=0, alpha=SCALE)
    w = w.reshape(bsz, num_heads, q_len, k_len) + mask
    w = F.softmax(w, dim=-1).type(v.dtype)
    return torch.matmul(w, v)


def multihead_attention_math(q, k, v, mask, p):
    """F.multi_head_attention_forward's math path: [B*H, N, D], q pre-scaled, baddbmm with the mask."""
    q = q * SCALE
    w = torch.baddbmm(mask, q, k.transpose(-2, -1))
    w = F.softmax(w, dim=-1)
    return torch.bmm(F.dropout(w, p=p), v)


def t5_inplace_bias(q, k, v, mask, p):
    """Older T5: `scores += position_bias` in place, then an fp32 softmax cast back."""
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += mask
    w = F.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.matmul(F.dropout(w, p=p), v)


def two_additive_masks(q, k, v, mask, p):
    """T5 in transformers 5: a relative position bias and the padding mask, added one after the other."""
    w = torch.matmul(q, k.transpose(2, 3)) * 1.0
    w = w + mask
    w = w + torch.zeros_like(mask[:, :, :1]).masked_fill(mask[:, :, :1] < -1e4, torch.finfo(q.dtype).min)
    return torch.matmul(F.softmax(w, dim=-1), v)


def einsum_attention(q, k, v, mask, p):
    w = torch.einsum("b h q d, b h k d -> b h q k", q, k) * SCALE + mask
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)


def einsum_not_attention(q, k, v, mask, p):
    w = torch.einsum("bhid,bhje->bhde", q, k) * SCALE  # [B, H, D, D]: a softmax, but not attention
    return torch.einsum("bhde,bhje->bhjd", w.softmax(-1), v)


def softcapped(q, k, v, mask, p):
    """Gemma-2's soft cap: scaled scores -> cap * tanh(. / cap), then the mask (a cap of 1.5 bites on
    these inputs, whose scores are about N(0, 1))."""
    w = torch.matmul(q, k.transpose(-2, -1)) * SCALE
    w = torch.tanh(w / 1.5) * 1.5
    return torch.softmax(w + mask, dim=-1) @ v


def softcapped_then_scaled(q, k, v, mask, p):
    """A cap written on the raw products and scaled after: 2 * tanh(S / 2) * SCALE is a cap of 2 * SCALE."""
    w = (torch.tanh(torch.matmul(q, k.transpose(-2, -1)) / 2.0) * 2.0).mul(SCALE)
    return torch.softmax(w, dim=-1) @ v


def tanh_scores(q, k, v, mask, p):
    """tanh with no multiplication after it: not a soft cap (the scores' range is (-1, 1))."""
    return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * SCALE), dim=-1) @ v


def tanh_of_masked_scores(q, k, v, mask, p):
    """The cap applied after the mask: tanh would map the mask's -inf to -1, so it is no mask any more."""
    w = q @ k.transpose(-2, -1) * SCALE + mask
    return torch.softmax(torch.tanh(w) * 2.0, dim=-1) @ v


def learned_bias(q, k, v, mask, p):
    """ALiBi / a relative bias that is trained: the op returns the mask's gradient too (on the CPU)."""
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE + mask, dim=-1) @ v


def returns_weights(q, k, v, mask, p):
    w = torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)
    return w @ v, w


FORMS = [
    Form("sfdp_1", sfdp_1, source="Inductor 1: matmul.div.softmax.matmul"),
    Form("sfdp_2", sfdp_2, source="Inductor 2: .mul(scale)"),
    Form("sfdp_3", sfdp_3, dropout=True, source="Inductor 3: F.dropout on the weights"),
    Form("sfdp_4", sfdp_4, dropout=True, source="Inductor 4: .mul(scale), F.dropout"),
    Form("sfdp_5", sfdp_5, mask="additive", source="Inductor 5: additive mask"),
    Form("sfdp_6", sfdp_6, mask="additive", dropout=True, source="Inductor 6: torch.dropout"),
    Form("sfdp_7", sfdp_7, "bnhd", dropout=True, source="Inductor 7: permuted inputs, fp32 softmax, cast back"),
    Form("sfdp_8", sfdp_8, "bnhd", source="Inductor 8: 7 without dropout"),
    Form("sfdp_9", sfdp_9, "bnhd", dropout=True, source="Inductor 9: query scaled first"),
    Form("sfdp_10", sfdp_10, "bnhd", source="Inductor 10: 9 without dropout"),
    Form("sfdp_11", sfdp_11, "bnhd", source="Inductor 11: HF permuted inputs"),
    Form("sfdp_12", sfdp_12, "bnhd", dropout=True, source="Inductor 12: 11 with F.dropout"),
    Form("sfdp_13", sfdp_13, "3d", dropout=True, source="Inductor 13: bmm on [B*H, N, D], no scale"),
    Form("sfdp_14", sfdp_14, "bnhd", mask="additive", source="Inductor 14: BERT-large"),
    Form("sfdp_15", sfdp_15, "bnhd", mask="keep01", source="Inductor 15: DistilBERT masked_fill(-inf tensor)"),
    Form("sfdp_16", sfdp_16, "bnhd", mask="additive", dropout=True, source="Inductor 16: BERT-large with dropout, cast to q's dtype"),
    Form("sfdp_17", sfdp_17, "bnhd", mask="keep01", dropout=True, source="Inductor 17: DistilBERT with dropout"),
    Form("sfdp_18", sfdp_18, "bnhd", mask="bool", dropout=True, returns_kv=True,
         source="Inductor 18: old GPT-2, 0-d tensor scale, where(causal, w, finfo.min)"),
    Form("sfdp_19", sfdp_19, mask="bool+additive", dropout=True, source="Inductor 19: GPT-2 causal where + padding"),
    Form("sfdp_20", sfdp_20, "bnhd", mask="keep01", dropout=True, source="Inductor 20: DistilBERT, q scaled first"),
    Form("sfdp_21", sfdp_21, "bnhd", mask="additive", source="Inductor 21: T5, no scale, fp32 softmax"),
    Form("sfdp_22", sfdp_22, "bnhd", mask="additive", returns_kv=True, source="Inductor 22: 21, also returning k and v"),
    Form("sfdp_23", sfdp_23, "bnhd", returns_kv=True, source="Inductor 23: T5 without a mask, casts around the softmax"),
    Form("sfdp_24", sfdp_24, mask="additive", source="Inductor 24: old (M)BART bmm, mask on a 4-D view"),
    Form("sfdp_25", sfdp_25, "bnhd", mask="additive", dropout=True, source="Inductor 25: T5 with dropout"),
    Form("sfdp_26", sfdp_26, "bnhd", mask="additive", dropout=True, returns_kv=True, source="Inductor 26: 25, also returning k and v"),
    Form("sfdp_27", sfdp_27, "bnhd", dropout=True, returns_kv=True, source="Inductor 27: T5 with dropout, no mask"),
    Form("sfdp_28", sfdp_28, "bhnd-strided", dropout=True, source="Inductor 28: non-contiguous q/k/v"),
    Form("sfdp_29", sfdp_29, "bnhd", mask="additive", source="Inductor 29: sqrt(scale) on q and on K^T"),
    Form("sfdp_30", sfdp_30, "bnhd", source="Inductor 30: 29 without a mask"),
    Form("gpt2_reorder_and_upcast", gpt2_reorder_and_upcast, mask="additive",
         source="GPT-2 reorder_and_upcast_attn: baddbmm in fp32 on [B*H, N, D]"),
    Form("multihead_attention_math", multihead_attention_math, "3d", mask="additive3d", dropout=True,
         source="nn.MultiheadAttention math path (need_weights, weights discarded)"),
    Form("t5_inplace_bias", t5_inplace_bias, mask="additive", dropout=True, source="older T5: scores += bias"),
    Form("two_additive_masks", two_additive_masks, mask="additive", source="T5: position bias + padding mask"),
    Form("einsum", einsum_attention, mask="additive", source="einsum products (x-transformers, lucidrains)"),
    Form("einsum_other_contraction", einsum_not_attention, expect="dense", reason="not a recognised product",
         source="an einsum that is no Q K^T (contracts the query axis)"),
    Form("softcapped", softcapped, mask="additive", source="Gemma-2: cap * tanh(scores / cap), then the mask"),
    Form("softcapped_then_scaled", softcapped_then_scaled, source="a soft cap on the raw products, scaled after"),
    Form("tanh_scores", tanh_scores, expect="dense", reason="tanh of the scores followed by the softmax",
         source="tanh without a cap's multiplication"),
    Form("tanh_of_masked_scores", tanh_of_masked_scores, mask="additive", expect="dense",
         reason="tanh of masked scores", source="a soft cap after the mask"),
    Form("learned_bias", learned_bias, mask="learned",
         source="a trained additive bias (ALiBi slopes, T5 bias under full fine-tuning)"),
    Form("returns_weights", returns_weights, expect="dense", reason="used elsewhere",
         source="output_attentions=True"),
]


def inputs(form: Form, B=2, H=4, N=13, D=16, dtype=torch.float32, seed=0):
    """(q, k, v, mask) for a form, leaves with requires_grad (the mask never)."""
    gen = torch.Generator().manual_seed(seed)
    if form.layout == "bnhd":
        shape = (B, N, H, D)
    elif form.layout == "3d":
        shape = (B * H, N, D)
    else:
        shape = (B, H, N, D)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    if form.layout == "bhnd-strided":  # [B, N, H, D] storage seen as [B, H, N, D]
        q, k, v = (torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[1, N - 4:] = False  # sequence 1 is padded
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    minimum = torch.finfo(dtype).min
    if form.mask is None:
        mask = None
    elif form.mask == "keep01":
        mask = pad.long()
    elif form.mask == "bool":
        mask = (causal[None] & pad[:, None, :])[:, None]  # [B, 1, N, N]
    elif form.mask == "bool+additive":
        mask = (causal[None, None], torch.zeros(B, 1, 1, N, dtype=dtype).masked_fill(~pad[:, None, None], minimum))
    elif form.mask in ("additive", "learned", "additive3d"):
        bias = 0.3 * torch.randn(B, 1, N, N, generator=gen)
        mask = bias.masked_fill(~pad[:, None, None, :], minimum).to(dtype)
        if form.mask == "learned":
            mask = mask.requires_grad_()
        if form.mask == "additive3d":  # MHA merges batch and heads: [B * H, N, N]
            mask = mask.expand(B, H, N, N).reshape(B * H, N, N)
    else:
        raise ValueError(form.mask)
    return q, k, v, mask
