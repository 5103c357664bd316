"""Soft-capped attention scores (Gemma-2): s -> cap * tanh(s / cap), applied to the scaled scores
before any mask or bias is added, as the model writes it. The cap bounds every score to (-cap, cap)
and is smooth, so the softmax, the selection and the kernels are unchanged around it; backward
multiplies the score gradient by the cap's slope, 1 - tanh(s / cap)^2.

`softcap` is 0.0 where a model caps nothing (every op's default); a positive value is the cap."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def capped(s: Tensor, softcap: float, slope: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """(cap * tanh(s / cap), the slope 1 - tanh(s / cap)^2 when asked, else None). s is the scaled
    scores, before masks; it is overwritten (chunks here are temporaries). softcap 0: s unchanged."""
    if not softcap:
        return s, None
    t = s.div_(softcap).tanh_()
    d = (1.0 - t * t) if slope else None
    return t.mul_(softcap), d


def check_softcap(softcap: float) -> float:
    """The cap as a float; a clear error for a negative or non-finite one."""
    softcap = float(softcap)
    if not (softcap >= 0.0 and softcap != float("inf")):
        raise ValueError(f"attention softcap must be 0 (no cap) or a positive finite number; got {softcap}")
    return softcap
