"""spt::attention_site, the op the attention pass emits, and its backward.

`spt::attention_site(q, k, v, mask, anchor, template, is_causal, scale, dropout_p, training, softcap,
mask_grad)` replaces one matched attention (softcap: 0.0, or the cap of soft-capped scores,
sparse_ops/attention/softcap.py; mask_grad: the additive mask is a learned bias, and backward returns
its gradient). It finds its layer's site (sites/attention.py) from `anchor` (the q projection's
weight) and `template` (registry.py), which decides how the call runs.

Outputs: out [B, H, N, Dv], lse [B, H, N], selection (the block or token indices, flattened: an
unbacked size), meta (AttentionMeta: how the call ran). Backward uses what forward saved and never
reads the options again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward
from spt_compile.sparse_ops.attention.token_sparse import sparse_attention_backward
from spt_compile.registry import REGISTRY

from . import attention as site_module  # cuda_flash_backward read at call time (tests stand it in)
from .attention import _float_mask, as_causal, dense_attention
from .meta import AttentionMeta


@torch.library.custom_op("spt::attention_site", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def attention_site(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], anchor: Optional[Tensor], template: int,
    is_causal: bool, scale: float, dropout_p: float, training: bool, softcap: float = 0.0, mask_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`anchor` is the weight that identifies the layer (its q projection's); never differentiated."""
    site = REGISTRY.site(template, anchor)
    if not mask_grad:  # a learned bias stays the op's operand: its gradient is returned for it
        mask, is_causal = as_causal(mask, is_causal, q.shape[0], q.shape[2], k.shape[2])
    common = _common_dtype(q, k, v)
    if common is None:
        return site.forward(q, k, v, mask, REGISTRY.templates[template].options, is_causal, scale, dropout_p,
                            training, softcap, mask_grad)
    q_, k_, v_, mask_ = _cast(common, q, k, v, mask)
    out, lse, selection, meta = site.forward(q_, k_, v_, mask_, REGISTRY.templates[template].options, is_causal,
                                             scale, dropout_p, training, softcap, mask_grad)
    return out.to(q.dtype), lse.float(), selection, meta


def _common_dtype(q: Tensor, k: Tensor, v: Tensor) -> Optional[torch.dtype]:
    """None when q, k, v share a dtype. Under torch.autocast they may not (HF's RoPE leaves q and k in
    fp32 while v comes from a bf16 linear): dense SDPA would run in the autocast dtype, which is the
    narrowest of the three, so the site does the same (forward and backward alike)."""
    if q.dtype == k.dtype == v.dtype:
        return None
    return min((q.dtype, k.dtype, v.dtype), key=lambda d: torch.finfo(d).bits)


def _cast(dtype, *tensors):
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


@attention_site.register_fake
def _(q, k, v, mask, anchor, template, is_causal, scale, dropout_p, training, softcap=0.0, mask_grad=False):
    B, H, N, _ = q.shape
    n = torch.library.get_ctx().new_dynamic_size()  # size of the selection: decided at run time
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.promote_types(q.dtype, torch.float32)),
            q.new_empty(n, dtype=torch.int32), AttentionMeta.fake())


@torch.library.custom_op("spt::attention_site_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def attention_site_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor,
    indices: Tensor, meta: Tensor, is_causal: bool, scale: float, dropout_p: float, softcap: float = 0.0,
    mask_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d(mask)): d(mask) in the mask's shape and dtype when mask_grad, else empty."""
    common = _common_dtype(q, k, v)
    if common is not None:  # as the forward ran: in the narrowest dtype, grads back in each input's
        grads = attention_site_backward(*_cast(common, dout, q, k, v, mask, out), lse, indices, meta, is_causal,
                                        scale, dropout_p, softcap, mask_grad)
        return (*(g.to(t.dtype) for g, t in zip(grads[:3], (q, k, v))),
                grads[3].to(mask.dtype) if mask_grad else grads[3])
    if not mask_grad:
        mask, is_causal = as_causal(mask, is_causal, q.shape[0], q.shape[2], k.shape[2])  # as forward read it
    grads = _backward_grads(dout, q, k, v, mask, out, lse, indices, meta, is_causal, scale, dropout_p, softcap,
                            mask_grad)
    return tuple(g.contiguous() for g in grads[:3]) + (grads[3] if mask_grad else q.new_empty(0),)


