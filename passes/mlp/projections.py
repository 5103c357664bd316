"""A projection unit, parsed from the node that ends it (parse_projection): `linear(x, W, b)`,
`x @ W.T` (+ b) as Linear subclasses write it, or `addmm(b, x, W)` (GPT-2's Conv1D, with its views
around it when PEFT adds a LoRA delta to the Conv1D's output); optionally plus a PEFT LoRA delta
`linear(linear(dropout?(x), A), B) * s` (_lora), optionally followed by a no-op `.to(dtype)`, or by
the cast back to the base's dtype when the adapters are wider than the base (PEFT keeps them in fp32
on a bf16 model: the delta and the sum in fp32, then `.to(bf16)`; Projection.adapter_dtype).
The MLP's input, gate, up and down projections, and the loss pass's LM head, are each one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Node

from ..fx_utils import bind, is_number, op, same, shape, val


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
    # Set when the LoRA delta runs in a wider dtype than the base projection (fp32 adapters on a bf16
    # model): the site computes it in the base's dtype, as torch.autocast would (passes/mlp/rewrite.py).
    adapter_dtype: Optional[torch.dtype] = None

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


def _adapter_input_cast(n: Node, linear_out: Node) -> bool:
    """n casts the LoRA input to the adapters' wider dtype, which the linear reading it computes in
    (PEFT's fp32 adapters on a bf16 model)."""
    if op(n) not in ("to", "float", "type"):
        return False
    a, b, o = val(n.args[0]), val(n), val(linear_out)
    return (all(isinstance(t, torch.Tensor) for t in (a, b, o)) and b.dtype == o.dtype != a.dtype
            and b.dtype.itemsize > a.dtype.itemsize)


def _cast(n: Node) -> bool:
    return op(n) in ("to", "float", "type", "type_as") or _noop_cast(n)


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
    # casts between x and the adapter's input; x itself may be a no-op cast (Gemma's RMSNorm ends in
    # type_as), which is where the base projection reads it, so the walk stops there
    while xin is not x and (_noop_cast(xin) or _autocast_input_cast(xin, inner) or _adapter_input_cast(xin, inner)):
        nodes.add(xin)
        xin = xin.args[0]
    return (a["weight"], outer["weight"], scale, p, nodes) if xin is x else None


def parse_projection(n: Node) -> Optional[Projection]:
    """The projection unit whose last node is n, or None."""
    out, nodes = n, set()
    if _cast(n):
        if not (isinstance(n.args[0], Node) and len(n.args[0].users) == 1):
            # what the cast reads is used elsewhere too (Gemma 2 / 3 norm the MLP's output: x.float(),
            # then type_as(x)): the unit ends before the cast, which the cast's other readers need
            return None
        nodes.add(n)
        n = n.args[0]
    if op(n) == "add":
        for base_node, delta in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            p = (_base_with_bias(base_node) or _base_viewed(base_node)) if isinstance(base_node, Node) else None
            lora = _lora(delta, p.x) if p is not None and isinstance(delta, Node) else None
            if lora is None:
                continue
            base_dtype, delta_dtype = val(base_node).dtype, val(delta).dtype
            wider = delta_dtype != base_dtype and delta_dtype.itemsize > base_dtype.itemsize
            # the unit's output: a no-op cast at most, or (wider adapters) the cast back to the base's dtype
            back = val(out).dtype == base_dtype and val(out).device == val(base_node).device
            if not (out is n or _noop_cast(out) or (wider and back)):
                continue
            if wider and not back:
                continue  # a sum left in the adapters' dtype: not a form the op computes
            p.lora_a, p.lora_b, p.scale, p.dropout, lora_nodes = lora
            p.adapter_dtype = delta_dtype if wider else None
            p.nodes |= nodes | lora_nodes | {n}
            p.output = out
            return p
    if out is not n and not _noop_cast(out):
        return None
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
