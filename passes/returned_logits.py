"""Logits returned beside the chunked loss leave the compiled graph outside autograd.

Why: a graph output that requires grad gets a gradient from AOTAutograd on every backward, a
zero-filled [T, V] tensor when the loop differentiates only the loss (Hugging Face returns the
logits, most loops read only `.loss`). For SmolLM2 at 4096 tokens that is 805 MB filled and then
scanned by the chunked op to skip its GEMMs: 0.19 s of a 5.2 s step of 8 layers on this CPU
(benchmarks/research/profile_step.py --config spt --seq 512 --batch 8 --layers 8).

What: where the op's logits go straight to the graph's output and nowhere else, the op returns them
non-differentiable (logits_differentiable=False) and the graph also returns the head's operands
(h, and W, b where they are not graph inputs). `LogitsGradient`, the callable the backend hands
Dynamo, attaches their gradient outside the compiled graph
(sparse_ops/linear_cross_entropy/logits_gradient.py): it runs only when something differentiates
through the logits, and then gives h, W and b what the op's own backward would have.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Node

from spt_compile.sparse_ops.linear_cross_entropy.logits_gradient import attach_logits_gradient

_N_ARGS = 16  # spt::linear_cross_entropy's arguments up to logit_softcap, as passes/loss.py writes them


@dataclass(frozen=True)
class ReturnedLogits:
    positions: tuple[int, ...]  # where the graph's outputs hold the op's logits
    operands: tuple[Optional[tuple[str, int]], ...]  # h, W, b: ("arg", i) graph input i, ("out", j) extra output j; None: no bias
    chunk: int
    factors: tuple[float, float, float]  # logit_mul, logit_div, logit_softcap


def _logits_node(call: Node) -> Optional[Node]:
    got = [u for u in call.users if u.target is operator.getitem and u.args[1] == 1]
    return got[0] if len(got) == 1 else None


def detach_returned_logits(gm: GraphModule) -> tuple[list[ReturnedLogits], int]:
    """Rewrites gm as the module docstring says; returns what LogitsGradient needs and the number of
    outputs gm had before (the extras follow them). ([], n): nothing to do."""
    graph = gm.graph
    out = graph.output_node()
    outputs = out.args[0]
    if not isinstance(outputs, (tuple, list)):
        return [], 1
    n_outputs = len(outputs)
    placeholders = {p: i for i, p in enumerate(graph.find_nodes(op="placeholder"))}
    extras: list[Node] = []
    found = []
    for call in graph.find_nodes(op="call_function", target=torch.ops.spt.linear_cross_entropy.default):
        args = call.args
        if len(args) != _N_ARGS or call.kwargs or not args[8] or not any(args[11]):  # no logits, or no grads
            continue
        logits = _logits_node(call)
        if logits is None or set(logits.users) != {out}:  # also used inside the graph: keep its gradient there
            continue
        operands = []
        for t in args[:3]:
            if t is None:
                operands.append(None)
            elif t in placeholders:
                operands.append(("arg", placeholders[t]))
            else:
                if t not in extras:
                    extras.append(t)
                operands.append(("out", extras.index(t)))
        call.args = (*args, False)  # logits_differentiable=False
        positions = tuple(i for i, o in enumerate(outputs) if o is logits)
        found.append(ReturnedLogits(positions, tuple(operands), int(args[7]), tuple(float(f) for f in args[13:16])))
    if found:
        out.args = (type(outputs)((*outputs, *extras)),)
        graph.lint()
        gm.recompile()
    return found, n_outputs


class LogitsGradient:
    """Calls the compiled graph, drops its extra outputs and attaches the returned logits' gradient."""

    def __init__(self, compiled: Callable, returned: list[ReturnedLogits], n_outputs: int):
        self.compiled, self.returned, self.n_outputs = compiled, returned, n_outputs

    def __call__(self, *args):
        outs = self.compiled(*args)
        extras = outs[self.n_outputs:]
        outs = list(outs[: self.n_outputs])
        for r in self.returned:
            h, W, b = (None if o is None else (args[o[1]] if o[0] == "arg" else extras[o[1]]) for o in r.operands)
            for p in r.positions:
                outs[p] = attach_logits_gradient(outs[p], h, W, b, r.chunk, *r.factors)
        return outs
