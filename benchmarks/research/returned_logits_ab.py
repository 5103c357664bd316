#!/usr/bin/env python
"""A/B of the returned logits' gradient: outside the compiled graph (passes/returned_logits.py, the
backend's way) against inside it (AOTAutograd hands the graph a zero-filled [T, V] gradient for the
logits every backward, which the chunked op scans). One process, one PEFT SmolLM2 compiled twice with
backend="spt", stepped alternately round after round (in ABBA order) (bench_finetune.py's model, LoRA and batch; LM
tuning: labels = inputs).

    python benchmarks/research/returned_logits_ab.py --seq 512 --batch 8 --rounds 5 \\
        --json benchmarks/research/results/returned_logits_ab_cpu_512x8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=0, help="truncate SmolLM2 (0: all 30 layers)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each one step of both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import spt_compile.backend as backend
    from bench_finetune import lora_model
    from spt_compile import compile_reports
    from spt_compile.options import make_options

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lora_model(args.layers)
    # Options spelled apart (the same values): Dynamo would otherwise reuse the first compile for the second
    runs = {"outside": torch.compile(model, backend="spt"),
            "inside": torch.compile(model, backend="spt", options={"compiler": "inductor"})}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=0.0)  # the weights stay put
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step(name):
        t0 = time.perf_counter()
        runs[name](input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    detach = backend.detach_returned_logits
    for name in runs:  # compile (the "inside" one without the backend's detaching), calibrate, warm up
        backend.detach_returned_logits = detach if name == "outside" else (lambda gm: ([], 0))
        for _ in range(2 + make_options({}).calibration_steps):
            step(name)
        print(f"{name}: {len(compile_reports(model))} graphs compiled so far", flush=True)
    backend.detach_returned_logits = detach
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):  # ABBA: neither always steps first
            times[name].append(step(name))
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in runs), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"logits' gradient outside the graph {med['outside']:.2f} s, inside {med['inside']:.2f} s: "
          f"{med['outside'] / med['inside']:.3f}x")
    if args.json:
        from provenance import cpu_model, source_commit
        args.json.write_text(json.dumps({
            "seq": args.seq, "batch": args.batch, "layers": model.config.num_hidden_layers, "threads": args.threads,
            "rounds": args.rounds, "step_times_s": times, "median_s": med,
            "outside_over_inside": med["outside"] / med["inside"], "torch": torch.__version__,
            "commit": source_commit(), "cpu": cpu_model()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
