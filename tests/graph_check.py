"""A backend for graph tests: runs the passes, then proves which nodes were replaced and that the
rest of the graph is the same graph (same nodes, same targets, same arguments)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from spt_compile.options import make_options
from spt_compile.passes import GraphReport, rewrite_graph
from spt_compile.passes.float_inputs import float_inputs, specialize

SPT_OPS = {torch.ops.spt.attention_site.default, torch.ops.spt.mlp_site.default,
           torch.ops.spt.linear_cross_entropy.default, torch.ops.spt.dropout.default}


def _signature(parts: tuple, new: set) -> tuple:
    """(op, target, args, kwargs) with nodes named, and `new` nodes all named "<spt>"."""
    op, target, args, kwargs = parts

    def name(a):
        if isinstance(a, Node):
            return "<spt>" if a in new else a.name
        return repr(a)

    return op, str(target), tuple(torch.fx.node.map_aggregate(args, name)), \
        tuple(sorted((k, str(torch.fx.node.map_aggregate(v, name))) for k, v in kwargs.items()))


def _parts(node: Node) -> tuple:
    return node.op, node.target, node.args, dict(node.kwargs)


@dataclass
class GraphCapture:
    options: dict = field(default_factory=dict)
    reports: list[GraphReport] = field(default_factory=list)
    checked: int = 0

    def __call__(self, gm, example_inputs, **_):
        # Module floats Dynamo made graph inputs are read as constants first (tested on its own); the
        # check below is about what the passes replace.
        floats = float_inputs(gm, example_inputs)
        specialize(gm, floats)
        graphs = [gm] + [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]
        before = {g: [(n, _parts(n)) for n in g.graph.nodes] for g in graphs}
        report = rewrite_graph(gm, example_inputs, make_options({"compiler": "eager", **self.options}))
        report.floats = floats
        self.reports.append(report)
        replaced = {name for s in report.sites for name in s.replaced} | set(report.dropouts)
        for g in graphs:
            self._check(g, before[g], replaced)
        return gm.forward

    def _check(self, g, before: list[tuple[Node, tuple]], replaced: set[str]) -> None:
        parts = dict(before)
        before = [n for n, _ in before]
        after = list(g.graph.nodes)
        removed = [n for n in before if n not in set(after)]
        added = [n for n in after if n not in set(before)]
        assert {n.name for n in removed} <= replaced, f"removed but not reported: {set(n.name for n in removed) - replaced}"
        # New nodes are the spt ops, the getitem of their output, and mask / dtype glue only.
        for n in added:
            ok = n.target in SPT_OPS or (n.op == "call_function" and any(a.target in SPT_OPS for a in n.all_input_nodes
                                                                          if isinstance(a, Node)))
            ok = ok or n.meta.get("spt_decomposed")  # a replaced call written out (passes/mha.py)
            ok = ok or n.meta.get("spt_loss_rows")  # the MLP sites' loss-row operand (passes/loss_rows.py)
            ok = ok or n.meta.get("spt_real_rows")  # their real-token rows (passes/real_rows.py)
            ok = ok or n.target in (torch.logical_not, torch.logical_and, torch.logical_or, torch.masked_fill,
                                    torch.where, operator.add) or n.target in ("to", "flatten", "reshape") \
                or n.target.__name__ == "getitem"
            assert ok, f"unexpected new node {n.format_node()}"
        # Every surviving node is unchanged, except that uses of a replaced output now read the op.
        removed_set, added_set = set(removed), set(added)
        for n in after:
            if n in added_set:
                continue
            now = _parts(n)
            if getattr(n.target, "__name__", None) == "tag_activation_checkpoint":  # the loss rows threaded in
                while now[2] and isinstance(now[2][-1], Node) and now[2][-1].meta.get("spt_loss_rows"):
                    now = (now[0], now[1], now[2][:-1], now[3])
            assert _signature(now, added_set) == _signature(parts[n], removed_set), \
                f"node changed: {n.format_node()}"
        self.checked += 1

    @property
    def sites(self):
        return [s for r in self.reports for s in r.sites]

    def rewritten(self, kind=None):
        return [s for r in self.reports for s in r.rewritten(kind)]

    def dense(self, kind=None):
        return [s for r in self.reports for s in r.dense(kind)]
