#!/usr/bin/env python
"""Whole SmolLM2 + LoRA fine-tuning steps, dense and spt, alternating step by step in ONE process.

bench_finetune.py runs each configuration in its own process, one after another, so a slow spell of
this shared 2-core machine (step times move by up to 25% between runs) lands on whichever ran then.
Here the same PEFT model is stepped eagerly (SDPA), through Inductor and through backend="spt" in turn,
round after round (in reverse order every other round: ABBA), and each configuration's median is taken
over the rounds: a drift hits all alike.
Caution (measured 2026-12-06, docs/measurements_history.md): configurations stepped in one process slow each other, and not
alike. Eager's step took 10.72 s alone in this script and 12.03 s beside Inductor (in a later pair of
runs with 15% more page faults a step), so ratios between dense and spt from here overstate spt's lead:
use it for A/B of spt variants, and bench_finetune.py (a fresh process per configuration) for ratios
against dense.
The model, LoRA and batch are bench_finetune.py's (random tokens, labels = inputs: LM tuning; with
--prompt-frac, each row's first tokens carry no loss).

    python benchmarks/research/step_ab.py --seq 512 --batch 8 --rounds 3 \\
        --json benchmarks/research/results/step_ab_cpu_512x8.json

spt-variant steps the same compiled model under run-time options; spt-compiled compiles the model a
second time with any options, structural ones included (e.g. --compile-option compiler=inductor).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=0, help="truncate SmolLM2 (0: all 30 layers)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, each one step of every configuration")
    p.add_argument("--configs", nargs="+", default=["eager", "inductor", "spt"],
                   choices=["eager", "inductor", "spt", "spt-variant", "spt-compiled"])
    p.add_argument("--variant-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-time spt option for the spt-variant configuration: the same compiled model as "
                        "spt, stepped inside spt_compile.enable(KEY=VALUE, ...) (repeatable)")
    p.add_argument("--compile-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an spt option (structural ones too, e.g. compiler=inductor) for the spt-compiled "
                        "configuration: the same model compiled a second time with options={KEY: VALUE, ...}")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="PEFT lora_dropout (bench_finetune.py's 0; the main job and PEFT's usual setting: 0.05)")
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="share of each row's first tokens that carry no loss (labels -100), as bench_finetune.py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import spt_compile
    from bench_finetune import lora_model
    from spt_compile.options import make_options
    from spt_compile.recipes.cli import spt_option_pairs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lora_model(args.layers, lora_dropout=args.lora_dropout)
    runs = {"eager": model}
    if "inductor" in args.configs:
        runs["inductor"] = torch.compile(model)
    if {"spt", "spt-variant"} & set(args.configs):
        runs["spt"] = torch.compile(model, backend="spt")
    variant = spt_option_pairs(args.variant_option)
    if "spt-variant" in args.configs:
        if not variant:
            p.error("spt-variant needs at least one --variant-option KEY=VALUE")
        compiled = runs["spt"]

        def run_variant(**kw):
            with spt_compile.enable(**variant):
                return compiled(**kw)
        runs["spt-variant"] = run_variant
    compiled_options = spt_option_pairs(args.compile_option)
    if "spt-compiled" in args.configs:
        if not compiled_options:
            p.error("spt-compiled needs at least one --compile-option KEY=VALUE")
        runs["spt-compiled"] = torch.compile(model, backend="spt", options=compiled_options)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=0.0)  # the weights stay put
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : int(args.prompt_frac * args.seq)] = -100  # a prompt: no loss there

    faults = {name: [] for name in args.configs}  # minor page faults per step: fresh memory touched

    def step(name):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        runs[name](input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return time.perf_counter() - t0

    calibrated = False
    for name in args.configs:  # compile, spt's calibration (once: the variant runs the same model), one warm-up
        spt = name in ("spt", "spt-variant")  # one compiled model; spt-compiled is another, calibrated apart
        warm = 2 + (make_options({}).calibration_steps if name.startswith("spt") else 0)
        for _ in range(1 if spt and calibrated else warm):
            step(name)
        calibrated = calibrated or spt
    times = {name: [] for name in args.configs}
    for counted in faults.values():  # the timed rounds' only
        counted.clear()
    for r in range(args.rounds):
        # ABBA: every other round runs the configurations in reverse, so none always follows the same one
        # (the step after another's backward can inherit its allocator and cache state)
        for name in (args.configs if r % 2 == 0 else args.configs[::-1]):
            times[name].append(step(name))
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in args.configs), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    best = min(med[n] for n in ("eager", "inductor") if n in med) if {"eager", "inductor"} & set(med) else None
    for n in args.configs:
        print(f"{n:9s} median {med[n]:6.2f} s" + (f"  {med[n] / best:.3f}x of the best dense" if best else "")
              + f"  {statistics.median(faults[n]):.0f} minor page faults a step")
    if "spt" in runs:
        sites = spt_compile.report(model)
        print("spt runs:", {s["name"]: s.get("backward") for s in sites if s["kind"] == "mlp"}.popitem(),
              {s["name"]: s.get("runs") for s in sites if s["kind"] == "attention"}.popitem())
    if args.json:
        from provenance import cpu_model, source_commit
        args.json.write_text(json.dumps({
            "seq": args.seq, "batch": args.batch, "layers": model.config.num_hidden_layers, "threads": args.threads,
            "lora_dropout": args.lora_dropout, "prompt_frac": args.prompt_frac, "variant_options": variant,
            "compile_options": compiled_options,
            "rounds": args.rounds, "order": "abba", "step_times_s": times, "minor_faults": faults,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""), "median_s": med, "torch": torch.__version__,
            "commit": source_commit(), "cpu": cpu_model()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
