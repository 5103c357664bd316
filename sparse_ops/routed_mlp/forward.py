"""The routed forward: tokens grouped by block, one GEMM per projection per block."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import (
    _BlockOrderWeights, _activate, _block_forward, _block_pre, _input_projections, _lora_columns,
    _lora_inputs, _merges_out_lora, _routed_blocks, _with_lora_inputs,
)
from .dropout import hidden_keep, lora_input_scales, out_keep
from .compensation import compensation
from .spec import MlpSpec, MlpWeights, _block_weights, block_bounds, out_features


@torch.no_grad()  # gradients: routed_mlp_backward_saved (routed_mlp wraps both in an autograd.Function)
def routed_mlp_forward(
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    block_mask: Tensor,
    seed: int = 0,
    block_norms: Optional[Tensor] = None,
    saved: Optional[list] = None,
    perm: Optional[Tensor] = None,
    comp: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """y [T, d_out], plus compensation(x, ~block_mask, *comp) if `comp` (U, V, M) is given (written
    where the blocks' outputs accumulate: no zero fill, no extra pass); with `perm`, that of
    permute_hidden(w, spec, perm) (the weights are put in block order once per call:
    _BlockOrderWeights). If `block_norms` ([T, n_blocks]) is given, it receives ||block output|| per
    routed token (the router's calibration target). If `saved` is a list, it receives one flat tensor:
    each routed block's pre-activations (block after block; per block gate then up, or the single
    pre-activation, each [Tb, Fb]), then the LoRA inputs t [T, r_in + r_gate] (see _lora_inputs):
    with them routed_mlp_backward_saved recomputes no projection; then (with a LoRA on the out
    projection) t_out = sum over blocks of dropout(h_b) A_out_b^T [T, r_out], which B_out's gradient
    needs."""
    T, d_out = x.shape[0], out_features(w, spec)
    blocks = list(_routed_blocks(block_mask, spec))
    projections = _input_projections(spec)
    n_pre = len(projections) * sum(tok.numel() * (hi - lo) for _, lo, hi, tok, _ in blocks)
    cols = _lora_columns(x.shape[1], w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    n_t = T * (cols.K - x.shape[1])
    flat = t = t_out = None
    if saved is not None:  # [pre-activations | t | t_out]: t, X's LoRA columns, [T, K - d_in]
        flat = x.new_empty(n_pre + n_t + T * r_out)
        t = flat[n_pre : n_pre + n_t].view(T, cols.K - x.shape[1])
        t_out = flat[n_pre + n_t :].view(T, r_out)
    t = _lora_inputs(x, w, spec, cols, *lora_input_scales(x, spec, seed), out=t)
    X = _with_lora_inputs(x, t, cols)  # [T, K]
    merged = _merges_out_lora(w, spec)
    bw = _BlockOrderWeights(w, spec, cols, perm, merged)
    # One accumulator: index_add_ of a block's [Tb, d_out + r] output into two would read it strided,
    # 8x slower on this CPU than the whole row.
    Y = x.new_empty(T, d_out + r_out)  # [y without the out LoRA | sum over blocks of h A_out_b^T]
    if comp is None:
        Y.zero_()
    else:
        compensation(x, ~block_mask, *comp, out=Y[:, :d_out])
        Y[:, d_out:].zero_()
    offset = 0
    for b, lo, hi, tok, every in blocks:
        n, Fb = tok.numel(), hi - lo
        Xb = X if every else X.index_select(0, tok)  # [Tb, K]
        pre = []
        for proj in projections:
            dest = None if flat is None else flat[offset : offset + n * Fb].view(n, Fb)
            offset += n * Fb
            pre.append(_block_pre(Xb, proj, bw, lo, hi, dest))
        h = _activate(tuple(pre), spec)  # [Tb, Fb]
        kept = hidden_keep(n, lo, hi, spec, seed, b, x)  # a dropout over the hidden layer, for its rows
        if kept is not None:
            h = h * kept
        yb = F.linear(h, bw.out_block(lo, hi))  # [Tb, d_out (+ r)]
        if r_out and not merged:
            keep = out_keep(n, lo, hi, spec, seed, b, x)
            yb = torch.cat([yb, F.linear(h if keep is None else h * keep, bw.out_a_block(lo, hi))], 1)
        if block_norms is not None:
            own = yb[:, :d_out]
            if r_out:
                own = own + (yb[:, d_out:] @ w.out_bb.t()) * spec.out_scale
            block_norms[tok, b] = own.detach().float().norm(dim=-1).to(block_norms.dtype)
        if every:
            Y += yb
        else:
            Y.index_add_(0, tok, yb)
    if saved is not None:
        if r_out:
            t_out.copy_(Y[:, d_out:])
        saved.append(flat)
    y = Y[:, :d_out]
    if r_out:
        y = torch.addmm(y, Y[:, d_out:], w.out_bb.t(), alpha=spec.out_scale)
    if w.out_b is not None:
        y = y + w.out_b
    return y


def block_outputs(x: Tensor, w: MlpWeights, spec: MlpSpec) -> Tensor:
    """Every block's output for every token, without dropout or out bias: [T, n_blocks, d_out].
    Used on small token samples to fit the router and measure what routing keeps."""
    outs = []
    for lo, hi in block_bounds(spec.hidden, spec.n_blocks):
        outs.append(_block_forward(x, x, x, _block_weights(w, spec, lo, hi), spec, None))
    return torch.stack(outs, dim=1)
