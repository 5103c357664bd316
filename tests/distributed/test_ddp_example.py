"""examples/ddp_finetune.py as a user runs it: torchrun with 2 CPU processes, DDP and FSDP2, a short
real run on SmolLM2 (2 layers) and a resume from its torch.distributed.checkpoint."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "ddp_finetune.py"
QUICK = ["--layers", "2", "--seq-len", "128", "--batch-size", "2", "--eval-examples", "4", "--lora-r", "4",
         "--save-every", "2", "--spt", "calibration_steps=1", "--spt", "compiler=aot_eager"]


def torchrun(*args, data=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if data is not None:
        env["SPT_DATA_DIR"] = str(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_and_a_run_without_torchrun():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--fsdp" in out.stdout and "--resume" in out.stdout
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1"], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert out.returncode == 2 and "run me with torchrun" in out.stdout


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_short_run_then_resume(tmp_path, data_dir, mode):
    out = torchrun(*QUICK, *mode, "--steps", "2", "--output", str(tmp_path), data=data_dir)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "sparse sites: 2 attention, 2 MLP" in out.stdout, out.stdout[-2000:]
    assert (tmp_path / "checkpoint" / ".metadata").is_file()
    out = torchrun(*QUICK, *mode, "--steps", "3", "--resume", "--output", str(tmp_path), data=data_dir)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert re.search(r"at step 2 \(dense\), [0-9.]+ at step 3", out.stdout), out.stdout[-2000:]
