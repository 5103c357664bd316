"""Loss pass: an LM head and its cross-entropy -> spt::linear_cross_entropy (chunked, no [T, V] saved).

Recognised: `cross_entropy(chain(linear(h, W, b)), labels, ignore_index=c, reduction=r, label_smoothing=e)`
where `chain` is any sequence of
    upcasts / no-op casts    .float(), .to(torch.float32), .type(...), .contiguous()
    views keeping the vocab  .view(-1, V), .reshape(...), .flatten(0, 1)
    one token slice          logits[..., :-1, :]  (static shapes; the op reads h[..., :-1, :] instead)
This is what Hugging Face's ForCausalLMLoss traces to (labels padded and shifted on the label side,
logits upcast, `view(-1, V)`, reduction "sum" then `/ num_items_in_batch`, or "mean"), and what
nanoGPT-style loops write. The cross-entropy must be 2-D logits [T, V] with 1-D class indices [T],
constant options and no class weights.

If the linear's output is also used elsewhere (HF returns the logits), the op returns the logits
too and those users read them, so the LM head runs once and the logits' gradient (zeros, when only
the loss is differentiated) joins the chunked backward instead of costing a separate GEMM. The
upcast fp32 copy exists only one chunk at a time. Left dense, with the reason: LoRA on the head,
logit scaling/soft-capping between head and loss, class weights, anything not listed above.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from spt_compile.options import Options
from spt_compile.sparse_ops.linear_cross_entropy import REDUCTIONS, can_precompute

from .fx_utils import bind, common_path, erase_unused, op, requires_grad, same, shape, static_int, val
from .mlp import parse_projection
from .report import GraphReport, SiteReport

_CASTS = ("float", "to", "type", "contiguous")
_VIEWS = ("view", "reshape", "flatten")


# The reason for a loss whose logits are an input of its graph; the backend warns about it (backend.py).
LOGITS_FROM_OUTSIDE = ("the logits are an input of this graph: the LM head ran in another one (a graph break between "
                       "the head and the loss; spt_compile.explain(model, **batch) names it)")


class Reject(Exception):
    """A loss that cannot be rewritten safely; the message is the reason shown by explain()."""


class LoraHead(Reject):
    """The LM head has a LoRA adapter (`lm_head` among PEFT's targets): the chunked loss covers plain
    linear heads only, but the head's rows are still its input's, which the loss-row operand reads
    (h and the logits' token slice, index)."""

    def __init__(self, h: Node, index: Optional[tuple]):
        super().__init__("the LM head has a LoRA adapter (the chunked loss covers plain linear heads)")
        self.h, self.index = h, index


def _cast_ok(n: Node) -> bool:
    """A cast that keeps the shape and device and goes to fp32 or stays in the same dtype."""
    a, b = val(n.args[0]), val(n)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.device == b.device and b.dtype in (torch.float32, a.dtype))


def _slice_ok(index, ndim: int) -> bool:
    """Basic indexing of leading (token) dims only: slices and ints, the vocab dim untouched."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (slice, int)) and i is not Ellipsis for i in index) or isinstance(index[0], bool):
        return False
    for i in index:
        if isinstance(i, slice) and any(isinstance(x, Node) for x in (i.start, i.stop, i.step)):
            return False
    full = slice(None, None, None)
    if Ellipsis in index:
        return index[-1] == full
    return len(index) < ndim or index[-1] == full


def _factor(n: Node) -> Optional[tuple[Node, float, float]]:
    """(logits, mul, div) when n is logits * c, c * logits or logits / c for a constant number c (finite,
    non-zero) in the logits' dtype (Cohere's logit_scale, Granite's logits_scaling); else None."""
    if op(n) not in ("mul", "div") or len(n.args) != 2 or n.kwargs:
        return None
    a, c = n.args
    if op(n) == "mul" and not isinstance(a, Node):
        a, c = c, a
    if not isinstance(a, Node) or isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c == 0:
        return None
    va, vn = val(a), val(n)
    if not (isinstance(va, torch.Tensor) and isinstance(vn, torch.Tensor) and va.dtype == vn.dtype
            and va.shape == vn.shape):
        return None
    return (a, float(c), 1.0) if op(n) == "mul" else (a, 1.0, float(c))


def _added_bias(n: Node) -> Optional[tuple[Node, Node]]:
    """(linear, bias) when n is linear(h, W) + bias, the linear without a bias of its own and `bias` a
    tensor of V values in the logits' dtype broadcast over the rows (BART's final_logits_bias); else None."""
    if op(n) != "add" or len(n.args) != 2 or n.kwargs:
        return None
    for lin, bias in (n.args, n.args[::-1]):
        if isinstance(lin, Node) and op(lin) == "linear" and isinstance(bias, Node) and bind(lin)["bias"] is None:
            vl, vb, vn = val(lin), val(bias), val(n)
            if (isinstance(vl, torch.Tensor) and isinstance(vb, torch.Tensor) and isinstance(vn, torch.Tensor)
                    and vb.dtype == vl.dtype and vn.shape == vl.shape and vb.dim() >= 1
                    and same(vb.shape[-1], vl.shape[-1]) and all(same(s, 1) for s in vb.shape[:-1])):
                return lin, bias
    return None


def _softcap(n: Node) -> Optional[tuple[Node, float, list[Node]]]:
    """(logits, cap, [n, tanh, div]) when n is tanh(logits / cap) * cap, Gemma-2's final soft-capping, with
    the same constant cap in both places; else None."""
    f = _factor(n)
    if f is None or f[1] == 1.0 or op(f[0]) != "tanh" or len(f[0].args) != 1 or f[0].kwargs:
        return None
    inner = _factor(f[0].args[0]) if isinstance(f[0].args[0], Node) else None
    if inner is None or inner[1] != 1.0 or inner[2] != f[1] or f[1] <= 0:
        return None
    return inner[0], f[1], [n, f[0], f[0].args[0]]


def _head_output(n: Node, factor_too: bool = True) -> bool:
    """n is the LM head's output as the op forms it: the linear or its added bias, or (factor_too) a
    factor on either (what soft-capping may read)."""
    if op(n) == "linear" or _added_bias(n) is not None:
        return True
    f = _factor(n) if factor_too else None
    return f is not None and _head_output(f[0], factor_too=False)


def _link(n: Node, index_taken: bool) -> Optional[str]:
    """What kind of chain link n is ("cast", "view", "slice", "factor", "bias", "softcap"), or None."""
    if not isinstance(n, Node) or not n.args:
        return None
    sc = _softcap(n)
    if sc is not None and _head_output(sc[0]):
        return "softcap"
    if _added_bias(n) is not None:
        return "bias"
    f = _factor(n)
    if f is not None and _head_output(f[0], factor_too=False):  # on the head's output, in its dtype, as the op applies it
        return "factor"
    if op(n) in _CASTS and _cast_ok(n):
        return "cast"
    a, b = shape(n.args[0]), shape(n)
    if op(n) in _VIEWS and a and b and same(a[-1], b[-1]):
        return "view"
    if op(n) == "getitem" and not index_taken and a and _slice_ok(n.args[1], len(a)):
        return "slice"
    return None


def _same_value(n: Node) -> bool:
    """n returns its input's value unchanged: contiguous(), or a cast to the dtype it already has."""
    a, b = val(n.args[0]), val(n)
    return (op(n) in _CASTS and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device)


def _walk(start: Node) -> tuple[Node, list[Node], Optional[tuple], list[Node], tuple[float, float, float],
                              Optional[Node]]:
    """From the cross-entropy input back to the linear: (linear node, chain nodes, token index,
    aliases, (mul, div, soft-cap) on the logits, a bias added to a linear without one). A chain node used
    elsewhere too is allowed when it and
    every node from it down to the linear (or to the factor, which the op applies) return that value
    unchanged (OPT returns `lm_head(h).contiguous()` as its logits, Cohere `lm_head(h) * logit_scale`):
    those are the aliases, whose other users the rewrite hands the op's logits."""
    chain, index, n, shared, factor, bias, cap = [], None, start, [], None, None, 0.0
    internal: list[Node] = []  # soft-capping's tanh and division: values the op never hands out
    while op(n) != "linear":
        kind = _link(n, index is not None)
        if kind is None:
            p = parse_projection(n) if isinstance(n, Node) else None
            if p is not None and p.lora_a is not None:
                raise LoraHead(p.x, index)
            if isinstance(n, Node) and n.op == "placeholder":
                raise Reject(LOGITS_FROM_OUTSIDE)
            raise Reject(f"the loss input is not a linear layer's output through casts, views and a token "
                         f"slice (found '{getattr(n, 'name', n)}')")
        if kind == "factor":
            pred, *factor = _factor(n)
        if kind == "bias":
            pred, bias = _added_bias(n)
        if kind == "softcap":
            pred, cap, nodes = _softcap(n)
            if len(n.users) != 1:
                shared.append(n)
            chain += nodes
            internal += nodes[1:]
            n = pred
            continue
        if len(n.users) != 1:
            shared.append(n)
        if kind == "slice":
            index = n.args[1]
        chain.append(n)
        n = pred if kind in ("factor", "bias") else n.args[0]
    used = [m for m in internal if len(m.users) != 1]
    if used:
        raise Reject(f"'{used[0].name}' inside the logits' soft-capping is also used elsewhere")
    if shared:
        tail = [c for c in chain[chain.index(shared[0]):] if c not in internal]  # down to the linear (or factor)
        if not all(_same_value(c) or _factor(c) is not None or _added_bias(c) is not None or _softcap(c) is not None
                   for c in tail):
            raise Reject(f"'{shared[0].name}' between the LM head and the loss is also used elsewhere")
    return n, chain, index, shared, (*(factor or (1.0, 1.0)), cap), bias


def _const(args: dict, name: str):
    v = args.get(name)
    if isinstance(v, Node):
        raise Reject(f"cross_entropy's {name} is not a constant")
    return v


def _autocast(h, W, b, linear) -> bool:
    """The head ran under autocast: fp32 operands, a half-precision product. The op then gets its
    operands cast to that dtype, which is what autocast does to the dense linear."""
    low = val(linear).dtype
    return low in (torch.bfloat16, torch.float16) and all(
        val(t).dtype in (low, torch.float32) for t in (h, W, b) if t is not None)


def match(ce: Node):
    """(linear, chain, index, options) for a cross_entropy node, or Reject."""
    a = bind(ce)
    x, target = a["input"], a["target"]
    if a.get("weight") is not None:
        raise Reject("cross_entropy has class weights")
    if _const(a, "size_average") is not None or _const(a, "reduce") is not None:
        raise Reject("cross_entropy uses the deprecated size_average/reduce arguments")
    reduction, ignore, eps = _const(a, "reduction"), _const(a, "ignore_index"), _const(a, "label_smoothing")
    if reduction not in REDUCTIONS or not isinstance(ignore, int) or not isinstance(eps, (int, float)):
        raise Reject(f"cross_entropy options not understood (reduction={reduction!r}, ignore_index={ignore!r})")
    xs, ts = shape(x), shape(target)
    if not xs or len(xs) != 2 or not ts or len(ts) != 1 or not isinstance(target, Node):
        raise Reject(f"cross_entropy of logits {xs} and target {ts}: needs [T, V] logits and [T] class indices")
    if val(target).dtype not in (torch.int64, torch.int32):
        raise Reject(f"cross_entropy target is {val(target).dtype}, not class indices")
    linear, chain, index, aliases, factor, added = _walk(x)
    la = bind(linear)
    h, W, b = la["input"], la["weight"], la["bias"] if added is None else added
    ws = shape(W)
    if not ws or len(ws) != 2 or not same(ws[0], xs[1]):
        raise Reject(f"LM head weight {ws} does not produce the {xs[1]} classes of the loss")
    dtypes = {val(t).dtype for t in (h, W, b, linear) if t is not None}
    if len(dtypes) != 1 and not _autocast(h, W, b, linear):
        raise Reject(f"LM head mixes dtypes {sorted(map(str, dtypes))}")
    others = [u for t in (linear, *aliases) for u in t.users if u not in chain]
    if index is not None:
        hs = [static_int(s) for s in shape(h)]
        if None in hs:
            raise Reject("logits are sliced before the loss under dynamic shapes")
        if others:
            raise Reject("logits are sliced before the loss and also used elsewhere")
        if torch.empty(hs, device="meta")[index].shape[:-1] != tuple(shape(chain[-1])[:-1]):
            raise Reject(f"token slice {index} does not map onto the LM head input")
    if (factor != (1.0, 1.0, 0.0) or added is not None) and linear.users.keys() - set(chain):
        raise Reject("the LM head's output is used elsewhere without the factor or bias the loss applies to it")
    return linear, chain, index, (ignore, reduction, float(eps)), others, factor, added


def _describe(h, V, opts, index, others, dtype, out_dtype, factor=(1.0, 1.0, 0.0), added=None) -> str:
    ignore, reduction, eps = opts
    parts = [f"h {tuple(shape(h))} vocab={V} reduction={reduction} ignore_index={ignore}"]
    if added is not None:
        parts.append(f"bias '{added.name}' added to the logits")
    if factor[0] != 1.0:
        parts.append(f"logits * {factor[0]:g}")
    if factor[1] != 1.0:
        parts.append(f"logits / {factor[1]:g}")
    if factor[2]:
        parts.append(f"soft-capped at {factor[2]:g}")
    if eps:
        parts.append(f"label_smoothing={eps}")
    if out_dtype != dtype:
        parts.append(f"upcast {str(dtype).replace('torch.', '')}->{str(out_dtype).replace('torch.', '')}")
    if index is not None:
        parts.append(f"token slice {index}")
    parts.append("logits also returned" if others else "logits not kept")
    return " ".join(parts)


def _grad_note(h, W, b, reduction) -> str:
    needs = [torch.is_grad_enabled() and t is not None and requires_grad(t) for t in (h, W, b)]
    if not any(needs):
        return "no grad"
    return "grads in forward" if can_precompute(reduction, needs) else "backward recomputes logits"


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict) -> None:
    graph = gm.graph
    for ce in [n for n in graph.nodes if op(n) == "cross_entropy"]:
        try:
            linear, chain, index, opts, others, factor, added = match(ce)
        except Reject as why:
            report.sites.append(SiteReport("loss", "dense", "cross_entropy", common_path([ce]), reason=str(why)))
            continue
        h, W, b = (bind(linear)[k] for k in ("input", "weight", "bias"))
        b = added if added is not None else b  # the bias added after the head (BART's final_logits_bias)
        V = shape(W)[0]
        path = common_path([linear]) or common_path([ce])
        detail = _describe(h, V, opts, index, others, val(linear).dtype, val(ce).dtype, factor, added) + \
            f", {_grad_note(h, W, b, opts[1])}"
        if not options.chunked_loss:
            report.sites.append(SiteReport("loss", "dense", "linear-cross_entropy", path, detail,
                                           reason="chunked_loss=False"))
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        target = bind(ce)["target"]
        anchor = max(linear, target, *([b] if added is not None else []), key=order.get)  # the op needs h, W, b, labels
        if any(order[u] <= order[anchor] for u in others):
            report.sites.append(SiteReport("loss", "dense", "linear-cross_entropy", path, detail,
                                           reason="the logits are used before the labels are computed"))
            continue
        entry = SiteReport("loss", "rewritten", "linear-cross_entropy", path, detail)
        report.sites.append(entry)
        if not apply:
            continue
        needs = [torch.is_grad_enabled() and t is not None and requires_grad(t) for t in (h, W, b)]
        precompute = can_precompute(opts[1], needs)  # gradients formed in forward: no recomputed GEMM
        with graph.inserting_before(anchor.next):  # in order, right after the last input
            hin = h if index is None else graph.call_function(operator.getitem, (h, index))
            compute = val(linear).dtype  # under autocast: the operands in the dtype the product ran in
            hin, Win, bin_ = (t if t is None or val(orig).dtype == compute else graph.call_method("to", (t, compute))
                              for t, orig in ((hin, h), (W, W), (b, b)))
            if added is not None:  # [1, V] (or [V]) -> the op's [V] bias
                bin_ = graph.call_method("reshape", (bin_, (V,)))
            call = graph.call_function(torch.ops.spt.linear_cross_entropy.default, (
                hin, Win, bin_, target, opts[0], opts[1], opts[2], options.loss_chunk, bool(others), val(ce).dtype,
                precompute, needs, options.loss_impl, *factor))
        with graph.inserting_after(call):
            logits = graph.call_function(operator.getitem, (call, 1))
            logits.meta.update(linear.meta)
        with graph.inserting_after(call):
            loss = graph.call_function(operator.getitem, (call, 0))
            loss.meta.update(ce.meta)
        ce.replace_all_uses_with(loss)
        inside = {*chain, ce}
        for alias in chain:  # the logits unchanged, used elsewhere too (OPT's .contiguous()): those uses get the op's
            if any(u not in inside for u in alias.users):
                alias.replace_all_uses_with(logits, delete_user_cb=lambda u: u not in inside)
        erased = erase_unused(graph, [ce, *chain])
        linear.replace_all_uses_with(logits)
        erased += erase_unused(graph, [linear, logits])
        entry.replaced = [n.name for n in erased if n is not logits]
