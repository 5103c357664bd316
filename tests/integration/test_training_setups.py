"""Real training setups with the model and training code unchanged (or one line added): Hugging Face
Trainer, a plain PyTorch loop killed with SIGKILL and resumed, and the ways in that do not work."""

from __future__ import annotations

import os

import pytest
import torch

import spt_compile
from spt_compile.registry import model_sites
from toy_models import SPARSE_AT_EVERY_LENGTH

pytest.importorskip("transformers")
pytest.importorskip("peft")

# Small enough for the CPU, large enough that attention and the MLP really run sparse from step 2.
OPTS = {"calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16, "density": 0.5,
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


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])  # the suite's, and the default's (it draws its own dropout masks)
def test_trainer_trains_through_spt_and_resumes_exactly(tmp_path, compiler):
    from transformers import TrainerCallback

    from spt_compile.integrations.hf import STATE_FILE

    torch._dynamo.reset()
    model = tiny_lora_llama()
    model.compile(backend="spt", options={**OPTS, "compiler": compiler})  # the one added line
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
    assert any(k.endswith("/router") for k in state2)
    assert not list(ckpt.glob("*.tmp*")), "temporary files left behind"

    class CrashAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise _Crash

    model = tiny_lora_llama()
    model.compile(backend="spt", options={**OPTS, "compiler": compiler})
    with pytest.raises(_Crash):
        trainer_for(model, tmp_path / "resumed", steps=4, callbacks=[CrashAtStep3()]).train()

    model = tiny_lora_llama()  # the same base weights (a pretrained model); the adapter comes from the checkpoint
    model.compile(backend="spt", options={**OPTS, "compiler": compiler})
    resumed = trainer_for(model, tmp_path / "resumed", steps=4)
    resumed.train(resume_from_checkpoint=True)
    got = losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json, 3-4 were run again
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], rel=1e-5)
    end = spt_compile.state_dict(model)
    assert end.keys() == final_state.keys()
    for k in end:
        torch.testing.assert_close(end[k], final_state[k], msg=lambda m: f"{k}: {m}")


def test_ways_in_that_do_not_work_say_so(tmp_path):
    """accelerate refuses the backend name; torch_compile=True would compile with Inductor (dense),
    which SptStateCallback refuses with the fix."""
    from transformers import Trainer, TrainingArguments

    from spt_compile.integrations.hf import SptStateCallback

    model = tiny_lora_llama()
    args = TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="spt", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=model, args=args, train_dataset=token_rows())
    args = TrainingArguments(output_dir=str(tmp_path), torch_compile=True, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"model.compile\(backend='spt'"):
        Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=[SptStateCallback()])


