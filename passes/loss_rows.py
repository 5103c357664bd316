"""Which token rows carry a loss: a [T] bool operand the MLP sites receive (under exact_forward those
rows keep every MLP block in the backward: options.ffn_loss_rows).

The mask depends only on the labels, a graph input. The nodes that turn the labels into the
cross-entropy's target (Hugging Face pads and shifts them, nanoGPT slices them) are copied to the top
of the graph, followed by `target != ignore_index`. Each MLP site then lays that out over its input's
rows, right after the input. Nothing travels by a side channel: the operand is in the graph, and
inside activation-checkpoint bodies it is one more operand of the checkpoint call
(passes/__init__.py).

Two kinds of loss are read:
  * tokens: an LM head and its cross-entropy (passes/loss.py's match, or an LM head with a LoRA
    adapter, which that pass leaves dense: its LoraHead rejection names the head's input). The target's rows are the LM head input's
    rows, or all positions but the last when the logits are sliced that way
    (logits[:, :-1]).
  * pooled: sequence classification on one position, `cross_entropy(head(h[:, p]), labels)` through
    linear layers, activations, dropout and sums of values of that row alone (a LoRA delta on the
    pooler; BERT's pooler and classifier read position 0). Row p of each sequence carries the loss.
    p may also differ per sequence, `head(h)[arange(B), p]` with p computed from the inputs alone
    (LLaMA's classifier reads each sequence's last non-padding token); the [B, N] mask is then made
    at the top of the graph.
Otherwise, or when the target is not computed from graph inputs by the ops in _PURE_*, `find` says
why and the sites run without it (explain() shows the reason).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .fx_utils import bind, op, same, shape, static_int, val
from .loss import LoraHead, Reject, match

# Ops the labels may pass through on the way to the target (no arithmetic on activations, no state).
_PURE_FUNCTIONS = {F.pad, torch._C._nn.pad, operator.getitem, torch.reshape, torch.flatten, torch.cat, torch.roll,
                   torch.narrow, torch.squeeze, torch.unsqueeze, torch.where, torch.masked_fill}
_PURE_METHODS = {"view", "reshape", "flatten", "contiguous", "to", "long", "int", "clone", "squeeze", "unsqueeze",
                 "narrow", "roll", "masked_fill", "expand", "__getitem__"}
# What may compute a per-sequence pooled position from the inputs (Hugging Face's last non-padding
# token: argmax(arange(N) * (input_ids != pad))): the label ops and integer arithmetic, no activations.
_INDEX_FUNCTIONS = _PURE_FUNCTIONS | {operator.ne, operator.eq, operator.mul, operator.add, operator.sub, torch.arange,
                                      torch.ne, torch.eq, torch.argmax, torch.sum, torch.clamp}
_INDEX_METHODS = _PURE_METHODS | {"ne", "eq", "mul", "add", "sub", "argmax", "sum", "clamp", "int", "long"}
# Between a pooled position and the classification loss: what a classification head is made of.
_HEAD_OPS = {"linear", "tanh", "dropout", "gelu", "relu", "silu", "sigmoid", "to", "float", "type", "contiguous",
             "view", "reshape"}
# Elementwise combinations a head may make of values that all come from the pooled position (a LoRA
# delta added to its base projection, scaled by a constant).
_COMBINE_OPS = {"add", "sub", "mul"}


@dataclass
class LossRows:
    """Where the loss reads its labels, and how its rows map onto the MLP inputs' rows."""

    target: Node  # [T_loss] class indices
    ignore_index: int
    kind: str  # "tokens" | "pooled"
    lead: tuple  # tokens: the LM head input's leading sizes; pooled: (B, N) of the pooled tensor
    index: Optional[tuple] = None  # tokens: the logits' token slice, or None
    # pooled: the position each sequence's head reads; a [B] integer node computed from the inputs
    # when it differs per sequence (the last non-padding token)
    position: Union[int, Node] = 0
    detail: str = ""  # for explain()


