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
