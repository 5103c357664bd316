"""Data of the examples and the quality benchmark: where it is found, how its files are read and
checked (every bad row named by file and line), and how rows become fixed-shape batches.

GSM8K comes from --data, else $SPT_DATA_DIR, else ../shared/data beside the checkout if it holds
GSM8K, else the Hugging Face hub (`datasets`). The quality benchmark's other sets (SST-2, Tiny
Shakespeare, WikiText-2) have no hub fallback: data_root wants --data or $SPT_DATA_DIR.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError

_CHECKOUT = Path(__file__).resolve().parents[2]
# The project's shared data folder when this is a source checkout beside it (../shared/data); used only
# if it exists.
BESIDE_CHECKOUT = _CHECKOUT.parent / "shared" / "data" if (_CHECKOUT / "pyproject.toml").is_file() else None


# --- finding and reading the files ------------------------------------------------------------------


def find_gsm8k(data: Path | None) -> tuple[dict, str]:
    """Rows of the train and test splits and a sentence saying where they came from: --data, else
    $SPT_DATA_DIR, else ../shared/data beside the checkout if it holds GSM8K, else the hub."""
    candidates = []
    if data is not None:
        candidates.append(("--data", data))
    elif os.environ.get("SPT_DATA_DIR"):
        candidates.append(("$SPT_DATA_DIR", Path(os.environ["SPT_DATA_DIR"])))
    elif BESIDE_CHECKOUT is not None and (BESIDE_CHECKOUT / "gsm8k" / "train.jsonl").is_file():
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
    """GSM8K rows of a JSON-lines file: each an object with string fields 'question' and 'answer'."""
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


def data_root(data: Optional[Path]) -> Path:
    """The folder holding every task's data (gsm8k/, sst2/, tinyshakespeare/, wikitext2/): --data,
    else $SPT_DATA_DIR."""
    if data is None:
        if not os.environ.get("SPT_DATA_DIR"):
            raise UserError("pass --data FOLDER or set SPT_DATA_DIR (the folder holding gsm8k/, sst2/, "
                            "tinyshakespeare/ and wikitext2/)")
        data = Path(os.environ["SPT_DATA_DIR"])
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist")
    return data


def text_lines(path: Path):
    """(line number, text) of a UTF-8 file, naming the file and line of a bad byte."""
    if not path.is_file():
        raise UserError(f"missing data file {path}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None


def read_text(path: Path) -> str:
    """A UTF-8 text file with "\\n" line ends; refused if it holds no text."""
    text = "\n".join(line for _, line in text_lines(path))
    if not text.strip():
        raise UserError(f"{path} holds no text")
    return text


def read_sst2(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE SST-2 file: a 'sentence<TAB>label' header, labels 0/1."""
    rows = []
    for n, line in text_lines(path):
        if n == 1:
            if line.split("\t") != ["sentence", "label"]:
                raise UserError(f"{path}:1: expected the header 'sentence<TAB>label', got {line[:60]!r}")
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"{path}:{n}: expected 2 tab-separated fields (sentence, label), got {len(fields)}")
        sentence, label = fields[0].strip(), fields[1].strip()
        if label not in ("0", "1"):
            raise UserError(f"{path}:{n}: the label must be 0 or 1, got {label!r}")
        if not sentence:
            raise UserError(f"{path}:{n}: empty sentence")
        rows.append((sentence, int(label)))
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


# --- examples and batches ----------------------------------------------------------------------------


def encode(tokenizer, row: dict, seq_len: int):
    """(input_ids, labels) of a GSM8K row with labels -100 on the prompt; None if the prompt alone does
    not fit."""
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


def windows(ids: list[int], seq_len: int, count: Optional[int] = None) -> list[tuple[list, list]]:
    """Consecutive non-overlapping windows of seq_len tokens, every token a label (at most count)."""
    n = len(ids) // seq_len if count is None else min(count, len(ids) // seq_len)
    return [(ids[i * seq_len : (i + 1) * seq_len],) * 2 for i in range(n)]


def filled(examples: list, batch_size: int, filler) -> list[tuple[list, int]]:
    """Batches of exactly batch_size examples and the number of real ones in each: the last one is
    topped up with `filler` (which must count for nothing), so every call has the same shape."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out.append((chunk + [filler] * (batch_size - len(chunk)), len(chunk)))
    return out


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
