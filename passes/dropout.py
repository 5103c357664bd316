"""Dropout pass: a graph's training-mode F.dropout calls on CPU tensors -> spt::dropout
(sparse_ops/dropout.py).

What runs faster is only the mask: F.dropout on a CPU draws one mt19937 number per element
(bernoulli_, about 7 ns an element here) and saves its mask for backward, a byte an element;
spt::dropout draws four 16-bit uniforms from each 64-bit number (about 2 ns an element) and saves
only a seed, its backward drawing the mask again. The distribution is dropout's with p on a grid of
2^-16 (at most 2^-17 from p) and the expected output exact; the masks are not eager's, as
Inductor's are not. In a LoRA model these are the dropouts PEFT puts before each adapter the MLP
sites do not take in (attention's q/k/v/o) and an encoder's hidden dropouts.

Rewritten: `F.dropout(x, p, training=True)` and `torch.dropout(x, p, True)` with a constant p in
(0, 1), no `inplace`, x a floating CPU tensor; inside activation-checkpoint bodies too, since the op
is tagged nondeterministic_seeded: AOTAutograd then saves the CPU RNG state before it and restores
it for the recomputation, which draws the same seed (a checkpointed run equals the plain one; tested).
Each call gets a number of its own as an operand, or AOTAutograd's common-subexpression pass would
merge dropouts of the same tensor (PEFT's q, k and v adapters) into one mask.
Left as they are: a p that is a graph input, `inplace=True`, CUDA tensors (F.dropout's Philox masks
cost little there, and the op's seed comes from the CPU generator, which AOTAutograd would not
restore for a CUDA recomputation). Option `fast_dropout` (default on) switches the pass off; under
Inductor downstream (the default `compiler`) it is off too, since Inductor generates its own masks,
fused into the kernels around them: the pass serves `compiler="aot_eager"` and `"eager"`.
"""

from __future__ import annotations

import operator
from collections.abc import Collection

import torch
from torch.fx import GraphModule

import spt_compile.sparse_ops.dropout  # noqa: F401  (registers spt::dropout)
from spt_compile.options import Options

from .fx_utils import bind, op, val
from .report import GraphReport


def _rewritable(node) -> bool:
    if node.op != "call_function" or op(node) != "dropout":
        return False
    args = bind(node)
    p, x = args.get("p"), val(args.get("input"))
    return (args.get("training") is True and not args.get("inplace", False) and isinstance(p, float)
            and 0.0 < p < 1.0 and isinstance(x, torch.Tensor) and x.is_floating_point()
            and x.device.type == "cpu")


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, skip: Collection = ()) -> None:
    """Rewrites gm's dropouts in place (apply; the caller recompiles) and lists their node names in
    report.dropouts. Runs on each graph the other passes do, checkpoint bodies included; skip: nodes
    a site takes in (explain's graph still has them, see passes/__init__.py)."""
    if not options.fast_dropout or options.downstream_compiler == "inductor":
        return  # Inductor draws dropout masks itself, fused into the kernels around them
    for node in list(gm.graph.nodes):
        if node in skip or not _rewritable(node):
            continue
        report.dropouts.append(node.name)
        if not apply:
            continue
        args = bind(node)
        with gm.graph.inserting_before(node):
            pair = gm.graph.call_function(torch.ops.spt.dropout.default,
                                          (args["input"], float(args["p"]), len(report.dropouts)))
            out = gm.graph.call_function(operator.getitem, (pair, 0))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