def test_resume_without_sparse_state_is_refused(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from spt_compile.integrations.hf import SptStateCallback
    from spt_compile.registry import SptStateError

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state = TrainerState(global_step=4)
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(SptStateError, match="checkpoint-4/spt_state.safetensors does not exist"):
        SptStateCallback().on_train_begin(args, state, TrainerControl(), model=tiny_lora_llama())
    with pytest.warns(UserWarning, match="calibrate afresh"):
        SptStateCallback(strict=False).on_train_begin(args, state, TrainerControl(), model=tiny_lora_llama())


def test_core_import_leaves_transformers_alone():
    import subprocess
    import sys

    code = "import sys, spt_compile; print(sorted(m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


# --- a plain loop, killed with SIGKILL and resumed ---------------------------------------------------

PLAIN = [ "--seq-len", "64", "--threads", "1", "--steps", "6", "--save-every", "2",
         "--spt", "calibration_steps=1", "--spt", "attention_dense_below=0", "--spt", "attention_backward_dense_below=0",
         "--spt", "attention_min_keys=0", "--spt", "attention_block=16",
         "--spt", "density=0.5"]


def plain_loop(model_dir, *args):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "plain_loop.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(script), "--model", str(model_dir), *PLAIN, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finished(proc) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A 1-layer random LLaMA with SmolLM2's tokenizer, saved as a model folder: loads in a second,
    where the embedded GGUF model takes most of a minute to convert on 2 cores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_plain_loop_killed_and_resumed_matches_uninterrupted_run(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    import signal

    monkeypatch.setenv("SPT_DATA_DIR", str(data_dir))
    finished(plain_loop(tiny_model_dir, "--output", str(tmp_path / "straight")))
    want = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)

    run = tmp_path / "killed"
    proc = plain_loop(tiny_model_dir, "--output", str(run))
    seen = []
    for line in proc.stdout:  # SIGKILL once step 3 ran: the step-2 checkpoint is written, step 4's may be
        seen.append(line)
        if line.startswith("step 3 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    partial = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 2 <= partial["step"] < 6 and not (run / "checkpoint.pt.tmp").exists()

    out = finished(plain_loop(tiny_model_dir, "--output", str(run), "--resume"))
    assert f"resumed at step {partial['step']}" in out
    got = torch.load(run / "checkpoint.pt", weights_only=False)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-6), "the loss curve must not change"
    assert got["spt"].keys() == want["spt"].keys() and any(k.endswith("/router") for k in got["spt"])
    for k in want["spt"]:
        torch.testing.assert_close(got["spt"][k], want["spt"][k], msg=lambda m: f"{k}: {m}")


def example(name, *args, env_extra=None):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)


def test_examples_help():
    for name in ("plain_loop.py", "hf_trainer.py"):
        out = example(name, "--help")
        assert out.returncode == 0 and "--resume" in out.stdout and "--spt NAME=VALUE" in out.stdout, out.stderr


