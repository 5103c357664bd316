"""The scores of a written-out attention: S = Q K^T (matmul, bmm, baddbmm or einsum) with scalar
scaling, casts, views and masks (additive, masked_fill, where) on top, in any nesting, and a soft cap
(Gemma-2's c * tanh(S / c), before any mask), read into _Scores. 3-D products on [B*H, N, D] are
lifted to the [B, H, N, D] tensors they were viewed from when the graph shows it (a [B*H, N, Nk] mask
on them is then read as [B, H, N, Nk]). forms.match_matmul_softmax reads the softmax's input through
_parse_scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from ..fx_utils import bind, constant, graph_scalar, op, same, shape, val
from .match import CASTS, DYNAMIC_FLOATS, FORBIDDING_FILL, Reject


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
    softcap: float = 0.0  # the cap c of c * tanh(S / c), once its multiplication is read
    tanh: bool = False  # tanh(S / c) read, its multiplication by c not yet: nothing else may come between
    unflatten: set[Node] = field(default_factory=set)  # masks [B*H, N, Nk] on lifted 3-D scores: viewed [B, H, ..]

    def closed(self, what: str) -> "_Scores":
        """self, if `what` may apply to it: not between a soft cap's tanh and its multiplication."""
        if self.tanh and not self.softcap:
            raise Reject(f"tanh of the scores followed by {what}, not by the multiplication of a soft cap")
        return self


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
            r.additive = [_checked_mask(r, m) for m in r.additive]  # baddbmm's: BLOOM's ALiBi [B*H, 1, Nk]
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
    elif name == "tanh":  # a soft cap: c * tanh(S / c), read here up to its multiplication
        r = _parse_scores(n.args[0])
        if r is not None:
            if r.tanh:
                raise Reject("the scores pass through tanh twice")
            if r.additive or r.forbid or r.allow:
                raise Reject("tanh of masked scores (a soft cap is applied before the masks)")
            r.tanh = True
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
                if r is not None and r.tanh and not r.softcap:  # c * tanh(S * scale / c'): the soft cap
                    _close_softcap(r, c if name == "mul" else 1.0 / c)
                    r.glue |= {t for t in n.args if graph_scalar(t)}
                    break
                if r is not None:
                    r.closed("another scaling")
                    if c <= 0:
                        raise Reject(f"scores are scaled by a non-positive constant ({c})")
                    if r.additive:
                        raise Reject("an additive mask is applied before the scaling")
                    f = c if name == "mul" else 1.0 / c
                    r.scale *= f
                    r.softcap *= f  # f * c * tanh(scale * S / c) is a cap of f * c at scale * f
                    r.glue |= {t for t in n.args if graph_scalar(t)}
                break
    elif name == "add":
        r = None
        for x, m in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if isinstance(m, Node) and (r := _parse_scores(x)) is not None:
                r.closed("a mask").additive.append(_checked_mask(r, m))
                break
    elif name == "masked_fill":
        a = bind(n)
        r = _parse_scores(a["input"])
        if r is not None:
            r.closed("a mask")
            value = constant(a["value"])
            if not (value is not None and value <= FORBIDDING_FILL):
                raise Reject(f"masked_fill with value {a['value']!r} (only very negative fills are masks)")
            r.forbid.append(_checked_mask(r, _unexpanded(a["mask"], r)))
            if graph_scalar(a["value"]):
                r.glue.add(a["value"])
    elif name == "where":
        a = bind(n)
        r = _parse_scores(a["input"])
        if r is not None:
            r.closed("a mask")
            other = constant(a["other"])
            if not (other is not None and other <= FORBIDDING_FILL):
                raise Reject(f"where(cond, scores, {a['other']!r}) is not a mask")
            r.allow.append(_checked_mask(r, _unexpanded(a["condition"], r)))
            if graph_scalar(a["other"]):
                r.glue.add(a["other"])
    else:
        return None
    if r is not None:
        r.nodes.add(n)
    return r


def _close_softcap(r: _Scores, c: float) -> None:
    """r holds tanh(a * QK^T), a = r.scale (the model's scale and its 1 / cap, folded); the model
    multiplied it by c. That is the op's soft cap c * tanh(scale * QK^T / c) with scale = a * c,
    whatever division fed the tanh."""
    if c <= 0:
        raise Reject(f"tanh of the scores multiplied by a non-positive constant ({c})")
    r.softcap, r.tanh = c, False
    r.scale *= c


def _unexpanded(mask: Node, r: _Scores) -> Node:
    """DistilBERT's `mask.expand_as(scores)`: the unexpanded mask broadcasts the same way, and the
    expand (which reads the scores for their shape) goes with the match."""
    if op(mask) == "expand_as" and mask.args[1] in r.nodes and len(mask.users) == 1:
        r.nodes.add(mask)
        return mask.args[0]
    return mask


def _checked_mask(r: _Scores, m: Node) -> Node:
    """A mask applied while lifted scores are 3-D: broadcast over the merged batch*heads axis, or one
    [B*H, N, Nk] entry per head (DeBERTa's relative attention), which the op reads as [B, H, N, Nk]."""
    if r.lifted and r.rank == 3:
        ms, qs = shape(m), shape(r.q)
        if ms is not None and len(ms) == 3 and qs is not None and len(qs) == 4 and _same_product(ms[0], qs[0], qs[1]):
            r.unflatten.add(m)
        elif ms is None or (len(ms) == 3 and not same(ms[0], 1)):
            raise Reject("a mask on the merged [B*H] axis of scores viewed from [B, H, N, D]")
    return m

