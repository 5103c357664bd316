"""Attention pass: softmax(Q K^T * scale + mask) V, as SDPA calls or written out, -> spt::attention_site.

Forms read (each a small parser below; a new form is a new parser and a test):
  * sdpa            F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                    enable_gqa); GQA through repeat_kv (`x[:, :, None].expand(..).reshape(..)`) or
                    repeat_interleave is unwrapped so the op reads the Hkv-head keys directly.
  * matmul-softmax  matmul(dropout?(cast?(softmax(S, -1))), V) with S built from matmul(Q, K^T),
                    scalar mul/div, additive masks, masked_fill / where with a very negative fill
                    (HF eager attention, BERT, nanoGPT).
Each rewrite is guarded: q/k/v 4-D and consistent, softmax over the key axis, a constant positive
scale, a mask broadcastable to [B, H, N, Nk] that needs no gradient, query length == key length,
head size divisible by pq_subspace_dim, no intermediate used elsewhere. What fails stays dense
and the reason goes to the report.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from spt_compile.options import Options

from .fx_utils import (
    bind, erase_unused, is_number, module_path, op, requires_grad, same, shape,
    static_int, users_outside, val,
)
from .report import GraphReport, SiteReport

FORBIDDING_FILL = -1.0e4  # a masked_fill / where value at or below this removes the key
CASTS = ("to", "float", "type", "type_as")


class Reject(Exception):
    """A candidate that cannot be rewritten safely; the message is the reason shown by explain()."""


@dataclass
class AttentionMatch:
    pattern: str
    output: Node  # the node whose uses the op's output takes over
    q: Node
    k: Node  # [B, Hkv, Nk, D], repeat_kv unwrapped
    v: Node
    is_causal: bool
    scale: float
    dropout_p: float
    additive: Optional[Node] = None  # float mask added to the scores
    allow: Optional[Node] = None  # bool, True = key allowed
    forbid: Optional[Node] = None  # bool, True = key forbidden (masked_fill form)
    nodes: set[Node] = field(default_factory=set)  # what the op replaces
    detail: str = ""


# --- repeat_kv ------------------------------------------------------------------------------------


def unwrap_repeat_kv(node: Node, H) -> tuple[Node, list[Node]]:
    """If `node` repeats kv heads up to H (HF's repeat_kv or repeat_interleave on dim 1), return the
    un-repeated tensor and the repeat nodes; else (node, [])."""
    if op(node) == "reshape" and op(node.args[0]) == "expand" and op(node.args[0].args[0]) == "getitem":
        expand = node.args[0]
        getitem = expand.args[0]
        x, index = getitem.args[0], getitem.args[1]
        full = slice(None, None, None)
        if (isinstance(index, tuple) and len(index) == 5 and index[2] is None
                and all(i == full for i in index[:2] + index[3:])):
            xs, ns = shape(x), shape(node)
            if xs and ns and len(xs) == 4 and len(ns) == 4 and same(xs[0], ns[0]) and same(xs[2], ns[2]) \
                    and same(xs[3], ns[3]) and _divides(xs[1], ns[1]):
                return x, [node, expand, getitem]
    if op(node) == "repeat_interleave":
        a = bind(node)
        xs, ns = shape(a["input"]), shape(node)
        if a.get("dim") in (1, -3) and isinstance(a.get("repeats"), int) and xs and ns and _divides(xs[1], ns[1]):
            return a["input"], [node]
    return node, []


def _divides(small, big) -> bool:
    s, b = static_int(small), static_int(big)
    return s is not None and b is not None and s > 0 and b % s == 0


# --- the forms --------------------------------------------------------------------------------------


def match_sdpa(node: Node) -> AttentionMatch:
    a = bind(node)
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(a[name], Node):
            raise Reject(f"SDPA's {name} is computed in the graph, not a constant")
    H = (shape(a["query"]) or (None, None))[1]
    k, k_rep = (a["key"], []) if a["enable_gqa"] else unwrap_repeat_kv(a["key"], H)
    v, v_rep = (a["value"], []) if a["enable_gqa"] else unwrap_repeat_kv(a["value"], H)
    m = AttentionMatch("sdpa", node, a["query"], k, v, bool(a["is_causal"]),
                       a["scale"], float(a["dropout_p"]), nodes={node, *k_rep, *v_rep})
    mask = a["attn_mask"]
    if mask is not None:
        if not isinstance(mask, Node):
            raise Reject("SDPA's attn_mask is not a tensor")
        if m.is_causal:
            raise Reject("SDPA called with both attn_mask and is_causal")
        if val(mask) is not None and val(mask).dtype == torch.bool:
            m.allow = mask
        else:
            m.additive = mask
    return m


def _transposed_key(node: Node) -> Optional[tuple[Node, Node]]:
    """K if node is K with its last two dims swapped (transpose or permute), with that node."""
    s = shape(node)
    if s is None or len(s) != 4:
        return None
    if op(node) == "transpose":
        a = bind(node)
        if {a["dim0"] % 4, a["dim1"] % 4} == {2, 3}:
            return a["input"], node
    if op(node) == "permute":
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        if [d % 4 for d in dims] == [0, 1, 3, 2]:
            return node.args[0], node
    return None


@dataclass
class _Scores:
    q: Node
    k: Node
    scale: float = 1.0
    additive: list[Node] = field(default_factory=list)
    forbid: list[Node] = field(default_factory=list)
    allow: list[Node] = field(default_factory=list)
    nodes: set[Node] = field(default_factory=set)


def _parse_scores(n) -> Optional[_Scores]:
    """S = matmul(Q, K^T) with scalar scaling, casts and masks applied on top, in any nesting."""
    name = op(n)
    if name == "matmul":
        found = _transposed_key(n.args[1]) if len(n.args) > 1 else None
        if found is None:
            return None
        return _Scores(n.args[0], found[0], nodes={n, found[1]})
    if name in CASTS or name == "contiguous":
        r = _parse_scores(n.args[0])
    elif name in ("mul", "div"):
        r = None
        for x, c in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if is_number(c) and (name == "mul" or x is n.args[0]):
                r = _parse_scores(x)
                if r is not None:
                    if c <= 0:
                        raise Reject(f"scores are scaled by a non-positive constant ({c})")
                    if r.additive:
                        raise Reject("an additive mask is applied before the scaling")
                    r.scale *= c if name == "mul" else 1.0 / c
                break
    elif name == "add":
        r = None
        for x, m in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if isinstance(m, Node) and (r := _parse_scores(x)) is not None:
                r.additive.append(m)
                break
    elif name == "masked_fill":
        a = bind(n)
        r = _parse_scores(a["input"])
        if r is not None:
            if not (is_number(a["value"]) and a["value"] <= FORBIDDING_FILL):
                raise Reject(f"masked_fill with value {a['value']!r} (only very negative fills are masks)")
            r.forbid.append(a["mask"])
    elif name == "where":
        a = bind(n)
        r = _parse_scores(a["input"])
        if r is not None:
            if not (is_number(a["other"]) and a["other"] <= FORBIDDING_FILL):
                raise Reject(f"where(cond, scores, {a['other']!r}) is not a mask")
            r.allow.append(a["condition"])
    else:
        return None
    if r is not None:
        r.nodes.add(n)
    return r


def match_matmul_softmax(node: Node) -> Optional[AttentionMatch]:
    """node = matmul(P, V); None when P is not a softmax (so node is no attention at all)."""
    if op(node) != "matmul" or len(node.args) < 2:
        return None
    p, v = node.args[0], node.args[1]
    nodes = {node}
    dropout_p = 0.0
    for _ in range(3):  # dropout and casts, in either order
        if op(p) == "dropout":
            a = bind(p)
            if isinstance(a["p"], Node) or isinstance(a["training"], Node):
                raise Reject("attention dropout probability is computed in the graph")
            dropout_p = float(a["p"]) if a["training"] else 0.0
        elif op(p) not in CASTS:
            break
        nodes.add(p)
        p = p.args[0]
    if op(p) != "softmax":
        return None
    a = bind(p)
    s = shape(p)
    if s is None or len(s) != 4 or a["dim"] not in (-1, 3):
        raise Reject(f"softmax over dim {a['dim']} of a {len(s) if s else '?'}-D tensor, not over the keys")
    nodes.add(p)
    scores = _parse_scores(a["input"])
    if scores is None:
        raise Reject("softmax input is not recognisable as matmul(Q, K^T) with scaling and masks")
    if len(scores.additive) > 1 or len(scores.forbid) + len(scores.allow) > 1:
        raise Reject("more than one additive mask or more than one boolean mask on the scores")
    H = (shape(scores.q) or (None, None))[1]
    k, k_rep = unwrap_repeat_kv(scores.k, H)
    v0, v_rep = unwrap_repeat_kv(v, H)
    return AttentionMatch(
        "matmul-softmax", node, scores.q, k, v0, is_causal=False, scale=scores.scale, dropout_p=dropout_p,
        additive=scores.additive[0] if scores.additive else None,
        allow=scores.allow[0] if scores.allow else None,
        forbid=scores.forbid[0] if scores.forbid else None,
        nodes=nodes | scores.nodes | set(k_rep) | set(v_rep),
    )


# --- checks and rewrite -------------------------------------------------------------------------------


def check(m: AttentionMatch, options: Options) -> None:
    """The semantic guard; raises Reject with the reason."""
    qs, ks, vs = shape(m.q), shape(m.k), shape(m.v)
    if not (qs and ks and vs and len(qs) == len(ks) == len(vs) == 4):
        raise Reject(f"q/k/v are not 4-D [B, H, N, D] (got {qs}, {ks}, {vs})")
    B, H, N, D = qs
    Hkv, Nk = ks[1], ks[2]
    if not (same(ks[0], B) and same(vs[0], B) and same(ks[3], D) and same(vs[1], Hkv) and same(vs[2], Nk)):
        raise Reject(f"q {qs}, k {ks}, v {vs} do not fit together")
    if not _divides(Hkv, H):
        raise Reject(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if not same(N, Nk):
        raise Reject("query length differs from key length (e.g. decoding with a KV cache); "
                     "sparse selection is for full-sequence training steps")
    d = static_int(D)
    if d is None or d % options.pq_subspace_dim != 0:
        raise Reject(f"head size {D} is not a multiple of pq_subspace_dim={options.pq_subspace_dim}")
    if m.scale is None:
        m.scale = d ** -0.5
    if isinstance(m.scale, torch.SymFloat) or not math.isfinite(float(m.scale)):
        raise Reject("softmax scale is not a finite constant")
    m.scale = float(m.scale)
    for mask, what in ((m.additive, "additive mask"), (m.allow, "boolean mask"), (m.forbid, "boolean mask")):
        if mask is None:
            continue
        ms = shape(mask)
        if ms is None or len(ms) > 4 or len(ms) == 0:
            raise Reject(f"{what} of shape {ms} is not broadcastable to [B, H, N, Nk]")
        ms = (1,) * (4 - len(ms)) + ms
        if not (same(ms[3], Nk) and all(same(x, 1) or same(x, y) for x, y in zip(ms[:3], (B, H, N)))):
            raise Reject(f"{what} of shape {ms} is not broadcastable to [B, H, N, Nk] = {(B, H, N, Nk)}")
        dtype = val(mask).dtype
        if what == "additive mask" and not dtype.is_floating_point:
            raise Reject(f"additive mask has dtype {dtype}")
        if what == "boolean mask" and dtype != torch.bool:
            raise Reject(f"mask condition has dtype {dtype}, not bool")
        if requires_grad(mask):
            raise Reject(f"the {what} requires grad (a learned bias); not supported yet")
    leaking = users_outside(m.nodes, keep=[m.output])
    if leaking:
        raise Reject(f"intermediate '{leaking[0].name}' is also used elsewhere (e.g. attention weights "
                     "returned with output_attentions=True)")


def _as_4d(graph, node: Node) -> Node:
    n = len(shape(node))
    return node if n == 4 else graph.call_function(operator.getitem, (node, (None,) * (4 - n)))


def _mask_argument(graph, m: AttentionMatch) -> Optional[Node]:
    """The op's mask: bool (True = allowed) or additive float, built from the matched pieces."""
    additive = _as_4d(graph, m.additive) if m.additive is not None else None
    allow = _as_4d(graph, m.allow) if m.allow is not None else None
    forbid = _as_4d(graph, m.forbid) if m.forbid is not None else None
    if additive is None:
        return allow if forbid is None else graph.call_function(torch.logical_not, (forbid,))
    if forbid is not None:
        return graph.call_function(torch.masked_fill, (additive, forbid, float("-inf")))
    if allow is not None:
        return graph.call_function(torch.where, (allow, additive, float("-inf")))
    return additive


def describe(m: AttentionMatch) -> str:
    qs, ks = shape(m.q), shape(m.k)
    mask = ("additive" if m.additive is not None else "") + (" bool" if m.allow is not None or m.forbid is not None else "")
    gqa = f" GQA {qs[1]}:{ks[1]}" if qs[1] != ks[1] else ""
    return (f"q {tuple(qs)} k {tuple(ks)}{gqa} causal={m.is_causal} mask={mask.strip() or 'none'} "
            f"scale={m.scale:.4g} dropout={m.dropout_p}")


def anchor_weight(start: Node, depth: int = 16) -> Optional[Node]:
    """The weight of the nearest projection feeding `start` (breadth-first). The op receives it so
    that, at run time, each layer finds its own site by this tensor's identity."""
    frontier, seen = [start], {start}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if op(n) in ("linear", "addmm"):
                w = bind(n)["weight" if op(n) == "linear" else "mat2"]
                if isinstance(w, Node) and w.op in ("placeholder", "get_attr"):
                    return w
            for arg in n.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    nxt.append(arg)
        frontier = nxt
    return None


def _upstream(node: Node, hops: int) -> set[Node]:
    found, frontier = set(), [node]
    for _ in range(hops):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        found.update(frontier)
    return found


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict) -> None:
    from spt_compile.registry import REGISTRY, SiteTemplate

    graph = gm.graph
    softmaxes = {n for n in graph.nodes if op(n) == "softmax" and len(shape(n) or ()) == 4}
    for node in list(graph.nodes):
        if node.graph is not graph:  # erased by an earlier rewrite
            continue
        name = op(node)
        if name not in ("sdpa", "matmul"):
            continue
        pattern = "sdpa" if name == "sdpa" else "matmul-softmax"
        try:
            m = match_sdpa(node) if name == "sdpa" else match_matmul_softmax(node)
            if m is None:
                continue
            softmaxes -= m.nodes
            check(m, options)
        except Reject as why:
            softmaxes -= _upstream(node, 4)  # its softmax is reported here, not again below
            report.sites.append(SiteReport("attention", "dense", pattern, module_path(node), reason=str(why)))
            continue
        path = module_path(node)
        entry = SiteReport("attention", "rewritten", m.pattern, path, describe(m))
        report.sites.append(entry)
        if not apply:
            continue
        anchor = anchor_weight(m.q)
        key = ("attention", anchor if anchor is not None else path)
        ordinal = ordinals.get(key, 0)
        ordinals[key] = ordinal + 1
        shape_kv = (static_int(shape(m.k)[1]), static_int(shape(m.k)[3]))
        template = REGISTRY.template_id(SiteTemplate("attention", ordinal, path, options, shape_kv))
        training = torch.is_grad_enabled() and any(requires_grad(t) for t in (m.q, m.k, m.v))
        with graph.inserting_before(m.output):
            mask = _mask_argument(graph, m)
            call = graph.call_function(torch.ops.spt.attention_site.default, (
                m.q, m.k, m.v, mask, anchor, template, m.is_causal, m.scale, m.dropout_p, training))
            out = graph.call_function(operator.getitem, (call, 0))
            out.meta.update(m.output.meta)
            want = val(m.output).dtype
            if want != val(m.q).dtype:  # e.g. a float32 softmax path without a cast back
                out = graph.call_method("to", (out, want))
                out.meta.update(m.output.meta)
        m.output.replace_all_uses_with(out)
        entry.replaced = [n.name for n in erase_unused(graph, m.nodes)]
    for n in softmaxes:  # a softmax over scores whose way to V was not recognised
        report.sites.append(SiteReport(
            "attention", "dense", "softmax", module_path(n),
            reason="4-D softmax whose path to matmul(P, V) is not a recognised form (casts, dropout)"))
