"""Where does an spt attention call spend its time? torch.profiler over a few forward+backward steps
of the same one-SDPA module bench_attention.py times (so the next bottleneck shows).

    python benchmarks/research/profile_attention.py --device cuda --n 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import make_fn  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--config", help="a bench_attention.py config (default: spt-block-triton on CUDA, "
                   "spt-block-torch on the CPU)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    args.density, args.block, args.bidirectional = 1 / 8, 64, False
    dev = torch.device(args.device)
    args.config = args.config or ("spt-block-triton" if dev.type == "cuda" else "spt-block-torch")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, h, args.n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    fn = make_fn(args.config, args)
    for _ in range(3):
        fn(q, k, v).sum().backward()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            fn(q, k, v).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