@pytest.mark.slow
def test_hf_trainer_example_runs_sparse_and_checkpoints(tmp_path, data_dir, tiny_model_dir):
    import json

    out = example("hf_trainer.py", "--model", str(tiny_model_dir), "--steps", "2", "--save-steps", "2",
                  "--seq-len", "64", "--threads", "1", "--output", str(tmp_path), *PLAIN[PLAIN.index("--spt"):],
                  env_extra={"SPT_DATA_DIR": str(data_dir), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["losses"]) == 2 and result["sparse_sites"] == 2  # 1 layer: attention + MLP
    assert (tmp_path / "checkpoint-2" / "spt_state.safetensors").is_file()


# --- compile settings a training setup brings along ---------------------------------------------------


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def train_steps(model, compiled, steps=3, seq_lens=(48,), **batch_kw):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for i in range(steps):
        n = seq_lens[i % len(seq_lens)]
        ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n - 5:] = 0  # padding, as a collator that pads to the longest writes it
        loss = compiled(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_hf_gradient_checkpointing_gives_the_same_run(compiler):
    """model.gradient_checkpointing_enable(): every site is still rewritten, the recomputed forward
    makes the same sparse choices (calls are not counted twice), and the losses equal the plain run's.
    From transformers 5.25 the checkpointed layers trace only with Dynamo's
    skip_fwd_side_effects_in_bwd_under_checkpoint (the README's line; without it explain() lists
    them as not traced: tests/passes/test_unmatched.py)."""
    from spt_compile import compile_reports

    runs = []
    for checkpointing in (False, True):
        model = tiny_lora_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch._dynamo.reset()
        torch.manual_seed(1)  # the same site seeds in both runs
        n = len(compile_reports(model))
        # HF's checkpointing breaks the graph before the loss, so the sites there get no loss rows
        # (passes/loss_rows.py); compared without them, the runs must match exactly.
        # transformers >= 5.25 needs the `kernels` package, whose wrapper around LlamaAttention.forward
        # sets and resets a module-level variable on every call: inside torch.utils.checkpoint Dynamo
        # refuses that side effect and runs each layer eagerly, unless it may skip replaying it in the
        # recomputation (a set-and-reset needs no replay). A no-op with 5.24.
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            compiled = torch.compile(model, backend="spt", options={**OPTS, "ffn_loss_rows": "off", "compiler": compiler})
            runs.append(train_steps(model, compiled, steps=2))  # calibration, then a sparse step
        reports = compile_reports(model)[n:]
        assert sum(len(r.rewritten("attention")) + len(r.rewritten("mlp")) for r in reports) == 4, (
            checkpointing, n, [r.summary() for r in reports], [r.summary() for r in compile_reports()])
        assert [site.calls for _, site in model_sites(model)] == [2, 2, 2, 2]
    assert runs[0] == runs[1]


def test_changing_sequence_lengths_recompile_once():
    """Batches padded to their longest sequence: Dynamo compiles the first shape, then one graph
    with a dynamic length (its automatic dynamic shapes); every later length reuses it."""
    from spt_compile import compile_reports

    model = tiny_lora_llama()
    torch._dynamo.reset()
    n = len(compile_reports(model))
    compiled = torch.compile(model, backend="spt", options=OPTS)
    losses = train_steps(model, compiled, steps=5, seq_lens=(24, 32, 40, 48, 20))
    assert all(l == l for l in losses)
    reports = compile_reports(model)[n:]
    assert len(reports) == 2
    assert all(len(r.rewritten("attention")) == 2 and len(r.rewritten("mlp")) == 2 for r in reports)


def test_dynamic_true_on_hf_llama_rewrites_every_site():
    """dynamic=True: HF's and PEFT's float attributes (attention scaling and dropout, LoRA scaling and
    dropout) reach the graph as inputs; the backend reads them as constants, so every site is
    rewritten, one graph serves every length, and with every key and block kept it equals dense."""
    import copy

    from spt_compile import compile_reports

    model = no_dropout(tiny_lora_llama())
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    n = len(compile_reports(model))
    compiled = torch.compile(model, backend="spt", options={**OPTS, "density": 1.0, "ffn_active": 4}, dynamic=True)
    got = train_steps(model, compiled, steps=3, seq_lens=(24, 40, 32))
    want = train_steps(reference, reference, steps=3, seq_lens=(24, 40, 32))
    reports = compile_reports(model)[n:]
    assert reports[0].floats and len(reports[0].rewritten("attention")) == 2 and len(reports[0].rewritten("mlp")) == 2
    assert all(len(r.rewritten("attention")) == 2 and len(r.rewritten("mlp")) == 2 for r in reports)
    assert len(reports) <= 2  # no compile per length
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_dynamic_true_changed_float_attribute_is_never_stale(compiler, caplog):
    """A module float read as a constant changes after compiling (a LoRA scaling). Through AOTAutograd
    (aot_eager, inductor) Dynamo specializes the floats the backend read as constants and guards on
    them, so it recompiles; with compiler="eager" the backend's own check runs that graph as traced,
    with a warning naming the input. Either way the new value is used, never the stale constant."""
    import copy
    import logging

    from spt_compile import compile_reports

    model = no_dropout(tiny_lora_llama()).eval()
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    options = {**OPTS, "calibration_steps": 0, "density": 1.0, "ffn_active": 4, "compiler": compiler}
    compiled = torch.compile(model, backend="spt", options=options, dynamic=True)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        n = len(compile_reports(model))
        for m in (model, reference):
            m.base_model.model.model.layers[0].mlp.up_proj.scaling["default"] = 0.5
        with caplog.at_level(logging.WARNING, logger="spt_compile"):
            got = compiled(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    warned = [r for r in caplog.records if "up_proj_scaling" in r.getMessage() and "specialize_float" in r.getMessage()]
    if compiler == "eager":
        assert warned and len(compile_reports(model)) == n  # the backend's check, no recompile
    else:
        assert not warned and len(compile_reports(model)) > n  # Dynamo's guard: a recompile with the new value


def test_bf16_autocast_on_hf_llama_matches_dense_autocast():
    """Under torch.autocast HF's RoPE leaves q, k in fp32 while v comes from a bf16 linear; dense
    SDPA is autocast to bf16, and the attention site does the same. PEFT casts the down projection's
    LoRA input back to fp32 (lora_A's dtype), which autocast undoes in the linear: the MLP site is
    rewritten and computes in bf16 like the dense layers; so is the LM head + loss (its operands cast
    to bf16, as autocast casts them for the dense linear)."""
    import copy

    from spt_compile import compile_reports

    model = no_dropout(tiny_lora_llama())
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    n = len(compile_reports(model))
    compiled = torch.compile(model, backend="spt", options={**OPTS, "density": 1.0, "ffn_active": 4})
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # calibration, then the sparse path (every key kept)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = reference(input_ids=ids, labels=ids).loss
        want.backward()
    assert sum(len(r.rewritten("attention")) for r in compile_reports(model)[n:]) == 2
    assert sum(len(r.rewritten("mlp")) for r in compile_reports(model)[n:]) == 2
    assert sum(len(r.rewritten("loss")) for r in compile_reports(model)[n:]) == 1
    assert loss.item() == pytest.approx(want.item(), rel=1e-3)
    grads = [(name, p.grad, r.grad) for (name, p), r in zip(model.named_parameters(), reference.parameters())
             if p.grad is not None]
    assert len(grads) == 2 * 7 * 2  # LoRA A and B of the 7 projections of both layers
    for name, got, ref in grads:  # bf16 computation (measured: at most 0.9% of the gradient's size)
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max() + 1e-6, name


def test_compile_mode_through_options(caplog):
    """torch.compile refuses mode= with options=; the mode can travel in the options instead. With
    compiler='aot_eager' a mode is ignored with a warning that says so."""
    import logging

    from toy_models import NanoGPT

    model = NanoGPT(layers=1, block_size=64)
    with pytest.raises(RuntimeError, match="Either mode or options"):
        torch.compile(model, backend="spt", mode="max-autotune", options={"density": 0.5})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={"mode": "max-autotune", "compiler": "aot_eager"})
    with caplog.at_level(logging.WARNING, logger="spt_compile"):
        compiled(torch.randint(0, 97, (2, 16)))
    assert "mode='max-autotune' only applies to compiler='inductor'" in caplog.text
    assert "options={'compiler': 'inductor', 'mode': 'max-autotune'}" in caplog.text


def test_bf16_model_with_float32_adapters_rewrites_the_mlp_and_matches_dense():
    """PEFT keeps LoRA adapters in fp32 on a bf16 model (autocast_adapter_dtype, its default): the
    LoRA input is cast up, the delta and the sum run in fp32 and the sum is cast back to bf16. The MLP
    site is still rewritten (it was left dense before: 'projections read different inputs'), computes
    the LoRA path in bf16 as autocast would, and the gradients reach the fp32 weights."""
    import copy

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from spt_compile import compile_reports

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():  # B starts at zero: give the delta a size to check
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    n = len(compile_reports(model))
    compiled = torch.compile(model, backend="spt", options={**OPTS, "density": 1.0, "ffn_active": 4})
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # calibration, then the routed path with every block active
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    for _ in range(2):
        want = reference(input_ids=ids, labels=ids).loss
        want.backward()
    mlps = [s for r in compile_reports(model)[n:] for s in r.rewritten("mlp")]
    assert len(mlps) == 2 and all("adapters float32: computed in bfloat16" in s.detail for s in mlps)
    assert loss.item() == pytest.approx(want.item(), rel=1e-2)
    grads = [(name, p.grad, r.grad) for (name, p), r in zip(model.named_parameters(), reference.parameters())
             if p.grad is not None]
    assert len(grads) == 2 * 7 * 2 and all(g.dtype == torch.float32 for _, g, _ in grads)
    for name, got, ref in grads:  # the LoRA path in bf16 against PEFT's fp32
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-6, name
