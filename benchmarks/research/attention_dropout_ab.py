#!/usr/bin/env python
"""Exact attention with dropout on the CPU, forward + the backward's replay + its vjp, as the attention
site runs it at short lengths: SDPA under a seeded RNG fork (bernoulli_ masks; the path before)
against sparse_ops/attention/exact_dropout.py (16-bit masks from a generator of its own), alternating
call by call in one process, medians.

    python benchmarks/research/attention_dropout_ab.py --json benchmarks/research/results/attention_dropout_ab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = [(32, 12, 16, 32), (32, 12, 64, 32), (8, 9, 512, 64)]  # SST-2 batches (MiniLM heads), SmolLM2 512 x 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from spt_compile.sites.attention import _seeded
    from spt_compile.sparse_ops.attention.exact_dropout import attention_with_dropout

    torch.set_num_threads(args.threads)
    scale = 0.17

    def sdpa(q, k, v, mask, seed):
        with _seeded(seed, q.device):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=args.dropout, scale=scale)

    def masks16(q, k, v, mask, seed):
        return attention_with_dropout(q, k, v, mask, False, scale, args.dropout, seed)

    rows = []
    for B, H, N, D in SHAPES:
        q, k, v, dout = (torch.randn(B, H, N, D) for _ in range(4))
        mask = torch.zeros(B, 1, N, N)
        mask[..., N - 3:] = float("-inf")  # padding, as an HF extended mask has it

        def call(fn):
            with torch.no_grad():
                fn(q, k, v, mask, 5)  # the site's forward
            _, vjp = torch.func.vjp(lambda a, b, c: fn(a, b, c, mask, 5), q, k, v)  # its backward: replay
            vjp(dout)

        times = {"sdpa": [], "masks16": []}
        for _ in range(args.rounds):
            for name, fn in (("sdpa", sdpa), ("masks16", masks16)):
                t0 = time.perf_counter()
                call(fn)
                times[name].append(time.perf_counter() - t0)
        old, new = (statistics.median(times[n][2:]) for n in ("sdpa", "masks16"))
        rows.append(dict(shape=[B, H, N, D], sdpa_ms=round(old * 1e3, 2), masks16_ms=round(new * 1e3, 2),
                         ratio=round(new / old, 3)))
        print(f"[B, H, N, D] = [{B}, {H}, {N}, {D}]: SDPA + RNG fork {old * 1e3:.2f} ms, 16-bit masks "
              f"{new * 1e3:.2f} ms ({new / old:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(dict(command="python " + " ".join([sys.argv[0], *sys.argv[1:]]),
                                             dropout=args.dropout, threads=args.threads, rounds=args.rounds,
                                             torch=torch.__version__, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
