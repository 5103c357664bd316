"""Plain references of the routed MLP and its compensation, with the kernels' signatures. Tests
compare against them. They loop over tokens; gradients come from autograd."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .spec import ACTIVATIONS, MlpSpec, MlpWeights, block_bounds


def routed_mlp_reference(
    x: Tensor, weights: MlpWeights, spec: MlpSpec, block_mask: Tensor, hidden_scale: Optional[Tensor] = None
) -> Tensor:
    """y_t = sum over the blocks b chosen for token t of block b's output, plus the output bias.

    x [T, d_in]; block_mask [T, n_blocks] bool. No LoRA dropout (the reference is deterministic);
    hidden_scale [T, F]: a dropout over the hidden layer as drawn (spec.hidden_dropout; the op's
    dropout.hidden_keep_layer), multiplied into h before the out projection."""
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
        if hidden_scale is not None:
            h = h * hidden_scale[t]
        rows.append(project(h, w.out_w, w.out_b, w.out_a, w.out_bb, spec.out_scale, spec.out_layout))
    if not rows:
        d_out = w.out_w.shape[1] if spec.out_layout == "io" else w.out_w.shape[0]
        return x.new_zeros(0, d_out)
    return torch.cat(rows)


def exact_forward_mlp_reference(
    x: Tensor, weights: MlpWeights, spec: MlpSpec, block_mask: Tensor, hidden_scale: Optional[Tensor] = None
) -> Tensor:
    """The dense MLP's output whose gradients are the exact Jacobian masked to the routed (token,
    block) pairs: the pairs block_mask leaves out add their output with every input detached, except
    the out projection's LoRA B, which (applied once per layer to every block's h A_out^T) keeps its
    exact gradient. routed_mlp.exact_mlp_forward's semantics, as a per-token loop."""
    routed = routed_mlp_reference(x, weights, spec, block_mask, hidden_scale)
    frozen = {n: (None if t is None else t.detach()) for n, t in weights._asdict().items()}
    frozen["out_b"] = None  # added once, by the routed part
    frozen["out_bb"] = weights.out_bb
    return routed + routed_mlp_reference(x.detach(), MlpWeights(**frozen), spec, ~block_mask, hidden_scale)


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