def _backward_grads(dout, q, k, v, mask, out, lse, indices, meta, is_causal, scale, dropout_p, softcap,
                    mask_grad) -> tuple[Tensor, ...]:
    """(dq, dk, dv) of the call as its meta says it ran, and d(mask) after them when mask_grad."""
    run = AttentionMeta.read(meta)
    if softcap and run.mode not in (AttentionMeta.TOKEN, AttentionMeta.BLOCK):  # the site never runs SDPA then
        raise RuntimeError(f"spt::attention_site_backward: soft-capped scores from a {run.mode} call")
    if not (run.mode == AttentionMeta.BLOCK and run.impl == "triton" and dropout_p == 0.0):
        dout = dout.contiguous()  # the Triton kernels (no dropout) read any strides: no copy for them
    bias = mask if mask is not None and mask.dtype != torch.bool else None
    B = q.shape[0]
    if mask_grad and run.mode not in (AttentionMeta.TOKEN, AttentionMeta.BLOCK, AttentionMeta.DENSE):
        raise RuntimeError(f"spt::attention_site_backward: a learned bias from a call of mode {run.mode}")
    if run.mode == AttentionMeta.TOKEN:
        return sparse_attention_backward(dout, q, k, v, indices.view(B, *run.shape), out, lse, scale, bias,
                                         dropout_p, run.seed, softcap, bias_grad=mask_grad)
    if run.mode == AttentionMeta.CUDA_FLASH_LSE:  # the forward ran CUDA's flash kernel
        return site_module.cuda_flash_backward(dout, q, k, v, out, lse, is_causal, scale)
    if run.mode == AttentionMeta.CUDA_EFFICIENT_LSE:  # ... or its memory-efficient kernel, with a mask
        return site_module.cuda_efficient_backward(dout, q, k, v, mask, out, lse, is_causal, scale)
    if run.mode == AttentionMeta.DENSE_LSE:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal,
            attn_mask=_float_mask(mask, q.dtype), scale=scale)
    if run.mode == AttentionMeta.BLOCK:
        return block_sparse_backward(dout, q, k, v, indices.view(B, *run.shape), out, lse, scale, is_causal, mask,
                                     run.block_m, run.block_n, dropout_p, run.seed, run.impl,
                                     diag_first=True, softcap=softcap,  # the site's selection made them
                                     bias_grad=mask_grad)
    # Dense calls saved no attention weights: recompute them (same dropout seed). torch.func.vjp,
    # not autograd.grad: inside a custom op's kernel autograd records nothing.
    if mask_grad:
        _, vjp = torch.func.vjp(lambda q_, k_, v_, m_: dense_attention(q_, k_, v_, m_, is_causal, scale, dropout_p,
                                                                       run.seed), q, k, v, mask)
        return vjp(dout)
    _, vjp = torch.func.vjp(lambda q_, k_, v_: dense_attention(q_, k_, v_, mask, is_causal, scale, dropout_p, run.seed),
                            q, k, v)
    return vjp(dout)


@attention_site_backward.register_fake
def _(dout, q, k, v, mask, out, lse, indices, meta, is_causal, scale, dropout_p, softcap=0.0, mask_grad=False):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            mask.new_empty(mask.shape) if mask_grad else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, anchor, template, is_causal, scale, dropout_p, training, softcap, mask_grad = inputs
    out, lse, indices, meta = output
    ctx.save_for_backward(q, k, v, mask, out, lse, indices, meta)
    ctx.args = (is_causal, scale, dropout_p, softcap, mask_grad)


def _backward(ctx, dout, dlse, dindices, dmeta):
    q, k, v, mask, out, lse, indices, meta = ctx.saved_tensors
    # dout as it comes (a model's output transpose makes it a strided view): the op copies it only
    # for the paths that need a contiguous one
    dq, dk, dv, dmask = attention_site_backward(dout, q, k, v, mask, out, lse, indices, meta, *ctx.args)
    mask_grad = ctx.args[-1]
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None, None, None, None


attention_site.register_autograd(_backward, setup_context=_setup_context)
