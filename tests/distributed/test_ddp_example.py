"""examples/ddp_finetune.py as a user runs it: torchrun with 2 CPU processes, DDP and FSDP2, a short
real run on SmolLM2 (2 layers) and a resume from its torch.distributed.checkpoint."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "ddp_finetune.py"
QUICK = ["--layers", "2", "--seq-len", "128", "--batch-size", "2", "--eval-examples", "4", "--lora-r", "4",
         "--save-every", "2", "--spt", "calibration_steps=1", "--spt", "compiler=aot_eager"]


def torchrun_command(*args, data=None) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if data is not None:
        env["SPT_DATA_DIR"] = str(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), *args]
    return cmd, env


def torchrun(*args, data=None) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(*args, data=data)
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
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-2"
    assert (tmp_path / "checkpoint-2" / ".metadata").is_file()
    out = torchrun(*QUICK, *mode, "--steps", "3", "--resume", "--output", str(tmp_path), data=data_dir)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert re.search(r"at step 2 \(dense\), [0-9.]+ at step 3", out.stdout), out.stdout[-2000:]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_an_interrupted_then_killed_run_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    """One run, stopped twice: Ctrl-C to torchrun after step 2 (every rank checkpoints the step in flight
    and stops), then --resume and SIGKILL of one rank after its next checkpoint (torchrun stops the
    other; the last complete checkpoint stays named), then --resume to the end: the held-out loss after
    the last step equals an uninterrupted run's."""
    last = 8
    steps = ["--steps", str(last)]
    whole = torchrun(*QUICK, *steps, "--output", str(tmp_path / "whole"), data=data_dir)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    want = re.search(rf"([0-9.]+) at step {last}", whole.stdout).group(1)

    # 1. Ctrl-C once rank 0's bar shows step 2 of a run that would checkpoint only at its end
    out = tmp_path / "stopped"
    cmd, env = torchrun_command(*QUICK, *steps, "--save-every", "100", "--output", str(out), data=data_dir)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = b""
    while f"| 2/{last} [".encode() not in seen and (chunk := os.read(run.stderr.fileno(), 4096)):  # tqdm redraws with \r
        seen += chunk
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=300)
    stopped = re.search(rf"stopped after step (\d+) of {last}", stdout.decode())
    assert stopped, stdout.decode()[-1500:] + (seen + stderr).decode(errors="replace")[-3000:]
    saved = int(stopped.group(1))
    latest = out / "latest"
    assert 2 <= saved < last - 2 and latest.read_text().strip() == f"checkpoint-{saved}"

    # 2. resumed, then one rank killed once the next checkpoint is complete
    cmd, env = torchrun_command(*QUICK, *steps, "--resume", "--output", str(out), data=data_dir)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, killed = time.time() + 400, None
    while time.time() < deadline and run.poll() is None:
        if latest.read_text().strip() not in ("", f"checkpoint-{saved}"):
            workers = [c for agent in _children(run.pid) for c in [agent, *_children(agent)]]
            ranks = [w for w in workers if "ddp_finetune.py" in Path(f"/proc/{w}/cmdline").read_text(errors="ignore")]
            if len(ranks) >= 2:
                killed = ranks[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    stdout, stderr = run.communicate(timeout=300)
    assert killed is not None, "the run ended before a rank could be killed: " + stdout[-1000:]
    assert run.returncode != 0, "torchrun reports the killed rank"
    assert latest.read_text().strip() != f"checkpoint-{last}", "killed before the end"

    # 3. resumed to the end
    resumed = torchrun(*QUICK, *steps, "--resume", "--output", str(out), data=data_dir)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert re.search(rf"{re.escape(want)} at step {last}", resumed.stdout), (want, resumed.stdout[-1500:])


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A 1-layer random LLaMA with SmolLM2's tokenizer, as a model folder (loads in a second)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def test_hf_trainer_under_torchrun_runs_ddp_and_writes_the_state_once(tmp_path, data_dir, tiny_llama_dir):
    script = REPO / "examples" / "hf_trainer.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "SPT_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), "--model", str(tiny_llama_dir), "--steps", "2", "--save-steps", "2", "--seq-len", "128",
           "--spt", "calibration_steps=1", "--spt", "compiler=aot_eager", "--output", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    import json

    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"losses"')]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks), ranks
    assert all(r["sparse_sites"] == 2 for r in ranks), ranks  # the layer's attention and MLP
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("spt_state.safetensors"))
    assert written == ["checkpoint-2/spt_state.safetensors"], written


def _mpirun() -> str | None:
    """mpirun from the test extra's `mpich` wheel (installed beside this Python), else from PATH."""
    import shutil

    return shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(_mpirun() is None, reason="accelerate launches several CPU processes through mpirun "
                    "(pip install mpich, in the test extra)")
def test_hf_trainer_under_accelerate_launch_runs_two_processes(tmp_path, data_dir, tiny_llama_dir):
    """`accelerate launch --cpu --num_processes 2` starts CPU processes only through mpirun (its
    --mpirun_hostfile); with MPICH's wheel it runs the same two-rank DDP job as torchrun."""
    script = REPO / "examples" / "hf_trainer.py"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost:2\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "SPT_DATA_DIR": str(data_dir), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PATH": f"{Path(_mpirun()).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mpirun_hostfile", str(hostfile), str(script), "--model", str(tiny_llama_dir), "--steps", "2",
           "--save-steps", "2", "--seq-len", "128", "--spt", "calibration_steps=1", "--spt", "compiler=aot_eager",
           "--output", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    import json

    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"losses"')]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks), ranks
    assert ranks[0]["losses"] == ranks[1]["losses"], "one DDP run: the same (averaged) losses on both ranks"
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("spt_state.safetensors"))
    assert written == ["checkpoint-2/spt_state.safetensors"], written
