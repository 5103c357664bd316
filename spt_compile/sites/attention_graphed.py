"""`spt::attention_graphed`: the block-sparse attention op for graphs that CUDA graphs will capture
(`options={"compiler": "inductor", "mode": "reduce-overhead"}`).

A captured graph replays its kernels without running any Python, so an op inside one must not
depend on anything the host decides per call. The regular op (`spt::attention_site`) does: its site
counts calls, calibrates, probes, analyses the mask on the host, and returns a CPU `meta` tensor and a
selection whose size is known only at run time. This op is the same computation with all of that
fixed when the graph is traced:

* **Fixed shapes.** Outputs out [B, H, N, Dv], lse [B, H, N] fp32 and the block lists
  [B, Hkv, n_qb, Lb] int32, Lb = the budget of a full-length row (blocks_per_query of Nk keys) for
  the traced `density` / `top_l` / `attention_min_keys` / `attention_block`; a shorter row lists
  fewer blocks and -1 after them.
* **Nothing on the host.** Each row's budget is computed on the device from the mask (its real keys),
  the selection kernels read it from there. An explicit mask is used as a mask (no host check that
  it is the causal triangle), packed rows get their row's budget (no per-sequence sinks).
* **No state, no side effects.** Block selection has no fitted state; no call is counted, nothing is
  probed or calibrated (`report()` lists no calls for these sites; `compile_reports` lists them).
* **Captured options.** Run-time options (`enable(density=...)`) do not reach a replayed graph: the
  values at trace time hold. Dropout is not served (its seeds would be Python state): such a site
  keeps the regular op.

Backward is `block_sparse_backward` over the same lists. Training calls run the exact forward (the
defaults' exact_forward) or the sparse one, as traced."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spt_compile.sparse_ops.attention import pq
from spt_compile.sparse_ops.attention import select as block_select
from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward, block_sparse_forward, resolve_impl

from .attention import flash_with_lse


def list_width(Nk: int, density: float, top_l: Optional[int], block: int, min_keys: int = 0) -> int:
    """Lb of a full-length row: the lists' fixed width."""
    n_kb = block_select.n_blocks(Nk, block)
    return int(block_select.blocks_per_query(torch.tensor([Nk]), density, top_l, block, n_kb, min_keys)[0])


def _budgets(mask: Optional[Tensor], B: int, N: int, Nk: int, density: float, top_l: Optional[int], block: int,
             min_keys: int, device) -> tuple[Tensor, Optional[Tensor]]:
    """(budget [B, n_qb] int32 on the device, real [B, Nk] bool or None): each row's key blocks from its
    real keys, computed on the device (no host read)."""
    n_kb, n_qb = block_select.n_blocks(Nk, block), block_select.n_blocks(N, block)
    if mask is None:
        lengths, real = torch.full((B,), Nk, dtype=torch.int64, device=device), None
    else:
        real = pq.real_key_mask(mask, B, Nk)  # [B, Nk]
        lengths = real.sum(-1)
    budget = block_select.blocks_per_query(lengths, density, top_l, block, n_kb, min_keys)  # [B]
    return budget.to(torch.int32)[:, None].expand(B, n_qb), real


@torch.library.custom_op("spt::attention_graphed", mutates_args=())
def attention_graphed(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float, block: int,
    density: float, top_l: int, min_keys: int, exact_forward: bool, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """top_l < 0: none (density decides, at least min_keys keys). exact_forward: the output is exact
    attention; the lists serve the backward. Returns (out, lse, block lists)."""
    B, H, N, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    top = None if top_l < 0 else top_l
    impl = resolve_impl(impl, q.device)
    budget, real = _budgets(mask, B, N, Nk, density, top, block, min_keys, q.device)
    lists = block_select.select_blocks(q, k, scale, None, is_causal, mask, real, block, block, impl,
                                       budget_dev=budget, Lb=list_width(Nk, density, top, block, min_keys))
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    flash = flash_with_lse(q, k, v, mask, is_causal, scale) if exact_forward else None
    if flash is not None:
        out, lse = flash
    elif exact_forward:  # every key block listed: exactly dense
        n_kb = block_select.n_blocks(Nk, block)
        every = torch.arange(n_kb, dtype=torch.int32, device=q.device).expand(B, Hkv, block_select.n_blocks(N, block),
                                                                               n_kb)
        out, lse = block_sparse_forward(q, k, v, every, scale, is_causal, mask, block, block, 0.0, 0, impl)
    else:
        out, lse = block_sparse_forward(q, k, v, lists, scale, is_causal, mask, block, block, 0.0, 0, impl,
                                        diag_first=True)
    return out.contiguous(), lse.to(lse_dtype).contiguous(), lists


@attention_graphed.register_fake
def _(q, k, v, mask, is_causal, scale, block, density, top_l, min_keys, exact_forward, impl):
    B, H, N, _ = q.shape
    Nk = k.shape[2]
    Lb = list_width(Nk, density, None if top_l < 0 else top_l, block, min_keys)
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.promote_types(q.dtype, torch.float32)),
            q.new_empty(B, k.shape[1], block_select.n_blocks(N, block), Lb, dtype=torch.int32))


@torch.library.custom_op("spt::attention_graphed_backward", mutates_args=())
def attention_graphed_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor, lists: Tensor,
    is_causal: bool, scale: float, block: int, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = resolve_impl(impl, q.device)
    dout = dout if impl == "triton" else dout.contiguous()  # the Triton kernels read any strides
    grads = block_sparse_backward(dout, q, k, v, lists, out, lse, scale, is_causal, mask, block, block, 0.0, 0,
                                  impl, diag_first=True)
    return tuple(g.contiguous() for g in grads)


@attention_graphed_backward.register_fake
def _(dout, q, k, v, mask, out, lse, lists, is_causal, scale, block, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, block, density, top_l, min_keys, exact_forward, impl = inputs
    out, lse, lists = output
    ctx.save_for_backward(q, k, v, mask, out, lse, lists)
    ctx.args = (is_causal, scale, block, impl)
    ctx.mark_non_differentiable(lse, lists)


def _backward(ctx, dout, dlse, dlists):
    q, k, v, mask, out, lse, lists = ctx.saved_tensors
    dq, dk, dv = attention_graphed_backward(dout, q, k, v, mask, out, lse, lists, *ctx.args)
    return (dq, dk, dv) + (None,) * 9


attention_graphed.register_autograd(_backward, setup_context=_setup_context)
