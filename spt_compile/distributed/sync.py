"""One sparse state across ranks.

Every rank of a data-parallel run must hold the same routers, unit orders, codebooks and predictors,
or the ranks would train different sparse models under one averaged gradient, and a checkpoint
written by rank 0 would describe rank 0 only. How each piece gets there:

* samples (the router's token buffer, the codebooks' key buffer): all-gathered where they are taken,
  so every rank buffers the same tokens, in rank order (`gather_rows`);
* probe results (quality): averaged over ranks (`mean_over_ranks`), so the decisions they feed (when
  to probe again) are the same everywhere;
* fits (router, unit order, error curve, codebooks): computed on every rank from the same buffer,
  then rank 0's result is broadcast (`from_rank0`), so the state is bit-identical even where a
  kernel is not bitwise reproducible across devices; the lazily fitted balance and compensation are
  functions of those and of the (DDP-synchronised) weights.

Collectives run only inside training calls, at points every rank reaches in the same order (the
calibration calls and the probe/refit calls, counted in training calls). A call without gradients
(evaluation, which scripts often run on rank 0 only) changes no state under torch.distributed
(registry.CallPlan.frozen). With no process group initialised every function here returns its input.

Each site's first training call in a process (registry.Site.begin), and each collective, first
compares a signature of the site (its name, kind, structure, options and call counts) across ranks,
as a hash in one 2-element all-reduce, and raises SptStateError naming what
differs: ranks compiled with different options, or state loaded on some ranks only, fail at the
first reduction instead of hanging or silently diverging.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import Tensor


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def active() -> bool:
    return world_size() > 1


def probe_interval(every: int) -> int:
    """Training calls between probes (and the refits they feed): `every` up to 32 ranks, then once
    more per 32 ranks, so that the syncs stay under about 1% of a step (docs/distributed.md: at
    SmolLM2's shape on 64 GPUs, probes every 25 calls would cost about 1%)."""
    return every * max(1, -(-world_size() // 32))


def _device() -> torch.device:
    """Where collectives run: the current CUDA device where the group has NCCL (alone, or beside gloo
    as accelerate sets it up: "cpu:gloo,cuda:nccl"), else the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _signature(site) -> tuple:
    options = site.template.options
    return (site.kind, site.name, site.ordinal, repr(site.template.structure()),
            zlib.crc32(repr(options).encode()), site.calls, site.train_calls)


def check_agreement(site, what: str) -> None:
    """All ranks must reach this collective from the same site, built from the same options, at the
    same call; else SptStateError naming the first difference."""
    import torch.distributed as dist

    from spt_compile.registry import SptStateError  # here: registry imports this module

    mine = _signature(site)
    h = zlib.crc32(repr(mine).encode())
    both = torch.tensor([h, -h], dtype=torch.int64, device=_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both.tolist() == [h, -h]:  # max and min agree with this rank: every rank has the same signature
        return
    every: list = [None] * world_size()
    dist.all_gather_object(every, mine)
    names = ("kind", "site", "ordinal", "structure", "options (hash)", "calls", "training calls")
    for rank, theirs in enumerate(every):
        if theirs != mine:
            diff = next(n for n, a, b in zip(names, mine, theirs) if a != b)
            raise SptStateError(
                f"spt under torch.distributed: rank {dist.get_rank()} and rank {rank} differ in the {diff} of "
                f"the {site.kind} site at {site.name or '<top>'} when syncing its {what} ({mine} against {theirs}). "
                "Every rank must compile the model with the same spt options and load the same sparse state "
                "(spt_compile.load_state_dict on every rank, or none), and run the same training steps.")


def gather_rows(site, what: str, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor's rows (dim 0; the same count for all of them) from every rank, concatenated in
    rank order, on the tensors' own device. Ranks may contribute different counts (0 included)."""
    if not active():
        return tensors
    import torch.distributed as dist

    check_agreement(site, what)
    dev = _device()
    n = torch.tensor([tensors[0].shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    top = max(counts)
    out = []
    for t in tensors:
        padded = t.new_zeros((top, *t.shape[1:]), device=dev)
        padded[: t.shape[0]] = t.to(dev)
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device))
    return tuple(out)


def mean_over_ranks(site, values: dict[str, float]) -> dict[str, float]:
    """The average of each value over ranks (probe results); values a rank could not measure are NaN
    there and left out of the average."""
    if not active():
        return values
    import torch.distributed as dist

    check_agreement(site, "probe results")
    keys = sorted(values)
    v = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    ok = torch.isfinite(v)
    both = torch.cat([torch.where(ok, v, torch.zeros_like(v)), ok.double()])
    dist.all_reduce(both)
    sums, n = both[: len(keys)], both[len(keys):]
    return {k: (float(s / c) if c > 0 else float("nan")) for k, s, c in zip(keys, sums.tolist(), n.tolist())}


def from_rank0(site, what: str, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Rank 0's tensors on every rank (same shapes on every rank; None stays None), each on its own
    device and dtype."""
    if not active():
        return tensors
    import torch.distributed as dist

    check_agreement(site, what)
    dev = _device()
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        buf = t.detach().to(dev).clone()
        dist.broadcast(buf, src=0)
        out.append(buf.to(t.device))
    return tuple(out)
