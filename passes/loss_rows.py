"""Which token rows carry a loss: a [T] bool operand the MLP sites receive (loss-carrying rows keep
every MLP block in the backward; options.ffn_loss_rows).

The mask depends only on the labels, a graph input, so it is computed once, at the top of the graph:
the nodes that turn the labels into the cross-entropy's target (Hugging Face pads and shifts them,
nanoGPT slices them) are copied there, then `target != ignore_index` is laid out over the LM head's
input rows, which are the rows of every MLP input of the same leading shape. Nothing travels by a
side channel: the operand is in the graph, also into activation-checkpoint bodies (passes/__init__.py).

Found only when the loss is in the graph and its target is computed from graph inputs by the ops
listed in _PURE, and the logits' token slice (if any) drops the last position (the shifted-logits
form). Otherwise `find` says why, and the MLP sites run without it (explain() shows the reason).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .fx_utils import bind, op, same, shape, static_int, val
from .loss import Reject, match

# Ops the labels may pass through on the way to the target (no arithmetic on activations, no state).
_PURE_FUNCTIONS = {F.pad, torch._C._nn.pad, operator.getitem, torch.reshape, torch.flatten, torch.cat, torch.roll, torch.narrow,
                   torch.squeeze, torch.unsqueeze, torch.where, torch.masked_fill}
_PURE_METHODS = {"view", "reshape", "flatten", "contiguous", "to", "long", "int", "clone", "squeeze", "unsqueeze",
                 "narrow", "roll", "masked_fill", "expand", "__getitem__"}


@dataclass
class LossRows:
    """Where the loss reads its labels: the target node, ignore_index, and the LM head input."""

    target: Node  # [T_loss] class indices
    ignore_index: int
    head_input: Node  # h [..., d]: the LM head's input; the target's rows are h's rows (after `index`)
    index: Optional[tuple]  # the token slice applied to the logits, or None
    detail: str  # for explain()


def find(gm: GraphModule) -> Union[LossRows, str]:
    """The loss of this graph whose target comes from graph inputs, or the reason there is none."""
    reason = "no cross_entropy in this graph (the loss is computed outside it: a graph break or per-block compile)"
    for ce in [n for n in gm.graph.nodes if op(n) == "cross_entropy"]:
        try:
            linear, _, index, (ignore, _, _), _ = match(ce)
        except Reject as why:
            reason = f"the loss is not an LM head + cross_entropy the loss pass reads ({why})"
            continue
        target = bind(ce)["target"]
        impure = _impure_ancestor(target)
        if impure is not None:
            reason = f"the loss's target is not computed from graph inputs alone ('{impure.name}')"
            continue
        h = bind(linear)["input"]
        if index is not None and _drops_last(index, shape(h)) is None:
            reason = f"the logits' token slice {index} is not the shifted-logits form (all positions but the last)"
            continue
        return LossRows(target, ignore, h, index, f"labels via '{target.name}' (ignore_index={ignore})")
    return reason


def _impure_ancestor(target: Node) -> Optional[Node]:
    """The first node on the way from graph inputs to target that is not a pure label op, or None."""
    seen, todo = set(), [target]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            continue
        pure = (n.op == "call_function" and n.target in _PURE_FUNCTIONS) or (
            n.op == "call_method" and n.target in _PURE_METHODS)
        if not pure or len(seen) > 64:
            return n
        todo.extend(a for a in n.all_input_nodes)
    return None


def _drops_last(index, h_shape) -> Optional[int]:
    """The dim of h that `index` cuts to all positions but the last (logits[:, :-1]), or None."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index or h_shape is None:
        return None
    cut = [d for d, i in enumerate(index) if i != slice(None, None, None)]
    if len(cut) != 1:
        return None
    d, i = cut[0], index[cut[0]]
    n = static_int(h_shape[d]) if d < len(h_shape) - 1 else None
    if not isinstance(i, slice) or i.step not in (None, 1) or i.start not in (None, 0) or n is None:
        return None
    return d if i.stop in (-1, n - 1) else None


