#!/usr/bin/env python
"""LoRA fine-tuning of SmolLM2-135M-Instruct on GSM8K on several processes: DDP or FSDP2, each
compiled with torch.compile(backend="spt").

    torchrun --nproc_per_node 2 examples/ddp_finetune.py --steps 50              # DDP
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --steps 50 --fsdp       # FSDP2 (fully_shard)
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --steps 100 --resume    # continue a run

One process per GPU (NCCL) or, without GPUs, per group of CPU cores (gloo). Every step's global batch
(--batch-size rows) is the single-process script's, split over the ranks; gradients are averaged by
DDP / FSDP. spt keeps one sparse state on every rank (routers, unit orders, codebooks: the samples
are gathered from all ranks, the fits broadcast from rank 0), so any rank's state describes the run.

Checkpoints go to OUTPUT/checkpoint-STEP/ every --save-every steps through torch.distributed.checkpoint
(model, optimizer, spt_compile.SptState, data position, each rank's random state); OUTPUT/latest names the last complete one and
is replaced only after every rank has written it, so a process killed at any moment (even while
saving) leaves the previous checkpoint intact. --resume continues from it, with the same number of
processes. Ctrl-C to torchrun (which passes it to every rank) or SIGTERM to the ranks: they agree on
the step to stop after, checkpoint it and stop, if that takes less than torchrun's grace period
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default; it kills the ranks then). The held-out answer loss
is measured before and after tuning, each rank on its share of the examples.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from spt_compile.recipes.cli import spt_option_pairs
from spt_compile.recipes.data import Batches, collate, encode, find_gsm8k
from spt_compile.recipes.errors import UserError
from spt_compile.recipes.interrupt import Interrupted, StopAtStepEnd
from spt_compile.recipes.launch import start_process_group
from spt_compile.recipes.lora import add_lora
from spt_compile.recipes.models import load_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per layer) instead of DDP")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local folder, or a hub id")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick checks)")
    p.add_argument("--data", type=Path, default=None, help="a folder holding gsm8k/{train,test}.jsonl "
                   "(default: $SPT_DATA_DIR, ../shared/data, then the hub)")
    p.add_argument("--output", type=Path, default=Path("runs/gsm8k-ddp"), help="checkpoints (default: runs/gsm8k-ddp)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint OUTPUT/latest names")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default: 50)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step over all ranks (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default: 256)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--save-every", type=int, default=25, help="checkpoint every K steps (default: 25)")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out GSM8K examples (default: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spt", action="append", default=[], metavar="NAME=VALUE",
                   help="an spt option, e.g. --spt ffn_active=3 (see spt_compile.options_help())")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "save_every", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def start() -> tuple[int, int, torch.device]:
    """The process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    device = start_process_group(how_to_run="torchrun --nproc_per_node 2 examples/ddp_finetune.py "
                                            "(examples/finetune.py is the single-process job)")
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model, fsdp: bool, device: torch.device):
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def held_out_loss(compiled, batches: list[dict], rank: int, world: int) -> float:
    """The answer loss over the held-out batches, each rank on its share, weighted by their answer
    tokens. Every rank runs the same number of forwards (DDP syncs buffers in each one): a rank short
    of batches repeats one and does not count it."""
    mine = [(b, True) for b in batches[rank::world]]
    mine += [(batches[0], False)] * (-(-len(batches) // world) - len(mine))
    total = torch.zeros(2, dtype=torch.float64)
    compiled.eval()
    for batch, counts in mine:
        loss = float(compiled(**batch).loss)
        if counts:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += torch.tensor([loss * n, n], dtype=torch.float64)
    compiled.train()
    dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def train(args) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from tqdm import tqdm

    import spt_compile

    rank, world, device = start()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({world})")
    options = spt_option_pairs(args.spt)
    try:
        spt_compile.options.make_options(options, where="--spt")
    except spt_compile.SptOptionError as e:
        raise UserError(str(e)) from None
    splits, source = find_gsm8k(args.data)
    torch.manual_seed(args.seed)  # the same initial adapter on every rank
    model, tokenizer = load_model(args.model, layers=args.layers, seq_len=args.seq_len)
    model = add_lora(model, args.lora_r).to(device)
    model.train()
    examples = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["train"]) if e is not None]
    held_out = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["test"][: args.eval_examples]) if e]
    eval_batches = [{k: v.to(device) for k, v in collate(held_out[i : i + 2], args.seq_len, tokenizer.pad_token_id).items()}
                    for i in range(0, len(held_out), 2)]
    if not eval_batches:
        raise UserError(f"no held-out example fits --seq-len {args.seq_len}; raise it or --eval-examples")
    wrapped = wrap(model, args.fsdp, device)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    batches, step = Batches(examples, args.batch_size, args.seed), 0
    latest = args.output / "latest"  # the name of the last complete checkpoint

    trained_only = StateDictOptions(ignore_frozen_params=True, strict=False)  # the adapter, not the base model

    def state() -> dict:
        model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=trained_only)
        # each rank's random stream (LoRA dropout outside the spt sites draws from it), under its own key
        rng = {f"rank{rank}": torch.get_rng_state()}
        if device.type == "cuda":
            rng[f"rank{rank}_cuda"] = torch.cuda.get_rng_state(device)
        return {"model": model_sd, "optim": optim_sd, "spt": spt_compile.SptState(wrapped),
                "progress": torch.tensor([step, batches.epoch, batches.position]), "rng": rng}

    if args.resume:
        ckpt = args.output / latest.read_text().strip() if latest.is_file() else None
        if ckpt is None or not (ckpt / ".metadata").is_file():
            raise UserError(f"--resume: no complete checkpoint in {args.output} (OUTPUT/latest names it)")
        loaded = state()
        dcp.load(loaded, checkpoint_id=str(ckpt))
        set_state_dict(wrapped, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                       options=trained_only)
        step, batches.epoch, batches.position = loaded["progress"].tolist()
        torch.set_rng_state(loaded["rng"][f"rank{rank}"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(loaded["rng"][f"rank{rank}_cuda"], device)
    compiled = torch.compile(wrapped, backend="spt", options=options)
    if rank == 0:
        print(f"{source}; {world} processes ({'FSDP2' if args.fsdp else 'DDP'}, {device.type})", flush=True)
    metrics, first = {}, step
    with spt_compile.disable():
        metrics["loss_before"] = held_out_loss(compiled, eval_batches, rank, world)
    bar = tqdm(total=args.steps, initial=step, desc="fine-tune (spt, distributed)", unit="step", disable=rank != 0)
    stopping = False
    with StopAtStepEnd() as stop:  # a signal mid-step: every rank finishes it, saves, stops
        while step < args.steps and not stopping:
            rows = batches.next()[rank::world]  # this rank's share of the global batch
            batch = {k: v.to(device) for k, v in collate(rows, args.seq_len, tokenizer.pad_token_id).items()}
            loss = compiled(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            stopping = any_rank(stop.requested is not None, device)  # the same step on every rank
            if step % args.save_every == 0 or step == args.steps or stopping:
                save_checkpoint(dcp, state(), args.output, step, rank)
    bar.close()
    if stopping:
        dist.destroy_process_group()
        raise Interrupted(stop.requested or "SIGTERM",
                          f"stopped after step {step} of {args.steps}; checkpoint in {args.output / f'checkpoint-{step}'}. "
                          "Rerun with --resume to continue.")
    metrics["loss_after"] = held_out_loss(compiled, eval_batches, rank, world)
    if rank == 0:
        print(f"held-out answer loss: {metrics['loss_before']:.4f} at step {first} (dense), {metrics['loss_after']:.4f} "
              f"at step {step} (evaluated through the compiled model)", flush=True)
        sites = spt_compile.report(wrapped)  # the sites that ran, one per layer and kind
        print(f"sparse sites: {sum(s['kind'] == 'attention' for s in sites)} attention, "
              f"{sum(s['kind'] == 'mlp' for s in sites)} MLP (the same state on every rank); checkpoint in "
              f"{args.output / latest.read_text().strip()}",
              flush=True)
    dist.destroy_process_group()
    return metrics


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (one all-reduce of one number): ranks that got a signal at
    different moments still stop after the same step, where the collective save needs all of them."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def save_checkpoint(dcp, state: dict, output: Path, step: int, rank: int) -> Path:
    """Writes checkpoint-STEP with every rank, then (rank 0, after all have finished) points OUTPUT/latest
    at it by an atomic rename and deletes the checkpoint it replaces. Until then `latest` names the
    previous complete checkpoint, so an interruption at any moment loses at most the steps since it."""
    import shutil

    target = output / f"checkpoint-{step}"
    dcp.save(state, checkpoint_id=str(target))  # collective: returns once every rank has written
    dist.barrier()
    if rank == 0:
        latest = output / "latest"
        previous = latest.read_text().strip() if latest.is_file() else None
        tmp = output / "latest.tmp"
        tmp.write_text(target.name + "\n")
        os.replace(tmp, latest)
        if previous and previous != target.name:
            shutil.rmtree(output / previous, ignore_errors=True)
    dist.barrier()  # no rank goes on (or exits) before `latest` is final
    return target


def main(argv=None) -> int:
    try:
        train(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", flush=True)
        return 2
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