def find(gm: GraphModule) -> Union[LossRows, str]:
    """The loss of this graph whose target comes from graph inputs, or the reason there is none."""
    reason = "no cross_entropy in this graph (the loss is computed outside it: a graph break or per-block compile)"
    for ce in [n for n in gm.graph.nodes if op(n) == "cross_entropy"]:
        a = bind(ce)
        target, ignore = a["target"], a.get("ignore_index", -100)
        if not isinstance(target, Node) or not isinstance(ignore, int):
            reason = "the loss's target or ignore_index is not a graph value and a constant"
            continue
        impure = _impure_ancestor(target)
        if impure is not None:
            reason = f"the loss's target is not computed from graph inputs alone ('{impure.name}')"
            continue
        try:
            linear, _, index, *_ = match(ce)
            h = bind(linear)["input"]
        except Reject as why:
            pooled = _pooled(a["input"])
            # an LM head with LoRA, which the loss pass leaves dense: its rows are still h's rows
            adapted = (why.h, why.index) if pooled is None and isinstance(why, LoraHead) else None
            if pooled is None and adapted is None:
                reason = f"the loss is neither an LM head + cross_entropy ({why}) nor a classification of one position"
                continue
            if pooled is not None:
                h, position = pooled
                if isinstance(position, Node) and static_int(shape(h)[1]) is None:
                    reason = "the pooled position differs per sequence and the sequence length is dynamic"
                    continue
                return LossRows(target, ignore, "pooled", tuple(shape(h)[:2]), position=position,
                                detail=f"labels via '{target.name}' on {_where(position)} (ignore_index={ignore})")
            h, index = adapted
        pooled = _pooled(h) if index is None else None
        if pooled is not None:  # a classifier head over one position (a linear the loss pass also reads)
            return LossRows(target, ignore, "pooled", tuple(shape(pooled[0])[:2]), position=pooled[1],
                            detail=f"labels via '{target.name}' on {_where(pooled[1])} (ignore_index={ignore})")
        if index is not None and _drops_last(index, shape(h)) is None:
            reason = f"the logits' token slice {index} is not the shifted-logits form (all positions but the last)"
            continue
        return LossRows(target, ignore, "tokens", tuple(shape(h)[:-1]), index=index,
                        detail=f"labels via '{target.name}' (ignore_index={ignore})")
    return reason


def _where(position: Union[int, Node]) -> str:
    """explain()'s name for a pooled position."""
    return f"position {position}" if isinstance(position, int) else f"each sequence's position '{position.name}'"


def _impure_ancestor(target: Node, functions=_PURE_FUNCTIONS, methods=_PURE_METHODS) -> Optional[Node]:
    """The first node on the way from graph inputs to target that is not a pure label op (one of
    `functions` / `methods`), or None."""
    seen, todo = set(), [target]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            continue
        pure = (n.op == "call_function" and n.target in functions) or (n.op == "call_method" and n.target in methods)
        if not pure or len(seen) > 64:
            return n
        todo.extend(a for a in n.all_input_nodes)
    return None


def _pooled(x: Node, depth: int = 24, memo: Optional[dict] = None) -> Optional[tuple[Node, int]]:
    """(h [B, N, d], p) when x, the loss's [B, C] input, is a classification head over h[:, p]. The
    head may combine values elementwise (_COMBINE_OPS) when each tensor operand is itself a head over
    the same h[:, p]: PEFT's LoRA on the pooler adds s * B(A(dropout(t))) to W t, both from t = h[:, p].
    memo: the answers per node so far (operands that share nodes are walked once)."""
    if not isinstance(x, Node) or depth == 0:
        return None
    memo = {} if memo is None else memo
    if x not in memo:
        memo[x] = _pooled_step(x, depth, memo)
    return memo[x]


def _pooled_step(x: Node, depth: int, memo: dict) -> Optional[tuple[Node, int]]:
    """_pooled for one node not yet in memo."""
    if op(x) == "getitem":
        h, index = x.args
        hs = shape(h)
        if (hs and len(hs) == 3 and isinstance(index, tuple) and len(index) >= 2
                and index[0] == slice(None, None, None) and isinstance(index[1], int) and index[1] >= 0
                and all(i == slice(None, None, None) for i in index[2:])):
            return h, index[1]
        at = _per_sequence(h, index)
        return None if at is None else (h, at)
    if op(x) in _COMBINE_OPS:
        operands = [a for a in (*x.args, *x.kwargs.values()) if isinstance(a, Node)]
        found = [_pooled(a, depth - 1, memo) for a in operands]
        if not found or any(f is None or f[0] is not found[0][0] or f[1] != found[0][1] for f in found):
            return None  # some operand reads other rows (or is not a head over one position)
        return found[0]
    if op(x) in ("layer_norm", "rms_norm"):  # over each row's last dim (ModernBERT's head): keeps the rows
        d = bind(x)
        rows_kept = isinstance(d["normalized_shape"], (list, tuple)) and len(d["normalized_shape"]) == 1
        return _pooled(d["input"], depth - 1, memo) if rows_kept else None
    if op(x) not in _HEAD_OPS:
        return None
    return _pooled(bind(x)["input"] if op(x) in ("linear", "dropout") else x.args[0], depth - 1, memo)


