#!/usr/bin/env python
"""Where the untuned sparse model loses quality: held-out GSM8K answer loss of SmolLM2-135M with
sparse attention only, routed FFN only, and both, against dense -- one run, no fine-tuning.

The sites are calibrated on training batches first (the backend's dense calibration calls), then each
configuration is evaluated on the same held-out batches by switching run-time options with
spt_compile.enable(), which needs no recompile.

    python benchmarks/research/quality_breakdown.py --json benchmarks/research/results/quality_breakdown_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Sparse attention only; attention_dense_below=0 because at this length the default runs attention
# exact (docs/attention.md).
ATTN = {"sparse_ffn": False, "attention_dense_below": 0, "attention_backward_dense_below": 0, "attention_min_keys": 0}
CONFIGS = [
    ("dense", None),
    ("attention 1/8 only (block 64)", {**ATTN, "density": 1 / 8}),
    ("attention 1/8 only (block 16)", {**ATTN, "density": 1 / 8, "attention_block": 16}),
    ("attention 1/8 only (token, PQ)", {**ATTN, "density": 1 / 8, "attention_selection": "token"}),
    ("attention 1/4 only (block 64)", {**ATTN, "density": 1 / 4}),
    ("attention 1/4 only (block 16)", {**ATTN, "density": 1 / 4, "attention_block": 16}),
    ("attention 1/4 only (token, PQ)", {**ATTN, "density": 1 / 4, "attention_selection": "token"}),
    ("attention 1/2 only (block 64)", {**ATTN, "density": 1 / 2}),
    ("FFN 2 of 4 blocks only", {"sparse_attention": False, "ffn_active": 2}),
    ("FFN 3 of 4 blocks only", {"sparse_attention": False, "ffn_active": 3}),
    ("both, defaults (attention exact at this length)", {}),
    ("both, attention sparse too", {"attention_dense_below": 0, "attention_backward_dense_below": 0,
                                    "attention_min_keys": 0}),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $SPT_DATA_DIR)")
    p.add_argument("--examples", type=int, default=32, help="held-out GSM8K test problems")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    import spt_compile
    from spt_compile.recipes.data import collate, encode, find_gsm8k
    from spt_compile.recipes.evaluate import answer_loss, calibrate, calibration_batches
    from spt_compile.recipes.models import load_model

    splits, source = find_gsm8k(args.data)
    print(source, file=sys.stderr)
    model, tokenizer = load_model(seq_len=args.seq_len)
    model.eval()
    pad = tokenizer.pad_token_id
    held = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["test"][: args.examples]) if e]
    batches = [collate(held[i : i + 4], args.seq_len, pad) for i in range(0, len(held), 4)]
    train = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["train"][:64]) if e]
    compiled = torch.compile(model, backend="spt")
    calibrate(compiled, calibration_batches(train, 4, args.seq_len, pad))
    results = []
    for name, options in CONFIGS:
        with (spt_compile.disable() if options is None else spt_compile.enable(**options)):
            loss = answer_loss(compiled, batches)
        results.append({"config": name, "options": options, "held_out_answer_loss": loss})
        print(f"{name:26} {loss:.4f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"examples": len(held), "seq_len": args.seq_len, "results": results,
                                         "model": "SmolLM2-135M-Instruct (untuned)"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
