"""The gradient of logits returned beside the chunked loss, attached outside a compiled graph.

A model that returns its logits (Hugging Face does) gets them from spt::linear_cross_entropy. When
they are a differentiable output of a compiled graph, AOTAutograd hands that graph a gradient for
them on every backward: a zero-filled [T, V] tensor when the loop differentiates the loss only (the
usual case; 805 MB of fp32 at 4096 tokens of SmolLM2's vocabulary), which the op then scans to skip
its GEMMs. Instead the backend returns them from the graph outside autograd and attaches this node
to them (passes/returned_logits.py). Its backward runs only when something differentiates through
the logits, and then forms exactly what the op's own backward would: d(h), d(W), d(b) through the
logits' factor and soft-cap, one chunk of rows at a time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .chunked import _grad_buffers, backprop_logits_grad


class _LogitsGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, h: Tensor, W: Tensor, b: Optional[Tensor], chunk: int,
                factors: tuple[float, float, float]) -> Tensor:
        ctx.save_for_backward(h, W, b)  # held by the compiled graph's backward too: no new memory
        ctx.chunk, ctx.factors = chunk, factors
        return logits  # returned as is: autograd hands the caller a view of it carrying this node

    @staticmethod
    def backward(ctx, dlogits: Tensor):
        h, W, b = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        h2 = h.reshape(-1, h.shape[-1])  # [T, d]
        dh, dW, db = _grad_buffers(h2, W, [needs[0], needs[1], needs[2] and b is not None])  # the op's: fp32 dW, db
        backprop_logits_grad(dlogits.reshape(-1, W.shape[0]).contiguous(), h2, W, b, dh, dW, db, ctx.chunk,
                             *ctx.factors)
        return (None, None if dh is None else dh.view(h.shape), None if dW is None else dW.to(W.dtype),
                None if db is None else db.to(b.dtype), None, None)


def attach_logits_gradient(logits: Tensor, h: Tensor, W: Tensor, b: Optional[Tensor], chunk: int,
                           logit_mul: float = 1.0, logit_div: float = 1.0, logit_softcap: float = 0.0) -> Tensor:
    """logits [*, V] = the head's output for h [*, d] (spt::linear_cross_entropy's, returned outside
    autograd) -> the same values, differentiable in h, W and b where they require grad."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, W, b))):
        return logits
    return _LogitsGradient.apply(logits, h, W, b, chunk, (logit_mul, logit_div, logit_softcap))
