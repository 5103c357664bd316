"""Memory measurements of the benchmarks (CPU and CUDA).

allocation_peak(prof): the highest bytes-alive level reached during a torch.profiler run with
profile_memory=True, from its [memory] events (signed allocation sizes, replayed in time order) and
relative to what was alive when profiling started. On the CPU this is the allocator's view; RSS runs
1.6-1.8x higher here because freed pages stay mapped.

peak_rss_bytes(): the process's peak resident set (ru_maxrss), for "peak RSS above the loaded
model" measured in a fresh process.
"""

from __future__ import annotations

import resource
import sys


def allocation_peak(prof, device_type: str = "CPU") -> int:
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == device_type]
    alive = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        alive += e.nbytes()  # negative for a free
        peak = max(peak, alive)
    return peak


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best we have
        return peak_rss_bytes()
