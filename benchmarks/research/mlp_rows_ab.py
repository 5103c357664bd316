#!/usr/bin/env python
"""When does ranking an MLP's rows without a loss pay? One SmolLM2-shaped MLP (SwiGLU 576 -> 1536, LoRA
r=16 on gate/up/down) under a small-vocabulary LM loss, 8 x 512 tokens, forward + backward through
backend="spt", in ONE process: label layouts (which rows carry a loss) and run-time options
(spt_compile.enable) alternate step by step, so a slow spell of this shared CPU hits every variant alike.

Variants: NAME:PROMPT_FRAC:LAST:OPTIONS, where PROMPT_FRAC is the share of each row's first tokens
without a loss, LAST is 1 if the last token of each row carries none (as an LM's shifted labels leave
it), OPTIONS is k=v,k=v run-time options (numbers). Default: the issue-16 question (docs/quality.md).

    python benchmarks/research/mlp_rows_ab.py --rounds 12 --json benchmarks/research/results/mlp_rows_ab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_VARIANTS = [
    "all-loss:0:0:",                 # every row a loss row: every block, no scores
    "last-unlabelled:0:1:",          # LM tuning as HF's labels give it: 1 row in 512 without a loss
    "last-unlabelled-ranked:0:1:ffn_skip_min=0",  # ranked anyway (the behaviour before ffn_skip_min)
    "prompt-1/8:0.125:1:",
    "prompt-1/8-ranked:0.125:1:ffn_skip_min=0",
    "prompt-half:0.5:1:",            # GSM8K-like: half of each row a prompt (3 of 4: ranked)
    "prompt-half-whole:0.5:1:ffn_skip_min=1",
    "prompt-half-2of4:0.5:1:ffn_active=2",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", help="NAME:PROMPT_FRAC:LAST:OPTIONS (repeatable)")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (each runs every variant once)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import spt_compile
    from mlp_step_lm import mlp_block

    torch.set_num_threads(args.threads)
    model, x, vocab = mlp_block()
    fn = torch.compile(model, backend="spt", options={"calibration_steps": 1})
    base = torch.randint(0, vocab, (8, 512))
    variants = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, frac, last, opts = spec.split(":")
        labels = base.clone()
        labels[:, : int(float(frac) * 512)] = -100
        if last == "1":
            labels[:, -1] = -100
        options = {k: float(v) if "." in v or k == "ffn_skip_min" else int(v)
                   for k, v in (o.split("=") for o in opts.split(",") if o)}
        variants.append((name, labels, options))

    def step(labels, options):
        with spt_compile.enable(**options):
            t = time.perf_counter()
            fn(x, labels).backward()
            dt = time.perf_counter() - t
        x.grad = None
        for q in model.parameters():
            q.grad = None
        return dt

    for _ in range(2):  # calibration, then a warm-up round
        for _, labels, options in variants:
            step(labels, options)
    times = {name: [] for name, _, _ in variants}
    for _ in range(args.rounds):
        for name, labels, options in variants:
            times[name].append(step(labels, options))
    ref = statistics.median(times[variants[0][0]])
    print(f"{'variant':24s} {'median ms':>10s} {'min ms':>8s} {'/ ' + variants[0][0]:>14s}")
    for name, _, _ in variants:
        med = statistics.median(times[name])
        print(f"{name:24s} {1000 * med:10.1f} {1000 * min(times[name]):8.1f} {med / ref:14.3f}")
    print("runs:", [{k: s.get(k) for k in ("runs", "backward")} for s in spt_compile.report(model)])
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from provenance import cpu_model, source_commit
        args.json.write_text(json.dumps({"variants": args.variant or DEFAULT_VARIANTS,
                                         "times_s": times, "threads": args.threads, "torch": torch.__version__,
                                         "commit": source_commit(), "cpu": cpu_model()},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
