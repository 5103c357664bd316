"""The rewrite of a checked attention match: the report's description of the site (describe, and a
note when calls will run exact for being short), the weight the op finds its site by at run time
(anchor_weight), the op's one mask built from the matched pieces (_mask_argument), and emit, which
inserts spt::attention_site and erases what it replaced."""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from spt_compile.options import Options

from ..fx_utils import bind, erase_unused, op, requires_grad, shape, static_int, val
from .match import AttentionMatch, _shape4


def _as_4d(graph, node: Node, m: AttentionMatch) -> Node:
    if node in m.unflatten:  # [B*H, N, Nk] -> [B, H, N, Nk]
        return graph.call_function(torch.unflatten, (node, 0, (-1, static_int(_shape4(m.q, m.merged)[1]))))
    n = len(shape(node))
    return node if n == 4 else graph.call_function(operator.getitem, (node, (None,) * (4 - n)))


def _combine(graph, nodes: list[Node], fn, m: AttentionMatch) -> Optional[Node]:
    out = None
    for n in nodes:
        n = _as_4d(graph, n, m)
        out = n if out is None else graph.call_function(fn, (out, n))
    return out


def _mask_argument(graph, m: AttentionMatch) -> Optional[Node]:
    """The op's mask: bool (True = allowed) or additive float, built from the matched pieces
    (several additive masks are summed, several boolean ones combined)."""
    additive = _combine(graph, m.additive, operator.add, m)
    allow = _combine(graph, m.allow, torch.logical_and, m)
    forbid = _combine(graph, m.forbid, torch.logical_or, m)
    if allow is not None and forbid is not None:
        allow = graph.call_function(torch.logical_and, (allow, graph.call_function(torch.logical_not, (forbid,))))
        forbid = None
    if additive is None:
        return allow if forbid is None else graph.call_function(torch.logical_not, (forbid,))
    if forbid is not None:
        return graph.call_function(torch.masked_fill, (additive, forbid, float("-inf")))
    if allow is not None:
        return graph.call_function(torch.where, (allow, additive, float("-inf")))
    return additive


def describe(m: AttentionMatch) -> str:
    qs, ks = _shape4(m.q, m.merged), _shape4(m.k, m.merged)
    mask = ("additive" if m.additive else "") + (" bool" if m.allow or m.forbid else "")
    gqa = f" GQA {qs[1]}:{ks[1]}" if qs[1] != ks[1] else ""
    # Hugging Face passes its causal mask as a bool tensor (SDPA) or an additive one (eager); the site
    # reads one that is exactly the causal triangle as is_causal at run time (sites/attention.py
    # as_causal), which causal=False hides
    article = "an" if mask.strip() == "additive" else "a"
    causal_at_run_time = f" ({article} {mask.strip()} mask that is exactly causal runs as causal)" if (
        not m.is_causal and mask.strip() in ("bool", "additive") and str(qs[2]) == str(ks[2])) else ""  # symbolic too
    return (f"q {tuple(qs)} k {tuple(ks)}{gqa} causal={m.is_causal} mask={mask.strip() or 'none'}{causal_at_run_time} "
            f"scale={m.scale:.4g} dropout={m.dropout_p}" + (f" softcap={m.softcap:.4g}" if m.softcap else "")
            + (" learned bias (its gradient returned)" if m.mask_grad else ""))


def _short_note(m: AttentionMatch, options: Options) -> str:
    """Said when the traced key length makes calls run exact attention whatever density / top_l ask
    (Options.attention_short_reason; report() counts them as exact_short)."""
    n_keys = static_int(_shape4(m.k, m.merged)[2])
    training = torch.is_grad_enabled() and any(requires_grad(t) for t in (m.q, m.k, m.v))
    why = None if n_keys is None else options.attention_short_reason(n_keys, training)
    if why is None:
        return ""
    asked = f"top_l={options.top_l}" if options.top_l is not None else f"density={options.density:.4g}"
    option = why.split("=", 1)[0].split()[-1]  # "below NAME=..." / "within NAME=..."
    return f"; at {n_keys} keys calls run exact attention, not {asked}: {why} (lower {option} to sparsify it)"


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


