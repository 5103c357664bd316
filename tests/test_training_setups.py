"""Real training setups with the model and training code unchanged (or one line added): Hugging Face
Trainer, a plain PyTorch loop killed with SIGKILL and resumed, and the ways in that do not work."""

from __future__ import annotations

import os

import pytest
import torch

import spt_compile
from spt_compile.registry import model_sites

pytest.importorskip("transformers")
pytest.importorskip("peft")

# Small enough for the CPU, large enough that attention and the MLP really run sparse from step 2.
OPTS = {"calibration_steps": 1, "attention_dense_below": 0, "attention_block": 16, "density": 0.5,
        "compiler": "aot_eager"}
SEQ, VOCAB = 48, 128


def tiny_lora_llama(seed=0):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    model = LlamaForCausalLM(config)
    # lora_dropout > 0: the run draws random numbers every step, so resume must restore the RNG exactly.
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, lora)


def token_rows(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = SEQ - 8 * (i % 3)  # ragged: Trainer's collator pads nothing, so keep one length per batch
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def trainer_for(model, out, steps, callbacks=(), **kw):
    from transformers import Trainer, TrainingArguments

    from spt_compile.integrations.hf import SptStateCallback

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=[SptStateCallback(), *callbacks])


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


class _Crash(Exception):
    pass


def test_trainer_trains_through_spt_and_resumes_exactly(tmp_path):
    from transformers import TrainerCallback

    from spt_compile.integrations.hf import STATE_FILE

    torch._dynamo.reset()
    model = tiny_lora_llama()
    model.compile(backend="spt", options=OPTS)  # the one added line
    straight = trainer_for(model, tmp_path / "straight", steps=4)
    straight.train()
    want = losses(straight)
    assert sorted(want) == [1, 2, 3, 4]
    kinds = sorted(site.kind for _, site in model_sites(model))
    assert kinds == ["attention", "attention", "mlp", "mlp"]
    assert all(site.calls >= 4 for _, site in model_sites(model))
    assert any(s.get("captured") is not None for s in spt_compile.report(model)), "MLPs never ran routed"
    final_state = spt_compile.state_dict(model)

    from safetensors.torch import load_file

    ckpt = tmp_path / "straight" / "checkpoint-2"
    state2 = load_file(ckpt / STATE_FILE)
    assert any(k.endswith("/codebooks") for k in state2) and any(k.endswith("/router") for k in state2)
    assert not list(ckpt.glob("*.tmp*")), "temporary files left behind"

    class CrashAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise _Crash

    model = tiny_lora_llama()
    model.compile(backend="spt", options=OPTS)
    with pytest.raises(_Crash):
        trainer_for(model, tmp_path / "resumed", steps=4, callbacks=[CrashAtStep3()]).train()

    model = tiny_lora_llama()  # the same base weights (a pretrained model); the adapter comes from the checkpoint
    model.compile(backend="spt", options=OPTS)
    resumed = trainer_for(model, tmp_path / "resumed", steps=4)
    resumed.train(resume_from_checkpoint=True)
    got = losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json, 3-4 were run again
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], rel=1e-5)
    end = spt_compile.state_dict(model)
    assert end.keys() == final_state.keys()
    for k in end:
        torch.testing.assert_close(end[k], final_state[k], msg=lambda m: f"{k}: {m}")