def _per_sequence(h: Node, index) -> Optional[Node]:
    """p [B] when index reads h[arange(B), p] (h [B, N, C]), p an integer vector computed from the graph
    inputs alone (a classifier that reads each sequence's last non-padding token); else None."""
    hs = shape(h)
    if not (hs and len(hs) == 3 and isinstance(index, tuple) and len(index) == 2
            and all(isinstance(i, Node) for i in index)):
        return None
    rows, at = index
    if rows.target is not torch.arange or len(rows.args) != 1 or not same(rows.args[0], hs[0]):
        return None
    v = val(at)
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.dtype not in (torch.int64, torch.int32) or \
            _impure_ancestor(at, _INDEX_FUNCTIONS, _INDEX_METHODS) is not None:
        return None
    return at


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


def insert_carries(graph: Graph, found: LossRows) -> Node:
    """Copies the target's computation to the top of `graph` (after the last placeholder), then
    `target != ignore_index`: [T_loss] bool; returns that node."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    per_sequence = isinstance(found.position, Node)
    ancestors, todo = set(), [found.target] + ([found.position] if per_sequence else [])
    while todo:
        n = todo.pop()
        if n not in ancestors and n.op != "placeholder":
            ancestors.add(n)
            todo.extend(n.all_input_nodes)
    point = [n for n in graph.nodes if n.op == "placeholder"][-1]
    copies: dict[Node, Node] = {}
    for n in sorted(ancestors, key=order.get):
        with graph.inserting_after(point):
            point = copies[n] = graph.node_copy(n, lambda a: copies.get(a, a))
    with graph.inserting_after(point):
        carries = graph.call_function(torch.ne, (copies[found.target], found.ignore_index))
    example = val(found.target)
    if example is not None:
        carries.meta["example_value"] = torch.empty_like(example, dtype=torch.bool)  # fake, symbolic sizes kept
    made = [carries]
    if per_sequence:  # [B, N] already here: position p_b of sequence b where its label counts
        labelled, N = carries, static_int(found.lead[1])
        with graph.inserting_after(carries):
            positions = graph.call_function(torch.arange, (N,), {"device": None if example is None else example.device})
        with graph.inserting_after(positions):
            across = graph.call_method("unsqueeze", (positions, 0))  # [1, N]
        with graph.inserting_after(across):
            chosen = graph.call_method("unsqueeze", (copies[found.position], 1))  # [B, 1]
        with graph.inserting_after(chosen):
            at = graph.call_function(operator.eq, (across, chosen))  # [B, N]
        with graph.inserting_after(at):
            counts = graph.call_method("unsqueeze", (labelled, 1))  # [B, 1]
        with graph.inserting_after(counts):
            carries = graph.call_function(operator.and_, (at, counts))
        if example is not None:
            carries.meta["example_value"] = torch.empty(example.shape[0], N, dtype=torch.bool, device=example.device)
        made += [positions, across, chosen, at, counts, carries]
    for n in [*copies.values(), *made]:  # this pass's own nodes (tests/graph_check.py)
        n.meta["spt_loss_rows"] = True
    return carries


def finish(graph: Graph, carries: Node, found: LossRows, x: Node) -> Node:
    """The [T] bool mask over the rows of the MLP input x, built from `carries` right after x (or
    after carries, when x comes first: a placeholder of a checkpoint body)."""
    made = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    start = max(x, carries, key=order.get)

    def add(kind, target, args, kwargs=None):
        with graph.inserting_after(made[-1] if made else start):
            node = (graph.call_method if kind == "method" else graph.call_function)(target, args, kwargs or {})
        made.append(node)
        return node

    if found.kind == "pooled" and isinstance(found.position, Node):  # carries is [B, N] already
        rows = carries
    elif found.kind == "pooled":  # [B, N]: position p of each sequence, where its label counts
        n = add("method", "size", (x, 1))
        device = val(carries).device if isinstance(val(carries), torch.Tensor) else None
        positions = add("function", torch.arange, (n,), {"device": device})
        at = add("function", operator.eq, (positions, found.position))
        rows = add("function", operator.and_, (add("method", "unsqueeze", (at, 0)),
                                               add("method", "unsqueeze", (carries, 1))))
    elif found.index is not None:  # logits[..., :-1, :]: the last position of that dim carries no loss
        d = _drops_last(found.index, found.lead + (None,))
        cut = [static_int(s) for s in found.lead]
        cut[d] -= 1
        view = add("method", "view", (carries, tuple(cut)))
        rows = add("function", F.pad, (view, [0, 0] * (len(found.lead) - 1 - d) + [0, 1]), {"value": False})
    else:
        rows = carries
    out = add("method", "reshape", (rows, -1))
    for node in made:
        node.meta["spt_loss_rows"] = True
    xv = val(x)
    if isinstance(xv, torch.Tensor):
        out.meta["example_value"] = xv.new_empty(xv.shape[:-1], dtype=torch.bool).reshape(-1)
    return out


def fits(found: LossRows, x_shape: Optional[tuple]) -> bool:
    """Whether the mask can be laid over the rows of an MLP input x [..., d]."""
    if x_shape is None:
        return False
    lead = x_shape[:-1]
    if found.kind == "pooled":
        return len(lead) == 2 and all(same(a, b) for a, b in zip(lead, found.lead))
    if len(lead) == len(found.lead):
        return all(same(a, b) for a, b in zip(lead, found.lead))
    total_a, total_b = 1, 1
    for s in lead:
        total_a = total_a * s
    for s in found.lead:
        total_b = total_b * s
    return same(total_a, total_b) and found.index is None


class RowsSource:
    """The loss rows of one graph: `carries` inserted at the top the first time an MLP site asks;
    inside an activation-checkpoint body (`into_body`), a placeholder fed by the outer graph's."""

    def __init__(self, graph: Graph, found: Union[LossRows, str], outer: Optional["RowsSource"] = None,
                 call: Optional[Node] = None):
        self.graph, self.found, self.outer, self.call = graph, found, outer, call
        self.carries: Optional[Node] = None

    @property
    def reason(self) -> str:
        """Why there are no loss rows ("" when there are)."""
        return self.found if isinstance(self.found, str) else ""

    def into_body(self, call: Node, body: GraphModule) -> "RowsSource":
        """The source for the body of a checkpoint call: `carries` becomes one more operand of `call`."""
        return RowsSource(body.graph, self.found, outer=self, call=call)

    def note(self, x: Node) -> str:
        """What an MLP site with input x gets, for explain() (inserts nothing)."""
        if self.reason:
            return f"no loss rows: {self.reason}"
        if not fits(self.found, shape(x)):
            return f"no loss rows: the MLP input {tuple(shape(x) or ())} does not have the loss's rows {self.found.lead}"
        return "loss rows from the labels" + (f" ({_where(self.found.position)})" if self.found.kind == "pooled" else "")

    def reaches(self, x: Node) -> bool:
        """Whether an MLP site with input x gets loss rows."""
        return not self.reason and fits(self.found, shape(x))

    def for_input(self, x: Node) -> tuple[Optional[Node], str]:
        """(the mask node for an MLP input x, or None; the note for explain())."""
        note = self.note(x)
        if not self.reaches(x):
            return None, note
        return finish(self.graph, self._carries(), self.found, x), note

    def _carries(self) -> Node:
        if self.carries is None and self.outer is None:
            self.carries = insert_carries(self.graph, self.found)
        elif self.carries is None:  # thread the outer graph's into the checkpoint body
            outer = self.outer._carries()
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                self.carries = self.graph.placeholder("spt_loss_rows")
            self.carries.meta.update(outer.meta)
            self.call.args = (*self.call.args, outer)
        return self.carries
