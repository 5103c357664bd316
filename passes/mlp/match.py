"""What the MLP parsers return: MlpMatch (one MLP, read off the graph as its projections, activation
and the nodes between), and Reject (an MLP that stays dense, with the reason explain() shows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.fx import Node

from .projections import Projection


class Reject(Exception):
    """An MLP that cannot be rewritten safely; the message is the reason shown by explain()."""


@dataclass
class MlpMatch:
    x: Node
    up: Projection  # "in": the projection that is (plain) or multiplies (gated) the activation
    gate: Optional[Projection]
    down: Projection
    activation: str
    nodes: set[Node]
    # A fused gate/up projection split by chunk/split: "gate_up" (the gate is the first half) or
    # "up_gate"; then gate is that projection and up is None (the op splits the weights).
    fused: str = ""
    # p of a live dropout over the whole hidden layer (T5's wo(dropout(h)) in training), drawn by the op
    hidden_dropout: float = 0.0

    @property
    def pattern(self) -> str:
        return f"{'gated ' if self.gate else ''}{'fused ' if self.fused else ''}{self.activation}"

    @property
    def hidden(self):
        """F, the hidden size (half the fused projection's outputs)."""
        return self.gate.out_features // 2 if self.fused else self.up.out_features
