#!/usr/bin/env python
"""Where a whole fine-tuning step's time goes, op by op: one profiled step of a bench_finetune.py
configuration, the aten ops with the most self CPU time (the 512 x 8 gap hunt of issue 16).

    python benchmarks/research/profile_step.py --config spt --seq 512 --batch 8 --layers 8 --top 30 \\
        --json benchmarks/research/results/profile_step_spt_512x8.json
    python benchmarks/research/profile_step.py --config eager-sdpa ...   # the same for the dense step

Uses bench_finetune.py's model, LoRA and batch; --layers truncates the model so a run takes a minute.
Timed steps come first (median of --steps), then one profiled step (profiling inflates small ops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))


def main(argv=None) -> int:
    from bench_finetune import CONFIGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="spt")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="truncate SmolLM2 to this many layers (0: all 30)")
    p.add_argument("--steps", type=int, default=3, help="timed steps before the profiled one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="share of each row's first tokens that carry no loss (labels -100), as bench_finetune.py")
    p.add_argument("--option", action="append", default=[], help="extra spt option KEY=VALUE")
    p.add_argument("--shapes", action="store_true", help="also group the top ops by input shapes")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import spt_compile  # noqa: F401
    from bench_finetune import lora_model
    from spt_compile.options import make_options
    from spt_compile.recipes.cli import spt_option_pairs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backend, options, attn = CONFIGS[args.config]
    options = dict(options or {})
    options.update(spt_option_pairs(args.option))
    model = lora_model(args.layers, attn)
    run = {"eager": model, "inductor": None, "spt": None}[backend]
    if backend == "inductor":
        run = torch.compile(model)
    elif backend == "spt":
        run = torch.compile(model, backend="spt", options=options)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : int(args.prompt_frac * args.seq)] = -100  # a prompt: no loss there

    def step():
        t0 = time.perf_counter()
        run(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    warm = 2 + (make_options(options).calibration_steps if backend == "spt" else 0)
    for _ in range(warm):
        step()
    times = [step() for _ in range(args.steps)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        profiled = step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    print(f"{args.config}: step {statistics.median(times):.2f} s (median of {args.steps}), profiled {profiled:.2f} s, "
          f"self CPU total {total:.2f} s")
    print(f"{'op':60s} {'calls':>7s} {'self s':>8s} {'share':>6s}")
    top = []
    for e in rows[: args.top]:
        s = e.self_cpu_time_total / 1e6
        print(f"{e.key[:60]:60s} {e.count:7d} {s:8.3f} {s / total:6.1%}")
        top.append({"op": e.key, "calls": e.count, "self_s": s})
    if args.shapes:
        by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        print(f"\n{'op':36s} {'input shapes':70s} {'calls':>6s} {'self s':>7s}")
        for e in by_shape[: args.top]:
            print(f"{e.key[:36]:36s} {str(e.input_shapes)[:70]:70s} {e.count:6d} {e.self_cpu_time_total / 1e6:7.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": args.config, "options": options, "seq": args.seq, "batch": args.batch,
            "prompt_frac": args.prompt_frac, "layers": args.layers,
            "threads": args.threads, "step_times": times, "profiled_step_s": profiled, "self_cpu_total_s": total,
            "top": top, "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
