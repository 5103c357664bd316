#!/usr/bin/env python
"""One SmolLM2-shaped MLP (SwiGLU 576 -> 1536, PEFT LoRA r=16 on gate/up/down) under an LM loss, forward +
backward, 8 x 512 tokens, every token carrying a loss (so spt's MLP backward is the dense one: loss rows
keep every block): eager, Inductor and spt, one config per process. Median and min milliseconds per
step; --profile adds torch.profiler's op table (where a config's time goes).

Answers: is the spt MLP op itself slower than Inductor's fused MLP when nothing is sparse? (At this
stop, two runs: spt 225 / 234 ms, Inductor 222 / 225, eager 275 / 227: within a few percent of
Inductor, so the 512 x 8 step gap lies mostly outside the MLP sites.)

    for c in eager inductor spt; do python benchmarks/research/mlp_step_lm.py $c; done
"""

from __future__ import annotations

import argparse
import statistics
import time


def mlp_block(lora_dropout: float = 0.0):
    """(PEFT model, x [8, 512, 576], vocab): SmolLM2's MLP with LoRA on gate/up/down, a residual
    and a small-vocabulary LM head whose cross-entropy takes (x, labels); seeded."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")
    vocab = 64  # a small head: the MLP dominates the step

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(cfg)
            self.head = torch.nn.Linear(576, vocab, bias=False)

        def forward(self, x, labels):
            y = x + self.mlp(x)
            return F.cross_entropy(self.head(y).view(-1, vocab), labels.view(-1))

    model = get_peft_model(Block(), LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"],
                                               lora_dropout=lora_dropout))
    return model, torch.randn(8, 512, 576, requires_grad=True), vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", choices=["eager", "inductor", "spt", "spt-inductor"])
    p.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-loss-last", action="store_true",
                   help="the last token of each row carries no loss (-100), as an LM's shifted labels leave it")
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="share of each row's first tokens that carry no loss, as a prompt")
    p.add_argument("--option", action="append", default=[], help="an spt option, KEY=INT (e.g. ffn_active=2)")
    p.add_argument("--profile", action="store_true", help="print the profiler's op table of 3 more steps")
    args = p.parse_args(argv)

    import torch

    import spt_compile

    torch.set_num_threads(args.threads)
    model, x, vocab = mlp_block()
    labels = torch.randint(0, vocab, (8, 512))
    if args.no_loss_last:
        labels[:, -1] = -100
    labels[:, : int(args.prompt_frac * labels.shape[1])] = -100
    if args.config == "eager":
        fn = model
    elif args.config == "inductor":
        fn = torch.compile(model, backend="inductor")
    else:
        options = {"calibration_steps": 1, **{k: int(v) for k, v in (o.split("=") for o in args.option)}, **({"compiler": "inductor"} if args.config == "spt-inductor" else {})}
        fn = torch.compile(model, backend="spt", options=options)

    def step():
        fn(x, labels).backward()
        x.grad = None
        for q in model.parameters():
            q.grad = None

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"{args.config}: median {1000 * statistics.median(times):.1f} ms, min {1000 * min(times):.1f} ms "
          f"over {args.steps} steps")
    if args.config.startswith("spt"):
        print([{k: s[k] for k in ("name", "runs") if k in s} for s in spt_compile.report(model)])
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
