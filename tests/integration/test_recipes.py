"""spt_compile.recipes, the helpers the examples and benchmarks share: where the data is found, how
its files are checked, how rows become fixed-shape batches, batched generation, atomic checkpoints,
stopping a training loop on a signal."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest
import torch

from spt_compile.recipes import UserError, data
from spt_compile.recipes.checkpoints import save_atomically
from spt_compile.recipes.cli import spt_option_pairs
from spt_compile.recipes.data import filled, find_gsm8k, read_jsonl, read_sst2, read_text, windows
from spt_compile.recipes.evaluate import exact_match
from spt_compile.recipes.interrupt import Interrupted, StopAtStepEnd


def write(path, content: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_recipes_import_without_transformers():
    import subprocess

    code = ("import sys, spt_compile.recipes.data, spt_compile.recipes.evaluate, spt_compile.recipes.models, "
            "spt_compile.recipes.lora; print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_gsm8k_comes_from_the_first_place_that_has_it(tmp_path, monkeypatch):
    """--data, then $SPT_DATA_DIR, then ../shared/data beside the checkout, then the hub (a local
    stand-in for `datasets.load_dataset` here); with none of them it says what to pass."""
    import types

    rows = [{"question": "1+1?", "answer": "#### 2"}]
    folder = tmp_path / "mine" / "gsm8k"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps(rows[0]) + "\n")
    monkeypatch.setattr(data, "BESIDE_CHECKOUT", tmp_path / "absent")
    monkeypatch.delenv("SPT_DATA_DIR", raising=False)
    assert "(--data)" in find_gsm8k(tmp_path / "mine")[1]
    monkeypatch.setenv("SPT_DATA_DIR", str(tmp_path / "mine"))
    assert "($SPT_DATA_DIR)" in find_gsm8k(None)[1]
    monkeypatch.delenv("SPT_DATA_DIR")
    monkeypatch.setattr(data, "BESIDE_CHECKOUT", tmp_path / "mine")
    assert "beside the checkout" in find_gsm8k(None)[1]

    monkeypatch.setattr(data, "BESIDE_CHECKOUT", tmp_path / "absent")
    hub = types.ModuleType("datasets")
    hub.load_dataset = lambda name, config: {"train": rows, "test": rows} if name == "openai/gsm8k" else None
    monkeypatch.setitem(sys.modules, "datasets", hub)
    splits, source = find_gsm8k(None)
    assert "hub" in source and splits["train"] == rows

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    hub.load_dataset = offline
    with pytest.raises(UserError, match="pass --data FOLDER.*SPT_DATA_DIR.*internet access.*no network"):
        find_gsm8k(None)


def test_gsm8k_rows_are_checked(tmp_path):
    ok = '{"question": "q", "answer": "a #### 1"}\n'
    assert read_jsonl(write(tmp_path / "ok.jsonl", ok + "\n" + ok)) == [{"question": "q", "answer": "a #### 1"}] * 2
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(write(tmp_path / "bad.jsonl", ok + "{question\n"))
    with pytest.raises(UserError, match=r"rows.jsonl:2: a GSM8K row needs string fields 'question' and 'answer'"):
        read_jsonl(write(tmp_path / "rows.jsonl", ok + '{"question": 3, "answer": "a"}\n'))
    with pytest.raises(UserError, match="holds no rows"):
        read_jsonl(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(UserError, match="missing data file"):
        read_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("content,message", [
    ("sentence\tlabel\nfine film \t1\n", None),
    ("text\tlabel\nfine film \t1\n", "sst2.tsv:1: expected the header 'sentence<TAB>label'"),
    ("sentence\tlabel\nfine film \t1\nno label here\n", "sst2.tsv:3: expected 2 tab-separated fields"),
    ("sentence\tlabel\nfine film \t1\nbad film \t2\n", "sst2.tsv:3: the label must be 0 or 1, got '2'"),
    ("sentence\tlabel\n \t1\n", "sst2.tsv:2: empty sentence"),
    (b"sentence\tlabel\nfine \xff film\t1\n", "sst2.tsv:2: not UTF-8"),
    ("sentence\tlabel\n\n", "holds no rows"),
])
def test_sst2_rows_are_checked(tmp_path, content, message):
    path = write(tmp_path / "sst2.tsv", content)
    if message is None:
        assert read_sst2(path) == [("fine film", 1)]
        return
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sst2(path)


def test_text_files_and_folders_are_checked(tmp_path):
    with pytest.raises(UserError, match="missing data file .*input.txt"):
        read_text(tmp_path / "input.txt")
    with pytest.raises(UserError, match="holds no text"):
        read_text(write(tmp_path / "empty.txt", "\n \n"))
    with pytest.raises(UserError, match=r"bad.txt:3: not UTF-8"):
        read_text(write(tmp_path / "bad.txt", b"one\ntwo\n\xc3(\n"))
    assert read_text(write(tmp_path / "ok.txt", "one\r\ntwo\n")) == "one\ntwo"


def test_batches_are_filled_to_one_shape_and_windows_cut():
    assert filled([1, 2, 3, 4, 5], 2, 0) == [([1, 2], 2), ([3, 4], 2), ([5, 0], 1)]
    assert windows(list(range(10)), 4) == [([0, 1, 2, 3],) * 2, ([4, 5, 6, 7],) * 2]
    assert len(windows(list(range(100)), 4, count=3)) == 3


def test_spt_option_pairs_read_json_else_keep_the_string():
    assert spt_option_pairs(["density=0.25", "ffn_cluster=false", "top_l=null", "compiler=eager", "ffn_active=3"]) == {
        "density": 0.25, "ffn_cluster": False, "top_l": None, "compiler": "eager", "ffn_active": 3}


def test_checkpoint_write_interrupted_leaves_old_one_whole(tmp_path, monkeypatch):
    """A crash while writing (here: torch.save raising halfway) must leave the last checkpoint readable."""
    path = tmp_path / "checkpoint.pt"
    save_atomically({"step": 2}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_atomically({"step": 4}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 2}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_asks_the_loop_to_stop_and_a_second_stops_at_once(capsys, sig):
    before = signal.getsignal(sig)
    with StopAtStepEnd() as stop:
        os.kill(os.getpid(), sig)  # handled before the next bytecode: the step goes on
        assert stop.requested == sig.name
        assert f"{sig.name}: finishing this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
        assert signal.getsignal(sig) is before  # the second signal gave the handlers back
    assert signal.getsignal(sig) is before
    assert Interrupted(sig.name, "stopped").exit_code == 128 + sig  # as a shell reports the signal


def test_outside_the_main_thread_signals_act_as_before():
    seen = {}

    def run():
        with StopAtStepEnd() as stop:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["requested"] = stop.requested

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": None}


@pytest.mark.slow
def test_batched_generation_gives_the_texts_of_one_by_one(smollm2_2layer, smollm2_tokenizer, data_dir):
    """exact_match as the quality benchmark calls it (batch_size > 1, left padding) against one problem
    at a time: the same generated texts, and the tokenizer's padding side restored."""
    rows = read_jsonl(data_dir / "gsm8k" / "test.jsonl")[:3]
    texts = {1: [], 3: []}
    decode = smollm2_tokenizer.decode
    side = smollm2_tokenizer.padding_side
    try:
        for batch_size, out in texts.items():
            smollm2_tokenizer.decode = lambda *a, out=out, **k: out.append(decode(*a, **k)) or out[-1]
            exact_match(smollm2_2layer, smollm2_tokenizer, rows, batch_size=batch_size, max_new_tokens=24)
    finally:
        smollm2_tokenizer.decode = decode
    assert len(texts[1]) == len(texts[3]) == 3 and all(texts[1])
    assert texts[1] == texts[3]
    assert smollm2_tokenizer.padding_side == side
