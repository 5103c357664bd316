#!/usr/bin/env python
"""What LoRA dropout costs the routed MLP, and what its 16-bit masks save. One SmolLM2-shaped MLP
(SwiGLU 576 -> 1536, LoRA r=16 on gate/up/down, lora_dropout 0.05 as PEFT's usual setting and this
project's main job) under a small-vocabulary LM loss, 8 x 512 tokens, forward + backward, in ONE
process, variants alternating step by step:

  eager           PEFT as written (each mask drawn once, by nn.Dropout)
  spt             backend="spt": masks from 16-bit uniforms, drawn in forward and again in backward
  spt-rand        the same with masks from torch.rand(shape) >= p (the behaviour before)
  spt-no-dropout  lora_dropout 0 (a model of its own): what the masks cost at all

Labels as an LM's shifted ones (the last token of each row carries no loss), or --prompt-frac of each
row a prompt (GSM8K-like: the backward then ranks its pairs).

    python benchmarks/research/dropout_masks_ab.py --rounds 8 --json benchmarks/research/results/dropout_masks_ab_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


@contextlib.contextmanager
def rand_masks():
    """Masks as before: one fp32 uniform per element from torch.rand."""
    import torch

    from spt_compile.sparse_ops.routed_mlp import dropout

    real = dropout.draw_keep
    dropout.draw_keep = lambda shape, p, seed, device: torch.rand(
        shape, generator=torch.Generator(device=device).manual_seed(seed), device=device).ge_(p).bool()
    try:
        yield
    finally:
        dropout.draw_keep = real


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (each runs every variant once)")
    p.add_argument("--prompt-frac", type=float, default=0.0, help="share of each row's first tokens without a loss")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of the dropout models")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    from mlp_step_lm import mlp_block

    torch.set_num_threads(args.threads)
    model, x, vocab = mlp_block(args.dropout)
    plain, _, _ = mlp_block(0.0)
    model.train(), plain.train()
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1})
    compiled_plain = torch.compile(plain, backend="spt", options={"calibration_steps": 1})
    labels = torch.randint(0, vocab, (8, 512))
    labels[:, : int(args.prompt_frac * 512)] = -100
    labels[:, -1] = -100
    variants = {
        "eager": (model, contextlib.nullcontext),
        "spt": (compiled, contextlib.nullcontext),
        "spt-rand": (compiled, rand_masks),
        "spt-no-dropout": (compiled_plain, contextlib.nullcontext),
    }

    def step(fn, ctx, m):
        with ctx():
            t = time.perf_counter()
            fn(x, labels).backward()
            dt = time.perf_counter() - t
        x.grad = None
        for q in m.parameters():
            q.grad = None
        return dt

    owners = {"eager": model, "spt": model, "spt-rand": model, "spt-no-dropout": plain}
    for _ in range(2):  # calibration, then a warm-up round
        for name, (fn, ctx) in variants.items():
            step(fn, ctx, owners[name])
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (fn, ctx) in variants.items():
            times[name].append(step(fn, ctx, owners[name]))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    print("median s:", "  ".join(f"{n} {v:.3f}" for n, v in med.items()))
    print(f"spt / eager {med['spt'] / med['eager']:.3f}   spt-rand / eager {med['spt-rand'] / med['eager']:.3f}"
          f"   spt / spt-rand {med['spt'] / med['spt-rand']:.3f}   spt-no-dropout / eager "
          f"{med['spt-no-dropout'] / med['eager']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "shape": "8 x 512, SmolLM2 MLP 576 -> 1536, LoRA r=16 gate/up/down", "lora_dropout": args.dropout,
            "prompt_frac": args.prompt_frac, "rounds": args.rounds, "threads": args.threads,
            "step_times_s": times, "median_s": med, "torch": torch.__version__,
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
