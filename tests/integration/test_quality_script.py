"""benchmarks/quality.py: its argument and data checks, the target logic of its table, and a tiny
real run (MiniLM on SST-2, one step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402


def test_per_task_arguments_and_options():
    args = quality.parse_args(["--steps", "7", "--lr", "sst2=1e-3", "--option", "density=0.25",
                               "--option", "ffn_cluster=false", "--option", "attention_selection=token",
                               "--option", "top_l=none", "--option", "ffn_active=3"])
    assert args.steps == {"gsm8k": 7, "sst2": 7, "wikitext2": 7, "wikitext2_long": 7}
    assert args.lr == {**quality.DEFAULTS["lr"], "sst2": 1e-3}
    assert args.spt_options == {"density": 0.25, "ffn_cluster": False, "attention_selection": "token",
                                "top_l": None, "ffn_active": 3}
    args = quality.parse_args(["--tasks", "sst2,gsm8k", "--steps", "gsm8k=5,sst2=3", "--eval", "wikitext2=4"])
    assert args.tasks == ["sst2", "gsm8k"]
    assert args.steps == {"gsm8k": 5, "sst2": 3, "wikitext2": quality.DEFAULTS["steps"]["wikitext2"],
                          "wikitext2_long": quality.DEFAULTS["steps"]["wikitext2_long"]}
    assert args.eval["wikitext2"] == 4 and args.eval["gsm8k"] == quality.DEFAULTS["eval"]["gsm8k"]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "mnli=3"], "unknown task 'mnli'"),
    (["--steps", "gsm8k=x"], "'x' in 'gsm8k=x' is not an integer"),
    (["--steps", "sst2=0"], "--steps must be at least 1 (task sst2)"),
    (["--tasks", "gsm8k,cola"], "unknown task 'cola'"),
    (["--option", "density"], "expected NAME=VALUE"),
    (["--eval", "gsm8k=0"], "--eval must be at least 1 for gsm8k and wikitext2"),
])
def test_bad_arguments_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        quality.parse_args(argv)
    assert message in capsys.readouterr().err


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


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
        assert quality.read_sst2(path) == [("fine film", 1)]
        return
    with pytest.raises(quality.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quality.read_sst2(path)


def test_text_files_and_folders_are_checked(tmp_path):
    with pytest.raises(quality.UserError, match="missing data file .*input.txt"):
        quality.read_text(tmp_path / "input.txt")
    with pytest.raises(quality.UserError, match="holds no text"):
        quality.read_text(write(tmp_path / "empty.txt", "\n \n"))
    with pytest.raises(quality.UserError, match=r"bad.txt:3: not UTF-8"):
        quality.read_text(write(tmp_path / "bad.txt", b"one\ntwo\n\xc3(\n"))
    assert quality.read_text(write(tmp_path / "ok.txt", "one\r\ntwo\n")) == "one\ntwo"


def run_script(*args, data=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SPT_DATA_DIR", None)
    if data is not None:
        env["SPT_DATA_DIR"] = str(data)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_bad_data_is_named_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def error(*argv) -> str:
        assert quality.main(list(argv)) == 2
        return capsys.readouterr().err

    monkeypatch.delenv("SPT_DATA_DIR", raising=False)
    assert "pass --data FOLDER or set SPT_DATA_DIR" in error("--tasks", "wikitext2")
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood \t1\n")
    monkeypatch.setenv("SPT_DATA_DIR", str(tmp_path))
    assert f"missing data file {tmp_path / 'sst2' / 'dev.tsv'}" in error("--tasks", "sst2")
    write(tmp_path / "gsm8k" / "train.jsonl", '{"question": "q", "answer": "a #### 1"}\n')
    write(tmp_path / "gsm8k" / "test.jsonl", '{"question": "q", "answer": "a #### 1"}\n{"question": 3}\n')
    assert "test.jsonl:2: a GSM8K row needs string fields" in error("--tasks", "gsm8k", "--data", str(tmp_path))
    assert "did you mean 'density'" in error("--tasks", "sst2", "--option", "densty=0.5")


def test_cuda_asked_without_a_gpu_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert quality.main(["--device", "cuda", "--tasks", "sst2"]) == 2
    assert "--device cuda: torch" in (err := capsys.readouterr().err) and "sees no CUDA device" in err
    assert quality.main(["--device", "tpu", "--tasks", "sst2"]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err


def test_batches_are_filled_to_one_shape_and_windows_cut():
    assert quality.filled([1, 2, 3, 4, 5], 2, 0) == [([1, 2], 2), ([3, 4], 2), ([5, 0], 1)]
    assert quality.windows(list(range(10)), 4) == [([0, 1, 2, 3],) * 2, ([4, 5, 6, 7],) * 2]
    assert len(quality.windows(list(range(100)), 4, count=3)) == 3


def parts(dense_loss, spt_sparse_loss, spt_dense_loss, dense_acc=None, spt_acc=None):
    return {"dense": {"untuned": {"answer_loss": 1.5, "exact_match": 0.0},
                      "tuned": {"answer_loss": dense_loss, "exact_match": 0.25}},
            "spt": {"untuned_sparse": {"answer_loss": 5.0},
                    "tuned_sparse": {"answer_loss": spt_sparse_loss},
                    "tuned_dense": {"answer_loss": spt_dense_loss, "exact_match": 0.1875}}}


def test_targets_loss_within_two_percent_accuracy_within_one_point():
    loss, em = quality.task_rows("gsm8k", parts(1.0, 1.03, 1.01))
    assert loss["diff_spt_sparse"] == pytest.approx(0.03) and loss["met_spt_sparse"] is False
    assert loss["diff_spt_dense"] == pytest.approx(0.01) and loss["met_spt_dense"] is True
    assert quality.task_rows("gsm8k", parts(1.0, 0.9, 1.02))[0]["met_spt_sparse"] is True  # better is fine
    assert quality.task_rows("gsm8k", parts(1.0, 0.9, 1.0201))[0]["met_spt_dense"] is False
    # exact match: generated dense only, so no sparse column; no target of its own
    assert em["spt_sparse"] is None and em["diff_spt_sparse"] is None and em["met_spt_dense"] is None
    assert em["diff_spt_dense"] == pytest.approx(-6.25)  # points

    acc = {"dense": {"untuned": {"accuracy": 0.5}, "tuned": {"accuracy": 0.85}},
           "spt": {"tuned_sparse": {"accuracy": 0.845}, "tuned_dense": {"accuracy": 0.8399}}}
    (row,) = quality.task_rows("sst2", acc)
    assert row["diff_spt_sparse"] == pytest.approx(-0.5) and row["met_spt_sparse"] is True
    assert row["diff_spt_dense"] == pytest.approx(-1.01) and row["met_spt_dense"] is False
    assert row["untuned_sparse"] is None  # the spt part had no untuned evaluation

    # kept: the share of dense LoRA's improvement over the untuned model (1.5 here) that spt keeps
    assert loss["kept_spt_dense"] == pytest.approx(0.98) and row["kept_spt_dense"] == pytest.approx(0.3399 / 0.35)
    barely = parts(1.0, 1.0, 1.01)
    barely["dense"]["untuned"]["answer_loss"] = 1.02  # within +2%, but half of a small improvement
    (short, _) = quality.task_rows("gsm8k", barely)
    assert short["kept_spt_dense"] == pytest.approx(0.5) and short["met_spt_dense"] is False

    text = quality.table(quality.task_rows("gsm8k", parts(1.0, 1.03, 1.01)) + [row])
    lines = text.splitlines()
    assert "met (sparse / dense-eval)" in lines[0] and set(lines[1]) == {"-"}
    assert "held-out answer loss" in lines[2] and "+3.00%" in lines[2] and "+1.00%" in lines[2]
    assert lines[2].rstrip().endswith("no / yes") and "<= +2%" in lines[2]
    assert "25.0%" in lines[3] and "-6.25 pt" in lines[3] and lines[3].rstrip().endswith("-")
    assert "84.5%" in lines[4] and "-0.50 pt" in lines[4] and lines[4].rstrip().endswith("yes / no")


def test_an_interrupted_task_still_tabulates():
    rows = quality.task_rows("wikitext2", {"dense": {"untuned": {"wikitext2_ppl": 20.0, "shakespeare_ppl": 30.0}}})
    assert [r["dense"] for r in rows] == [None, None] and all(r["met_spt_sparse"] is None for r in rows)
    assert "20.00" in quality.table(rows)


@pytest.mark.slow
def test_one_step_on_sst2_end_to_end(tmp_path, data_dir):
    """Every FFN block active (attention runs exact at these lengths): the sparse evaluation must
    equal the dense one of the same weights, so the two spt columns read the same adapter, and the
    untuned spt model must equal the untuned dense one."""
    out_json = tmp_path / "quality.json"
    # 1 thread and no downstream compiler: 44 s instead of 115 s beside another job on 2 cores
    out = run_script("--tasks", "sst2", "--steps", "1", "--eval", "64", "--sst2-train", "64", "--threads", "1",
                     "--option", "ffn_active=4", "--option", "calibration_steps=1", "--option", "compiler=eager",
                     "--json", str(out_json), data=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dev accuracy" in out.stdout and "met (sparse / dense-eval)" in out.stdout
    assert "rewritten: 6 attention, 6 MLP" in out.stdout
    record = json.loads(out_json.read_text())
    task = record["tasks"]["sst2"]
    assert task["steps"] == 1 and task["dev_sentences"] == 64 and task["seq_len"] == 64
    assert record["spt_options_in_effect"]["ffn_active"] == 4 and record["torch"] == torch.__version__
    assert "commit" in record  # the source it ran (None outside a git checkout)
    dense, spt = task["dense"], task["spt"]
    assert len(dense["history"]) == len(spt["history"]) == 1
    # the same initialisation in both runs (new classifier head included): before tuning, every block
    # active and attention exact, the spt-compiled model is the dense one
    assert spt["untuned_sparse"]["accuracy"] == dense["untuned"]["accuracy"]
    assert spt["untuned_sparse"]["dev_loss"] == pytest.approx(dense["untuned"]["dev_loss"], rel=1e-4)
    for part in (dense["untuned"], dense["tuned"], spt["untuned_sparse"], spt["tuned_sparse"], spt["tuned_dense"]):
        assert 0.0 <= part["accuracy"] <= 1.0 and part["dev_loss"] > 0
    assert spt["tuned_sparse"]["accuracy"] == spt["tuned_dense"]["accuracy"]
    assert spt["tuned_sparse"]["dev_loss"] == pytest.approx(spt["tuned_dense"]["dev_loss"], rel=1e-4)
    assert all(g["attention"] == 6 and g["mlp"] == 6 for g in spt["graphs"])
    assert "ffn_active=4" in spt["explain"].splitlines()[0]  # explain ran with the --option values
    (row,) = record["rows"]
    assert row["metric"] == "accuracy" and row["target"] == ["points", 1.0] and row["met_spt_sparse"] is not None
    assert {"load", "evaluate", "train"} <= dense["seconds"].keys() and "calibrate" in spt["seconds"]


@pytest.mark.slow
def test_batched_generation_gives_the_texts_of_one_by_one(smollm2_2layer, smollm2_tokenizer, data_dir):
    """finetune.exact_match as the script calls it (batch_size > 1, left padding) against one problem
    at a time: the same generated texts, and the tokenizer's padding side restored."""
    import finetune as ft

    rows = ft.read_jsonl(data_dir / "gsm8k" / "test.jsonl")[:3]
    texts = {1: [], 3: []}
    decode = smollm2_tokenizer.decode
    side = smollm2_tokenizer.padding_side
    try:
        for batch_size, out in texts.items():
            smollm2_tokenizer.decode = lambda *a, out=out, **k: out.append(decode(*a, **k)) or out[-1]
            ft.exact_match(smollm2_2layer, smollm2_tokenizer, rows, batch_size=batch_size, max_new_tokens=24)
    finally:
        smollm2_tokenizer.decode = decode
    assert len(texts[1]) == len(texts[3]) == 3 and all(texts[1])
    assert texts[1] == texts[3]
    assert smollm2_tokenizer.padding_side == side


def test_load_prints_the_tables_again_and_the_spread_over_seeds(tmp_path, capsys):
    paths = []
    for seed, spt_dense in ((0, 1.01), (1, 1.05)):
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"seed": seed, "command": "x", "tasks": {"gsm8k": parts(1.0, 1.5, spt_dense)}}))
        paths.append(str(path))
    assert quality.main(["--load", *paths]) == 0
    out = capsys.readouterr().out
    assert "seed 0: dense 1.0000, spt dense-eval 1.0100 (+1.00%, kept 0.980)" in out
    assert "seed 1: dense 1.0000, spt dense-eval 1.0500 (+5.00%, kept 0.900)" in out
    assert "diff_spt_dense: +1.00% .. +5.00% over 2 seeds" in out
    (tmp_path / "bad.json").write_text("{}")
    assert quality.main(["--load", str(tmp_path / "bad.json")]) == 2
    assert "not a quality.py record" in capsys.readouterr().err
