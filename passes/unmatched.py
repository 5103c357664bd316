"""The last sweep over a graph: attention- and MLP-like chains no pass rewrote or reported.

Every candidate the passes parse ends in the report, rewritten or dense with a reason. Two kinds
would otherwise be silently absent: a chain whose form no parser recognises (the parser returns
None, so the pass has nothing to say), and a chain inside a higher-order-op body the passes do not
enter (they enter activation-checkpoint bodies only; a torch.cond branch, an invoke_subgraph region,
an autocast or autograd.Function body stay unread). This sweep reads every graph reachable from the
one the backend received and reports each such chain as dense, with what it saw and why:

  * attention-like: a softmax (or log-softmax, _softmax) over a product (matmul, bmm, baddbmm,
    einsum) of two activations, whose output (through element-wise ops, views, dropout) is one
    operand of a second product; and any attention call (SDPA, aten._scaled_dot_product_*, flash or
    flex attention, nn.MultiheadAttention).
  * MLP-like: a projection (linear, addmm, or a matmul with a 2-D weight) whose input is a chain of
    element-wise ops and views in which a nonlinearity (relu, gelu, silu, tanh, sigmoid, ...) is
    applied to another projection's output (optionally multiplied by a third).
  * mixture of experts: grouped GEMMs over stacked expert weights (torch._grouped_mm, transformers'
    grouped_mm), one report per experts module.

The passes tell the sweep what they looked at (`Seen`): the nodes of every site they rewrote or
left dense with a reason, and the graphs they read. A chain with one of its anchor nodes seen is
already in the report; the sweep adds nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from .fx_utils import POINTWISE, common_path, op, shape
from .report import GraphReport, SiteReport


@dataclass
class Seen:
    """What the passes looked at in one rewrite_graph call."""

    nodes: set[Node] = field(default_factory=set)  # nodes of sites rewritten or reported dense
    graphs: set[GraphModule] = field(default_factory=set)  # graphs the passes read


SOFTMAXES = {"softmax", "_softmax", "log_softmax", "_log_softmax"}
PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum", "mm"}
VIEWS = {"view", "reshape", "contiguous", "transpose", "permute", "flatten", "unflatten", "squeeze", "unsqueeze",
         "expand", "expand_as"}
CASTS = {"to", "float", "half", "bfloat16", "type", "type_as", "double"}
# Element-wise nonlinearities an MLP's hidden layer is built with (x * sigmoid(a x) counts by its sigmoid,
# GPT-2's written-out GELU by its tanh).
NONLINEAR = {"relu", "gelu", "silu", "tanh", "sigmoid", "mish", "softplus", "elu", "selu", "celu", "leaky_relu",
             "hardswish", "hardsigmoid", "hardtanh", "relu6", "erf", "logsigmoid", "softsign", "prelu", "rrelu",
             "threshold", "glu"}
# Element-wise ops an MLP's hidden layer or an attention's scores may be written with: what the
# passes follow (fx_utils.POINTWISE), and more that they do not.
ELEMENTWISE = POINTWISE | NONLINEAR | CASTS | {
    "dropout", "clamp_min", "clamp_max", "square", "exp", "log", "log1p", "expm1", "reciprocal", "sin", "cos",
    "masked_fill", "where", "nan_to_num", "floor_divide", "true_divide", "multiply", "subtract", "addcmul",
    "alpha_dropout", "feature_alpha_dropout", "maximum", "minimum", "fmax", "fmin", "clamp", "clip"}
# A custom torch.autograd.Function applied to one tensor, as Dynamo traces it (BLOOM's GeLUFunction):
# taken as a possible activation, which the MLP pass does not read.
CUSTOM_FUNCTION = "autograd_function_apply"
ATTENTION_CALLS = ("scaled_dot_product", "flash_attn", "flash_attention", "flex_attention",
                   "multi_head_attention_forward")
CHAIN_LIMIT = 64  # nodes a backward walk visits before it gives up


def name(node) -> Optional[str]:
    """op(node), else the called function's or method's own name (in-place underscore dropped;
    an aten overload by its op name)."""
    if not isinstance(node, Node):
        return None
    known = op(node)
    if known is not None:
        return known
    if node.op == "call_method":
        target = node.target
    elif node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            target = t._opname
        elif isinstance(t, torch._ops.OpOverloadPacket):
            target = t._qualified_op_name.split("::")[-1]
        else:
            target = getattr(t, "__name__", None)
            if target is None:
                return None
    else:
        return None
    if target.endswith("_") and not target.startswith("__"):
        target = target[:-1]
    return target


def _attention_call(n: Node) -> bool:
    called = name(n) or ""
    return called in ("sdpa", "mha") or any(key in called for key in ATTENTION_CALLS)


def run(gm: GraphModule, report: GraphReport, seen: Seen) -> None:
    """Adds a dense SiteReport for every attention- or MLP-like chain of gm (and the higher-order-op
    bodies in it) that the passes neither rewrote nor reported."""
    for graph_module, hop in _graphs(gm, seen):
        _Sweep(graph_module, report, seen, hop).run()


def _graphs(gm: GraphModule, seen: Seen, hop: Optional[str] = None, done=None):
    """(graph module, the outermost higher-order op whose body the passes did not enter, or None),
    for gm and every body a call in it uses, each once."""
    done = set() if done is None else done
    if id(gm) in done:
        return
    done.add(id(gm))
    yield gm, hop
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        try:
            body = gm.get_submodule(node.target) if isinstance(node.target, str) else None
        except AttributeError:
            body = None
        if not isinstance(body, GraphModule):
            continue
        user = next((u for u in node.users if u.op == "call_function"), None)
        hop_name = getattr(user.target, "__name__", str(user.target)) if user is not None else "higher-order op"
        inner = hop if hop is not None or body in seen.graphs else hop_name
        yield from _graphs(body, seen, inner, done)


class _Sweep:
    def __init__(self, gm: GraphModule, report: GraphReport, seen: Seen, hop: Optional[str]):
        self.gm, self.report, self.seen, self.hop = gm, report, seen, hop
        self.read = hop is None and gm in seen.graphs  # the passes ran on this graph

    def run(self) -> None:
        nodes = list(self.gm.graph.nodes)
        for n in nodes:
            if _attention_call(n) and n not in self.seen.nodes:
                self._call(n)
        for n in nodes:
            if name(n) in SOFTMAXES and n not in self.seen.nodes:
                self._softmax(n)
        chains: dict[frozenset, list[tuple[Node, "_Hidden"]]] = {}
        for n in nodes:
            if _projection(n) is not None and n not in self.seen.nodes:
                hidden = _hidden(_projection(n))
                if hidden is not None and not (hidden.activations & self.seen.nodes):
                    chains.setdefault(frozenset(hidden.activations), []).append((n, hidden))
        for found in chains.values():
            # several projections may read one hidden layer (a LoRA branch beside the down
            # projection): the report names the widest one
            down, hidden = max(found, key=lambda f: _out_features(f[0]))
            self._mlp(down, hidden)
        experts: dict[str, list[Node]] = {}  # grouped GEMMs by module: one report per experts block
        for n in nodes:
            if _grouped_mm(n) and n not in self.seen.nodes:
                experts.setdefault(common_path([n]), []).append(n)
        for calls in experts.values():
            self._experts(calls)

    # --- reports -----------------------------------------------------------------------------------

    def _add(self, kind: str, pattern: str, nodes: list[Node], what: str, why: str) -> None:
        if self.read:
            pattern, reason = f"unrecognised {pattern}", f"{what}, but {why}"
        else:
            reason = f"{what}, inside a {self.hop or 'higher-order op'} body the passes do not enter"
        self.report.sites.append(SiteReport(kind, "dense", pattern, common_path(nodes), reason=reason))

    def _call(self, n: Node) -> None:
        called = name(n)
        called = {"sdpa": "scaled_dot_product_attention", "mha": "multi_head_attention_forward"}.get(called, called)
        self._add("attention", "attention call", [n], f"'{n.name}' calls {called}",
                  "the attention pass reads F.scaled_dot_product_attention, nn.MultiheadAttention and "
                  "written-out softmax(Q K^T) V only")

    def _softmax(self, s: Node) -> None:
        after = _weights_product(s)
        if after is None or after[0] in self.seen.nodes:
            return
        product, between = after
        scores = _scores_product(s)
        if scores is None:
            return
        first, ops = scores
        what = (f"'{first.name}' ({name(first)} of two activations) -> {name(s)} '{s.name}' -> "
                f"'{product.name}' ({name(product)} with a third) is attention-like")
        if not self.read:
            self._add("attention", "attention-like chain", [first, s, product], what, "")
            return
        odd_scores = sorted({name(x) for x in ops} - _SCORE_OPS)
        odd_weights = sorted({name(x) for x in between} - {"dropout"} - CASTS)
        rank = len(shape(s) or ())
        if name(s) != "softmax":
            why = f"its weights are a {name(s)}, which the attention pass does not read as softmax(QK^T)"
        elif odd_weights:
            why = (f"between the softmax and '{product.name}' the weights pass through {', '.join(odd_weights)} "
                   "(the attention pass reads only dropout and casts there)")
        elif odd_scores:
            why = (f"the scores pass through {', '.join(odd_scores)} (the attention pass reads scalar scaling, "
                   "additive and masked_fill/where masks, casts and views there)")
        elif rank not in (3, 4):
            why = f"the softmax is over {rank}-D scores (the attention pass reads 3-D and 4-D)"
        else:
            why = "the attention pass recognised no form in it (passes/attention/forms.py, match_matmul_softmax)"
        self._add("attention", "attention-like chain", [first, s, product], what, why)

    def _experts(self, calls: list[Node]) -> None:
        called = sorted({_called_name(n) for n in calls})
        what = f"{len(calls)} grouped GEMM call(s) ({', '.join(called)}): a mixture-of-experts block"
        if not self.read:
            self._add("mlp", "mixture of experts", calls, what, "")
            return
        self.report.sites.append(SiteReport(
            "mlp", "dense", "mixture of experts", common_path(calls),
            reason=f"{what}, which routes its tokens to experts itself; the MLP pass rewrites dense MLPs only, so the "
                   "experts run as the model wrote them (a dense shared expert beside them is rewritten)"))

    def _mlp(self, down: Node, hidden: "_Hidden") -> None:
        acts = sorted({name(a) for a in hidden.activations})
        ups = sorted(hidden.activated, key=lambda p: p.name)
        what = (f"{', '.join(repr(p.name) for p in ups)} -> {'/'.join(acts)} -> '{down.name}' is MLP-like "
                "(a projection, an element-wise nonlinearity, a projection)")
        nodes = [*ups, *hidden.activations, down]
        if not self.read:
            self._add("mlp", "mlp-like chain", nodes, what, "")
            return
        followed = POINTWISE | {"dropout", "type_as", "view", "reshape", "getitem"}
        unread = sorted({name(n) for n in hidden.nodes} - followed)
        if CUSTOM_FUNCTION in acts:
            why = ("its activation is a custom torch.autograd.Function: the MLP pass reads torch's element-wise "
                   "ops only (the op would replace the Function's own backward)")
        elif hidden.others:
            o = hidden.others[0]
            why = (f"the hidden layer also reads '{o.name}' {tuple(shape(o) or ())}, which is not a projection "
                   "(the MLP pass reads down(act(up(x))) and down(act(gate(x)) * up(x)) only, e.g. no learned "
                   "scale between the activation and the down projection)")
        elif unread:
            why = f"it is written with {', '.join(unread)}, element-wise ops the MLP pass does not follow"
        elif len({_input(p) for p in hidden.activated | hidden.plain}) > 1:
            why = "its projections read different inputs"
        else:
            why = ("the element-wise chain between the projections is none of the MLP pass's forms "
                   "(plain down(act(up(x))), gated down(act(gate(x)) * up(x)))")
        self._add("mlp", "mlp-like chain", nodes, what, why)


# --- MLP-like chains --------------------------------------------------------------------------------


def _called_name(n: Node) -> str:
    t = n.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t).removesuffix(".default")
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _grouped_mm(n: Node) -> bool:
    """A grouped GEMM over stacked expert weights: torch._grouped_mm, or a library's op of that name
    (transformers' grouped_mm_fallback on CPUs)."""
    return n.op == "call_function" and "grouped_mm" in _called_name(n)


def _weight(n) -> bool:
    """n is a 2-D tensor the graph receives (a parameter), possibly transposed or cast."""
    while isinstance(n, Node) and (name(n) in ("t", "transpose", "permute", "contiguous") or name(n) in CASTS
                                   or (n.op == "call_function" and n.target is getattr and n.args[1] in ("T", "mT"))):
        n = n.args[0]
    return isinstance(n, Node) and n.op in ("placeholder", "get_attr") and len(shape(n) or ()) == 2


def _projection(n: Node) -> Optional[Node]:
    """The activation input of a projection node (linear, addmm, or a matmul/mm with a 2-D weight), else None."""
    called = name(n)
    if called == "linear":
        x = n.args[0] if n.args else n.kwargs.get("input")
    elif called == "addmm":
        x = n.args[1] if len(n.args) > 1 else n.kwargs.get("mat1")
    elif called in ("matmul", "mm") and len(n.args) >= 2:
        a, b = n.args[:2]
        x = a if _weight(b) and not _weight(a) else b if _weight(a) and not _weight(b) else None
    else:
        return None
    return x if isinstance(x, Node) else None


def _input(p: Node) -> Optional[Node]:
    """What a projection reads, through views that keep the last dim."""
    x = _projection(p)
    while isinstance(x, Node) and name(x) in ("view", "reshape", "contiguous"):
        x = x.args[0]
    return x


def _out_features(p: Node) -> int:
    s = shape(p)
    try:
        return int(s[-1]) if s else 0
    except (TypeError, ValueError):  # a symbolic size
        return 0


@dataclass
class _Hidden:
    nodes: set[Node]  # the element-wise ops and views between the projections
    activations: set[Node]  # nonlinearities applied to a projection's output
    activated: set[Node]  # projections under a nonlinearity
    plain: set[Node]  # other projections feeding the hidden layer (a gated MLP's up)
    others: list[Node]  # tensors feeding it that are no projection and no constant


def _elementwise(n: Node) -> bool:
    called = name(n)
    if called in ELEMENTWISE:
        return True
    if called in ("max", "min"):  # max(a, b) against a constant or tensor, not max(a, dim): XGLM clamps its
        # scores with torch.max(w, torch.full((), finfo.min))
        return len(n.args) == 2 and not isinstance(n.args[1], int) and "dim" not in n.kwargs
    if called in ("view", "reshape"):  # views that keep the last dim (tokens flattened or restored)
        a, b = shape(n.args[0]), shape(n)
        return bool(a and b) and str(a[-1]) == str(b[-1])
    return called == "contiguous"


def _split_half(n: Node) -> Optional[Node]:
    """The split tensor, when n is one piece of its chunk/split (a fused gate/up projection)."""
    if name(n) == "getitem" and isinstance(n.args[0], Node) and name(n.args[0]) in ("chunk", "split", "tensor_split"):
        return n.args[0].args[0]
    return None


def _hidden(x: Node) -> Optional[_Hidden]:
    """The element-wise region feeding a projection's input x, when a nonlinearity in it is applied
    to another projection's output; else None."""
    region, leaves, stack = set(), {}, [x]
    while stack:
        n = stack.pop()
        if n in region or n in leaves:
            continue
        if not isinstance(n, Node) or n.op in ("placeholder", "get_attr", "output"):
            leaves[n] = "other"
            continue
        if _projection(n) is not None:
            leaves[n] = "projection"
            continue
        half = _split_half(n)
        if half is not None:
            region.add(n)
            stack.append(half)
            continue
        if name(n) == "getitem" and name(n.args[0]) == CUSTOM_FUNCTION:  # its output: the Function itself
            region.update((n, n.args[0]))
            stack.extend(a for a in n.args[0].all_input_nodes if a.op != "get_attr")
            continue
        if not _elementwise(n):
            leaves[n] = "other"
            continue
        region.add(n)
        if len(region) > CHAIN_LIMIT:
            return None
        stack.extend(n.all_input_nodes)
    projections = {n for n, kind in leaves.items() if kind == "projection"}
    if not projections:
        return None

    def reaches(start: Node) -> set[Node]:
        found, todo, visited = set(), list(start.all_input_nodes), set()
        while todo:
            n = todo.pop()
            if n in visited:
                continue
            visited.add(n)
            if n in projections:
                found.add(n)
            elif n in region:  # a half of a fused projection leads to the projection, past its chunk/split
                half = _split_half(n)
                todo.extend([half] if half is not None else n.all_input_nodes)
        return found

    activations, activated = set(), set()
    for n in region:
        if name(n) in NONLINEAR or name(n) == CUSTOM_FUNCTION:
            under = reaches(n)
            if under:
                activations.add(n)
                activated |= under
    if not activations:
        return None
    others = [n for n, kind in leaves.items()
              if kind == "other" and isinstance(n, Node) and len(shape(n) or ()) > 0 and not _constant_like(n)]
    return _Hidden(region, activations, activated, projections - activated, others)


def _constant_like(n: Node) -> bool:
    """A tensor made in the graph from no input (torch.full, ones, arange): a constant."""
    return n.op == "call_function" and not n.all_input_nodes


# --- attention-like chains ----------------------------------------------------------------------------

# What the attention pass's scores parser follows between Q K^T and the softmax.
_SCORE_OPS = {"mul", "div", "add", "masked_fill", "where", "to", "float", "type", "type_as", "contiguous", "view",
              "reshape", "expand_as", "full", "getitem", "transpose", "permute"}


def _weights_product(s: Node) -> Optional[tuple[Node, list[Node]]]:
    """(the product the softmax's output is an operand of, the ops between), following element-wise
    ops, views and dropout for a few steps; else None."""
    frontier, between = [s], []
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in n.users:
                called = name(u)
                if called in PRODUCTS and u.op in ("call_function", "call_method"):
                    operands = u.args[1:] if called == "einsum" else u.args[:3]
                    if n in operands:
                        return u, between
                if _elementwise(u) or called in VIEWS:
                    between.append(u)
                    nxt.append(u)
        frontier = nxt
    return None


def _scores_product(s: Node) -> Optional[tuple[Node, list[Node]]]:
    """(the product of two activations the softmax's input comes from, the ops between), through
    element-wise ops, masks and views; else None."""
    start = s.args[0] if s.args else s.kwargs.get("input")
    frontier, ops, visited = [start], [], set()
    for _ in range(12):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in visited:
                continue
            visited.add(n)
            called = name(n)
            if called in PRODUCTS:
                operands = [a for a in (n.args[1:] if called == "einsum" else n.args) if isinstance(a, Node)]
                if called == "baddbmm":
                    operands = operands[1:3]
                if len(operands) >= 2 and not any(_weight(a) for a in operands):
                    return n, ops
                continue
            if _elementwise(n) or called in VIEWS:
                ops.append(n)
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None
