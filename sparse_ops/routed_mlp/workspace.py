"""Memory reused from call to call for the block-order weights (_BlockOrderWeights), on the CPU and
only for buffers large enough to need it.

Why: the torch path writes each projection's weights in block order on every call (forward and
backward) and frees them after. On the CPU an allocation above glibc's largest mmap threshold (32 MiB
on 64-bit Linux) is mapped anew each time and its pages fault in as they are first written: one
[11008, 4096] fp32 projection (LLaMA-7B's MLP, 172 MiB) took about 40 ms to allocate and fill on this
project's CPU, against about 12 ms to copy into memory already mapped (docs/host_overhead.md).
Smaller buffers come back from malloc's heap, and CUDA's caching allocator already reuses its blocks,
so those are allocated as usual.

A buffer is lent to one build at a time, per thread and per role (a projection's weights); a build
that finds it lent gets a fresh allocation. It is handed back when the build that holds it is freed,
and kept (grown to the largest build seen) until `release()`. What it holds is resident memory the
step's allocation events no longer show, so the benchmarks add `held_bytes()` to their peaks.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

# Buffers of at least this many bytes are reused: glibc's M_MMAP_THRESHOLD grows with the blocks
# freed, up to 32 MiB on 64-bit systems; above it every allocation is a fresh mapping.
REUSE_FROM_BYTES = 32 * 2**20

_local = threading.local()  # .pool: {(role, dtype): [buffer (flat), lent]}


def _pool() -> dict:
    if not hasattr(_local, "pool"):
        _local.pool = {}
    return _local.pool


def empty(owner: object, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised contiguous [shape] tensor of like's dtype and device, for `owner` to fill;
    reused memory when it is large and on the CPU (handed back when `owner` is garbage)."""
    numel = math.prod(shape)
    if not _reusable(like) or numel * like.element_size() < REUSE_FROM_BYTES:
        return like.new_empty(shape)
    pool = _pool()
    key = (role, like.dtype)
    entry = pool.get(key)
    if entry is not None and entry[1]:  # lent to a build still alive: do not share it
        return like.new_empty(shape)
    if entry is None or entry[0].numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: calls outside inference mode write it too
            entry = pool[key] = [torch.empty(numel, dtype=like.dtype), False]
    entry[1] = True
    weakref.finalize(owner, _hand_back, entry)
    return entry[0][:numel].view(shape)


def _reusable(like: Tensor) -> bool:
    """A plain CPU tensor or parameter: not a fake, functional or functorch-wrapped one (tracing),
    whose allocations must stay theirs."""
    return (type(like) in (torch.Tensor, torch.nn.Parameter) and like.device.type == "cpu"
            and not torch._C._functorch.is_functorch_wrapped_tensor(like))


def _hand_back(entry: list) -> None:
    entry[1] = False


def held_bytes() -> int:
    """Bytes this thread's reused buffers hold."""
    return sum(buf.numel() * buf.element_size() for buf, _ in _pool().values())


def release() -> None:
    """Free this thread's reused buffers (those lent now stay valid for their builds)."""
    _pool().clear()
