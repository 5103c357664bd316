"""MLP pass: two-layer MLPs (plain and gated, with or without LoRA) -> spt::mlp_site.

A *projection* is `linear(x, W, b)` or `addmm(b, x, W)` (GPT-2's Conv1D; with its views around it
when PEFT adds a LoRA delta to the Conv1D's output), optionally plus a PEFT LoRA delta
`linear(linear(dropout?(x), A), B) * s`, optionally followed by a no-op `.to(dtype)`.
An MLP is
    plain   out( act(in(x)) )             (views that keep the last dim may sit around act)
    gated   out( act(gate(x)) * in(x) )
where `act` is any chain of element-wise ops on the projection's output (an identity dropout
included, as T5's act -> dropout -> wo in eval or at p = 0); it is identified by
evaluating the chain on probe values and comparing with the known activations (so GPT-2's
mul/pow/tanh/add tanh-GELU is recognised as gelu_tanh). Unknown activations, intermediates used
elsewhere, or shapes that do not fit leave the MLP dense, with the reason in the report.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.fx import GraphModule, Node

from spt_compile.options import Options
from spt_compile.sparse_ops.routed_mlp import ACTIVATIONS, MlpSpec

from .fx_utils import (
    POINTWISE, bind, common_path, erase_unused, is_number, op, requires_grad, same, shape,
    static_int, users_outside, val,
)
from .report import GraphReport, SiteReport

if TYPE_CHECKING:
    from .loss_rows import RowsSource
    from .real_rows import RealRowsSource

MAX_CHAIN = 64  # element-wise nodes an activation may be written with


class Reject(Exception):
    """An MLP that cannot be rewritten safely; the message is the reason shown by explain()."""


@dataclass
class Projection:
    x: Node
    weight: Node
    bias: Optional[Node]
    layout: str  # "oi": x W^T (Linear), "io": x W (Conv1D)
    output: Node  # the unit's last node
    nodes: set[Node] = field(default_factory=set)
    lora_a: Optional[Node] = None
    lora_b: Optional[Node] = None
    scale: float = 1.0
    dropout: float = 0.0

    @property
    def out_features(self):
        s = shape(self.weight)
        return s[0] if self.layout == "oi" else s[1]

    @property
    def in_features(self):
        s = shape(self.weight)
        return s[1] if self.layout == "oi" else s[0]


def _noop_cast(n: Node) -> bool:
    if op(n) not in ("to", "float", "type", "type_as", "contiguous"):
        return False
    a, b = val(n.args[0]), val(n)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device


def _transposed(n: Any) -> Optional[Node]:
    """W when n is a 2-D W transposed: W.T, W.mT, W.t(), W.transpose(0, 1) or W.permute(1, 0)."""
    if not isinstance(n, Node):
        return None
    w = None
    if n.op == "call_function" and n.target is getattr and n.args[1] in ("T", "mT"):
        w = n.args[0]
    elif op(n) == "t" or (n.op == "call_function" and n.target is torch.t):
        w = n.args[0]
    elif op(n) == "transpose":
        a = bind(n)
        dims = (a.get("dim0"), a.get("dim1"))
        if all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}:  # a 2-D W's two dims
            w = a["input"]
    elif op(n) == "permute" and tuple(n.args[1:]) in (((1, 0),), (1, 0)):
        w = n.args[0]
    s = shape(w) if isinstance(w, Node) else None
    return w if s is not None and len(s) == 2 else None


def _base(n: Node) -> Optional[Projection]:
    if op(n) == "matmul":  # x @ W.T, as custom Linear subclasses write it
        a = bind(n)
        w = _transposed(a["other"])
        if w is not None and len(shape(a["input"]) or ()) >= 2:
            return Projection(a["input"], w, None, "oi", n, {n, a["other"]})
    if op(n) == "linear":
        a = bind(n)
        w = shape(a["weight"])
        if w is not None and len(w) == 2:
            return Projection(a["input"], a["weight"], a["bias"], "oi", n, {n})
    if op(n) == "addmm":
        a = bind(n)
        w = shape(a["mat2"])
        if a["beta"] == 1 and a["alpha"] == 1 and w is not None and len(w) == 2 and len(shape(a["input"]) or ()) == 1:
            return Projection(a["mat1"], a["mat2"], a["input"], "io", n, {n})
    return None


def _base_with_bias(n: Node) -> Optional[Projection]:
    """_base(n), or `x @ W.T + b`: a bias-free base projection plus a 1-D bias of its output size."""
    if op(n) != "add":
        return _base(n)
    for base_node, b in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        p = _base(base_node) if isinstance(base_node, Node) else None
        bs = shape(b) if isinstance(b, Node) else None
        if p is not None and p.bias is None and bs is not None and len(bs) == 1 and same(bs[0], p.out_features):
            p.bias, p.output = b, n
            p.nodes.add(n)
            return p
    return None


def _base_viewed(n: Node) -> Optional[Projection]:
    """GPT-2's Conv1D as PEFT wraps it: view(addmm(b, view(x, -1, d), W), [..., out]) is one projection
    of the unflattened x (so that the LoRA branch, which reads x itself, joins it)."""
    if not (_view_keeping_last(n) and op(n.args[0]) == "addmm"):
        return None
    p = _base(n.args[0])
    if p is None or not _view_keeping_last(p.x):
        return None
    x0 = p.x.args[0]
    xs, ns = shape(x0), shape(n)
    if not (xs and ns and len(xs) == len(ns) and all(same(a, b) for a, b in zip(xs[:-1], ns[:-1]))):
        return None
    p.nodes |= {n, p.x}
    p.x, p.output = x0, n
    return p


def _autocast_input_cast(n: Node, linear_out: Node) -> bool:
    """n casts the LoRA input to another dtype (PEFT casts it to lora_A's weight dtype) that the
    linear reading it does not compute in: under autocast the linear recasts it to the autocast
    dtype, which is what the site computes in, so the cast changes nothing the op would not."""
    if op(n) not in ("to", "float", "type"):
        return False
    a, b, o = val(n.args[0]), val(n), val(linear_out)
    return all(isinstance(t, torch.Tensor) for t in (a, b, o)) and b.dtype != o.dtype and a.dtype == o.dtype


def _lora(n: Node, x: Node) -> Optional[tuple[Node, Node, float, float, set[Node]]]:
    """(A, B, scale, dropout p, nodes) if n = linear(linear(dropout?(x), A), B) [* scale]."""
    nodes, scale = set(), 1.0
    if op(n) == "mul":
        for t, s in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if is_number(s) and op(t) == "linear":
                nodes.add(n)
                n, scale = t, float(s)
                break
    if op(n) != "linear" or bind(n)["bias"] is not None:
        return None
    outer = bind(n)
    inner = outer["input"]
    if op(inner) != "linear" or bind(inner)["bias"] is not None:
        return None
    a = bind(inner)
    xin, p = a["input"], 0.0
    nodes |= {n, inner}
    if xin is x:  # no LoRA dropout (x itself may be a dropout, as T5's act -> dropout -> wo)
        return a["weight"], outer["weight"], scale, 0.0, nodes
    if op(xin) == "dropout":
        d = bind(xin)
        if isinstance(d["p"], Node) or isinstance(d["training"], Node):
            return None
        p = float(d["p"]) if d["training"] else 0.0
        nodes.add(xin)
        xin = d["input"]
    while _noop_cast(xin) or _autocast_input_cast(xin, inner):
        nodes.add(xin)
        xin = xin.args[0]
    return (a["weight"], outer["weight"], scale, p, nodes) if xin is x else None


def parse_projection(n: Node) -> Optional[Projection]:
    """The projection unit whose last node is n, or None."""
    out, nodes = n, set()
    if _noop_cast(n):
        nodes.add(n)
        n = n.args[0]
    if op(n) == "add":
        for base_node, delta in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            p = (_base_with_bias(base_node) or _base_viewed(base_node)) if isinstance(base_node, Node) else None
            lora = _lora(delta, p.x) if p is not None and isinstance(delta, Node) else None
            if lora is not None:
                p.lora_a, p.lora_b, p.scale, p.dropout, lora_nodes = lora
                p.nodes |= nodes | lora_nodes | {n}
                p.output = out
                return p
    p = _base_with_bias(n)
    if p is not None:
        p.nodes |= nodes
        p.output = out
    return p


def _view_keeping_last(n: Node) -> bool:
    if op(n) not in ("view", "reshape"):
        return False
    a, b = shape(n.args[0]), shape(n)
    return bool(a and b) and same(a[-1], b[-1])


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
            d = bind(n)
            if isinstance(d["p"], Node) or isinstance(d["training"], Node) or (d["training"] and d["p"] > 0):
                live_dropout.append(n)
            chain.add(n)
            stack.append(d["input"])
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

    @property
    def pattern(self) -> str:
        return f"{'gated ' if self.gate else ''}{'fused ' if self.fused else ''}{self.activation}"

    @property
    def hidden(self):
        """F, the hidden size (half the fused projection's outputs)."""
        return self.gate.out_features // 2 if self.fused else self.up.out_features


def match_mlp(down: Projection, units: dict) -> Optional[MlpMatch]:
    """MLP ending in `down`; None if down's input is not an activated projection; Reject if it is
    one but cannot be rewritten."""
    h, views = down.x, set()
    while _view_keeping_last(h):
        views.add(h)
        h = h.args[0]
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
            if gate.dropout:
                raise Reject("LoRA dropout on a fused gate/up projection: the op would draw each half's mask "
                             "separately (it is exact with lora_dropout=0 or in eval mode)")
            return MlpMatch(gate.x, None, gate, down, activation, nodes | views,
                            fused="gate_up" if g.half == 0 else "up_gate")
        if gate.x is not up.x:
            raise Reject("gate and up projections read different inputs")
    else:
        return None
    return MlpMatch(up.x, up, gate, down, activation, nodes | views)


def check(m: MlpMatch, options: Options) -> None:
    F = m.hidden
    if m.gate is not None and not m.fused and not same(m.gate.out_features, F):
        raise Reject(f"gate ({m.gate.out_features}) and up ({F}) projections differ in size")
    if not same(m.down.in_features, F):
        raise Reject(f"down projection reads {m.down.in_features} features, the hidden layer has {F}")
    F = static_int(F)
    if F is None or F < options.ffn_blocks:
        raise Reject(f"hidden size {F} is smaller than ffn_blocks={options.ffn_blocks}")
    xs, ys = shape(m.x), shape(m.down.output)
    if not (xs and ys and len(xs) == len(ys) and all(same(a, b) for a, b in zip(xs[:-1], ys[:-1]))):
        raise Reject(f"the MLP reshapes tokens between input {xs} and output {ys}")
    dtype = val(m.x).dtype
    for p in filter(None, (m.up, m.gate, m.down)):
        for t in filter(None, (p.weight, p.bias, p.lora_a, p.lora_b)):
            if val(t).dtype != dtype:
                raise Reject(f"'{t.name}' is {val(t).dtype} while the MLP input is {dtype}")
    units = [p for p in (m.up, m.gate, m.down) if p is not None]
    everything = set(m.nodes).union(*(p.nodes for p in units))
    leaking = users_outside(everything, keep=[m.down.output])
    if leaking:
        raise Reject(f"intermediate '{leaking[0].name}' is also used outside the MLP")


def describe(m: MlpMatch) -> str:
    lora = [name for name, p in (("in", m.up), ("gate", m.gate), ("out", m.down)) if p is not None and p.lora_a is not None]
    first = m.up or m.gate
    layout = " Conv1D" if first.layout == "io" else ""
    fused = f" fused gate/up ({m.fused.replace('_', ' then ')})" if m.fused else ""
    return f"x {tuple(shape(m.x))} hidden={m.hidden}{layout}{fused} LoRA={'/'.join(lora) or 'none'}"


def _spec(m: MlpMatch, options: Options) -> MlpSpec:
    g = m.gate
    x_dtype, out_dtype = val(m.x).dtype, val(m.down.output).dtype
    autocast = x_dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float16)
    up = m.up or g  # fused: both halves are the gate projection's
    return MlpSpec(
        activation=m.activation, gated=g is not None, hidden=static_int(m.hidden),
        n_blocks=options.ffn_blocks, in_layout=up.layout, gate_layout=g.layout if g else "oi",
        out_layout=m.down.layout, in_scale=up.scale, gate_scale=g.scale if g else 1.0,
        out_scale=m.down.scale, in_dropout=up.dropout, gate_dropout=g.dropout if g else 0.0,
        out_dropout=m.down.dropout, compute=str(out_dtype).removeprefix("torch.") if autocast else "",
        fused=m.fused,
    )


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


def _slots(p: Optional[Projection]) -> tuple:
    return (None, None, None, None) if p is None else (p.weight, p.bias, p.lora_a, p.lora_b)


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict,
        rows: Optional["RowsSource"] = None, real: Optional["RealRowsSource"] = None,
        seen: Optional[set[Node]] = None) -> None:
    """rows: where the sites get the loss-row mask from (passes/loss_rows.py); real: their real-token
    rows (passes/real_rows.py, after the attention pass ran on this graph); None: no operand.
    seen: collects the nodes of every site rewritten or reported (passes/unmatched.py reads it)."""
    from spt_compile.registry import REGISTRY, SiteTemplate

    graph = gm.graph
    seen = set() if seen is None else seen
    # Projection units, outermost first (a LoRA unit's add/cast comes after its base linear).
    units: dict[Node, Projection] = {}
    claimed: set[Node] = set()
    for n in reversed(list(graph.nodes)):
        if n in claimed:
            continue
        p = parse_projection(n)
        if p is not None:
            units[n] = p
            claimed |= p.nodes
    done: set[Node] = set()
    for out_node in [n for n in graph.nodes if n in units]:
        down = units[out_node]
        if out_node in done or out_node.graph is not graph:
            continue
        try:
            m = match_mlp(down, units)
            if m is None:
                continue
            check(m, options)
        except Reject as why:
            report.sites.append(SiteReport("mlp", "dense", "mlp", common_path([down.output, down.x]), reason=str(why)))
            seen.update(down.nodes, _hidden_layer(down.x, units))
            continue
        units_used = [p for p in (m.up, m.gate, m.down) if p is not None]
        path = common_path([p.output for p in units_used])
        entry = SiteReport("mlp", "rewritten", m.pattern, path,
                           describe(m) + ("" if rows is None else f", {rows.note(m.x)}")
                           + ("" if real is None else f", {real.note(m.x)}"))
        report.sites.append(entry)
        done |= {p.output for p in units_used}
        seen.update(m.nodes, *(p.nodes for p in units_used))
        if not apply:
            continue
        anchor = (m.gate or m.up).weight  # the op finds the layer's site by this tensor at run time
        key = ("mlp", anchor)
        ordinal = ordinals.get(key, 0)
        ordinals[key] = ordinal + 1
        template = REGISTRY.template_id(SiteTemplate("mlp", ordinal, path, options, (static_int((m.up or m.gate).in_features),)))
        args = (m.x, *_slots(m.up), *_slots(m.gate), *_slots(m.down))
        training = torch.is_grad_enabled() and any(requires_grad(a) for a in args if a is not None)
        loss_rows = None if rows is None else rows.for_input(m.x)[0]
        real_rows = None if real is None else real.for_input(m.x)
        with graph.inserting_before(m.down.output):
            call = graph.call_function(torch.ops.spt.mlp_site.default, (
                *args, loss_rows, real_rows, template, _spec(m, options).to_str(), training))
            out = graph.call_function(operator.getitem, (call, 0))
            out.meta.update(m.down.output.meta)
            want = val(m.down.output).dtype
            if want != val(m.x).dtype:  # e.g. autocast: the projections produced a lower precision
                out = graph.call_method("to", (out, want))
                out.meta.update(m.down.output.meta)
        m.down.output.replace_all_uses_with(out)
        everything = set(m.nodes).union(*(p.nodes for p in units_used))
        entry.replaced = [n.name for n in erase_unused(graph, everything)]
