"""One step under the CUDA profiler, for the benchmarks' --host-profile: wall time, the GPU kernels
launched (count and summed time, the largest by name) and the operations that synchronised the host
with the device (torch.cuda.set_sync_debug_mode). Shared by bench_attention.py and bench_ffn.py."""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch


def profile_step(step: Callable[[], None], top: int = 8) -> dict:
    """step runs one forward + backward on the current CUDA device; call it warmed up. Without CUDA
    (a CPU check of the benchmark) nothing is counted: no kernels, no syncs."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).split("\n")[0][:120] for w in caught if "synchroniz" in str(w.message)]
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync()
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync()
    wall = time.perf_counter() - t
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, list] = {}  # name -> [ms, launches]
    for e in kernels:
        ms = (e.device_time if hasattr(e, "device_time") else e.cuda_time) / 1e3
        entry = per_kernel.setdefault(e.name[:60], [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    largest = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"top_kernels_ms": {k: round(v[0], 4) for k, v in largest},
            "top_kernels_launches": {k: v[1] for k, v in largest},
            "wall_ms_profiled": wall * 1e3, "gpu_kernels": len(kernels),
            "gpu_kernel_ms": sum(v[0] for v in per_kernel.values()), "host_syncs": len(syncs),
            "sync_sites": syncs[:10]}
