"""benchmarks/quality.py, run as a user runs it (a subprocess each time): its argument and data
checks, the settings it resolves (--dry-run), the target logic of its table (records read back with
--load), and a tiny real run (MiniLM on SST-2, one step). The data readers it uses are tested in
test_recipes.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality.py"


def run_script(*args, data=None, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    env.pop("SPT_DATA_DIR", None)
    if data is not None:
        env["SPT_DATA_DIR"] = str(data)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def dry_run(*args) -> dict:
    out = run_script("--dry-run", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_per_task_arguments_and_options():
    defaults = dry_run()
    assert defaults["tasks"] == ["gsm8k", "sst2", "wikitext2", "wikitext2_long"] and defaults["spt_options_given"] == {}
    args = dry_run("--steps", "7", "--lr", "sst2=1e-3", "--option", "density=0.25",
                   "--option", "ffn_cluster=false", "--option", "attention_selection=token",
                   "--option", "top_l=none", "--option", "ffn_active=3")
    assert args["steps"] == {"gsm8k": 7, "sst2": 7, "wikitext2": 7, "wikitext2_long": 7}
    assert args["lr"] == {**defaults["lr"], "sst2": 1e-3}
    assert args["spt_options_given"] == {"density": 0.25, "ffn_cluster": False, "attention_selection": "token",
                                         "top_l": None, "ffn_active": 3}
    in_effect = args["spt_options_in_effect"]
    assert in_effect["density"] == 0.25 and in_effect["ffn_active"] == 3 and in_effect["ffn_cluster"] is False
    args = dry_run("--tasks", "sst2,gsm8k", "--steps", "gsm8k=5,sst2=3", "--eval", "wikitext2=4")
    assert args["tasks"] == ["sst2", "gsm8k"]
    assert args["steps"] == {"gsm8k": 5, "sst2": 3, "wikitext2": defaults["steps"]["wikitext2"],
                             "wikitext2_long": defaults["steps"]["wikitext2_long"]}
    assert args["eval"]["wikitext2"] == 4 and args["eval"]["gsm8k"] == defaults["eval"]["gsm8k"]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "mnli=3"], "unknown task 'mnli'"),
    (["--steps", "gsm8k=x"], "'x' in 'gsm8k=x' is not an integer"),
    (["--steps", "sst2=0"], "--steps must be at least 1 (task sst2)"),
    (["--tasks", "gsm8k,cola"], "unknown task 'cola'"),
    (["--option", "density"], "expected NAME=VALUE"),
    (["--eval", "gsm8k=0"], "--eval must be at least 1 for gsm8k and wikitext2"),
])
def test_bad_arguments_are_named(argv, message):
    out = run_script(*argv, "--dry-run")
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_bad_data_is_named_before_any_model_loads(tmp_path):
    def error(*argv, data=None) -> str:
        out = run_script(*argv, data=data)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "==" not in out.stdout  # no task started: nothing was loaded
        return out.stderr

    assert "pass --data FOLDER or set SPT_DATA_DIR" in error("--tasks", "wikitext2")
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood \t1\n")
    assert f"missing data file {tmp_path / 'sst2' / 'dev.tsv'}" in error("--tasks", "sst2", data=tmp_path)
    write(tmp_path / "gsm8k" / "train.jsonl", '{"question": "q", "answer": "a #### 1"}\n')
    write(tmp_path / "gsm8k" / "test.jsonl", '{"question": "q", "answer": "a #### 1"}\n{"question": 3}\n')
    assert "test.jsonl:2: a GSM8K row needs string fields" in error("--tasks", "gsm8k", "--data", str(tmp_path))
    assert "did you mean 'density'" in error("--tasks", "sst2", "--option", "densty=0.5", data=tmp_path)


def test_cuda_asked_without_a_gpu_is_an_error():
    out = run_script("--device", "cuda", "--tasks", "sst2", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and "--device cuda: torch" in out.stderr and "sees no CUDA device" in out.stderr, \
        out.stderr[-2000:]
    out = run_script("--device", "tpu", "--tasks", "sst2")
    assert out.returncode == 2 and "--device must be cpu or cuda" in out.stderr, out.stderr[-2000:]


def parts(dense_loss, spt_sparse_loss, spt_dense_loss, dense_acc=None, spt_acc=None):
    return {"dense": {"untuned": {"answer_loss": 1.5, "exact_match": 0.0},
                      "tuned": {"answer_loss": dense_loss, "exact_match": 0.25}},
            "spt": {"untuned_sparse": {"answer_loss": 5.0},
                    "tuned_sparse": {"answer_loss": spt_sparse_loss},
                    "tuned_dense": {"answer_loss": spt_dense_loss, "exact_match": 0.1875}}}


def load_tables(tmp_path, records: dict) -> dict:
    """Each record (name -> its tasks) written to a file and read back with --load: per name, the
    lines of the table printed for it and its rows as {column heading: cell}."""
    paths = {}
    for name, tasks in records.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps({"seed": 0, "command": name, "tasks": tasks}))
    out = run_script("--load", *map(str, paths.values()))
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.splitlines()
    tables = {}
    for name, path in paths.items():
        start = next(i for i, line in enumerate(printed) if line.startswith(f"{path} (seed 0, {name})"))
        end = printed.index("", start)
        lines = printed[start + 1 : end]
        head = re.split(r"\s{2,}", lines[0].strip())
        rows = []
        for line in lines[2:]:
            cells = re.split(r"\s{2,}", line.strip())
            assert len(cells) == len(head), line
            rows.append(dict(zip(head, cells)))
        tables[name] = (lines, rows)
    return tables


def test_targets_loss_within_two_percent_accuracy_within_one_point(tmp_path):
    acc = {"dense": {"untuned": {"accuracy": 0.5}, "tuned": {"accuracy": 0.85}},
           "spt": {"tuned_sparse": {"accuracy": 0.845}, "tuned_dense": {"accuracy": 0.8399}}}
    barely = parts(1.0, 1.0, 1.01)
    barely["dense"]["untuned"]["answer_loss"] = 1.02  # within +2%, but half of a small improvement
    tables = load_tables(tmp_path, {
        "main": {"gsm8k": parts(1.0, 1.03, 1.01), "sst2": acc},
        "better": {"gsm8k": parts(1.0, 0.9, 1.02)},
        "just_out": {"gsm8k": parts(1.0, 0.9, 1.0201)},
        "barely": {"gsm8k": barely},
    })
    lines, (loss, em, row) = tables["main"]
    assert loss["sparse vs dense"] == "+3.00%" and loss["dense-eval vs dense"] == "+1.00%"
    assert loss["met (sparse / dense-eval)"] == "no / yes" and loss["target"] == "<= +2%, kept >= 0.9"
    assert tables["better"][1][0]["met (sparse / dense-eval)"].startswith("yes / ")  # better is fine
    just_out = tables["just_out"][1][0]
    assert just_out["dense-eval vs dense"] == "+2.01%" and just_out["met (sparse / dense-eval)"].endswith(" / no")
    # exact match: generated dense only, so no sparse column; no target of its own
    assert em["spt sparse"] == "-" and em["sparse vs dense"] == "-" and em["met (sparse / dense-eval)"] == "-"
    assert em["dense-eval vs dense"] == "-6.25 pt" and em["target"] == "-"

    assert row["sparse vs dense"] == "-0.50 pt" and row["dense-eval vs dense"] == "-1.01 pt"
    assert row["met (sparse / dense-eval)"] == "yes / no"
    assert row["untuned spt"] == "-"  # the spt part had no untuned evaluation

    # kept: the share of dense LoRA's improvement over the untuned model (1.5 here) that spt keeps
    assert loss["kept (dense-eval)"] == "0.980" and row["kept (dense-eval)"] == f"{0.3399 / 0.35:.3f}"
    short = tables["barely"][1][0]
    assert short["dense-eval vs dense"] == "+1.00%"  # within the band ...
    assert short["kept (dense-eval)"] == "0.500" and short["met (sparse / dense-eval)"].endswith(" / no")  # ... not kept

    assert "met (sparse / dense-eval)" in lines[0] and set(lines[1]) == {"-"}
    assert "held-out answer loss" in lines[2] and "+3.00%" in lines[2] and "+1.00%" in lines[2]
    assert lines[2].rstrip().endswith("no / yes") and "<= +2%" in lines[2]
    assert "25.0%" in lines[3] and "-6.25 pt" in lines[3] and lines[3].rstrip().endswith("-")
    assert "84.5%" in lines[4] and "-0.50 pt" in lines[4] and lines[4].rstrip().endswith("yes / no")


def test_an_interrupted_task_still_tabulates(tmp_path):
    tasks = {"wikitext2": {"dense": {"untuned": {"wikitext2_ppl": 20.0, "shakespeare_ppl": 30.0}}}}
    lines, rows = load_tables(tmp_path, {"interrupted": tasks})["interrupted"]
    assert len(rows) == 2 and [r["dense"] for r in rows] == ["-", "-"]
    assert [r["met (sparse / dense-eval)"] for r in rows] == ["- / -", "-"]
    assert rows[0]["untuned"] == "20.00" and rows[1]["untuned"] == "30.00"


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


def test_load_prints_the_tables_again_and_the_spread_over_seeds(tmp_path):
    paths = []
    for seed, spt_dense in ((0, 1.01), (1, 1.05)):
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"seed": seed, "command": "x", "tasks": {"gsm8k": parts(1.0, 1.5, spt_dense)}}))
        paths.append(str(path))
    out = run_script("--load", *paths)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "seed 0: dense 1.0000, spt dense-eval 1.0100 (+1.00%, kept 0.980)" in out.stdout
    assert "seed 1: dense 1.0000, spt dense-eval 1.0500 (+5.00%, kept 0.900)" in out.stdout
    assert "diff_spt_dense: +1.00% .. +5.00% over 2 seeds" in out.stdout
    (tmp_path / "bad.json").write_text("{}")
    out = run_script("--load", str(tmp_path / "bad.json"))
    assert out.returncode == 2 and "not a quality.py record" in out.stderr, out.stderr[-2000:]


def test_load_prints_the_mean_and_spread_of_paired_differences(tmp_path):
    """Over several seeds --load prints each paired difference's range, mean and sample sd."""
    paths = []
    for seed, (dense, spt) in enumerate([(0.80, 0.79), (0.82, 0.83), (0.81, 0.84)]):
        acc = {"dense": {"untuned": {"accuracy": 0.5}, "tuned": {"accuracy": dense}},
               "spt": {"tuned_sparse": {"accuracy": spt}, "tuned_dense": {"accuracy": spt}}}
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps({"seed": seed, "command": "c", "tasks": {"sst2": acc}}))
    out = run_script("--load", *map(str, paths))
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("diff_spt_dense:"))
    # differences -1, +1, +3 points: mean +1.00, sd 2.00
    assert "-1.00 pt .. +3.00 pt over 3 seeds" in line and "mean +1.00 pt" in line and "sd 2.00 pt" in line
