"""PEFT LoRA as the examples and benchmarks apply it to LLaMA-style models (SmolLM2)."""

from __future__ import annotations

# every attention and MLP projection of a LLaMA-style decoder layer
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, r: int):
    """The PEFT model: LoRA of rank r (alpha 2r, dropout 0.05) on LORA_TARGETS, a causal LM task."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, task_type="CAUSAL_LM",
                             target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def lora_state(model) -> dict:
    """A detached copy of the adapter's weights (for a checkpoint)."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: the embeddings are frozen (and the check looks for a hub config)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
