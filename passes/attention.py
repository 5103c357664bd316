"""Attention pass: softmax(Q K^T * scale + mask) V, as SDPA calls or written out, -> spt::attention_site.

Forms read (each a small parser below; a new form is a new parser and a test):
  * sdpa            F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                    enable_gqa); GQA through repeat_kv (`x[:, :, None].expand(..).reshape(..)`) or
                    repeat_interleave is unwrapped so the op reads the Hkv-head keys directly.
  * matmul-softmax  matmul(dropout?(cast?(softmax(S, -1))), V) with S built from matmul(Q, K^T),
                    scalar mul/div (also by a 0-d torch.full, or on K^T), additive masks (several
                    are summed), masked_fill / where with a very negative fill, in-place `+=`
                    (HF eager attention, BERT, DistilBERT, T5, old GPT-2, nanoGPT).
  * bmm-softmax     the same on [B*H, N, D] with bmm / baddbmm: read on the [B, H, N, D] tensors
                    the operands were viewed from when the graph shows it (old BART, GPT-2's
                    reorder_and_upcast_attn), else as one batch of B*H heads (Inductor's pattern 13).
  * einsum-softmax  einsum("bhid,bhjd->bhij", Q, K) ... einsum("bhij,bhjd->bhid", P, V), any letters.
  * multihead_attention  nn.MultiheadAttention's F.multi_head_attention_forward call, written out
                    by mha.py as in-projection -> SDPA -> out-projection, then read as sdpa.
tests/attention_forms.py lists every form with the result the tests expect.
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
    bind, constant, erase_unused, module_path, op, requires_grad, same, shape, static_int, users_outside,
    val,
)
from . import mha
from .report import GraphReport, SiteReport

FORBIDDING_FILL = -1.0e4  # a masked_fill / where value at or below this removes the key
CASTS = ("to", "float", "type", "type_as")


# Under dynamic=True Dynamo passes Python floats into the graph as tensors unless
# torch._dynamo.config.specialize_float is set. Module attributes (HF's `self.scaling`,
# `attention_dropout`) are read back as constants before the passes run (float_inputs.py); what is
# left is a float passed to forward() as an argument, or a value computed from tensors.
DYNAMIC_FLOATS = (" (under dynamic=True Dynamo passes a float argument of forward() as a graph value; "
                  "store it as a module attribute, or set torch._dynamo.config.specialize_float = True)")


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
    additive: list[Node] = field(default_factory=list)  # float masks added to the scores (summed)
    allow: list[Node] = field(default_factory=list)  # bool, True = key allowed
    forbid: list[Node] = field(default_factory=list)  # bool, True = key forbidden (masked_fill form)
    nodes: set[Node] = field(default_factory=set)  # what the op replaces
    glue: set[Node] = field(default_factory=set)  # views/casts/constants erased when nothing else reads them
    merged: bool = False  # q/k/v are 3-D [B*H, N, D]: the op sees them as one batch of B*H heads
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
    if same(small, big):  # also symbolic (a merged [B*H] axis under dynamic=True)
        return True
    s, b = static_int(small), static_int(big)
    return s is not None and b is not None and s > 0 and b % s == 0


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


def _transposed_key(node: Node) -> Optional[tuple[Node, set[Node], float]]:
    """(K, nodes, c) if node is c * K with its last two dims swapped (transpose or permute, 3-D or
    4-D; c a constant factor on K^T as in SDPA's math form, else 1)."""
    c, nodes = 1.0, set()
    if op(node) in ("mul", "div") and len(node.users) == 1:
        x, f = node.args[0], constant(node.args[1])
        if f is None and op(node) == "mul":
            x, f = node.args[1], constant(node.args[0])
        if f is not None and f > 0 and isinstance(x, Node):
            c, nodes, node = (f if op(node) == "mul" else 1.0 / f), {node}, x
    s = shape(node)
    if s is None or len(s) not in (3, 4):
        return None
    r = len(s)
    if op(node) == "transpose":
        a = bind(node)
        if {a["dim0"] % r, a["dim1"] % r} == {r - 2, r - 1}:
            return a["input"], nodes | {node}, c
    if op(node) == "permute":
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        if [d % r for d in dims] == list(range(r - 2)) + [r - 1, r - 2]:
            return node.args[0], nodes | {node}, c
    return None


def _merged_from(node: Node) -> Optional[tuple[Node, set[Node]]]:
    """(x4, nodes) if node is x4 [B, H, N, D] viewed as [B*H, N, D] (view/reshape, casts around it)."""
    nodes = set()
    while op(node) in CASTS or op(node) == "contiguous":
        nodes.add(node)
        node = node.args[0]
    if op(node) not in ("view", "reshape"):
        return None
    x, s3 = node.args[0], shape(node)
    s4 = shape(x)
    if s3 and s4 and len(s3) == 3 and len(s4) == 4 and _same_product(s3[0], s4[0], s4[1]) \
            and same(s3[1], s4[2]) and same(s3[2], s4[3]):
        return x, nodes | {node}
    return None


def _same_product(bh, b, h) -> bool:
    try:
        return same(bh, b * h)
    except Exception:  # noqa: BLE001 - sizes that do not multiply are no match
        return False


@dataclass
class _Scores:
    q: Node
    k: Node
    scale: float = 1.0
    additive: list[Node] = field(default_factory=list)
    forbid: list[Node] = field(default_factory=list)
    allow: list[Node] = field(default_factory=list)
    nodes: set[Node] = field(default_factory=set)
    glue: set[Node] = field(default_factory=set)  # views/casts of q/k, erased when nothing else reads them
    rank: int = 4  # of the current scores tensor
    lifted: bool = False  # q/k are the [B, H, N, D] tensors the 3-D products were viewed from


def einsum_roles(node: Node) -> Optional[tuple[str, Node, Node]]:
    """("qk", Q, K) for einsum("..id,..jd->..ij", Q, K) and ("pv", P, V) for einsum("..ij,..jd->..id",
    P, V), with any letters, the same batch letters on every operand, spaces allowed; else None."""
    if op(node) != "einsum" or len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "." in eq or eq.count(",") != 1:
        return None
    (a, b), out = eq.split("->")[0].split(","), eq.split("->")[1]
    if not (len(a) == len(b) == len(out) and len(a) in (3, 4) and a[:-2] == b[:-2] == out[:-2]):
        return None
    batch = set(a[:-2])

    def distinct(*letters):
        return len(batch | set(letters)) == len(batch) + len(letters)

    if b[-1] == a[-1] and out[-2:] == a[-2] + b[-2] and distinct(a[-2], a[-1], b[-2]):  # scores: i d, j d -> i j
        return "qk", node.args[1], node.args[2]
    if b[-2] == a[-1] and out[-2:] == a[-2] + b[-1] and distinct(a[-2], a[-1], b[-1]):  # P V: i j, j d -> i d
        return "pv", node.args[1], node.args[2]
    return None


def _product(n: Node) -> Optional[_Scores]:
    """matmul(Q, K^T), bmm(Q, K^T), or baddbmm(M, Q, K^T, beta, alpha) (M additive; ignored when beta
    is 0). 3-D products on [B*H, N, D] are read on the [B, H, N, D] tensors they were viewed from
    when that is visible in the graph, else as one batch of B*H heads."""
    name = op(n)
    if name == "einsum":  # no transpose: K is read as it is
        roles = einsum_roles(n)
        if roles is None or roles[0] != "qk" or not all(isinstance(t, Node) for t in roles[1:]):
            return None
        return _Scores(roles[1], roles[2], nodes={n}, rank=len(shape(n) or ()))
    if name not in ("matmul", "bmm", "baddbmm"):
        return None
    a = bind(n)
    q, kt = (a["batch1"], a["batch2"]) if name == "baddbmm" else (a["input"], a["other" if name == "matmul" else "mat2"])
    if not isinstance(q, Node) or not isinstance(kt, Node):
        return None
    r = _Scores(q, kt, nodes={n}, rank=len(shape(n) or ()))
    if name == "baddbmm":
        alpha, beta = constant(a["alpha"]), constant(a["beta"])
        if alpha is None or beta not in (0.0, 1.0):
            raise Reject("baddbmm with a computed alpha or a beta other than 0 or 1")
        if alpha <= 0:
            raise Reject(f"scores are scaled by a non-positive constant ({alpha})")
        r.scale = alpha
        if beta == 1.0:
            r.additive.append(a["input"])
    found = _transposed_key(kt)
    if r.rank == 3:
        lq = _merged_from(q)
        lk = _merged_from(found[0]) if found is not None else None
        if lk is None and found is None:  # K^T viewed from a 4-D [B, H, D, N] tensor (GPT-2's reorder form)
            lkt = _merged_from(kt)
            found4 = _transposed_key(lkt[0]) if lkt is not None else None
            if found4 is not None:
                lk = (found4[0], lkt[1] | found4[1])
                found = (kt, set(), found4[2])
        if lq is not None and lk is not None:
            r.q, r.k, r.lifted = lq[0], lk[0], True
            r.glue |= lq[1] | lk[1]
            r.scale *= found[2]
            if found[1]:
                r.nodes |= found[1] - lk[1]
            return r
    if found is None:
        return None
    r.k = found[0]
    r.nodes |= found[1]
    r.scale *= found[2]
    return r


def _parse_scores(n) -> Optional[_Scores]:
    """S = matmul(Q, K^T) with scalar scaling, casts, views and masks applied on top, in any nesting."""
    name = op(n)
    if name in ("matmul", "bmm", "baddbmm", "einsum"):
        return _product(n)
    if name in CASTS or name == "contiguous":
        r = _parse_scores(n.args[0])
    elif name in ("view", "reshape"):  # [B*H, N, Nk] <-> [B, H, N, Nk] on lifted products
        r = _parse_scores(n.args[0])
        if r is not None:
            a, b = shape(n.args[0]), shape(n)
            if not (r.lifted and a and b and sorted((len(a), len(b))) == [3, 4] and same(a[-1], b[-1])
                    and same(a[-2], b[-2])):
                raise Reject(f"scores are reshaped from {a} to {b}")
            r.rank = len(b)
    elif name in ("mul", "div"):
        r = None
        for x, c in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if op(c) == "item" or isinstance(val(c), torch.SymFloat):
                if _parse_scores(x) is not None:
                    raise Reject(f"the scores are scaled by a value computed in the graph{DYNAMIC_FLOATS}")
                continue
            c = constant(c)
            if c is not None and isinstance(x, Node) and (name == "mul" or x is n.args[0]):
                r = _parse_scores(x)
                if r is not None:
                    if c <= 0:
                        raise Reject(f"scores are scaled by a non-positive constant ({c})")
                    if r.additive:
                        raise Reject("an additive mask is applied before the scaling")
                    r.scale *= c if name == "mul" else 1.0 / c
                    r.glue |= {t for t in n.args if op(t) == "full"}
                break
    elif name == "add":
        r = None
        for x, m in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if isinstance(m, Node) and (r := _parse_scores(x)) is not None:
                r.additive.append(_checked_mask(r, m))
                break
    elif name == "masked_fill":
        a = bind(n)
        r = _parse_scores(a["input"])
        if r is not None:
            value = constant(a["value"])
            if not (value is not None and value <= FORBIDDING_FILL):
                raise Reject(f"masked_fill with value {a['value']!r} (only very negative fills are masks)")
            r.forbid.append(_checked_mask(r, _unexpanded(a["mask"], r)))
            if op(a["value"]) == "full":
                r.glue.add(a["value"])
    elif name == "where":
        a = bind(n)
        r = _parse_scores(a["input"])
        if r is not None:
            other = constant(a["other"])
            if not (other is not None and other <= FORBIDDING_FILL):
                raise Reject(f"where(cond, scores, {a['other']!r}) is not a mask")
            r.allow.append(_checked_mask(r, _unexpanded(a["condition"], r)))
            if op(a["other"]) == "full":
                r.glue.add(a["other"])
    else:
        return None
    if r is not None:
        r.nodes.add(n)
    return r


def _unexpanded(mask: Node, r: _Scores) -> Node:
    """DistilBERT's `mask.expand_as(scores)`: the unexpanded mask broadcasts the same way, and the
    expand (which reads the scores for their shape) goes with the match."""
    if op(mask) == "expand_as" and mask.args[1] in r.nodes and len(mask.users) == 1:
        r.nodes.add(mask)
        return mask.args[0]
    return mask


def _checked_mask(r: _Scores, m: Node) -> Node:
    """A mask applied while lifted scores are 3-D must not vary over the merged batch*heads axis."""
    if r.lifted and r.rank == 3:
        ms = shape(m)
        if ms is None or (len(ms) == 3 and not same(ms[0], 1)):
            raise Reject("a mask on the merged [B*H] axis of scores viewed from [B, H, N, D]")
    return m


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
    for _ in range(3):  # dropout and casts, in either order
        if op(p) == "dropout":
            a = bind(p)
            if isinstance(a["p"], Node) or isinstance(a["training"], Node):
                raise Reject(f"attention dropout probability is computed in the graph{DYNAMIC_FLOATS}")
            dropout_p = float(a["p"]) if a["training"] else 0.0
        elif op(p) not in CASTS:
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
        raise Reject("softmax input is not recognisable as a product of Q and K^T with scaling and masks "
                     "(e.g. the scores transformed, as by soft-capping)")
    if scores.rank != len(s):
        raise Reject("softmax is not over the scores' own shape")
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
        additive=scores.additive, allow=scores.allow, forbid=scores.forbid,
        nodes=nodes | scores.nodes | set(k_rep) | set(v_rep), glue=glue, merged=merged,
    )


