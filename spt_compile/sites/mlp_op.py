"""spt::mlp_site, the op the MLP pass emits, and its backward.

`spt::mlp_site(x, <the 12 weight slots of MlpWeights>, loss_rows, real_rows, template, spec, training)`
replaces one matched MLP. The first projection's weight identifies its layer's site (sites/mlp.py,
registry.py), which decides how the call runs. The slots are spelled out because a custom op's
schema takes tensors one by one; everywhere else they travel as MlpWeights.

Outputs: y [*, d_out], block_mask [T, n_blocks] bool, perm [F] int64 (hidden units in block order),
pre (the routed blocks' pre-activations, flat: an unbacked size; backward rebuilds the hidden layer
from them instead of recomputing the projections; empty for the reference impl), meta (MlpMeta:
how the call ran; backward runs the same implementation and needs no host sync for the counts), comp (ffn_compensate's U and V, flat, in x's dtype; empty when
nothing was added).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spt_compile.sparse_ops.routed_mlp import (
    MlpSpec, MlpWeights, compensation_input_grad, join_fused, permute_hidden, routed_mlp_backward_saved, split_fused,
    unpermute_grads,
)
from spt_compile.sparse_ops.routed_mlp.grouped import grouped_backward_saved
from spt_compile.registry import REGISTRY

from .meta import MlpMeta, MlpRun
from .mlp_impl import reference_backward

N_SLOTS = len(MlpWeights._fields)
DIFFERENTIABLE = 1 + N_SLOTS  # x and the weight slots come first in both ops' inputs


@torch.library.custom_op("spt::mlp_site", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def mlp_site(
    x: Tensor,
    in_w: Tensor, in_b: Optional[Tensor], in_a: Optional[Tensor], in_bb: Optional[Tensor],
    gate_w: Optional[Tensor], gate_b: Optional[Tensor], gate_a: Optional[Tensor], gate_bb: Optional[Tensor],
    out_w: Tensor, out_b: Optional[Tensor], out_a: Optional[Tensor], out_bb: Optional[Tensor],
    loss_rows: Optional[Tensor], real_rows: Optional[Tensor], template: int, spec: str, training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss_rows: [T] bool, the rows whose position carries a loss (passes/loss_rows.py), or None.
    real_rows: spt::real_rows of the attention mask before this MLP (empty: none padded), or None."""
    s = MlpSpec.from_str(spec)
    weights = split_fused(MlpWeights(in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a,
                                     out_bb), s)
    # The first projection's weight (gate, else in; a fused gate/up one whole) identifies the layer's site.
    site = REGISTRY.site(template, gate_w if gate_w is not None else in_w)
    return site.forward(x, weights, s, REGISTRY.templates[template].options, training, loss_rows, real_rows)


@mlp_site.register_fake
def _(x, in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a, out_bb,
      loss_rows, real_rows, template, spec, training):
    s = MlpSpec.from_str(spec)
    T = 1
    for n in x.shape[:-1]:
        T = T * n
    d_out = out_w.shape[1] if s.out_layout == "io" else out_w.shape[0]
    ctx = torch.library.get_ctx()
    return (x.new_empty(*x.shape[:-1], d_out), x.new_empty(T, s.n_blocks, dtype=torch.bool),
            x.new_empty(s.hidden, dtype=torch.int64), x.new_empty(ctx.new_dynamic_size()),
            MlpMeta.fake(s.n_blocks), x.new_empty(ctx.new_dynamic_size()))


