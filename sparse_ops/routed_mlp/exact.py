"""The exact forward with a sparse backward: every unit for every token, and per (token, block)
pair a score that decides which pairs the backward keeps."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import (
    _BlockOrderWeights, _activation_vjp, _block_pre, _input_projections, _lora_columns,
    _lora_inputs, _merges_out_lora, _routed_blocks, _take, _with_lora_inputs,
)
from .dropout import hidden_keep_layer, lora_input_scales, out_keep_layer
from .grouped import pair_rows, routed_pairs
from .spec import MlpSpec, MlpWeights, _slot_slice, block_bounds, out_features


# How exact_mlp_forward scores a (token, block) pair for the backward (BACKWARD_IMPORTANCE):
#   "jacobian"      sum over the block's units of a bound on the unit's Jacobian norm,
#                   ||w_out_j|| (|u_j act'(g_j)| ||w_gate_j|| + |act(g_j)| ||w_up_j||) (plain: ||w_out_j||
#                   |act'(z_j)| ||w_in_j||): what the unit passes back to x and to its LoRA factors;
#   "output"        sum over the block's units of |h_j| ||w_out_j|| (a bound on the block's output norm);
#   "block_output"  the block's output norm itself (one GEMM per block for the out projection).
IMPORTANCES = ("jacobian", "output", "block_output")


def unit_norms(w: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]) -> dict[str, Tensor]:
    """Per hidden unit (block order), the norm of its weight row in each input projection and of its
    column in the out projection (base weights): {proj: [F]} fp32. The "jacobian" and "output"
    importances read them (through score_weights, which a caller with frozen base weights keeps)."""
    out = {}
    for proj in _input_projections(spec) + ("out",):
        W = getattr(w, f"{proj}_w")
        unit_dim = _slot_slice(f"{proj}_w", spec)
        out[proj] = _take(W.float().norm(dim=1 - unit_dim), 0, perm)
    return out


def block_weights(unit_weight: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
    """[F, nb]: unit j's weight in the column of its block, zero elsewhere, so that values [T, F] @ it
    is each block's weighted sum of its units' values ([T, nb])."""
    return torch.block_diag(*[unit_weight[lo:hi, None] for lo, hi in bounds])


def score_weights(w: MlpWeights, spec: MlpSpec, perm: Optional[Tensor], importance: str) -> tuple[Tensor, ...]:
    """What `importance` ("jacobian" or "output") weights each unit's |value| by, one [F, nb]
    block_weights matrix per term of its sum (fp32; see IMPORTANCES): gated "jacobian" (|u act'(g)|,
    |act(g)|) -> (gate x out, in x out norms); plain (|act'(z)|) -> (in x out); "output" (|h|) ->
    (out). Built from the base weights alone, so a caller with frozen weights keeps them
    (exact_mlp_forward(weights_for_scores=)): 2 products and 2 block_diag launches fewer a call."""
    norms = unit_norms(w, spec, perm)
    if importance == "output":
        units = [norms["out"]]
    elif spec.gated:
        units = [norms["gate"] * norms["out"], norms["in"] * norms["out"]]
    else:
        units = [norms["in"] * norms["out"]]
    bounds = block_bounds(spec.hidden, spec.n_blocks)
    return tuple(block_weights(u, bounds) for u in units)


@torch.no_grad()  # gradients: routed_mlp_backward_saved(..., exact_forward=True)
def exact_mlp_forward(
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    choose: Callable[[Tensor], Tensor],
    seed: int = 0,
    saved: Optional[list] = None,
    perm: Optional[Tensor] = None,
    importance: Optional[str] = "jacobian",
    grouped: bool = False,
    n_pairs: Optional[int] = None,
    weights_for_scores: Optional[tuple[Tensor, ...]] = None,
    counts: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], bool, Optional[list[int]]]:
    """The exact MLP (every unit for every token, LoRA and its dropout included) whose backward is
    sparse: one GEMM per projection over the whole hidden layer. Returns (y [T, d_out], block_mask
    [T, nb], scores [T, nb], whole: every pair kept, see below, counts: tokens per block of
    block_mask, the call's one host sync; backward takes them instead of counting again): `scores` rates each (token, block) pair for the backward (`importance`,
    see IMPORTANCES; None: not computed, choose(None) decides alone), and block_mask = choose(scores)
    the pairs the backward keeps (every pair: the dense MLP, whose backward is routed_mlp_backward_saved
    over every block).

    `saved` receives routed_mlp_forward's flat layout for that mask: the routed pairs'
    pre-activations, t, and t_out, the latter from *every* unit (the exact forward's, so B_out's
    gradient is exact). The whole layer's pre-activations exist only while this runs (two [T, F]
    for a gated MLP); only the routed pairs' are kept, so the saved bytes are the routed forward's.
    When every pair is kept, `saved` holds them whole instead ([T, F] per projection, the buffer the
    GEMMs wrote: no gather; routed_mlp_backward_saved(..., whole=True)).

    grouped: save the kept pairs for grouped_backward_saved instead (grouped.py: [S, Fb] per
    projection, sorted by block), with the tokens per block left on the device: counts is then None,
    and `n_pairs`, the number of pairs choose() keeps when the caller knows it, spares the one sync
    (the pairs' count) that is left; whole is known either way. weights_for_scores: score_weights(w,
    spec, perm, importance) when the caller keeps them (frozen base weights), else computed here. counts: the tokens per block of
    the mask choose() returns, when the caller knows them (whole rows, counted on the host): the
    block path's sync is spared too."""
    T, d_in = x.shape
    d_out, nb = out_features(w, spec), spec.n_blocks
    projections = _input_projections(spec)
    cols = _lora_columns(d_in, w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    t = _lora_inputs(x, w, spec, cols, *lora_input_scales(x, spec, seed))  # [T, K - d_in] or None
    X = _with_lora_inputs(x, t, cols)  # [T, K]
    merged = _merges_out_lora(w, spec)
    bw = _BlockOrderWeights(w, spec, cols, perm, merged)
    bounds = block_bounds(spec.hidden, nb)
    # The pre-activations go straight into what a dense call saves, [pre per projection (T x F each) | t |
    # t_out]; when the backward keeps fewer pairs, the kept ones are gathered out of it instead.
    n_t = T * (cols.K - d_in)
    flat = x.new_empty(len(projections) * T * spec.hidden + n_t + T * r_out)
    pre = tuple(_block_pre(X, proj, bw, 0, spec.hidden, flat[i * T * spec.hidden : (i + 1) * T * spec.hidden]
                           .view(T, spec.hidden)) for i, proj in enumerate(projections))  # each [T, F]
    a, act_vjp = _activation_vjp(spec.activation, pre[0])
    h = a * pre[1] if spec.gated else a  # [T, F]
    kept = hidden_keep_layer(T, spec, seed, x)  # [T, F]: a dropout over the hidden layer, drawn per block
    hd = h if kept is None else h * kept  # what the out projection (and its LoRA) reads
    Y = F.linear(hd, bw.out)  # [T, d_out (+ r)]: y without the out LoRA | hd A_out^T (merged)
    if r_out and not merged:  # the out LoRA's dropout, drawn per block as routed_mlp_forward draws it
        keep = out_keep_layer(T, spec, seed, x)  # [T, F]
        Y = torch.cat([Y, F.linear(hd * keep, bw.out_a)], 1)
    scores = None if importance is None else torch.empty(T, nb, dtype=torch.float32, device=x.device)
    if importance is None:
        pass  # choose() decides without scores
    elif importance == "block_output":
        for b, (lo, hi) in enumerate(bounds):
            own = F.linear(h[:, lo:hi], bw.out_block(lo, hi)[:d_out])
            if r_out:
                lora = F.linear(h[:, lo:hi], (bw.out_block(lo, hi)[d_out:] if merged else bw.out_a_block(lo, hi)))
                own = torch.addmm(own, lora, w.out_bb.t(), alpha=spec.out_scale)
            scores[:, b] = own.float().norm(dim=-1)
    else:
        if weights_for_scores is None:
            weights_for_scores = score_weights(w, spec, perm, importance)
        # Each score is a weighted sum over the block's units of |a unit value| (IMPORTANCES): one GEMM
        # against a [F, nb] matrix holding each unit's weight in its block's column does the weighting
        # and the per-block sum in one pass; as broadcast products and a reduction it was 8 elementwise
        # passes over [T, F], about 40 ms of a layer at 4096 x 1536 in isolation (docs/ffn.md, "Scoring the pairs").
        if importance == "output":
            values = [h]
        elif spec.gated:
            values = [act_vjp(pre[1]), a]
        else:
            values = [act_vjp(torch.ones_like(pre[0]))]
        for i, (v, weighting) in enumerate(zip(values, weights_for_scores)):  # v [T, F], weighting [F, nb] fp32
            # beta=0 on the first term: scores is uninitialised, and addmm ignores it then
            scores.addmm_(v.abs().float(), weighting, beta=min(i, 1))
    block_mask = choose(scores)
    if grouped:
        counts = None
        n_pairs = int(block_mask.sum()) if n_pairs is None else n_pairs  # the one sync, when not known
        whole = n_pairs == T * nb
    else:
        if counts is None:
            counts = block_mask.sum(0).tolist()  # the one host sync: sizes the saved pairs, and backward's
        whole = sum(counts) == T * nb
    if whole and counts is None:
        counts = [T] * nb
    if saved is not None:
        n_pre = len(projections) * T * spec.hidden
        if t is not None:
            flat[n_pre : n_pre + n_t] = t.reshape(-1)
        if r_out:
            flat[n_pre + n_t :] = Y[:, d_out:].reshape(-1)
        if whole:  # every pair kept: save it whole (routed_mlp_backward_saved(whole=True))
            saved.append(flat)
        elif grouped:  # grouped_backward_saved's layout: [S, Fb] per projection, sorted by block
            pairs = routed_pairs(block_mask, n_pairs)
            saved.append(torch.cat([pair_rows(p, block_mask, pairs).reshape(-1) for p in pre] + [flat[n_pre:]]))
        else:  # routed_mlp_forward's layout: per block, its tokens' rows of each projection, then t, t_out
            # The kept rows are gathered straight into the saved tensor (one copy, not a gather and a cat).
            sizes = [(hi - lo) * c for c, (lo, hi) in zip(counts, bounds)]  # elements per block and projection
            out = flat.new_empty(len(projections) * sum(sizes) + flat.numel() - n_pre)
            at = 0
            for b, lo, hi, tok, every in _routed_blocks(block_mask, spec, counts):
                for p in pre:
                    dst = out[at : at + sizes[b]].view(-1, hi - lo)  # [tokens of block b, Fb]
                    if every:
                        dst.copy_(p[:, lo:hi])
                    else:
                        torch.index_select(p[:, lo:hi], 0, tok, out=dst)
                    at += sizes[b]
            out[at:] = flat[n_pre:]
            saved.append(out)
    y = Y[:, :d_out]
    if r_out:
        y = torch.addmm(y, Y[:, d_out:], w.out_bb.t(), alpha=spec.out_scale)
    if w.out_b is not None:
        y = y + w.out_b
    return y, block_mask, scores, whole, counts