# --- checks and rewrite -------------------------------------------------------------------------------


def _shape4(node: Node, merged: bool) -> Optional[tuple]:
    s = shape(node)
    return (1, *s) if merged and s is not None and len(s) == 3 else s


def check(m: AttentionMatch, options: Options) -> None:
    """The semantic guard; raises Reject with the reason."""
    qs, ks, vs = (_shape4(t, m.merged) for t in (m.q, m.k, m.v))
    if not (qs and ks and vs and len(qs) == len(ks) == len(vs) == 4):
        raise Reject(f"q/k/v are not 4-D [B, H, N, D] (got {qs}, {ks}, {vs})")
    B, H, N, D = qs
    Hkv, Nk = ks[1], ks[2]
    if not (same(ks[0], B) and same(vs[0], B) and same(ks[3], D) and same(vs[1], Hkv) and same(vs[2], Nk)):
        raise Reject(f"q {qs}, k {ks}, v {vs} do not fit together")
    # q, k, v of different dtypes occur under autocast (HF's RoPE leaves q, k in fp32, v comes from a
    # bf16 linear): the site computes in the narrowest of them, as autocast's dense attention does.
    if not _divides(Hkv, H):
        raise Reject(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if not same(N, Nk):
        raise Reject("query length differs from key length (e.g. decoding with a KV cache); "
                     "sparse selection is for full-sequence training steps")
    d = static_int(D)
    if d is None:
        raise Reject(f"head size {D} is not a constant")
    if m.scale is None:
        m.scale = d ** -0.5
    if isinstance(m.scale, torch.SymFloat) or not math.isfinite(float(m.scale)):
        raise Reject("softmax scale is not a finite constant")
    m.scale = float(m.scale)
    masks = [(x, "additive mask") for x in m.additive] + [(x, "boolean mask") for x in m.allow + m.forbid]
    for mask, what in masks:
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


def _combine(graph, nodes: list[Node], fn) -> Optional[Node]:
    out = None
    for n in nodes:
        n = _as_4d(graph, n)
        out = n if out is None else graph.call_function(fn, (out, n))
    return out


def _mask_argument(graph, m: AttentionMatch) -> Optional[Node]:
    """The op's mask: bool (True = allowed) or additive float, built from the matched pieces
    (several additive masks are summed, several boolean ones combined)."""
    additive = _combine(graph, m.additive, operator.add)
    allow = _combine(graph, m.allow, torch.logical_and)
    forbid = _combine(graph, m.forbid, torch.logical_or)
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
    return (f"q {tuple(qs)} k {tuple(ks)}{gqa} causal={m.is_causal} mask={mask.strip() or 'none'} "
            f"scale={m.scale:.4g} dropout={m.dropout_p}")


def _short_note(m: AttentionMatch, options: Options) -> str:
    """Said when the traced key length is below attention_dense_below: such calls run exact attention
    whatever density / top_l ask (report() counts them as exact_short)."""
    n_keys = static_int(_shape4(m.k, m.merged)[2])
    if n_keys is None or n_keys >= options.attention_dense_below:
        return ""
    asked = f"top_l={options.top_l}" if options.top_l is not None else f"density={options.density:.4g}"
    return (f"; at {n_keys} keys calls run exact attention, not {asked}: below attention_dense_below="
            f"{options.attention_dense_below} (set it lower to sparsify shorter sequences)")


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


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict,
        seen: Optional[set[Node]] = None) -> None:
    """seen: collects the nodes of every site rewritten or reported (passes/unmatched.py reads it)."""
    from spt_compile.registry import REGISTRY, SiteTemplate

    graph = gm.graph
    seen = set() if seen is None else seen
    softmaxes = {n for n in graph.nodes if op(n) == "softmax" and len(shape(n) or ()) == 4}
    products = ("sdpa", "matmul", "bmm", "einsum", "mha")
    for node in list(graph.nodes):
        if node.graph is not graph:  # erased by an earlier rewrite
            continue
        name = op(node)
        if name not in products:
            continue
        pattern = {"sdpa": "sdpa", "mha": "multihead_attention"}.get(name, "matmul-softmax")
        finish = None
        call = node
        try:
            if name == "mha":  # written out as in-projection, SDPA, out-projection; undone unless rewritten
                try:
                    node, finish = mha.decompose(graph, node)
                except mha.MhaReject as why:
                    raise Reject(str(why)) from None
            m = match_sdpa(node) if op(node) == "sdpa" else match_matmul_softmax(node)
            if m is None:
                continue
            softmaxes -= m.nodes
            check(m, options)
        except Reject as why:
            if finish is not None:
                finish(False)
            softmaxes -= _upstream(node, 4)  # its softmax is reported here, not again below
            seen.update({call, node}, _upstream(node, 4))
            report.sites.append(SiteReport("attention", "dense", pattern, module_path(node), reason=str(why)))
            continue
        m.pattern = pattern if finish is not None else m.pattern
        path = module_path(node)
        entry = SiteReport("attention", "rewritten", m.pattern, path, describe(m) + _short_note(m, options))
        report.sites.append(entry)
        seen.update({call, m.output}, m.nodes)
        if not apply:
            if finish is not None:
                finish(False)
            continue
        replaced = finish(True) if finish is not None else []
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
                q, k, v, mask, anchor, template, m.is_causal, m.scale, m.dropout_p, training))
            out = graph.call_function(operator.getitem, (call, 0))
            if len(shape(m.output)) == 3:  # [1, B*H, N, Dv] or [B, H, N, Dv] -> [B*H, N, Dv]
                out = graph.call_method("flatten", (out, 0, 1))
            out.meta.update(m.output.meta)
            want = val(m.output).dtype
            if want != val(m.q).dtype:  # e.g. a float32 softmax path without a cast back
                out = graph.call_method("to", (out, want))
                out.meta.update(m.output.meta)
        m.output.replace_all_uses_with(out)
        entry.replaced = replaced + [n.name for n in erase_unused(graph, m.nodes | m.glue)]
    for n in softmaxes:  # a softmax over scores whose way to V was not recognised
        seen.add(n)
        report.sites.append(SiteReport(
            "attention", "dense", "softmax", module_path(n),
            reason="4-D softmax whose scores or path to V are not a recognised product (matmul, bmm or einsum "
                   "of Q and K^T, of P and V) with casts and dropout between"))
