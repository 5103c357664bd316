"""What the attention parsers return and share: AttentionMatch (one candidate, read off the graph),
Reject (a candidate that stays dense, with the reason explain() shows), the constants the forms are
read with, and two shape helpers the check and the rewrite use too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch.fx import Node

from ..fx_utils import same, shape, static_int

FORBIDDING_FILL = -1.0e4  # a masked_fill / where value at or below this removes the key
CASTS = ("to", "float", "type", "type_as")


# Under dynamic=True Dynamo passes Python floats into the graph as tensors unless
# torch._dynamo.config.specialize_float is set. Module attributes (HF's `self.scaling`,
# `attention_dropout`) are read back as constants before the passes run (float_inputs.py); what is
# left is a float passed to forward() as an argument, or a value computed from tensors.
DYNAMIC_FLOATS = (" (under dynamic=True Dynamo passes a float argument of forward() as a graph value; "
                  "store it as a module attribute, or set torch._dynamo.config.specialize_float = True)")


class Reject(Exception):
    """A candidate that cannot be rewritten safely; the message is the reason shown by explain()."""


@dataclass
class AttentionMatch:
    pattern: str
    output: Node  # the node whose uses the op's output takes over
    q: Node
    k: Node  # [B, Hkv, Nk, D], repeat_kv unwrapped
    v: Node
    is_causal: bool
    scale: float
    dropout_p: float
    additive: list[Node] = field(default_factory=list)  # float masks added to the scores (summed)
    allow: list[Node] = field(default_factory=list)  # bool, True = key allowed
    forbid: list[Node] = field(default_factory=list)  # bool, True = key forbidden (masked_fill form)
    nodes: set[Node] = field(default_factory=set)  # what the op replaces
    glue: set[Node] = field(default_factory=set)  # views/casts/constants erased when nothing else reads them
    merged: bool = False  # q/k/v are 3-D [B*H, N, D]: the op sees them as one batch of B*H heads
    detail: str = ""
    softcap: float = 0.0  # the scores soft-capped to cap * tanh(s / cap) before the masks (Gemma-2); 0: none
    mask_grad: bool = False  # an additive mask needs a gradient (a learned bias): the op returns it
    unflatten: set[Node] = field(default_factory=set)  # masks [B*H, N, Nk] the op reads as [B, H, N, Nk]


def _divides(small, big) -> bool:
    if same(small, big):  # also symbolic (a merged [B*H] axis under dynamic=True)
        return True
    s, b = static_int(small), static_int(big)
    return s is not None and b is not None and s > 0 and b % s == 0


def _shape4(node: Node, merged: bool) -> Optional[tuple]:
    s = shape(node)
    return (1, *s) if merged and s is not None and len(s) == 3 else s

