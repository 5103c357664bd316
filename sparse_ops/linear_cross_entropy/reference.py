"""Plain reference of the chunked linear + cross-entropy: the dense form, with the same signature."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def linear_cross_entropy_reference(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, chunk: int = 1024, return_logits: bool = False, logit_mul: float = 1.0,
    logit_div: float = 1.0, logit_softcap: float = 0.0,
) -> tuple[Tensor, Optional[Tensor]]:
    """The dense form as Hugging Face writes it: the whole [T, V] logits (times a constant factor, as
    Cohere and Granite write theirs; soft-capped, as Gemma-2's), upcast, one cross_entropy. `chunk` is
    accepted for the same signature and ignored."""
    logits = torch.nn.functional.linear(h, W, b)  # [*, V]
    if logit_mul != 1.0:
        logits = logits * logit_mul
    if logit_div != 1.0:
        logits = logits / logit_div
    if logit_softcap:  # Gemma-2's final soft-capping
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    loss = torch.nn.functional.cross_entropy(
        logits.float().view(-1, W.shape[0]), labels.reshape(-1), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing)
    return loss, (logits if return_logits else None)