def insert(graph: Graph, found: LossRows) -> Node:
    """Copies the target's computation to the top of `graph` (after the last placeholder) and adds
    the [T] bool loss-row mask over the LM head input's rows; returns its node."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    ancestors, todo = set(), [found.target]
    while todo:
        n = todo.pop()
        if n not in ancestors and n.op != "placeholder":
            ancestors.add(n)
            todo.extend(n.all_input_nodes)
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    copies: dict[Node, Node] = {}
    point = last_input
    for n in sorted(ancestors, key=order.get):
        with graph.inserting_after(point):
            point = copies[n] = graph.node_copy(n, lambda a: copies.get(a, a))
    h_lead = shape(found.head_input)[:-1]
    with graph.inserting_after(point):
        carries = graph.call_function(torch.ne, (copies[found.target], found.ignore_index))
    rows = carries
    if found.index is not None:  # logits[..., :-1, :]: the last position of that dim carries no loss
        d = _drops_last(found.index, shape(found.head_input))
        cut = list(h_lead)
        cut[d] = static_int(cut[d]) - 1
        with graph.inserting_after(rows):
            rows = graph.call_method("view", (rows, tuple(static_int(s) for s in cut)))
        with graph.inserting_after(rows):
            rows = graph.call_function(F.pad, (rows, [0, 0] * (len(h_lead) - 1 - d) + [0, 1]), {"value": False})
    with graph.inserting_after(rows):
        out = graph.call_method("reshape", (rows, -1))
    for n in [*copies.values(), *_between(carries, out)]:  # this pass's own nodes (tests/graph_check.py)
        n.meta["spt_loss_rows"] = True
    example = val(found.target)
    if example is not None:  # for later passes that read shapes
        lead = 1
        for s in h_lead:
            lead = lead * s
        for node in (carries, out):
            node.meta["example_value"] = torch.empty(
                lead if node is out else example.shape, dtype=torch.bool, device=example.device)
    return out


class RowsSource:
    """The loss-row mask of one graph, inserted the first time an MLP site asks for it; inside an
    activation-checkpoint body (`into_body`), a placeholder fed by the outer graph's mask."""

    def __init__(self, graph: Graph, found: Union[LossRows, str], lead: Optional[tuple] = None,
                 outer: Optional["RowsSource"] = None, call: Optional[Node] = None):
        self.graph, self.found, self.outer, self.call = graph, found, outer, call
        self.lead = tuple(shape(found.head_input)[:-1]) if isinstance(found, LossRows) else lead
        self.node: Optional[Node] = None

    @property
    def reason(self) -> str:
        """Why there are no loss rows ("" when there are)."""
        return self.found if isinstance(self.found, str) else ""

    def into_body(self, call: Node, body: GraphModule) -> "RowsSource":
        """The source for the body of a checkpoint call: the mask becomes one more operand of `call`."""
        return RowsSource(body.graph, self.found, self.lead, outer=self, call=call)

    def note(self, x: Node) -> str:
        """What an MLP site with input x gets, for explain() (inserts nothing)."""
        if self.reason:
            return f"no loss rows: {self.reason}"
        if not fits(self.lead, shape(x)):
            return f"no loss rows: the MLP input {tuple(shape(x))} has not the LM head's rows {self.lead}"
        return "loss rows from the labels"

    def for_input(self, x: Node) -> tuple[Optional[Node], str]:
        """(the mask node for an MLP input x, or None; the note for explain())."""
        note = self.note(x)
        if self.reason or not fits(self.lead, shape(x)):
            return None, note
        if self.node is None and self.outer is None:
            self.node = insert(self.graph, self.found)
        elif self.node is None:  # thread the outer mask into the checkpoint body
            outer, _ = self.outer.for_input(x)
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                self.node = self.graph.placeholder("spt_loss_rows")
            self.node.meta.update(outer.meta)
            self.node.meta["spt_loss_rows"] = True
            self.call.args = (*self.call.args, outer)
        return self.node, note


def _between(first: Node, last: Node) -> list[Node]:
    """The nodes from first to last in graph order."""
    out, n = [], first
    while n is not None and n.op != "root":
        out.append(n)
        if n is last:
            break
        n = n.next
    return out


def fits(rows_lead: tuple, x_shape: Optional[tuple]) -> bool:
    """Whether an MLP input x [..., d] has the LM head input's rows (same leading sizes)."""
    if x_shape is None:
        return False
    lead = x_shape[:-1]
    if len(lead) == len(rows_lead):
        return all(same(a, b) for a, b in zip(lead, rows_lead))
    total_a, total_b = 1, 1
    for s in lead:
        total_a = total_a * s
    for s in rows_lead:
        total_b = total_b * s
    return same(total_a, total_b)
