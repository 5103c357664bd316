"""Model float attributes that Dynamo turned into graph inputs, read back as constants.

Under `dynamic=True` (and Dynamo's automatic dynamic shapes) `torch._dynamo.config.specialize_float`
is off, so a Python float stored on a module -- HF attention's `scaling` and `attention_dropout`,
PEFT LoRA's `scaling[adapter]` and `lora_dropout.p`, a norm's `eps` -- reaches the graph as a 0-d
float64 CPU tensor input that the graph reads with `.item()`. The passes need those values as
constants (the attention op takes a constant scale and dropout; the MLP pass folds LoRA's scaling),
so without this every site of such a graph would stay dense.

`specialize` replaces each such read by the value the compiled call was traced with. What makes that
safe is the run-time check in `FloatGuard`: the specialized graph only runs while every one of those
inputs still holds its traced value; a changed value (a user who sets `lora_dropout.p` mid-run) runs
the graph as Dynamo traced it, unchanged and dense, with one warning naming the input.

Only floats read from module attributes (Dynamo's AttrSource / DictGetItemSource) are specialized:
a float passed to forward() as an argument may change every call and is left a graph value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.fx import GraphModule, Node

log = logging.getLogger("spt_compile")

ATTRIBUTE_SOURCES = ("AttrSource", "DictGetItemSource", "GetItemSource")


@dataclass(frozen=True)
class FloatInput:
    index: int  # position among the graph's inputs
    name: str  # the placeholder's name (Dynamo spells out the attribute path)
    value: float


def _is_item(node: Node) -> bool:
    return node.op == "call_method" and node.target == "item"


def _from_attribute(node: Node) -> bool:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    while source is not None:  # a chain such as AttrSource(DictGetItemSource(...)) is still an attribute
        if type(source).__name__ in ATTRIBUTE_SOURCES:
            return True
        source = getattr(source, "base", None)
    return False


def float_inputs(gm: GraphModule, example_inputs: Sequence) -> list[FloatInput]:
    """The graph inputs that are wrapped module floats: 0-d float64 CPU tensors, read only by
    `.item()`, whose source is a module attribute."""
    found = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(example, torch.Tensor) and type(example) is torch.Tensor and example.dim() == 0
                and example.dtype == torch.float64 and example.device.type == "cpu"
                and not example.requires_grad):
            continue
        if not node.users or not all(_is_item(u) for u in node.users) or not _from_attribute(node):
            continue
        found.append(FloatInput(index, node.name, float(example.item())))
    return found


def specialize(gm: GraphModule, floats: list[FloatInput]) -> None:
    """Replace every `.item()` read of those inputs by its value (in place). The placeholders stay,
    so the graph's signature does not change."""
    by_name = {f.name: f.value for f in floats}
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.name not in by_name:
            continue
        value = by_name[node.name]
        for item in list(node.users):
            for user in list(item.users):
                user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is item else a)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is item else a)
            gm.graph.erase_node(item)
    gm.recompile()


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A GraphModule with its own copy of the graph (node meta shared shallowly), same submodules."""
    graph = torch.fx.Graph()
    value, output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value, type_expr=output.type).meta = dict(output.meta)
    copy = GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


class FloatGuard:
    """Runs `specialized` while the float inputs hold their traced values, else `fallback` (the
    graph as traced), warning once per input that changed."""

    def __init__(self, specialized: Callable, fallback: Callable, floats: list[FloatInput]):
        self.specialized, self.fallback, self.floats = specialized, fallback, floats
        self.warned: set[str] = set()

    def changed(self, args) -> list[FloatInput]:
        return [f for f in self.floats if float(args[f.index]) != f.value]

    def __call__(self, *args):
        changed = self.changed(args)
        if not changed:
            return self.specialized(*args)
        for f in changed:
            if f.name not in self.warned:
                self.warned.add(f.name)
                log.warning("spt: %s was %r when the graph was compiled and is %r now; this graph runs as "
                            "traced (dense, not compiled) while it differs. Keep module float attributes "
                            "fixed during training, or set torch._dynamo.config.specialize_float = True so "
                            "that Dynamo recompiles for the new value.", f.name, f.value,
                            float(args[f.index]))
        return self.fallback(*args)
