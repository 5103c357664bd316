#!/usr/bin/env python
"""A/B of exact_mlp_forward (the exact_forward MLP site's forward) between a git revision and the
working tree, in ONE process, alternating call by call: SmolLM2's MLP shape (SwiGLU 576 -> 1536, LoRA
r=16 on gate/up/down), 8 x 512 tokens, the second half of each row a loss row (every block), the
first half ranked to 3 of 4 blocks (GSM8K-like), saving what backward needs.

    python benchmarks/research/ab_exact_save.py f750db4 --rounds 15 \\
        --json benchmarks/research/results/ab_exact_save_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "ops"), str(REPO / "tests"), str(REPO / "benchmarks")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="git revision whose sparse_ops/routed_mlp/exact.py is the baseline")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import spt_compile.sparse_ops.routed_mlp.exact as tree
    from ab_mlp_backward import module_at
    from provenance import cpu_model, source_commit
    from spt_compile.fitting.router import choose_blocks
    from test_routed_mlp_op import make_weights, spec_for

    torch.set_num_threads(args.threads)
    base = module_at(args.rev, "sparse_ops/routed_mlp/exact.py", "exact_at_rev", "spt_compile.sparse_ops.routed_mlp")
    gen = torch.Generator().manual_seed(0)
    w = make_weights(576, 1536, 576, gated=True, bias=False, lora=("in", "gate", "out"), r=16, gen=gen)
    w = type(w)(*[None if t is None else t.detach() for t in w])
    spec = spec_for(w, "silu", True, 4)
    x = torch.randn(4096, 576, generator=gen)
    loss_rows = torch.zeros(4096, 1, dtype=torch.bool)
    loss_rows.view(8, 512)[:, 256:] = True

    def choose(scores):  # [T, nb]: 3 of 4 blocks by score, every block on loss rows
        return choose_blocks(scores, 3) | loss_rows

    times: dict[str, list[float]] = {args.rev: [], "tree": []}
    outs = {}
    for _ in range(args.rounds):
        for name, module in ((args.rev, base), ("tree", tree)):
            saved: list = []
            t0 = time.perf_counter()
            y = module.exact_mlp_forward(x, w, spec, choose, 0, saved)[0]
            times[name].append(time.perf_counter() - t0)
            outs[name] = (y, saved[0])
    same = all(torch.equal(a, b) for a, b in zip(outs[args.rev], outs["tree"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.rev}: {1000 * med[args.rev]:.1f} ms, tree: {1000 * med['tree']:.1f} ms "
          f"({med['tree'] / med[args.rev]:.3f}x), median of {args.rounds}; outputs and saved tensors equal: {same}")
    if args.json:
        args.json.write_text(json.dumps({"rev": args.rev, "tree": source_commit(), "cpu": cpu_model(),
                                         "threads": args.threads, "times_s": times, "median_s": med,
                                         "equal": same, "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
