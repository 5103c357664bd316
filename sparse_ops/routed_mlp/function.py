"""The differentiable routed MLP for direct use (the backend's site op calls the pieces itself)."""

from __future__ import annotations


import torch
from torch import Tensor

from .backward import routed_mlp_backward_saved
from .forward import routed_mlp_forward
from .spec import MlpSpec, MlpWeights


class _RoutedMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block_mask, spec, seed, *slots):
        w = MlpWeights(*slots)
        saved: list = []
        y = routed_mlp_forward(x, w, spec, block_mask, seed, saved=saved)
        pre = saved[0]
        ctx.save_for_backward(x, block_mask, pre, *[t if t is not None else torch.empty(0) for t in slots])
        ctx.present = [t is not None for t in slots]
        ctx.spec, ctx.seed = spec, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, block_mask, pre, *saved = ctx.saved_tensors
        w = MlpWeights(*[t if p else None for t, p in zip(saved, ctx.present)])
        needs = MlpWeights(*ctx.needs_input_grad[4:])
        dx, grads = routed_mlp_backward_saved(dy, x, w, ctx.spec, block_mask, ctx.seed, ctx.needs_input_grad[0],
                                              needs, pre)
        return (dx, None, None, None, *grads)


def routed_mlp(x: Tensor, weights: MlpWeights, spec: MlpSpec, block_mask: Tensor, seed: int = 0) -> Tensor:
    """Differentiable routed MLP (see the module docstring): x [T, d_in], block_mask [T, n_blocks]
    bool -> y [T, d_out]. Same signature as reference.routed_mlp_reference, plus the dropout seed."""
    if block_mask.shape != (x.shape[0], spec.n_blocks) or block_mask.dtype != torch.bool:
        raise ValueError(f"routed_mlp: block_mask must be bool [{x.shape[0]}, {spec.n_blocks}]; "
                         f"got {block_mask.dtype} {tuple(block_mask.shape)}")
    return _RoutedMlp.apply(x, block_mask, spec, seed, *weights)
