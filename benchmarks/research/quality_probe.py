#!/usr/bin/env python
"""Fast quality probe: dense LoRA once, then LoRA through backend="spt" under each candidate
configuration, from the same seed, data and steps (benchmarks/quality.py's tasks and runs, shorter).
For iterating on issue 16; the quality of record is benchmarks/quality.py.

Per candidate it prints the held-out metric evaluated sparse (through spt) and dense (the same
adapter inside spt_compile.disable()), each against dense LoRA, and the share of dense LoRA's
improvement over the untuned model that the dense-evaluated spt adapter keeps:
(untuned - spt dense-eval) / (untuned - dense) for a loss (the issue's target: >= 0.9).

    python benchmarks/research/quality_probe.py --steps 60 --variant defaults: \\
        --variant exact:exact_forward=true --json benchmarks/research/results/probe.json

A variant is NAME:OPTION=VALUE,OPTION=VALUE (NAME: for the defaults). With --seeds 0,1 every run
(dense included) repeats per seed. The JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import quality as q  # noqa: E402

PRIMARY = {"gsm8k": ("answer_loss", "lower"), "sst2": ("accuracy", "higher"), "wikitext2": ("wikitext2_ppl", "lower"),
           "wikitext2_long": ("wikitext2_ppl", "lower")}


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:OPTION=VALUE,... (NAME: for the defaults)")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not OPTION=VALUE")
        options[key.strip()] = q.option_value(value.strip())
    return name, options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gsm8k", choices=q.TASKS)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: 60)")
    p.add_argument("--eval", type=int, default=32, help="held-out size, as quality.py's --eval (default: 32)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: quality.py's)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: quality.py's)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME:OPT=V,...",
                   help="an spt configuration to probe (repeatable)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense LoRA run (compare across files)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="set a module constant for every spt run, e.g. spt_compile.sites.mlp.BACKWARD_IMPORTANCE=output "
                        "(research switches that are not options)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if not a.variant and a.no_dense:
        p.error("nothing to run: give --variant, or drop --no-dense")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import importlib

    for item in a.set:
        target, _, value = item.partition("=")
        module, _, name = target.rpartition(".")
        setattr(importlib.import_module(module), name, q.option_value(value))
    record_sets = list(a.set)
    qargv = ["--tasks", a.task, "--steps", str(a.steps), "--eval", str(a.eval), "--generate", "0"]
    if a.seq_len:
        qargv += ["--seq-len", str(a.seq_len)]
    if a.batch_size:
        qargv += ["--batch-size", str(a.batch_size)]
    if a.data:
        qargv += ["--data", str(a.data)]
    metric, better = PRIMARY[a.task]
    sys.path.insert(0, str(HERE.parent))
    from provenance import source_commit

    record = {"what": "quality probe (benchmarks/research/quality_probe.py)", "commit": source_commit(),
              "command": "python benchmarks/research/quality_probe.py " + " ".join(sys.argv[1:]),
              "task": a.task, "steps": a.steps, "eval": a.eval, "metric": metric, "set": record_sets, "runs": []}
    try:
        base = q.parse_args(qargv)
        data = q.read_data(a.task, q.data_root(base.data))
    except q.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def save():
        record["wall_s"] = time.perf_counter() - t0
        if a.json:
            q.write_json(a.json, record)

    for seed in [int(s) for s in a.seeds.split(",")]:
        runs = ([("dense", None)] if not a.no_dense else []) + [(n, o) for n, o in a.variant]
        for name, options in runs:
            args = q.parse_args(qargv + ["--seed", str(seed)] + [f"--option={k}={v}" for k, v in (options or {}).items()])
            task = q.BUILDERS[a.task](args, data)
            entry = {"variant": name, "seed": seed, "options": options}
            record["runs"].append(entry)
            part = q.run(task, "eager" if options is None else "spt", args, lambda part: (entry.update(part=part), save()))
            entry["part"] = part
            save()
    print(table(record["runs"], metric, better))
    return 0


def table(runs: list[dict], metric: str, better: str) -> str:
    dense = {r["seed"]: r["part"] for r in runs if r["options"] is None}
    lines = [f"{'variant':24} seed  untuned  spt-untuned  sparse   dense-eval  vs dense (sparse / dense-eval)  kept   step s"]
    for r in runs:
        part, seed = r["part"], r["seed"]
        if r["options"] is None:
            lines.append(f"{'dense LoRA':24} {seed:4}  {part['untuned'][metric]:7.4f}  {'':11}  {'':7}  "
                         f"{part['tuned'][metric]:10.4f}  {'':30} {'':5}  {part['median_step_s']:.2f}")
            continue
        d = dense.get(seed)
        sp, de = part["tuned_sparse"][metric], part["tuned_dense"][metric]
        if d is None:
            rel, kept = "", ""
        elif better == "lower":
            ref, unt = d["tuned"][metric], d["untuned"][metric]
            rel = f"{100 * (sp - ref) / ref:+6.2f}% / {100 * (de - ref) / ref:+6.2f}%"
            kept = f"{(unt - de) / (unt - ref):.3f}" if unt != ref else "-"
        else:
            ref = d["tuned"][metric]
            rel, kept = f"{100 * (sp - ref):+6.2f} pt / {100 * (de - ref):+6.2f} pt", ""
        lines.append(f"{r['variant']:24} {seed:4}  {'':7}  {part['untuned_sparse'][metric]:11.4f}  {sp:7.4f}  {de:10.4f}  "
                     f"{rel:30} {kept:5}  {part['median_step_s']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
