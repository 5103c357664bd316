"""`spt::real_rows`: which rows of an MLP input are real tokens, from the attention mask, as a graph value.

The MLP sites draw their router samples from real tokens only, and exact_forward's backward gives
padding rows no blocks (padding positions were a quarter of GSM8K batches padded to 256 tokens, and
fitted the router to tokens nothing reads: benchmarks/research/routing_suspects.py). The MLP pass
(passes/mlp/) feeds each MLP site the mask of the attention site before it through this op, once
per mask and input shape, so the dependency is an edge of the graph.

Output: [B * N] bool, a row per position of the MLP input [B, N, d]; or an empty tensor when nothing
is padded (so the sites skip the masking at no cost) or when the mask does not describe [B, N] keys.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("spt::real_rows", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def real_rows(mask: Tensor, batch: int, seq: int) -> Tensor:
    """mask: the attention mask [B|1, H|1, N|1, N] (bool: True attends; float: additive). A key that
    no query may attend is padding. Whether anything is padded is read on the host from the mask's
    analysis, which the attention site before this MLP made for the same mask (mask_facts, kept per
    mask): no sync of its own."""
    from spt_compile.sites.attention import mask_facts  # the sites import this module

    B, N = int(batch), int(seq)
    if mask.dim() != 4 or mask.shape[-1] != N or mask.shape[-2] not in (1, N) or mask.shape[0] not in (1, B):
        return torch.zeros(0, dtype=torch.bool, device=mask.device)
    facts = mask_facts(mask, B, N, N)
    if bool((facts.lengths == N).all()):  # host data
        return torch.zeros(0, dtype=torch.bool, device=mask.device)
    return facts.real.reshape(-1).contiguous()  # [B * N]


@real_rows.register_fake
def _(mask, batch, seq):
    ctx = torch.library.get_ctx()
    return mask.new_empty(ctx.new_dynamic_size(), dtype=torch.bool)


def rows_of(real: Tensor | None, T: int) -> Tensor | None:
    """The [T] real-row mask an MLP site uses, or None (every row real, or the mask does not fit)."""
    return real if real is not None and real.numel() == T and T > 0 else None
