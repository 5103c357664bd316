"""The MLP forms: how the hidden layer joins the projections, read back from the down projection's
input (match_mlp) into an MlpMatch:
    plain   out( act(in(x)) )             (views that keep the last dim may sit around act)
    gated   out( act(gate(x)) * in(x) )   (gate and up also as the two halves of one fused
                                           projection, split by chunk / split)
_trace_chain follows the element-wise ops from a node back to one projection; identify_activation
names the activation they compute by evaluating them on probe values (ACTIVATIONS in
sparse_ops/routed_mlp/spec.py). _hidden_layer is what a rejected candidate covers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from spt_compile.sparse_ops.routed_mlp import ACTIVATIONS

from ..fx_utils import POINTWISE, bind, op, shape, static_int
from .match import MlpMatch, Reject
from .projections import Projection, _view_keeping_last

MAX_CHAIN = 64  # element-wise nodes an activation may be written with


@dataclass
class _Chain:
    leaf: Node  # projection output, or a view of it
    unit: Projection
    nodes: set[Node]  # element-wise nodes (root included)
    views: set[Node]
    half: Optional[int] = None  # leaf is half `half` (0 or 1) of the unit's output, split on its last dim


def _chunk_half(n: Node, units: dict) -> Optional[tuple[Node, int, set[Node]]]:
    """(unit output, half, nodes) when n = chunk(P, 2, dim=-1)[i] or split(P, F, dim=-1)[i] of a
    projection output P [..., 2F]: one half of a fused gate/up projection."""
    if op(n) != "getitem" or not isinstance(n.args[1], int) or n.args[1] not in (0, 1):
        return None
    c = n.args[0]
    if not isinstance(c, Node) or c.args[0] not in units:
        return None
    kind = c.target if c.op == "call_method" else getattr(c.target, "__name__", None)
    if kind not in ("chunk", "split"):
        return None
    size = c.args[1] if len(c.args) > 1 else c.kwargs.get("chunks", c.kwargs.get("split_size_or_sections",
                                                                                  c.kwargs.get("split_size")))
    dim = c.args[2] if len(c.args) > 2 else c.kwargs.get("dim", 0)
    out = shape(c.args[0])
    if out is None or dim not in (-1, len(out) - 1) or static_int(out[-1]) is None or static_int(out[-1]) % 2:
        return None
    if (kind == "chunk" and size != 2) or (kind == "split" and size != static_int(out[-1]) // 2):
        return None
    if any(u.op == "call_function" and op(u) != "getitem" for u in c.users):
        return None
    return c.args[0], n.args[1], {n, c}


def _trace_chain(root: Node, units: dict) -> Optional[_Chain]:
    """Follow element-wise ops back from root to a single projection output (the chain is empty if
    root is one). None if root reaches something else, or more than one projection."""
    chain, views, leaves = set(), set(), set()
    halves: dict[Node, tuple] = {}
    live_dropout: list[Node] = []
    stack = [root]
    while stack:
        n = stack.pop()
        if n in chain or n in leaves:
            continue
        if n in units:
            leaves.add(n)
            continue
        if _view_keeping_last(n) and n.args[0] in units:
            leaves.add(n)
            views.add(n)
            continue
        half = _chunk_half(n, units)
        if half is not None:  # one half of a fused gate/up projection
            leaves.add(n)
            halves[n] = half
            continue
        if op(n) == "dropout":  # T5's DenseReluDense: act -> dropout -> wo
            if _live_dropout(n):
                live_dropout.append(n)
            chain.add(n)
            stack.append(bind(n)["input"])
            continue
        if op(n) not in POINTWISE or len(chain) >= MAX_CHAIN:
            return None
        chain.add(n)
        stack.extend(a for a in n.all_input_nodes)
    if len(leaves) != 1:
        return None
    if live_dropout:
        raise Reject(f"dropout '{live_dropout[0].name}' (p > 0, training) inside the MLP's hidden layer: the "
                     "routed op has none (it is exact in eval mode or with p = 0)")
    leaf = leaves.pop()
    if leaf in halves:
        unit_node, half, split_nodes = halves[leaf]
        return _Chain(leaf, units[unit_node], chain, views | split_nodes, half)
    unit = units[leaf.args[0]] if leaf in views else units[leaf]
    return _Chain(leaf, unit, chain, views)


def _live_dropout(n: Node) -> bool:
    """Whether dropout node n may drop anything (p a graph value, or p > 0 in training)."""
    d = bind(n)
    return isinstance(d["p"], Node) or isinstance(d["training"], Node) or bool(d["training"] and d["p"] > 0)


def identify_activation(chain: _Chain, root: Node) -> str:
    """Evaluate the chain on probe values and name the activation it computes."""
    x = torch.linspace(-8.0, 8.0, 401, dtype=torch.float32)
    env = {chain.leaf: x}
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    for n in sorted(chain.nodes, key=order.get):
        args = torch.fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
        try:
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - an op we cannot replay is an unknown activation
            raise Reject(f"activation could not be evaluated ({type(e).__name__} in '{n.name}')") from None
    y = env[root]
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise Reject("activation does not map a tensor element-wise")
    errors = {name: ((f(x) - y.float()).abs() / (1 + y.float().abs())).max().item() for name, f in ACTIVATIONS.items()}
    best = min(errors, key=errors.get)
    if errors[best] > 1e-3:
        raise Reject(f"activation is not one of {', '.join(ACTIVATIONS)} (closest: {best}, error {errors[best]:.2g})")
    return best


def match_mlp(down: Projection, units: dict) -> Optional[MlpMatch]:
    """MLP ending in `down`; None if down's input is not an activated projection; Reject if it is
    one but cannot be rewritten."""
    h, views, live = down.x, set(), []
    while _view_keeping_last(h) or op(h) == "dropout":
        # a dropout over the whole hidden layer (T5's wo(dropout(act(wi(x)))), ModernBERT's
        # Wo(drop(act(input) * gate))): part of the MLP, the identity when p = 0 or in eval mode; a live
        # one is the op's hidden_dropout (below). It says nothing about other projections' inputs.
        if op(h) == "dropout" and _live_dropout(h):
            live.append(h)
        views.add(h)
        h = h.args[0] if op(h) != "dropout" else bind(h)["input"]
    found = _activated_layer(h, down, units, views)
    if found is not None and live:
        found.hidden_dropout = _hidden_dropout(live)
    return found


def _hidden_dropout(live: list[Node]) -> float:
    """p of the one live dropout over the whole hidden layer, which the op draws itself (seeded, drawn
    again in backward); Reject where it cannot."""
    d = bind(live[0])
    if len(live) > 1:
        raise Reject(f"{len(live)} dropouts over the MLP's hidden layer ('{live[0].name}', '{live[1].name}')")
    if isinstance(d["p"], Node) or isinstance(d["training"], Node):
        raise Reject(f"dropout '{live[0].name}' inside the MLP's hidden layer has p or training computed in the "
                     "graph (a constant is drawn by the op)")
    if d.get("inplace"):
        raise Reject(f"dropout '{live[0].name}' inside the MLP's hidden layer is in place")
    if not 0.0 < float(d["p"]) < 1.0:
        raise Reject(f"dropout '{live[0].name}' inside the MLP's hidden layer has p={d['p']} (0 < p < 1 is drawn)")
    return float(d["p"])


def _activated_layer(h: Node, down: Projection, units: dict, views: set) -> Optional[MlpMatch]:
    """match_mlp for the hidden layer h that `down` reads (through `views`)."""
    chain = _trace_chain(h, units)
    gate = None
    if chain is not None and chain.nodes:
        activation = identify_activation(chain, h)
        up = chain.unit
        nodes = chain.nodes | chain.views
    elif op(h) == "mul" and all(isinstance(a, Node) for a in h.args[:2]):
        sides = [_trace_chain(a, units) for a in h.args[:2]]
        if any(s is None for s in sides):
            return None
        activated = [s for s in sides if s.nodes]
        plain = [s for s in sides if not s.nodes]
        if len(activated) != 1 or len(plain) != 1:
            raise Reject("gated MLP needs exactly one activated branch and one plain branch")
        g, u = activated[0], plain[0]
        activation = identify_activation(g, h.args[sides.index(g)])
        gate, up = g.unit, u.unit
        nodes = g.nodes | g.views | u.views | {h}
        if (g.half is None) != (u.half is None) or (g.half is not None and (gate is not up or g.half == u.half)):
            raise Reject("the gated MLP's two halves come from different splits of a projection")
        if g.half is not None:  # act(W_gu x [.., :F]) * (W_gu x)[.., F:], one fused projection
            if gate.layout != "oi":
                raise Reject("a fused gate/up projection in the Conv1D layout ([in, out] weight)")
            return MlpMatch(gate.x, None, gate, down, activation, nodes | views,
                            fused="gate_up" if g.half == 0 else "up_gate")
        if gate.x is not up.x:
            raise Reject("gate and up projections read different inputs")
    else:
        return None
    return MlpMatch(up.x, up, gate, down, activation, nodes | views)


def _hidden_layer(h: Node, units: dict) -> set[Node]:
    """The element-wise nodes and views between an MLP's projections, read back from the down
    projection's input h (what a rejected candidate covers)."""
    found, stack = set(), [h]
    while stack and len(found) < MAX_CHAIN:
        n = stack.pop()
        if not isinstance(n, Node) or n in found or n in units:
            continue
        if not (op(n) in POINTWISE or op(n) == "dropout" or _view_keeping_last(n) or _chunk_half(n, units)):
            continue
        found.add(n)
        stack.extend(n.all_input_nodes)
    return found
