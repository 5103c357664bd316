#!/usr/bin/env python
"""A/B of the routed MLP's two PyTorch forms on this CPU: block-batched (A: one GEMM per projection per
block, ffn_impl="torch") against grouped (B: torch._grouped_mm, every block in one GEMM, offsets on the
device, ffn_impl="grouped"), timed in alternating rounds in one process (both see the same slow spells
of a shared machine).

Calls, at SmolLM2's MLP shape (SwiGLU 576 -> 1536, 4 blocks), LoRA r=16 on gate/up/down with frozen
base weights (d(x) and the LoRA grads), a unit permutation (the clustering):
  train   the default training call: exact forward (every block) saving the backward's pairs, then the
          backward masked to the top ffn_active of 4 blocks per token on average;
  routed  a routed training call (exact_forward=False): routed forward with ffn_compensate's
          predictors (rank 32) + backward;
  infer   a sparse-inference forward (routed, nothing saved).
Outputs and gradients of A and B are compared first (relative error).

    python benchmarks/research/ab_grouped_mlp.py --json benchmarks/research/results/ab_grouped_mlp_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

LORA_SLOTS = ("in_a", "in_bb", "gate_a", "gate_bb", "out_a", "out_bb")


def inputs(T: int, active: int, d: int = 576, F: int = 1536, r: int = 16, nb: int = 4, rank: int = 32):
    import torch

    from spt_compile.fitting.router import choose_blocks
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights

    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = MlpWeights(in_w=rn(F, d) / d**0.5, in_b=None, in_a=rn(r, d) / d**0.5, in_bb=rn(F, r) * 0.01,
                   gate_w=rn(F, d) / d**0.5, gate_b=None, gate_a=rn(r, d) / d**0.5, gate_bb=rn(F, r) * 0.01,
                   out_w=rn(d, F) / F**0.5, out_b=None, out_a=rn(r, F) / F**0.5, out_bb=rn(d, r) * 0.01)
    scores = rn(T, nb)
    return dict(x=rn(T, d), dy=rn(T, d), w=w, spec=MlpSpec("silu", True, F, nb, in_scale=2.0, gate_scale=2.0,
                                                            out_scale=2.0),
                routed=choose_blocks(scores, active), budget=T * active, scores=scores,
                perm=torch.randperm(F, generator=g), needs=MlpWeights(*[s in LORA_SLOTS for s in MlpWeights._fields]),
                comp=(rn(d, nb * rank) / d**0.5, rn(nb * rank, d) / 10, rn(nb, d) / 10))


def call(kind: str, grouped: bool, a: dict):
    import torch

    from spt_compile.sparse_ops.routed_mlp import exact_mlp_forward, routed_mlp_backward_saved, routed_mlp_forward
    from spt_compile.sparse_ops.routed_mlp.grouped import grouped_backward_saved, grouped_routed_forward

    x, w, spec, perm = a["x"], a["w"], a["spec"], a["perm"]
    saved: list = []
    if kind == "infer":
        if grouped:
            return (grouped_routed_forward(x, w, spec, a["routed"], 0, a["budget"], None, perm, a["comp"]),)
        return (routed_mlp_forward(x, w, spec, a["routed"], 0, perm=perm, comp=a["comp"]),)
    if kind == "train":
        def choose(s):  # the batch's top pairs, as MlpSite.backward_mask without padding or loss rows
            mask = torch.zeros_like(s, dtype=torch.bool)
            mask.view(-1)[s.reshape(-1).topk(a["budget"]).indices] = True
            return mask

        y, mask, _, whole, counts = exact_mlp_forward(x, w, spec, choose, 0, saved, perm, "jacobian", grouped,
                                                      a["budget"] if grouped else None)
        comp = None
    else:
        mask, comp = a["routed"], a["comp"]
        y = (grouped_routed_forward(x, w, spec, mask, 0, a["budget"], saved, perm, comp) if grouped
             else routed_mlp_forward(x, w, spec, mask, 0, saved=saved, perm=perm, comp=comp))
        counts = None
    UV = None if comp is None else comp[:2]
    if grouped:
        dx, grads = grouped_backward_saved(a["dy"], x, w, spec, mask, 0, True, a["needs"], saved[0], perm, UV)
    else:
        dx, grads = routed_mlp_backward_saved(a["dy"], x, w, spec, mask, 0, True, a["needs"], saved[0], perm=perm,
                                              comp=UV, exact_forward=kind == "train", counts=counts)
    return (y, dx, *[getattr(grads, s) for s in LORA_SLOTS])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--active", type=int, default=3, help="blocks of 4 per token (the default ffn_active is 3)")
    p.add_argument("--kinds", nargs="+", default=["train", "routed", "infer"], choices=["train", "routed", "infer"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for T in args.tokens:
        a = inputs(T, args.active)
        for kind in args.kinds:
            A, B = call(kind, False, a), call(kind, True, a)
            err = max(float((u - v).norm() / v.norm()) for u, v in zip(B, A))
            for _ in range(2):
                call(kind, False, a)
                call(kind, True, a)
            ta, tb = [], []
            for _ in range(args.rounds):
                for grouped, times in ((False, ta), (True, tb)):
                    t0 = time.perf_counter()
                    call(kind, grouped, a)
                    times.append(time.perf_counter() - t0)
            ratios = sorted(b / a_ for a_, b in zip(ta, tb))
            row = {"tokens": T, "kind": kind, "active": args.active, "blocks": 4,
                   "block_batched_ms": statistics.median(ta) * 1e3, "grouped_ms": statistics.median(tb) * 1e3,
                   "grouped_over_block_batched": statistics.median(ratios),
                   "quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]], "max_rel_error": err}
            rows.append(row)
            print(f"T={T} {kind:6s} block-batched {row['block_batched_ms']:7.1f} ms, grouped {row['grouped_ms']:7.1f} ms, "
                  f"ratio {row['grouped_over_block_batched']:.3f} ({row['quartiles'][0]:.3f}-{row['quartiles'][1]:.3f}); "
                  f"outputs and grads agree to {err:.1e}", flush=True)
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from provenance import source_commit

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python benchmarks/research/ab_grouped_mlp.py "
                                         + " ".join(argv or sys.argv[1:]), "commit": source_commit(),
                                         "torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
