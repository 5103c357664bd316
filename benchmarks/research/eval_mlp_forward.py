#!/usr/bin/env python
"""Evaluation (no-grad) forward of one SmolLM2-shaped MLP (SwiGLU 576 -> 1536, PEFT LoRA r=16 on
gate/up/down) through backend="spt": median and min milliseconds per call at 8 x 512 tokens.

Calls without gradients run the exact MLP (sparse_inference off); this times that path, e.g. to A/B
a change against an older checkout (PYTHONPATH=<worktree of the old commit> runs that one):

    python benchmarks/research/eval_mlp_forward.py
    PYTHONPATH=<a worktree of the old commit> python benchmarks/research/eval_mlp_forward.py
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=15, help="timed calls after 3 warm-up calls")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    import spt_compile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(cfg)

        def forward(self, x):
            return self.mlp(x)

    model = get_peft_model(Block(), LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"],
                                               lora_dropout=0.0))
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1})
    x = torch.randn(8, 512, 576, requires_grad=True)
    compiled(x).sum().backward()  # the calibration call (a training call)
    x = x.detach()
    times = []
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        for _ in range(args.calls):
            t = time.perf_counter()
            compiled(x)
            times.append(time.perf_counter() - t)
    print(f"spt_compile from {spt_compile.__file__}")
    print(f"eval forward: median {1000 * statistics.median(times):.1f} ms, min {1000 * min(times):.1f} ms "
          f"over {args.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