@torch.library.custom_op("spt::mlp_site_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def mlp_site_backward(
    dy: Tensor, x: Tensor,
    in_w: Tensor, in_b: Optional[Tensor], in_a: Optional[Tensor], in_bb: Optional[Tensor],
    gate_w: Optional[Tensor], gate_b: Optional[Tensor], gate_a: Optional[Tensor], gate_bb: Optional[Tensor],
    out_w: Tensor, out_b: Optional[Tensor], out_a: Optional[Tensor], out_bb: Optional[Tensor],
    block_mask: Tensor, perm: Tensor, pre: Tensor, meta: Tensor, comp: Tensor, spec: str, needs: list[bool],
) -> list[Tensor]:
    """Returns 1 + N_SLOTS tensors: dx, then one per weight slot; an empty tensor where no grad is needed."""
    s = MlpSpec.from_str(spec)
    weights = split_fused(MlpWeights(in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a,
                                     out_bb), s)
    if s.fused:  # the fused projection sits in the gate slots; its needs stand for both halves
        w_needs = MlpWeights(*needs[1:])
        needs = [needs[0], *w_needs._replace(in_w=w_needs.gate_w, in_b=w_needs.gate_b, in_a=w_needs.gate_a,
                                             in_bb=w_needs.gate_bb)]
    run = MlpMeta.read(meta)
    p = perm if run.permuted else None
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    impl = run.run.impl
    UV = None
    if comp.numel():  # ffn_compensate: frozen U, V; only x gets a gradient through it
        n = comp.numel() // (x2.shape[1] + dy2.shape[1])  # nb * r
        UV = comp[: x2.shape[1] * n].view(x2.shape[1], n), comp[x2.shape[1] * n :].view(n, dy2.shape[1])
    if impl == "grouped":  # the same, every block in one grouped GEMM
        dx, grads = grouped_backward_saved(dy2, x2, weights, s, block_mask, run.seed, needs[0], MlpWeights(*needs[1:]),
                                           pre, perm=p, comp=UV)
    elif impl == "torch":  # un-permutes block by block; adds the compensation's d(x) where d(x) accumulates
        dx, grads = routed_mlp_backward_saved(dy2, x2, weights, s, block_mask, run.seed, needs[0],
                                              MlpWeights(*needs[1:]), pre, perm=p, comp=UV,
                                              exact_forward=run.mode == MlpMeta.EXACT, whole=run.whole,
                                              counts=list(run.run.counts) or None)
    else:
        dx, grads = _kernel_impl_backward(impl, dy2, x2, weights, s, block_mask, needs, pre, run.run, p)
        if UV is not None and dx is not None:
            dx = dx + compensation_input_grad(dy2.to(comp.dtype), ~block_mask, *UV).to(dx.dtype)
    grads = join_fused(MlpWeights(*grads), s)
    return ([x.new_empty(0) if dx is None else dx.reshape(x.shape).contiguous()]
            + [x.new_empty(0) if g is None else g.contiguous() for g in grads])


def _kernel_impl_backward(impl: str, dy2, x2, weights: MlpWeights, s: MlpSpec, block_mask, needs, pre, run: MlpRun,
                       perm: Optional[Tensor]):
    """The Triton backward (reading the weights through perm and writing the gradients in place), or the
    reference's on the permuted weights, gradients un-permuted."""
    if impl == "triton":
        from spt_compile.sparse_ops.routed_mlp.triton import routed_mlp_backward_triton

        return routed_mlp_backward_triton(dy2, x2, weights, s, block_mask, needs[0], MlpWeights(*needs[1:]), pre,
                                          list(run.counts), run.compute, perm=perm)
    dx, grads = reference_backward(dy2, x2, permute_hidden(weights, s, perm), s, block_mask, needs)
    return dx, unpermute_grads(grads, s, perm)


@mlp_site_backward.register_fake
def _(dy, x, in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a, out_bb,
      block_mask, perm, pre, meta, comp, spec, needs):
    tensors = [x, in_w, in_b, in_a, in_bb, gate_w, gate_b, gate_a, gate_bb, out_w, out_b, out_a, out_bb]
    return [t.new_empty(t.shape) if (need and t is not None) else x.new_empty(0) for t, need in zip(tensors, needs)]


def _setup_context(ctx, inputs, output):
    tensors = inputs[:DIFFERENTIABLE]  # x and the weight slots
    loss_rows, real_rows, template, spec, training = inputs[DIFFERENTIABLE:]
    ctx.spec = spec
    y, block_mask, perm, pre, meta, comp = output
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*tensors, block_mask, perm, pre, meta, comp)
    # Only y carries a gradient. Without both lines autograd hands backward a zero-filled d(pre), a
    # memset the size of every routed pre-activation, per layer and step.
    ctx.mark_non_differentiable(block_mask, perm, pre, meta, comp)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dmask, dperm, dpre, dmeta, dcomp):
    *tensors, block_mask, perm, pre, meta, comp = ctx.saved_tensors
    needs = [bool(n) and p for n, p in zip(ctx.needs_input_grad[:DIFFERENTIABLE], ctx.present)]
    rest = (None,) * (len(ctx.needs_input_grad) - DIFFERENTIABLE)  # loss_rows, real_rows, template, spec, training
    if dy is None:  # y took no part in the loss (grads are not materialized: see _setup_context)
        return (None,) * DIFFERENTIABLE + rest
    grads = mlp_site_backward(dy.contiguous(), *tensors, block_mask, perm, pre, meta, comp, ctx.spec, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + rest


mlp_site.register_autograd(_backward, setup_context=_setup_context)
