#!/usr/bin/env python
"""An SST-2-shaped training step (MiniLM-L6 + LoRA r=16, dropout 0.05, quality.py's targets and head),
eager against backend="spt", alternating step by step in ONE process; then one profiled spt step.

quality.py's SST-2 runs show spt's steady steps at 0.42-0.45 s against dense's 0.27-0.34 (clean runs:
benchmarks/results/quality_cpu.json and the every-block controls): at 32 short sentences a batch the
sites' per-call work is a large share. This measures it on one fixed batch shape and lists the ops
with the most self time in spt's step (issue 19: per-call overhead).

    python benchmarks/research/sst2_step.py --len 32 --rounds 15 --json benchmarks/research/results/sst2_step_cpu.json
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=32, help="padded sentence length (SST-2 batches: 16-72)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--option", action="append", default=[], help="an spt option KEY=VALUE (numbers, true/false, strings: compiler=aot_eager)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import peft
    import torch
    from torch.profiler import profile
    from transformers import AutoModelForSequenceClassification

    import spt_compile  # noqa: F401  (registers the backend when run from source)
    from quality import LORA_R, MINILM_TARGETS
    from spt_compile.options import make_options
    from spt_compile.recipes.cli import spt_option_pairs
    from spt_compile.recipes.models import minilm_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = spt_option_pairs(args.option)  # JSON values (0.25, true), else strings (compiler=inductor)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.05,
                                                       task_type="SEQ_CLS", target_modules=MINILM_TARGETS,
                                                       modules_to_save=["classifier"])).train()
    spt = torch.compile(model, backend="spt", options=options)
    runs = {"eager": model, "spt": spt}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=0.0)
    gen = torch.Generator().manual_seed(1)
    B, N = args.batch, args.len
    lengths = torch.randint(max(4, N // 3), N + 1, (B,), generator=gen)
    lengths[0] = N
    mask = (torch.arange(N)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1000, 20000, (B, N), generator=gen) * mask,
             "token_type_ids": torch.zeros(B, N, dtype=torch.long), "attention_mask": mask,
             "labels": torch.randint(0, 2, (B,), generator=gen)}

    def step(name):
        t0 = time.perf_counter()
        runs[name](**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(2 + make_options(options).calibration_steps):
        step("spt")
    step("eager")
    times = {n: [] for n in runs}
    for _ in range(args.rounds):
        for n in runs:
            times[n].append(step(n))
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"batch {B} x {N} ({int(mask.sum())} real tokens): eager {1000 * med['eager']:.1f} ms, spt "
          f"{1000 * med['spt']:.1f} ms ({med['spt'] / med['eager']:.2f}x), median of {args.rounds} alternating rounds")
    with profile() as prof:
        for _ in range(3):
            step("spt")
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6 / 3
    print(f"spt, profiled, per step: self CPU {1000 * total:.1f} ms")
    top = []
    for e in rows[: args.top]:
        ms = e.self_cpu_time_total / 1e3 / 3
        print(f"  {e.key[:58]:58s} {e.count // 3:6d} calls {ms:8.2f} ms")
        top.append({"op": e.key, "calls_per_step": e.count // 3, "self_ms_per_step": ms})
    if args.json:
        args.json.write_text(json.dumps({"batch": B, "len": N, "real_tokens": int(mask.sum()), "options": options,
                                         "threads": args.threads, "step_times_s": times, "median_s": med,
                                         "spt_top_ops": top, "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
