#!/usr/bin/env python
"""A/B of the backward of an MLP call that keeps every pair (LM tuning's whole rows, in the units' own
order), in ONE process, alternating call by call: block by block (4 blocks of a quarter of the units,
the CPU's choice) against one pass over the whole layer (one block; the choice off the CPU,
backward.whole_in_one_pass). SwiGLU with LoRA r=16 on gate/up/down, frozen base weights (d(x) and the
LoRA gradients wanted), fp32. Prints and saves the median backward per path and their ratio, checks
that the two agree, and counts each path's launches with spt_compile.testing.Census.

    python benchmarks/research/ab_one_pass.py --json benchmarks/research/results/ab_one_pass_cpu.json
    python benchmarks/research/ab_one_pass.py --device cuda --dtype bf16 --cases smollm2:8192 llama7b:8192

On CUDA each call is timed between synchronizations (gpu_check.sh step 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "ops"), str(REPO / "tests"), str(REPO / "benchmarks"),
                str(REPO / "benchmarks" / "research")]


def main(argv=None) -> int:
    from ab_whole_rows import case_arguments, lora_swiglu_case

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    case_arguments(p, ["smollm2:64", "smollm2:2048", "smollm2:4096", "llama7b:512"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)

    import torch

    from provenance import cpu_model, source_commit
    from spt_compile.sparse_ops.routed_mlp import exact_mlp_forward, routed_mlp_backward_saved
    from spt_compile.testing import Census

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for case in args.cases:
        w, spec, x, dy, needs = lora_swiglu_case(case, args.lora_dropout, torch.Generator().manual_seed(0), device, dtype)
        shape, (T, nb) = case.split(":")[0], (x.shape[0], spec.n_blocks)
        every = torch.ones(T, nb, dtype=torch.bool, device=device)
        saved = []
        _, mask, _, whole, counts = exact_mlp_forward(x, w, spec, lambda s: every, 1, saved, None, None)
        assert whole

        def backward(one_pass):
            def run():
                # saved[0] is overwritten in place by neither path (d(z) goes into h's and act(z)'s buffers)
                return routed_mlp_backward_saved(dy, x, w, spec, mask, 1, True, needs, saved[0], exact_forward=True,
                                                 whole=True, counts=counts, one_pass=one_pass)
            return run

        paths = {"blocks": backward(False), "one_pass": backward(True)}
        results = {name: f() for name, f in paths.items()}  # warm-up, and the agreement check
        (dxb, gb), (dxo, go) = results["blocks"], results["one_pass"]
        err = {"dx": ((dxo - dxb).norm() / dxb.norm()).item()}
        for name, a in gb._asdict().items():
            if a is not None:
                err[name] = ((getattr(go, name) - a).norm() / a.norm()).item()
        assert max(err.values()) < (1e-5 if dtype == torch.float32 else 2e-2), err
        launches = {}
        for name, f in paths.items():
            with Census() as c, c.counting():
                f()
            launches[name] = c.launches
        times = {name: [] for name in paths}
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            for name in order + order[::-1]:
                sync()
                t0 = time.perf_counter()
                paths[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
        row = {"shape": shape, "tokens": T, "relative_difference": err, "launches": launches}
        for name in paths:
            row[f"{name}_ms"] = round(statistics.median(times[name]) * 1e3, 3)
        row["one_pass_over_blocks"] = round(row["one_pass_ms"] / row["blocks_ms"], 3)
        rows.append(row)
        print(f"{shape:8s} T={T:5d}  blocks {row['blocks_ms']:9.2f} ms ({launches['blocks']} launches)  one pass "
              f"{row['one_pass_ms']:9.2f} ms ({launches['one_pass']})  ratio {row['one_pass_over_blocks']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "argv": sys.argv, "commit": source_commit(), "cpu": cpu_model(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
            "threads": args.threads, "rounds": args.rounds, "lora_dropout": args.lora_dropout, "rows": rows},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
