#!/usr/bin/env python
"""Whole DDP LoRA fine-tuning steps, dense against backend="spt", run under torchrun: the median
step time and each rank's peak memory, measured in the same run.

    torchrun --nproc_per_node 8 benchmarks/bench_ddp.py --device cuda --dtype bf16 --layers 4 --seq-len 8192 \\
        --json benchmarks/results/ddp_step_llama7b.json                   # benchmarks/gpu_ddp.sh does this
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --shape tiny --seq-len 256 --steps 3   # a CPU check

Random-initialised LLaMA-shaped layers (shapes, not quality), LoRA r=16 on every projection, one row
of --seq-len tokens per rank and step, AdamW. Configurations, each compiled afresh in this process,
the same seed and data: eager (SDPA: FlashAttention on CUDA), inductor, spt (defaults). Ratios are to
the faster dense configuration of the same run; spt's warm-up adds its calibration calls (dense) so
that the timed steps are sparse ones. Rank 0 writes the JSON with every rank's peak memory over the
whole run and over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from source (the GPU machine has no install)
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SHAPES = {"llama7b": (4096, 11008, 32, 32), "smollm2": (576, 1536, 9, 3), "tiny": (128, 384, 4, 2)}
CONFIGS = ("eager", "inductor", "spt")


def build(shape: str, layers: int, seq_len: int, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq_len,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_memory(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def gather_ints(value: int, device) -> list[int]:
    """value from every rank, in rank order."""
    where = device if device.type == "cuda" else "cpu"
    got = [torch.zeros(1, dtype=torch.int64, device=where) for _ in range(dist.get_world_size())]
    dist.all_gather(got, torch.tensor([value], device=where))
    return [int(t) for t in got]


def run_config(name: str, args, device, dtype) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from spt_compile.options import Options

    model = build(args.shape, args.layers, args.seq_len, device, dtype)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = {"eager": lambda m: m, "inductor": torch.compile,
                "spt": lambda m: torch.compile(m, backend="spt", options={"compiler": "inductor"}
                                               if device.type == "cuda" else None)}[name](ddp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    times = []
    # spt's first calibration_steps calls run dense (collecting statistics) and the next compiles its
    # kernels: warm up past them, so that the timed steps are the sparse steps a run spends its time in.
    warmup = args.warmup + (Options().calibration_steps if name == "spt" else 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + args.steps):
        if step == warmup:
            peak_warmup = max_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        ids = torch.randint(0, 32000, (1, args.seq_len), generator=gen).to(device)
        sync(device)
        t0 = time.perf_counter()
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    steady, peak = max_memory(device), max(peak_warmup, max_memory(device))
    out = {"median_s": statistics.median(times), "steps_s": times, "warmup_steps": warmup,
           "peak_bytes_per_rank": gather_ints(peak, device), "peak_steady_bytes_per_rank": gather_ints(steady, device)}
    if name == "spt":
        import spt_compile

        kinds = [s["kind"] for s in spt_compile.report(ddp)]
        out["sites"] = {"attention": kinds.count("attention"), "mlp": kinds.count("mlp")}
    del compiled, ddp, model, opt
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("run under torchrun, e.g. torchrun --nproc_per_node 2 benchmarks/bench_ddp.py ...")
    from spt_compile.recipes.launch import start_process_group

    device = start_process_group(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    from provenance import source_commit

    results = {name: run_config(name, args, device, dtype) for name in args.configs}
    best = min((results[n]["median_s"] for n in ("eager", "inductor") if n in results), default=None)
    if dist.get_rank() == 0:
        for name, r in results.items():
            ratio = f"{r['median_s'] / best:.2f}x" if best else "-"
            print(f"{name:9} {r['median_s'] * 1e3:9.1f} ms/step  {ratio:>6}  peak/rank "
                  f"{max(r['peak_bytes_per_rank']) / 2**30:.2f} GiB (timed steps "
                  f"{max(r['peak_steady_bytes_per_rank']) / 2**30:.2f})  {r.get('sites', '')}", flush=True)
        record = {"command": " ".join(sys.argv), "commit": source_commit(), "world_size": dist.get_world_size(),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
                  "ratio_to_best_dense": {n: r["median_s"] / best for n, r in results.items()} if best else None}
        if args.json:
            args.json.write_text(json.dumps(record, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
