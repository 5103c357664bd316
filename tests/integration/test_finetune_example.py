"""examples/finetune.py as a user runs it: a short real run, Ctrl-C mid-run and an exact resume, and bad
input refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "finetune.py"
QUICK = ["--layers", "2", "--seq-len", "96", "--batch-size", "2", "--eval-examples", "4", "--lora-r", "4",
         "--compiler", "aot_eager", "--calibration-steps", "1", "--threads", "2"]


def finetune(*args, data=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    if data is not None:
        env["SPT_DATA_DIR"] = str(data)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


def finetune_interrupted(*args, data, when: str, sig=signal.SIGINT) -> tuple[int, str]:
    """Runs finetune.py and sends it `sig` (a user's Ctrl-C) as soon as its stderr (the progress bar)
    shows `when`. Returns (exit status, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SPT_DATA_DIR": str(data)}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    seen = b""
    try:
        while when.encode() not in seen:  # tqdm redraws with \r, so read bytes, not lines
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        if proc.poll() is None:
            proc.send_signal(sig)
        _, rest = proc.communicate(timeout=900)
    finally:
        proc.kill()
    return proc.returncode, (seen + rest).decode(errors="replace")


def history(output: Path) -> list[float]:
    return [h["loss"] for h in torch.load(output / "checkpoint.pt", weights_only=False)["history"]]


def test_help():
    out = finetune("--help")
    assert out.returncode == 0 and "--resume" in out.stdout and "--backend" in out.stdout


def test_short_run_then_exact_resume(tmp_path, data_dir):
    straight = tmp_path / "straight"
    out = finetune(*QUICK, "--steps", "4", "--save-every", "2", "--output", str(straight), data=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"GSM8K from {data_dir / 'gsm8k'} ($SPT_DATA_DIR)" in out.stdout
    assert "held-out answer loss before tuning" in out.stdout
    assert "after tuning (sparse)" in out.stdout and "after tuning (dense)" in out.stdout
    metrics = json.loads((straight / "metrics.json").read_text())
    assert {"loss_before", "loss_after_sparse", "loss_after_dense"} <= metrics.keys()
    # the sparse figure ran the sparse forward (evaluation runs exact unless sparse_inference asks for it)
    assert metrics["loss_after_sparse"] != metrics["loss_after_dense"]
    assert (straight / "adapter" / "adapter_model.safetensors").is_file()
    assert (straight / "spt_state.safetensors").is_file()
    assert len(metrics["sites"]) == 4  # 2 attention + 2 MLP sites, with their calibration figures

    # Ctrl-C during step 2 of a run that would checkpoint only at its end: the step finishes and is
    # saved, the run stops (status 130), and --resume goes on to the uninterrupted run's losses.
    broken = tmp_path / "resumed"
    status, err = finetune_interrupted(*QUICK, "--steps", "4", "--save-every", "100", "--output", str(broken),
                                       data=data_dir, when="| 1/4 [")
    assert status == 130, err[-3000:]
    assert "SIGINT: finishing this step, then saving a checkpoint" in err
    saved = torch.load(broken / "checkpoint.pt", weights_only=False)["step"]
    assert 1 <= saved < 4 and f"stopped after step {saved} of 4; checkpoint written to" in err, err[-2000:]
    out = finetune(*QUICK, "--steps", "4", "--save-every", "100", "--output", str(broken), "--resume", data=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed at step {saved}" in out.stdout
    assert history(broken) == pytest.approx(history(straight), rel=1e-5), "resume must reproduce the loss curve"


@pytest.mark.parametrize("problem,args,message", [
    ("missing folder", ["--data", "/nonexistent/data"], "holds neither gsm8k/train.jsonl"),
    ("bad option", ["--density", "2"], "'density' must be a float in (0, 1]"),
    ("bad flag value", ["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_input_is_named(tmp_path, data_dir, problem, args, message):
    out = finetune(*QUICK, "--output", str(tmp_path), *args, data=data_dir)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]


def test_malformed_rows_and_empty_files_are_named(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "no answer"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
    out = finetune(*QUICK, "--data", str(tmp_path), "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "train.jsonl:2: a GSM8K row needs string fields" in out.stderr
    (tmp_path / "train.jsonl").write_text("\n")
    out = finetune(*QUICK, "--data", str(tmp_path), "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "holds no rows" in out.stderr


def test_too_long_sequence_and_nan_loss_leave_checkpoints_alone(tmp_path, data_dir):
    out = finetune(*QUICK, "--seq-len", "9000", "--output", str(tmp_path / "long"), data=data_dir)
    assert out.returncode == 2 and "longer than the model allows (8192" in out.stderr

    run = tmp_path / "nan"
    out = finetune(*QUICK, "--steps", "3", "--save-every", "1", "--lr", "1e38", "--output", str(run), data=data_dir)
    assert out.returncode == 2 and "nothing was saved" in out.stderr, out.stderr[-2000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)  # from a step before it broke
    assert ckpt["step"] < 3
    assert all(torch.isfinite(v).all() for v in ckpt["lora"].values()), "a broken state was saved"
