"""Block-level key selection: which key blocks each query block attends.

Token-level selection (a top-L per query, pq.py) cannot win on speed or memory: a per-query top-k over
N keys costs more than dense attention on a CPU, the per-query gathers more still, and int32 token
indices [B, H, N, L] outweigh everything dense attention saves for backward. Selecting whole key
blocks for whole query blocks keeps the proxy work at N x N / block_n, turns the gathers into
contiguous tiles, and makes the selection [B, H, N / block_m, Lb] small and cheap to recompute.

Proxy (`pooled`): each key block is represented by the mean of its real keys k_bar. A query's share
of attention mass on block j is estimated as softmax_j(q . k_bar_j * scale + log n_j), n_j the number
of keys of block j the query may see; a query block scores each key block by the largest share any
of its queries gives it, so a block one query needs is not outvoted by the rest. The sink (first)
block and the query block's own diagonal block are always kept: both carry large attention mass in
trained decoders and the diagonal is the only block the first queries may see.

Shapes: q [B, H, N, D]; k [B, Hkv, Nk, D]; mask bool (True = allowed) or additive, broadcastable to
[B, H, N, Nk]; block_idx [B, H, ceil(N / block_m), Lb] int32, -1 = unused slot.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .pq import allowed_mask

# Elements of one [B, H, rows, n_kb] proxy chunk (fp32): bounded memory at any N.
_CHUNK_ELEMENTS = 1 << 22
# Added to the score of always-kept blocks; shares are <= 1, so these rank first, the diagonal block
# in slot 0 (block_sparse.py masks a causal chunk cheaply when it finds it there).
_FORCED_DIAG, _FORCED_SINK = 3.0, 2.0


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def blocks_per_query(lengths: Tensor, density: float, top_l: Optional[int], block_n: int, n_kb: int,
                     min_keys: int = 0, span_blocks: Optional[Tensor] = None) -> Tensor:
    """Key blocks per query block from the real key counts (per sequence [B], or per query block
    [B, n_qb] for packed rows): ceil(keys / block_n) where keys is top_l, or ceil(density x length)
    but at least min_keys (never more than the length); at least 1, at most n_kb (density 1.0 lists
    every block). span_blocks (like lengths): the key blocks from the one holding a row's first real
    key to the one holding its last; where every real key is wanted, at least those, since real keys
    that do not start at key 0 (left padding, holes) spread over more than ceil(length / block_n)."""
    if top_l is not None:
        keys = lengths.clamp(max=top_l)
    else:
        keys = torch.ceil(lengths.double() * density).long().clamp(min=min_keys).minimum(lengths)
    blocks = torch.ceil(keys.double() / block_n).long()
    if span_blocks is not None:
        blocks = torch.where(keys >= lengths, torch.maximum(blocks, span_blocks), blocks)
    return blocks.clamp(min=1, max=n_kb)


def real_key_span(real: Tensor) -> Tensor:
    """[B, 2] int64: the first and the last real key of each row of real [B, Nk] (Nk and -1 when none)."""
    Nk = real.shape[-1]
    pos = torch.arange(Nk, device=real.device)
    return torch.stack([torch.where(real, pos, Nk).amin(-1), torch.where(real, pos, -1).amax(-1)], -1)


def span_blocks(span: Tensor, block_n: int) -> Tensor:
    """[B]: key blocks from the first real key's to the last's (0 for a row without real keys)."""
    first, last = span[..., 0], span[..., 1]
    return torch.where(last >= 0, last // block_n - first // block_n + 1, 0)


def packed_segments(mask: Tensor, real: Tensor, N: int,
                    packed_known: bool = False) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """The sequences of rows that pack several (HF's DataCollatorWithFlattening: one row, a
    block-diagonal mask): (segment [B, N] the sequence index of each position, length [B, N] the real
    keys of sequence s at [:, s], packed [B] bool: the row holds two or more sequences with keys);
    None when no row packs two sequences, or the mask is not square self-attention.
    A sequence starts at query i when i may see key i but not key i - 1: only the mask's diagonal
    and the one below it are read. packed_known: return the segments whatever `packed` says (the
    caller reads it on the host with other facts, in one transfer), not None."""
    Nk = real.shape[1]
    if N != Nk or N < 2 or mask.shape[2] != N:
        return None
    i = torch.arange(N, device=mask.device)
    on = allowed_mask(mask[:, :, i, i].unsqueeze(-1), 0, N).squeeze(-1).any(1)  # [B|1, N]: i sees i
    below = allowed_mask(mask[:, :, i[1:], i[:-1]].unsqueeze(-1), 0, N).squeeze(-1).any(1)  # i sees i - 1
    B = real.shape[0]
    starts = torch.cat([torch.ones_like(on[:, :1]), on[:, 1:] & ~below], dim=1).expand(B, N)
    segment = starts.long().cumsum(1) - 1  # [B, N]: the sequence of each position
    length = torch.zeros(B, N, dtype=torch.int64, device=mask.device).scatter_add_(1, segment, real.long())
    packed = (length > 0).sum(1) > 1  # [B]: rows holding two or more sequences with keys
    if not (packed_known or bool(packed.any())):
        return None
    return segment, length, packed


def packed_blocks_per_query(mask: Tensor, real: Tensor, N: int, density: float, top_l: Optional[int],
                            block_m: int, block_n: int, found=None, host: bool = True,
                            min_keys: int = 0) -> Optional[tuple[Tensor, Tensor]]:
    """Rows that pack several sequences (packed_segments) give each query block the budget and the
    sink block of its own sequence, as if it ran alone: (budget, sink), each [B, n_qb] int64 (budget
    on the CPU: the largest among the sequences of the block's queries; sink: the first key block of
    the sequence of the block's last row); None when no row packs two sequences (blocks_per_query of
    the row's length applies, sink block 0). A sequence that does not start at a multiple of block_n
    spans one key block more than alone and gets it, so density 1.0 still lists every key.
    found: packed_segments of this mask when the caller has them; with them and `real` on the host,
    everything is computed on the host (sink too) and no device memory is read. host=False: the
    budget stays where it was computed (with device segments: on the device, no transfer).
    min_keys: the floor of blocks_per_query, per sequence."""
    found = packed_segments(mask, real, N) if found is None else found
    if found is None:
        return None
    segment, length, packed = found
    B, Nk = real.shape
    i = torch.arange(N, device=segment.device)
    block = (i // block_n).expand(B, N)
    first = torch.full((B, N), N, dtype=torch.int64, device=segment.device).scatter_reduce_(1, segment, block, "amin")
    last = torch.zeros(B, N, dtype=torch.int64, device=segment.device).scatter_reduce_(1, segment, block, "amax")
    spanned = (last - first + 1).clamp(min=1)  # [B, N] key blocks each sequence covers
    alone = torch.ceil(length.double() / block_n).long()  # ... and would cover alone
    budget = (blocks_per_query(length, density, top_l, block_n, N, min_keys) + spanned - alone).minimum(spanned)
    per_query = budget.gather(1, segment)  # [B, N]
    n_qb = n_blocks(N, block_m)
    per_block = _pad_to(per_query, 1, n_qb * block_m, 0).view(B, n_qb, block_m).amax(-1)  # [B, n_qb]
    whole_row = blocks_per_query(real.sum(1), density, top_l, block_n, n_blocks(Nk, block_n), min_keys)
    last_row = (torch.arange(n_qb, device=segment.device) * block_m + block_m - 1).clamp(max=N - 1)
    sink = first.gather(1, segment[:, last_row])  # [B, n_qb]
    sink = torch.where(packed[:, None], sink, 0)
    budget = torch.where(packed[:, None], per_block, whole_row[:, None].to(per_block.device))
    return (budget.cpu() if host else budget), sink


def _pad_to(x: Tensor, dim: int, size: int, value) -> Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat([x, x.new_full(pad_shape, value)], dim=dim)


def pooled_keys(k: Tensor, real: Tensor, block_n: int) -> tuple[Tensor, Tensor]:
    """Mean of each key block's real keys, and their count: k_bar [B, Hkv, n_kb, D] fp32, count [B, n_kb]."""
    B, Hkv, Nk, D = k.shape
    n_kb = n_blocks(Nk, block_n)
    w = _pad_to(real.to(torch.float32), 1, n_kb * block_n, 0.0).view(B, 1, n_kb, block_n, 1)
    kp = _pad_to(k.float(), 2, n_kb * block_n, 0.0).view(B, Hkv, n_kb, block_n, D)
    count = w.sum(3)  # [B, 1, n_kb, 1]
    k_bar = (kp * w).sum(3) / count.clamp(min=1)
    return k_bar, count.view(B, n_kb)


def _tile_allowed(mask: Tensor, B: int, H: int, r0: int, r1: int, block_m: int, block_n: int, Nk: int) -> Tensor:
    """Whether the explicit mask allows any (query, key) pair of each tile: [B, H|1, C, n_kb] for query
    blocks r0 // block_m ..; read one row chunk at a time."""
    allowed = allowed_mask(mask, r0, r1)  # [B|1, H|1, rows|1, Nk]
    n_kb = n_blocks(Nk, block_n)
    C = n_blocks(r1 - r0, block_m)
    if allowed.shape[2] == 1:  # one row for every query
        tiles = _pad_to(allowed, 3, n_kb * block_n, False).view(*allowed.shape[:2], 1, n_kb, block_n).any(-1)
        return tiles.expand(allowed.shape[0], allowed.shape[1], C, n_kb)
    a = _pad_to(_pad_to(allowed, 2, C * block_m, False), 3, n_kb * block_n, False)
    return a.reshape(*a.shape[:2], C, block_m, n_kb, block_n).any(-1).any(3)


def budget_on_device(budget_lb: Tensor, device, B: int, n_qb: int, on_device: Optional[Tensor] = None):
    """The key-block budgets where the selection compares them: an int when every query block has the
    same one (no copy), else [B, n_qb] int32 on `device`: `on_device` if the caller keeps one (the
    site copies it once per mask), else copied here. budget_lb is host data ([B] or [B, n_qb] int64 on
    the CPU); a copy of it from pageable memory makes CUDA drain the stream first, so it is made only
    where nothing is kept."""
    if budget_lb.device.type != "cpu":
        raise ValueError(f"budget_lb must be a CPU tensor (host data), got one on {budget_lb.device}")
    flat = budget_lb.flatten()
    if flat.numel() == 0 or bool((flat == flat[0]).all()):
        return int(flat[0]) if flat.numel() else 0
    if on_device is not None:
        return on_device
    return budget_lb.to(device=device, dtype=torch.int32).view(B, -1).expand(B, n_qb)


def select_key_blocks(
    q: Tensor,
    k: Tensor,
    scale: float,
    budget_lb: Tensor,
    is_causal: bool,
    mask: Optional[Tensor],
    real: Optional[Tensor],
    block_m: int,
    block_n: int,
    per_group: bool = True,
    sink: Optional[Tensor] = None,
    budget_dev: Optional[Tensor] = None,
    Lb: Optional[int] = None,
) -> Tensor:
    """Top-Lb key blocks per query block by the pooled proxy; never a block the query block may not
    see at all (causal future, masked out, padding only). budget_lb [B], or [B, n_qb] for packed
    rows (packed_lengths), host data; budget_dev: its [B, n_qb] int32 device copy when the caller
    keeps one (budget_on_device); budget_lb None: budget_dev alone, and Lb, the lists' width, given
    (nothing read on the host: a fixed output shape); real [B, Nk] bool (keys some query may see; None:
    every key). Returns block_idx [B, S, n_qb, max Lb] int32, -1 for unused slots, where
    S = Hkv when `per_group` (the query heads of a GQA group share one list, scored by the largest
    share any of them gives a block: one gather and one GEMM serve the group) and S = H otherwise.
    sink [B, n_qb] (packed rows): the block each query block always keeps besides its diagonal one,
    else block 0."""
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    n_qb, n_kb = n_blocks(N, block_m), n_blocks(Nk, block_n)
    if Lb is None:
        Lb = int(budget_lb.max()) if budget_lb.numel() else 0
    S = Hkv if per_group else H
    block_idx = torch.full((B, S, n_qb, Lb), -1, dtype=torch.int32, device=q.device)
    if Lb == 0 or N == 0:
        return block_idx
    if real is None:
        real = torch.ones(B, Nk, dtype=torch.bool, device=k.device)
    k_bar, count = pooled_keys(k, real, block_n)  # [B, Hkv, n_kb, D], [B, n_kb]
    k_bar_t = k_bar.transpose(-1, -2)  # [B, Hkv, D, n_kb]
    log_count = torch.log(count).view(B, 1, 1, n_kb)  # -inf for blocks of padding only
    kb_start = torch.arange(n_kb, device=q.device) * block_n
    budget = budget_dev if budget_lb is None else budget_on_device(budget_lb, q.device, B, n_qb, budget_dev)
    if not isinstance(budget, int):
        budget = budget.view(B, 1, n_qb, 1)
    qb_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * block_m * n_kb))
    for qb0 in range(0, n_qb, qb_per_chunk):
        qb1 = min(n_qb, qb0 + qb_per_chunk)
        r0, r1 = qb0 * block_m, min(N, qb1 * block_m)
        C = qb1 - qb0
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G * (r1 - r0), D)
        s = (qc @ k_bar_t).view(B, H, r1 - r0, n_kb) * scale + log_count  # [B, H, rows, n_kb]
        rows = torch.arange(r0, r1, device=q.device)
        if is_causal:  # a query sees block j iff j starts at or before it
            s = s.masked_fill(kb_start.view(1, n_kb) > rows.view(-1, 1), float("-inf"))
        share = torch.softmax(s, dim=-1).nan_to_num(0.0)
        share = _pad_to(share, 2, C * block_m, 0.0).view(B, H, C, block_m, n_kb).amax(3)  # [B, H, C, n_kb]
        if per_group:
            share = share.view(B, Hkv, G, C, n_kb).amax(2)  # [B, Hkv, C, n_kb]
        # Always kept: the sink block and the diagonal block (the key block holding the query
        # block's last row, clipped to the keys that exist).
        diag = ((torch.arange(qb0, qb1, device=q.device) * block_m + block_m - 1).clamp(max=min(N, Nk) - 1)
                // block_n).clamp(min=0)
        forced = torch.zeros(B, 1, C, n_kb, device=q.device)
        if sink is None:
            forced[..., 0] = _FORCED_SINK
        else:
            forced.scatter_(-1, sink[:, qb0:qb1].to(q.device).view(B, 1, C, 1), _FORCED_SINK)
        forced[:, :, torch.arange(C, device=q.device), diag] = _FORCED_DIAG
        score = share + forced
        # Forbidden tiles: padding-only blocks, causal future, masked out for the whole tile.
        visible = (count > 0).view(B, 1, 1, n_kb)
        if is_causal:
            last_row = (torch.arange(qb0, qb1, device=q.device) * block_m + block_m - 1).clamp(max=N - 1)
            visible = visible & (kb_start.view(1, n_kb) <= last_row.view(-1, 1))
        if mask is not None:
            tiles = _tile_allowed(mask, B, H, r0, r1, block_m, block_n, Nk)  # [B, H|1, C, n_kb]
            if per_group and tiles.shape[1] != 1:
                tiles = tiles.view(tiles.shape[0], Hkv, G, C, n_kb).any(2)  # a mask [1, H, ..]: batch kept at 1
            visible = visible & tiles
        score = score.masked_fill(~visible, float("-inf"))
        vals, idx = score.topk(min(Lb, n_kb), dim=-1)
        slots = torch.arange(idx.shape[-1], device=q.device)
        slot_unused = slots >= (budget if isinstance(budget, int) else budget[:, :, qb0:qb1])  # [B, 1, C, slots]
        idx = idx.masked_fill(torch.isneginf(vals) | slot_unused, -1)
        block_idx[:, :, qb0:qb1, : idx.shape[-1]] = idx.to(torch.int32)
    return block_idx


def mask_tiles(mask: Tensor, B: int, H: int, Hkv: int, N: int, Nk: int, block_m: int, block_n: int,
               per_group: bool) -> Tensor:
    """Whether the explicit mask allows any pair of each (query block, key block) tile:
    [B, S | 1, n_qb, n_kb] bool, S as in select_key_blocks; built a chunk of query blocks at a time."""
    n_qb = n_blocks(N, block_m)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * block_m * max(Nk, 1)))
    parts = []
    for qb0 in range(0, n_qb, per_chunk):
        qb1 = min(n_qb, qb0 + per_chunk)
        tiles = _tile_allowed(mask, B, H, qb0 * block_m, min(N, qb1 * block_m), block_m, block_n, Nk)
        if per_group and tiles.shape[1] != 1:
            tiles = tiles.reshape(tiles.shape[0], Hkv, H // Hkv, *tiles.shape[2:]).any(2)
        parts.append(tiles)
    return torch.cat(parts, dim=2)


def select_blocks(
    q: Tensor, k: Tensor, scale: float, budget_lb: Tensor, is_causal: bool, mask: Optional[Tensor],
    real: Optional[Tensor], block_m: int, block_n: int, impl: str, per_group: bool = True,
    sink: Optional[Tensor] = None,
    budget_dev: Optional[Tensor] = None, Lb: Optional[int] = None,
) -> Tensor:
    """select_key_blocks through the implementation `impl` names: the Triton kernels
    (select_triton.py: a few launches instead of about a hundred small operations, which is
    what the GPU path needs, at any N) when impl is 'triton', else PyTorch."""
    if impl == "triton":
        from .select_triton import select_key_blocks_triton

        B, H, N, _ = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        tiles = None if mask is None else mask_tiles(mask, B, H, Hkv, N, Nk, block_m, block_n, per_group)
        return select_key_blocks_triton(q, k, scale, budget_lb, is_causal, tiles,
                                        None if mask is None else real, block_m, block_n, per_group, sink, budget_dev,
                                        Lb)
    return select_key_blocks(q, k, scale, budget_lb, is_causal, mask, real, block_m, block_n, per_group, sink,
                             budget_dev, Lb)


def oracle_key_blocks(
    q: Tensor, k: Tensor, scale: float, budget_lb: Tensor, is_causal: bool, mask: Optional[Tensor],
    block_m: int, block_n: int,
) -> Tensor:
    """The quality reference: the Lb key blocks holding the most true attention mass of each query
    block (summed over its queries). Builds the full score matrix: for evaluation only."""
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    n_qb, n_kb = n_blocks(N, block_m), n_blocks(Nk, block_n)
    s = (q.float() @ k.repeat_interleave(H // Hkv, dim=1).float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype != torch.bool:
            s = s + mask.float()
        s = s.masked_fill(~allowed_mask(mask, 0, N), float("-inf"))
    if is_causal:
        s = s.masked_fill(torch.ones(N, Nk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    p = _pad_to(_pad_to(p, 2, n_qb * block_m, 0.0), 3, n_kb * block_n, 0.0)
    mass = p.view(B, H, n_qb, block_m, n_kb, block_n).sum((3, 5))  # [B, H, n_qb, n_kb]
    Lb = int(budget_lb.max())
    vals, idx = mass.topk(min(Lb, n_kb), dim=-1)
    slot_unused = torch.arange(idx.shape[-1], device=q.device) >= budget_lb.to(q.device).view(B, 1, -1, 1)
    return idx.masked_fill((vals <= 0) | slot_unused, -1).to(torch.int32)


__all__ = ["select_blocks", "select_key_blocks", "budget_on_device", "mask_tiles", "packed_blocks_per_query", "oracle_key_blocks", "blocks_per_query", "pooled_keys", "n_blocks"]