def emit(graph, m: AttentionMatch, options: Options, path: str, ordinals: dict) -> list[str]:
    """Insert spt::attention_site before m.output, hand it m.output's uses, and erase the matched
    nodes (and the glue nothing else reads); returns the names of the erased nodes."""
    from spt_compile.registry import REGISTRY, SiteTemplate

    anchor = anchor_weight(m.q)
    key = ("attention", anchor if anchor is not None else path)
    ordinal = ordinals.get(key, 0)
    ordinals[key] = ordinal + 1
    k4 = _shape4(m.k, m.merged)
    shape_kv = (static_int(k4[1]), static_int(k4[3]))
    template = REGISTRY.template_id(SiteTemplate("attention", ordinal, path, options, shape_kv))
    training = torch.is_grad_enabled() and any(requires_grad(t) for t in (m.q, m.k, m.v))
    with graph.inserting_before(m.output):
        mask = _mask_argument(graph, m)
        q, k, v = (graph.call_function(operator.getitem, (t, None)) if m.merged else t for t in (m.q, m.k, m.v))
        call = graph.call_function(torch.ops.spt.attention_site.default, (
            q, k, v, mask, anchor, template, m.is_causal, m.scale, m.dropout_p, training, m.softcap, m.mask_grad))
        out = graph.call_function(operator.getitem, (call, 0))
        if len(shape(m.output)) == 3:  # [1, B*H, N, Dv] or [B, H, N, Dv] -> [B*H, N, Dv]
            out = graph.call_method("flatten", (out, 0, 1))
        out.meta.update(m.output.meta)
        want = val(m.output).dtype
        if want != val(m.q).dtype:  # e.g. a float32 softmax path without a cast back
            out = graph.call_method("to", (out, want))
            out.meta.update(m.output.meta)
    m.output.replace_all_uses_with(out)
    return [n.name for n in erase_unused(graph, m.nodes | m.glue)]


def graphed_refusal(m: AttentionMatch, options: Options) -> Optional[str]:
    """Why spt::attention_graphed cannot serve this site (None: it can); the regular op then serves it,
    and CUDA graphs skip the graph that holds it."""
    if options.attention_selection != "block":
        return "token selection keeps PQ codebooks fitted per call"
    if m.dropout_p:
        return "attention dropout draws its masks from per-call seeds"
    if m.softcap:
        return "soft-capped scores run exact calls on the block kernels, which the graphed op does not"
    if m.mask_grad:
        return "a learned bias needs its gradient, which the graphed op does not return"
    if not options.sparse_attention:
        return "sparse_attention is off"
    if not (torch.is_grad_enabled() and any(requires_grad(t) for t in (m.q, m.k, m.v))) and not options.sparse_inference:
        return "an evaluation graph runs exact attention"
    q4, k4 = _shape4(m.q, m.merged), _shape4(m.k, m.merged)
    if any(static_int(d) is None for d in (*q4, *k4)):
        return "dynamic shapes: the block lists' width is fixed when the graph is traced"
    return None


def emit_graphed(graph, m: AttentionMatch, options: Options) -> list[str]:
    """Insert spt::attention_graphed (sites/attention_graphed.py) for m, as emit does the regular op."""
    training = torch.is_grad_enabled() and any(requires_grad(t) for t in (m.q, m.k, m.v))
    with graph.inserting_before(m.output):
        mask = _mask_argument(graph, m)
        q, k, v = (graph.call_function(operator.getitem, (t, None)) if m.merged else t for t in (m.q, m.k, m.v))
        call = graph.call_function(torch.ops.spt.attention_graphed.default, (
            q, k, v, mask, m.is_causal, m.scale, options.attention_block, float(options.density),
            -1 if options.top_l is None else int(options.top_l), int(options.attention_min_keys),
            bool(training and options.exact_forward), options.attention_impl))
        out = graph.call_function(operator.getitem, (call, 0))
        if len(shape(m.output)) == 3:
            out = graph.call_method("flatten", (out, 0, 1))
        out.meta.update(m.output.meta)
        want = val(m.output).dtype
        if want != val(m.q).dtype:
            out = graph.call_method("to", (out, want))
            out.meta.update(m.output.meta)
    m.output.replace_all_uses_with(out)
    return [n.name for n in erase_unused(graph, m.nodes | m.glue)]

