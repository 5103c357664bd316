#!/usr/bin/env python
"""How to gather a weight's columns into block order on the CPU: index_select along dim 1 against
torch.gather with the permutation broadcast over the rows, and a plain copy for scale.

The routed MLP's torch path puts the out projection ("oi": units are W_out's columns, [d_out, F]) in
the clustering's unit order on every call (_BlockOrderWeights, sparse_ops/routed_mlp/blocks.py). The
destination is memory already mapped (reused), as the op's is; the permutation is clustering-like
(each block's units ascending, blocks interleaved). Every method writes the same values; this times
them, alternating, at SmolLM2's and LLaMA-7B's MLP shapes.

    python benchmarks/research/column_gather.py --json benchmarks/research/results/column_gather_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks")]

SHAPES = {"smollm2": (576, 1536), "llama7b": (4096, 11008)}  # (d_out, F)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=21, help="runs of each method, alternating (median of all but the first)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    from provenance import cpu_model, scrub_paths, source_commit

    torch.set_num_threads(args.threads)
    rows = []
    for shape, (d_out, F) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(d_out, F, generator=gen)
        perm = torch.randperm(F, generator=gen).view(4, F // 4).sort(dim=1).values.reshape(-1)
        dest = torch.empty(d_out + 16, F)[:d_out]  # the out projection's rows of [W_out ; A_out]
        index = perm.expand(d_out, F)
        methods = {
            "index_select": lambda: torch.index_select(W, 1, perm, out=dest),
            "gather": lambda: torch.gather(W, 1, index, out=dest),
            "copy (no permutation)": lambda: dest.copy_(W),
        }
        want = W[:, perm]
        for name, run in methods.items():
            run()
            assert name.startswith("copy") or torch.equal(dest, want), name
        times = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, run in methods.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            row = dict(shape=shape, d_out=d_out, F=F, method=name, ms=statistics.median(ts[1:]) * 1e3)
            rows.append(row)
            print(f"{shape:8s} [{d_out}, {F}] {name:22s} {row['ms']:8.3f} ms", flush=True)
    if args.json:
        record = dict(what="an fp32 weight's columns gathered into block order on the CPU (benchmarks/research/column_gather.py)",
                      command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                      commit=source_commit(), cpu=cpu_model(), threads=args.threads, torch=torch.__version__,
                      rounds=args.rounds, rows=rows)
        args.json.write_text(json.dumps(scrub_paths(record), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
