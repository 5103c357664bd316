"""Evaluation and calibration calls: held-out answer loss, GSM8K exact match by greedy generation,
and the spt sites' dense calibration calls on training batches."""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from .data import collate


def final_answer(answer: str) -> str:
    """The number after GSM8K's `####`, without thousands separators ("" if there is none)."""
    m = re.search(r"####\s*(.+)", answer)
    return m.group(1).strip().replace(",", "") if m else ""


@torch.no_grad()
def answer_loss(model, batches: list[dict]) -> float:
    """Mean cross-entropy over the answer tokens of the held-out examples (every labelled token: for
    text windows, every token)."""
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


def calibration_batches(train_examples: list, batch_size: int, seq_len: int, pad_id: int,
                        options: Optional[dict] = None) -> list[dict]:
    """The first calibration_steps batches of the training examples, in order (calibration_steps of
    these spt options over the defaults)."""
    from spt_compile.options import make_options

    steps = make_options(options or {}).calibration_steps
    return [collate(train_examples[i * batch_size : (i + 1) * batch_size], seq_len, pad_id) for i in range(steps)]


@torch.no_grad()
def calibrate(compiled, batches: Iterable[dict]) -> None:
    """Run the sites' dense calibration calls on training batches (not the held-out ones), so that
    the sparse model can be evaluated before tuning and every training step runs sparse."""
    compiled.eval()
    for batch in batches:
        compiled(**batch)
    compiled.train()
