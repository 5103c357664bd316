"""Hugging Face `Trainer` with the spt backend: the way in, and the sparse state in its checkpoints.

    model.compile(backend="spt", options={...})         # in place: Trainer sees the model it knows
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SptStateCallback()])
    trainer.train()                                      # or trainer.train(resume_from_checkpoint=True)

Why `model.compile(...)` and not one of Trainer's own switches (tried with transformers 5.24,
accelerate 1.15):
  * `TrainingArguments(torch_compile_backend="spt")` fails in `Trainer(...)`: accelerate's
    `TorchDynamoPlugin` only takes the names in its `DynamoBackend` enum
    ("ValueError: 'SPT' is not a valid DynamoBackend").
  * `TrainingArguments(torch_compile=True)` inside `spt_compile.enable()` trains, but dense:
    TrainingArguments fills in `torch_compile_backend="inductor"` and accelerate calls
    `torch.compile(model, backend="inductor")`, which names a backend, so enable()'s default does not
    apply. SptStateCallback refuses that combination when the Trainer is built.
  * `Trainer(model=torch.compile(model, backend="spt"))` works only with
    `remove_unused_columns=False`: Trainer reads the wrapper's `forward(*args, **kwargs)` signature,
    drops every column and fails with "The batch received was empty".
  * `model.compile(backend="spt")` (nn.Module.compile, in place) needs nothing else: the module keeps
    its class, forward signature, parameter names and `save_pretrained`.

`SptStateCallback` writes `spt_compile.state_dict(model)` into every checkpoint folder Trainer saves
(`spt_state.safetensors`, written to a temporary name and renamed, so a killed run never leaves half a
file) and loads it back when training resumes from a checkpoint, so the resumed run makes the same
sparse choices as an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Optional

from transformers import TrainerCallback

import spt_compile
from spt_compile.registry import SptStateError

STATE_FILE = "spt_state.safetensors"


def save_state_file(model, path: str) -> None:
    """spt_compile.state_dict(model) as safetensors at `path`, atomically (temporary file, fsync,
    rename): a reader sees the old file or the new one, never a partial one."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in spt_compile.state_dict(model).items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state_file(model, path: str, strict: bool = True) -> None:
    from safetensors.torch import load_file

    spt_compile.load_state_dict(model, load_file(path), strict=strict)


class SptStateCallback(TrainerCallback):
    """Saves the sparse state with each Trainer checkpoint and restores it on resume.

    resume_from: the checkpoint folder to restore from when it is not
        `<output_dir>/checkpoint-<step>` (i.e. when `resume_from_checkpoint` names a folder elsewhere).
    strict: a resumed run whose checkpoint has no sparse state raises SptStateError (False: warn and
        let the sites calibrate afresh, which changes the run from what it would have been)."""

    def __init__(self, resume_from: Optional[str] = None, strict: bool = True):
        self.resume_from = resume_from
        self.strict = strict

    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "torch_compile", False):
            raise ValueError(
                "TrainingArguments(torch_compile=True) makes accelerate compile the model with backend="
                f"{args.torch_compile_backend!r} (it accepts no other backend names), which would train dense; "
                "leave torch_compile off and call model.compile(backend='spt', options={...}) before building "
                "the Trainer")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and model is not None and not spt_compile.report(model):
            import warnings

            warnings.warn("SptStateCallback: no sparse site ran in the first step; was the model compiled with "
                          "model.compile(backend='spt')? spt_compile.explain(model, **batch) says what matched",
                          stacklevel=2)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:  # only the main process writes, as Trainer does
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        save_state_file(model, os.path.join(folder, STATE_FILE))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a fresh run (Trainer has loaded no checkpoint state)
            return
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            load_state_file(model, path)
            return
        message = (f"resuming at step {state.global_step}, but {path} does not exist: the checkpoint was saved "
                   "without SptStateCallback, or resume_from_checkpoint names a folder outside output_dir "
                   "(pass SptStateCallback(resume_from=that folder))")
        if self.strict:
            raise SptStateError(message + "; SptStateCallback(strict=False) lets the sites calibrate afresh")
        import warnings

        warnings.warn(message + "; the sparse sites calibrate afresh", stacklevel=2)

