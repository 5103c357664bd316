#!/usr/bin/env python
"""A/B of block_sparse_backward_torch (the attention site's backward on the CPU) between a git revision
and the working tree, in ONE process, alternating call by call (ABBA), on a training call's inputs:
SmolLM2's heads (9 query / 3 key-value heads of 64), causal, the key blocks select_key_blocks lists
per GQA group (the diagonal block first), `--keys` keys a query (the defaults at 2048 tokens: density
1/8, 256 keys), and the exact forward's output and log-sum-exp (exact_forward: the backward is the exact Jacobian
masked to the listed tiles).

    python benchmarks/research/ab_attention_backward.py aee0cc6 --n 2048 --rounds 30 --json PATH
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "benchmarks" / "research")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="git revision whose sparse_ops/attention/block_sparse.py is the baseline")
    p.add_argument("--n", type=int, default=2048, help="tokens (one sequence)")
    p.add_argument("--keys", type=int, default=256, help="keys listed per query (64-key blocks)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import spt_compile.sparse_ops.attention.block_sparse as tree
    from ab_mlp_backward import module_at
    from provenance import cpu_model, source_commit
    from spt_compile.sparse_ops.attention.select import select_key_blocks

    torch.set_num_threads(args.threads)
    base = module_at(args.rev, "sparse_ops/attention/block_sparse.py", "block_sparse_at_rev",
                     "spt_compile.sparse_ops.attention")
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, N, D, blk = 1, 9, 3, args.n, 64, 64
    q = torch.randn(B, H, N, D, generator=gen)
    k, v = torch.randn(B, Hkv, N, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen)
    dout = torch.randn(B, H, N, D, generator=gen)
    scale = D ** -0.5
    kx, vx = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = (q @ kx.transpose(-1, -2)) * scale
    s.masked_fill_(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)  # [B, H, N]: the exact forward's
    out = torch.softmax(s, -1) @ vx
    del s, kx, vx
    budget = torch.tensor([max(1, args.keys // blk)])  # key blocks a query block lists
    lists = select_key_blocks(q, k, scale, budget, True, None, None, blk, blk)  # [B, Hkv, n_qb, Lb]
    call = (dout, q, k, v, lists, out, lse, scale, True, None, blk, blk, 0.0, 0)

    names = (args.rev, "tree")
    times: dict[str, list[float]] = {n: [] for n in names}
    outs = {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            module = base if name == args.rev else tree
            t0 = time.perf_counter()
            outs[name] = module.block_sparse_backward_torch(*call, diag_first=True)
            times[name].append(time.perf_counter() - t0)
    rel = {n: float((a - b).norm() / a.norm()) for n, a, b in zip(("q", "k", "v"), outs[args.rev], outs["tree"])}
    med = {k_: statistics.median(v_) for k_, v_ in times.items()}
    print(f"{args.rev}: {1000 * med[args.rev]:.1f} ms, tree: {1000 * med['tree']:.1f} ms "
          f"({med['tree'] / med[args.rev]:.3f}x), median of {args.rounds}, N={N}, {args.keys} keys a query; "
          f"largest relative gradient difference {max(rel.values()):.1e}")
    if args.json:
        args.json.write_text(json.dumps({"rev": args.rev, "tree": source_commit(), "cpu": cpu_model(), "n": N,
                                         "keys": args.keys, "threads": args.threads, "times_s": times,
                                         "median_s": med, "relative_difference": rel,
                                         "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
