#!/usr/bin/env python
"""Bytes each sparse-state sync moves per site under torch.distributed (spt_compile/distributed/sync.py).

Runs 2 CPU ranks (gloo) through a short LoRA fine-tuning of a random-initialised LLaMA-shaped model
with DDP and backend="spt", and counts, per site and per kind of sync, the bytes every rank hands to
each collective (all_gather: its own contribution; all_reduce, broadcast: the tensor) and how many
collectives ran. Shapes, not quality, matter here, so the models are random and short:

    python benchmarks/research/sync_bytes.py --shape smollm2 --json benchmarks/research/results/sync_bytes_smollm2.json
    python benchmarks/research/sync_bytes.py --shape llama7b --layers 1 --json benchmarks/research/results/sync_bytes_llama7b.json

docs/distributed.md turns these counts into times at 8 and 64 GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SHAPES = {  # hidden, intermediate, heads, kv heads
    "smollm2": (576, 1536, 9, 3),
    "llama7b": (4096, 11008, 32, 32),
}


def _rank(rank: int, world: int, init_file: str, args, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import spt_compile
    import spt_compile.distributed.sync as sync
    import spt_compile.sites.attention as attention_site
    import spt_compile.sites.mlp as mlp_site
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM

    mlp_site.PROBE_EVERY = attention_site.PROBE_EVERY = args.probe_every
    counts: dict = defaultdict(lambda: {"bytes": 0, "collectives": 0, "events": 0})
    current: list = []

    def count_bytes(op, tensors):
        if current:
            entry = counts[current[-1]]
            entry["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
            entry["collectives"] += 1

    def wrap_collective(name, tensors_of):
        original = getattr(dist, name)

        def wrapped(*a, **k):
            count_bytes(name, tensors_of(*a, **k))
            return original(*a, **k)
        setattr(dist, name, wrapped)

    wrap_collective("all_gather", lambda outs, t, *a, **k: [t])
    wrap_collective("all_reduce", lambda t, *a, **k: [t])
    wrap_collective("broadcast", lambda t, *a, **k: [t])
    wrap_collective("all_gather_object", lambda outs, obj, *a, **k: [torch.zeros(len(repr(obj)), dtype=torch.uint8)])

    def wrap_sync(name):
        original = getattr(sync, name)

        def wrapped(site, what, *a, **k):
            key = f"{site.kind} {what}"
            current.append(key)
            counts[key]["events"] += 1
            try:
                return original(site, what, *a, **k)
            finally:
                current.pop()
        setattr(sync, name, wrapped)

    for name in ("gather_rows", "from_rank0"):
        wrap_sync(name)
    original_mean = sync.mean_over_ranks

    def mean(site, values):
        key = f"{site.kind} probe results"
        current.append(key)
        counts[key]["events"] += 1
        try:
            return original_mean(site, values)
        finally:
            current.pop()
    sync.mean_over_ranks = mean

    hidden, inter, heads, kv = SHAPES[args.shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=args.seq_len)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    compiled = torch.compile(DDP(model), backend="spt", options={
        "calibration_steps": args.calibration_steps, "attention_dense_below": 0,
        "attention_backward_dense_below": 0, "attention_min_keys": 0, "compiler": "aot_eager"})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        ids = torch.randint(0, 256, (1, args.seq_len), generator=gen)
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    sites = {"attention": 0, "mlp": 0}
    for entry in spt_compile.report(compiled):
        sites[entry["kind"]] += 1
    if rank == 0:
        torch.save({"counts": {k: dict(v) for k, v in counts.items()}, "sites": sites}, out)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per rank per step (default: 512)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--calibration-steps", type=int, default=2)
    p.add_argument("--probe-every", type=int, default=2, help="training calls between probes (library: 25)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from provenance import source_commit

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "counts.pt")
        mp.start_processes(_rank, args=(2, str(Path(tmp) / "init"), args, out), nprocs=2, start_method="spawn")
        got = torch.load(out, weights_only=False)
    per_site = {}
    for key, c in sorted(got["counts"].items()):
        kind = key.split()[0]
        n_sites = got["sites"][kind]
        per_site[key] = {"bytes_per_rank_per_site_per_event": c["bytes"] / max(c["events"], 1),
                         "collectives_per_site_per_event": c["collectives"] / max(c["events"], 1),
                         "events_per_site": c["events"] / max(n_sites, 1)}
        print(f"{key:32} {per_site[key]['bytes_per_rank_per_site_per_event']:12,.0f} bytes per rank per site, "
              f"{per_site[key]['collectives_per_site_per_event']:.0f} collectives; {per_site[key]['events_per_site']:.0f} "
              f"per site in {args.steps} steps")
    record = {"command": " ".join(sys.argv), "commit": source_commit(), "shape": args.shape,
              "dims": dict(zip(("hidden", "intermediate", "heads", "kv_heads"), SHAPES[args.shape])),
              "settings": vars(args) | {"json": str(args.json)}, "sites": got["sites"], "per_site": per_site}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
