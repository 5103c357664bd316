"""nn.MultiheadAttention, which Dynamo keeps as one `F.multi_head_attention_forward` call, written out
as the plain torch it computes (in-projection, SDPA, out-projection) so the attention pass can read it.

The decomposition follows the function's own SDPA path (`need_weights=False`): q/k/v = in-projection
of the [N, B, E] inputs, viewed [B, H, N, E/H]; the key padding mask and attn_mask become one
additive mask (bool ones the way `_canonical_mask` converts them: True -> -inf); `is_causal` is
honoured exactly where the function honours it; dropout only in training. With `need_weights=True`
the function computes the same output through bmm/softmax, so the call is rewritten too as long as
nothing reads the returned weights. Not decomposed (the reason goes to explain): unbatched inputs,
bias_k/bias_v, add_zero_attn, static_k/static_v, weights that are used.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .fx_utils import shape, val


class MhaReject(Exception):
    pass


def _arguments(node: Node) -> dict:
    import inspect

    bound = inspect.signature(F.multi_head_attention_forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class _Emitter:
    """Adds nodes before `at`, each with the example value its fake evaluation gives (the attention
    pass reads shapes and dtypes from there)."""

    def __init__(self, graph: Graph, at: Node, fake_mode):
        self.graph, self.at, self.fake_mode, self.nodes = graph, at, fake_mode, []

    def __call__(self, target, *args, method: bool = False, **kwargs) -> Node:
        with self.graph.inserting_before(self.at):
            n = (self.graph.call_method if method else self.graph.call_function)(target, args, kwargs)
        fa, fk = torch.fx.node.map_arg((args, kwargs), val)
        with self.fake_mode:
            n.meta["example_value"] = getattr(fa[0], target)(*fa[1:], **fk) if method else target(*fa, **fk)
        n.meta["spt_decomposed"] = True
        n.meta["nn_module_stack"] = self.at.meta.get("nn_module_stack", {})
        self.nodes.append(n)
        return n


def decompose(graph: Graph, node: Node) -> tuple[Node, Callable[[bool], list[str]]]:
    """Write the call out before it; returns the SDPA node and `finish(keep)`: keep=True moves the
    call's users to the written-out output and erases the call (returns the erased names), False
    erases what was written."""
    a = _arguments(node)
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            raise MhaReject(f"nn.MultiheadAttention with {name}")
    for name in ("add_zero_attn", "dropout_p", "training", "need_weights", "is_causal", "use_separate_proj_weight",
                 "num_heads"):
        if isinstance(a[name], Node):
            raise MhaReject(f"nn.MultiheadAttention's {name} is computed in the graph")
    if a["add_zero_attn"]:
        raise MhaReject("nn.MultiheadAttention with add_zero_attn")
    qs = shape(a["query"])
    if qs is None or len(qs) != 3 or len(shape(a["key"]) or ()) != 3:
        raise MhaReject("nn.MultiheadAttention on unbatched inputs")
    users = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] not in (0, 1) for u in users):
        raise MhaReject("nn.MultiheadAttention's result is used other than by indexing")
    weights_users = [u for u in users if u.args[1] == 1 and u.users]
    if weights_users:
        raise MhaReject("nn.MultiheadAttention's attention weights are used (need_weights=True)")
    E, H = a["embed_dim_to_check"], a["num_heads"]  # the module's constants (qs[2] is symbolic under dynamic=True)
    if not isinstance(E, int) or E % H:
        raise MhaReject(f"embedding size {E} is not a multiple of {H} heads")
    hd = E // H
    fake_mode = getattr(val(a["query"]), "fake_mode", None)
    if fake_mode is None:
        raise MhaReject("nn.MultiheadAttention's inputs carry no example values to write the call out with")
    emit = _Emitter(graph, node, fake_mode)
    try:
        sdpa, out = _write_out(emit, a, E, H, hd)
    except MhaReject:
        _erase(graph, emit.nodes)
        raise
    except Exception as e:  # noqa: BLE001 - a call we cannot write out stays as it is
        _erase(graph, emit.nodes)
        raise MhaReject(f"nn.MultiheadAttention could not be written out ({type(e).__name__}: {e})") from None

    def finish(keep: bool) -> list[str]:
        if not keep:
            _erase(graph, emit.nodes)
            return []
        erased = []
        for u in users:
            if u.args[1] == 0:
                u.replace_all_uses_with(out)
            graph.erase_node(u)
            erased.append(u.name)
        graph.erase_node(node)
        return erased + [node.name]

    return sdpa, finish


def _erase(graph: Graph, nodes: list[Node]) -> None:
    for n in reversed(nodes):
        if not n.users and n.graph is graph:
            graph.erase_node(n)


def _write_out(emit: _Emitter, a: dict, E: int, H: int, hd: int) -> tuple[Node, Node]:
    """The nodes of F.multi_head_attention_forward's SDPA path; returns (the SDPA node, the output)."""
    query, key, value = a["query"], a["key"], a["value"]
    if a["use_separate_proj_weight"]:
        ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        bs = (None,) * 3 if a["in_proj_bias"] is None else tuple(
            emit(operator.getitem, a["in_proj_bias"], slice(i * E, (i + 1) * E)) for i in range(3))
        q, k, v = (emit(F.linear, x, w, b) for x, w, b in zip((query, key, value), ws, bs))
    elif query is key and key is value:  # self-attention: one packed projection, as F.mha computes it
        proj = emit(F.linear, query, a["in_proj_weight"], a["in_proj_bias"])
        q, k, v = (emit(operator.getitem, proj, (Ellipsis, slice(i * E, (i + 1) * E))) for i in range(3))
    else:
        W, b = a["in_proj_weight"], a["in_proj_bias"]
        q, k, v = (emit(F.linear, x, emit(operator.getitem, W, slice(i * E, (i + 1) * E)),
                        None if b is None else emit(operator.getitem, b, slice(i * E, (i + 1) * E)))
                   for i, x in enumerate((query, key, value)))
    q, k, v = (emit("permute", emit("unflatten", t, -1, (H, hd), method=True), 1, 2, 0, 3, method=True)
               for t in (q, k, v))  # [N, B, E] -> [B, H, N, hd]
    dtype = val(q).dtype

    def additive(m: Optional[Node]) -> Optional[Node]:
        if m is None or val(m).dtype != torch.bool:
            return m
        return emit(torch.masked_fill, emit(torch.zeros_like, m, dtype=dtype), m, float("-inf"))

    kpm, attn_mask = a["key_padding_mask"], a["attn_mask"]
    is_causal = bool(a["is_causal"])
    if is_causal and attn_mask is None:
        raise MhaReject("nn.MultiheadAttention with is_causal and no attn_mask (the call itself fails)")
    if is_causal and kpm is None and not a["need_weights"]:
        attn_mask = None
    else:
        is_causal = False
        attn_mask = additive(attn_mask)
        if attn_mask is not None and len(shape(attn_mask)) == 3 and not shape(attn_mask)[0] == 1:
            attn_mask = emit("unflatten", attn_mask, 0, (-1, H), method=True)  # [B*H, N, S] -> [B, H, N, S]
    if kpm is not None:
        kpm = emit(operator.getitem, additive(kpm), (slice(None), None, None, slice(None)))  # [B, 1, 1, S]
        attn_mask = kpm if attn_mask is None else emit(operator.add, attn_mask, kpm)
    p = float(a["dropout_p"]) if a["training"] else 0.0
    sdpa = emit(F.scaled_dot_product_attention, q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
    out = emit("flatten", emit("permute", sdpa, 2, 0, 1, 3, method=True), -2, method=True)  # [N, B, E]
    return sdpa, emit(F.linear, out, a["out_proj_weight"], a["out_proj_bias"])
