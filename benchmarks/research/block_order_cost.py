#!/usr/bin/env python
"""What the torch path's per-call block-order weights cost, and how much of it is the permutation.

The routed MLP's torch path builds `_BlockOrderWeights` once per forward and once per backward: each
input projection as [F, width] with its LoRA B columns beside W (one GEMM computes base and LoRA),
the out projection as [d_out (+ r), F] (LoRA A as extra rows when no LoRA dropout sits before it).
With LoRA, most of that is a copy the merged GEMMs need whatever the unit order; the clustering's
permutation turns the copy into a gather. Without a permutation, what needs no merging is a view.

This times the build with the permutation and without it, at SmolLM2's and LLaMA-7B's MLP shapes,
LoRA r=16 on gate/up/down, with and without dropout before the out LoRA (PEFT's lora_dropout), and
counts the bytes it writes (tensors that do not share storage with the weights). Each build runs
into the memory the op gives it (`reused`: its buffers of 32 MiB or more kept from call to call,
sparse_ops/routed_mlp/workspace.py) and into fresh allocations (`fresh`, the op before the workspace:
each large buffer a new mapping whose pages fault in as the build writes them).

    python benchmarks/research/block_order_cost.py --json benchmarks/research/results/block_order_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "ops"), str(REPO / "benchmarks")]

SHAPES = {"smollm2": (576, 1536), "llama7b": (4096, 11008)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=15, help="builds per configuration, alternating (the median of all but the first is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import dataclasses

    import torch

    from provenance import cpu_model, scrub_paths, source_commit
    from spt_compile.sparse_ops.routed_mlp import workspace
    from spt_compile.sparse_ops.routed_mlp.blocks import _BlockOrderWeights, _lora_columns, _merges_out_lora
    from test_routed_mlp_op import make_weights, spec_for

    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        d, F = SHAPES[shape]
        gen = torch.Generator().manual_seed(0)
        w = make_weights(d, F, d, gated=True, bias=False, lora=("in", "gate", "out"), r=16, gen=gen)
        w = type(w)(*[None if t is None else t.detach() for t in w])
        base = spec_for(w, "silu", True, 4)
        # a clustering-like permutation: each block's units in ascending order, blocks interleaved
        perm = torch.randperm(F, generator=gen).view(4, F // 4).sort(dim=1).values.reshape(-1)
        cols = _lora_columns(d, w, base)
        weights = {t.untyped_storage().data_ptr() for t in w if t is not None}
        configs = []  # (out_dropout, order name, perm, spec, merged, memory)
        for out_dropout in (0.0, 0.05):
            spec = dataclasses.replace(base, out_dropout=out_dropout)
            for name, pm in (("permuted", perm), ("natural", None)):
                for memory in ("reused", "fresh"):
                    configs.append((out_dropout, name, pm, spec, _merges_out_lora(w, spec), memory))
        reuse_from = workspace.REUSE_FROM_BYTES
        times: list[list[float]] = [[] for _ in configs]
        for _ in range(args.rounds):  # configurations alternate build by build (allocator and cache state shared)
            for i, (_, _, pm, spec, merged, memory) in enumerate(configs):
                workspace.REUSE_FROM_BYTES = reuse_from if memory == "reused" else float("inf")
                t0 = time.perf_counter()
                _BlockOrderWeights(w, spec, cols, pm, merged)
                times[i].append(time.perf_counter() - t0)
        workspace.REUSE_FROM_BYTES = reuse_from
        held = workspace.held_bytes()
        workspace.release()
        for (out_dropout, name, pm, spec, merged, memory), ts in zip(configs, times):
            bw = _BlockOrderWeights(w, spec, cols, pm, merged)  # the bytes it writes
            built = list(bw.inputs.values()) + [bw.out] + ([bw.out_a] if bw.out_a is not None else [])
            written = sum(t.numel() * t.element_size() for t in built if t.untyped_storage().data_ptr() not in weights)
            row = dict(shape=shape, d=d, F=F, out_lora_dropout=out_dropout, order=name, memory=memory,
                       ms=statistics.median(ts[1:]) * 1e3, mb_written=written / 2**20,
                       mb_reused_held=held / 2**20)
            rows.append(row)
            print(f"{shape:8s} out LoRA dropout {out_dropout:<4} {name:8s} {memory:6s} {row['ms']:8.2f} ms  "
                  f"{row['mb_written']:8.1f} MiB written ({held / 2**20:.0f} MiB held for reuse)", flush=True)
    if args.json:
        record = dict(what="_BlockOrderWeights build per call, permuted vs natural unit order, into reused "
                           "vs fresh memory (benchmarks/research/block_order_cost.py)",
                      command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                      commit=source_commit(), cpu=cpu_model(), threads=args.threads, torch=torch.__version__,
                      dtype="float32", lora_r=16, rounds=args.rounds, rows=rows)
        args.json.write_text(json.dumps(scrub_paths(record), indent=1) + "\n")  # no machine paths in records
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
