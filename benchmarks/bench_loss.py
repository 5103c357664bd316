#!/usr/bin/env python
"""The LM head + cross-entropy alone: dense (HF's form) vs the chunked op, forward + backward.

Bytes saved for backward (unique storages; W, held by reference, left out), the allocation peak
from the profiler's memory events, and the median time. `--return-logits` also returns the logits,
as a Hugging Face model does: their T x V stays alive (the model's return value), nothing T x V is
saved for backward. The head's weight is frozen (LoRA fine-tuning), h requires grad.

    python benchmarks/bench_loss.py --tokens 2048 --return-logits both --json benchmarks/results/loss_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from source (the GPU machine has no install)
    sys.path.insert(0, str(REPO))

from spt_compile.sparse_ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from spt_compile.sparse_ops.linear_cross_entropy.reference import linear_cross_entropy_reference  # noqa: E402
from spt_compile.recipes.memory import allocation_peak  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--hidden", type=int, default=576, help="d (SmolLM2: 576, LLaMA-7B: 4096)")
    p.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152, LLaMA: 32000)")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024], help="loss_chunk values to run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--return-logits", default="no", choices=["no", "yes", "both"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def measure(fn, h, W, y, ret, steps, **kw) -> dict:
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != W.untyped_storage().data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, logits = fn(h, W, None, y, return_logits=ret, **kw)
        loss.backward()
        del logits, loss
    h.grad = None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, logits = fn(h, W, None, y, return_logits=ret, **kw)
        loss.backward()
        times.append(time.perf_counter() - t0)
        h.grad = None
    return {"saved_bytes": sum(saved.values()), "alloc_peak_bytes": allocation_peak(prof),
            "time_s": statistics.median(times)}


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    for T in args.tokens:
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(T, args.hidden, generator=gen).to(dtype).requires_grad_()
        W = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).to(dtype)
        y = torch.randint(0, args.vocab, (T,), generator=gen)
        for ret in {"no": [False], "yes": [True], "both": [False, True]}[args.return_logits]:
            runs = [("dense", linear_cross_entropy_reference, {})] + [
                (f"chunked-{c}", linear_cross_entropy, {"chunk": c}) for c in args.chunks]
            for name, fn, kw in runs:
                r = measure(fn, h, W, y, ret, args.steps, **kw)
                rows.append({"config": name, "tokens": T, "return_logits": ret, **r})
    print(f"{'config':14} {'tokens':>6} {'logits out':>10} {'saved MB':>9} {'alloc peak MB':>13} {'time s':>7}")
    for r in rows:
        print(f"{r['config']:14} {r['tokens']:6d} {str(r['return_logits']):>10} {r['saved_bytes'] / 2**20:9.0f} "
              f"{r['alloc_peak_bytes'] / 2**20:13.0f} {r['time_s']:7.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": rows, "argv": sys.argv[1:], "torch": torch.__version__,
                                         "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
