#!/usr/bin/env python
"""How much memory a whole fine-tuning step maps afresh: minor page faults per step (getrusage), for
dense Inductor and for `spt`, SmolLM2 + PEFT LoRA r=16 on every projection, every token a label.

On this CPU a page faulted in costs about as much as writing it twice (a fresh 172 MiB buffer: about
40 ms to allocate and fill, 12 ms to copy into mapped memory; docs/host_overhead.md), so the faults
bound what reusing memory across steps could still save. One process per configuration; steps after
warm-up (and, for spt, after its calibration).

    python benchmarks/research/step_page_faults.py --seq 512 --batch 8 --json benchmarks/research/results/step_page_faults_cpu_512x8.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]


def one(config: str, seq: int, batch: int, steps: int, threads: int) -> dict:
    import torch

    from bench_finetune import lora_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = lora_model(0)
    if config == "inductor":
        run = torch.compile(model)
    else:
        import spt_compile  # noqa: F401  (registers the backend when run from source)

        run = torch.compile(model, backend="spt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step():
        run(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(6 if config == "spt" else 2):  # compile, spt's 4 calibration steps, warm-up
        step()
    rows = []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        rows.append(dict(step_s=time.perf_counter() - t0, minor_faults=faults,
                         faulted_mib=faults * resource.getpagesize() / 2**20))
    return dict(config=config, seq=seq, batch=batch, steps=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=["inductor", "spt"], choices=["inductor", "spt"])
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(one(args.worker, args.seq, args.batch, args.steps, args.threads)))
        return 0
    from provenance import cpu_model, scrub_paths, source_commit

    results = []
    for config in args.configs:  # a fresh process each: no allocator state carried over
        out = subprocess.run([sys.executable, __file__, "--worker", config, "--seq", str(args.seq), "--batch",
                              str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        results.append(result)
        for s in result["steps"]:
            print(f"{config:9s} {args.seq} x {args.batch}: step {s['step_s']:6.2f} s, {s['minor_faults']:8d} minor "
                  f"faults ({s['faulted_mib']:.0f} MiB)", flush=True)
    if args.json:
        record = dict(what="minor page faults per fine-tuning step (benchmarks/research/step_page_faults.py)",
                      command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                      commit=source_commit(), cpu=cpu_model(), threads=args.threads, results=results)
        args.json.write_text(json.dumps(scrub_paths(record), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
