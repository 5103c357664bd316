"""The attention forms, each parsed into an AttentionMatch: SDPA calls (match_sdpa) and softmax(S) V
written out with matmul, bmm or einsum (match_matmul_softmax; the scores S are read by scores.py).
GQA's repeated kv heads (HF's repeat_kv, repeat_interleave) are unwrapped so the op reads the Hkv
heads directly. A parser returns None for a node that is no attention, and raises Reject for one
that is but cannot be read."""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from ..fx_utils import bind, op, same, shape, val
from .match import CASTS, DYNAMIC_FLOATS, AttentionMatch, Reject, _divides
from .scores import _merged_from, _parse_scores, einsum_roles


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


# --- the forms --------------------------------------------------------------------------------------


def match_sdpa(node: Node) -> AttentionMatch:
    a = bind(node)
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(a[name], Node):
            raise Reject(f"SDPA's {name} is computed in the graph, not a constant{DYNAMIC_FLOATS}")
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
            m.allow = [mask]
        else:
            m.additive = [mask]
    return m


def _merges_heads(n: Node) -> bool:
    """n views 4-D weights [B, H, N, Nk] as [B*H, N, Nk] (DeBERTa's bmm with the values)."""
    if op(n) not in ("view", "reshape"):
        return False
    a, b = shape(n.args[0]), shape(n)
    return bool(a and b and len(a) == 4 and len(b) == 3 and same(a[-1], b[-1]) and same(a[-2], b[-2]))


def match_matmul_softmax(node: Node) -> Optional[AttentionMatch]:
    """node = matmul(P, V) or bmm(P, V); None when P is not a softmax (so node is no attention)."""
    if op(node) == "einsum":
        roles = einsum_roles(node)
        if roles is None or roles[0] != "pv":
            return None
        p, v = roles[1], roles[2]
    elif op(node) in ("matmul", "bmm") and len(node.args) >= 2:
        p, v = node.args[0], node.args[1]
    else:
        return None
    nodes = {node}
    dropout_p = 0.0
    for _ in range(4):  # dropout, casts and the weights' view back to [B*H, N, Nk], in any order
        if op(p) == "dropout":
            a = bind(p)
            if isinstance(a["p"], Node) or isinstance(a["training"], Node):
                raise Reject(f"attention dropout probability is computed in the graph{DYNAMIC_FLOATS}")
            dropout_p = float(a["p"]) if a["training"] else 0.0
        elif not (op(p) in CASTS or _merges_heads(p)):
            break
        nodes.add(p)
        p = p.args[0]
    if op(p) != "softmax":
        return None
    a = bind(p)
    s = shape(p)
    if s is None or len(s) not in (3, 4) or a["dim"] not in (-1, len(s) - 1):
        raise Reject(f"softmax over dim {a['dim']} of a {len(s) if s else '?'}-D tensor, not over the keys")
    nodes.add(p)
    scores = _parse_scores(a["input"])
    if scores is None:
        raise Reject("softmax input is not recognisable as a product of Q and K^T with scaling, a soft cap "
                     "and masks (e.g. the scores transformed otherwise)")
    if scores.rank != len(s):
        raise Reject("softmax is not over the scores' own shape")
    scores.closed("the softmax")
    glue = set(scores.glue)
    H = (shape(scores.q) or (None, None))[1]
    if scores.lifted:
        lv = _merged_from(v) if len(shape(v) or ()) == 3 else (v, set())
        if lv is None:
            raise Reject("V is not a view of a [B, H, N, D] tensor while Q and K are")
        v, v_glue = lv
        glue |= v_glue
    merged = len(shape(scores.q) or ()) == 3  # 3-D all the way: one batch of B*H heads
    k, k_rep = unwrap_repeat_kv(scores.k, H) if not merged else (scores.k, [])
    v0, v_rep = unwrap_repeat_kv(v, H) if not merged else (v, [])
    pattern = "einsum-softmax" if op(node) == "einsum" else "bmm-softmax" if merged or scores.lifted else "matmul-softmax"
    return AttentionMatch(
        pattern, node, scores.q, k, v0,
        is_causal=False, scale=scores.scale, dropout_p=dropout_p,
        additive=scores.additive, allow=scores.allow, forbid=scores.forbid, softcap=scores.softcap,
        unflatten=scores.unflatten,
        nodes=nodes | scores.nodes | set(k_rep) | set(v_rep), glue=glue, merged=merged,
    )
