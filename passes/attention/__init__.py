"""Attention pass: softmax(Q K^T * scale + mask) V, as SDPA calls or written out, -> spt::attention_site.

Forms read (each a small parser in forms.py / scores.py; a new form is a new parser and a test):
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
scale, a mask broadcastable to [B, H, N, Nk] (needing a gradient only on the CPU), query length == key length,
no intermediate used elsewhere (any head size: only token selection needs one divisible by
pq_subspace_dim, and the site raises naming the fix when it is chosen for one that is not). What fails stays dense
and the reason goes to the report.

Modules:
  match.py    AttentionMatch (what a parser reads off the graph), Reject, the shared constants
  forms.py    match_sdpa, match_matmul_softmax (also bmm / einsum), unwrap_repeat_kv
  scores.py   the written-out scores S: Q K^T with scaling, casts, views and masks (_parse_scores)
  checks.py   check: the semantic guard and its reject reasons
  rewrite.py  describe (the report's detail), anchor_weight, the op's mask, emit (spt::attention_site)
  here        run: every candidate matched, checked, reported, and rewritten when apply is set
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from spt_compile.options import Options

from .. import mha
from ..fx_utils import module_path, op, same, shape
from ..report import GraphReport, SiteReport
from .checks import check
from .forms import einsum_roles, match_matmul_softmax, match_sdpa, unwrap_repeat_kv
from .match import CASTS, DYNAMIC_FLOATS, FORBIDDING_FILL, AttentionMatch, Reject, _shape4
from .rewrite import _short_note, anchor_weight, describe, emit, emit_graphed, graphed_refusal

__all__ = [
    "run", "Reject", "AttentionMatch", "match_sdpa", "match_matmul_softmax", "unwrap_repeat_kv", "einsum_roles",
    "check", "describe", "anchor_weight", "FORBIDDING_FILL", "CASTS", "DYNAMIC_FLOATS",
]


def _upstream(node: Node, hops: int) -> set[Node]:
    found, frontier = set(), [node]
    for _ in range(hops):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        found.update(frontier)
    return found


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict,
        seen: Optional[set[Node]] = None, graphed: bool = False, taken: Optional[set[Node]] = None,
        planned: Optional[dict[Node, bool]] = None) -> None:
    """seen: collects the nodes of every site rewritten or reported (passes/unmatched.py reads it);
    graphed: emit spt::attention_graphed where it serves (rewrite.graphed_refusal);
    taken: collects the nodes of the sites rewritten (or, without apply, that would be);
    planned: without apply, collects each would-be site's output node and whether its op would get a
    mask, None for a cross-attention (what the MLP sites' real-rows note reads, passes/real_rows.py)."""
    graph = gm.graph
    seen = set() if seen is None else seen
    taken = set() if taken is None else taken
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
        refusal = graphed_refusal(m, options) if graphed else None
        if graphed and refusal is None and _short_note(m, options):  # exact both ways: SDPA as traced
            if finish is not None:
                finish(False)
            seen.update({call, m.output}, m.nodes)
            report.sites.append(SiteReport("attention", "dense", m.pattern, path, reason=(
                "CUDA graphs (mode='reduce-overhead'): the attention runs exact, as traced"
                + _short_note(m, options))))
            continue
        use_graphed = graphed and refusal is None
        note = ("; spt::attention_graphed for CUDA graphs (fixed shapes, budgets on the device, options as traced)"
                if use_graphed else f"; the regular op under CUDA graphs: {refusal}" if graphed else "")
        entry = SiteReport("attention", "rewritten", m.pattern, path,
                           describe(m) + ("" if use_graphed else _short_note(m, options)) + note)
        report.sites.append(entry)
        seen.update({call, m.output}, m.nodes)
        taken.update({call, m.output}, m.nodes)
        if not apply:
            if finish is not None:
                finish(False)
            if planned is not None:  # None for a cross-attention (passes/real_rows.py skips those)
                qs, ks = _shape4(m.q, m.merged), _shape4(m.k, m.merged)
                planned[m.output] = bool(m.additive or m.allow or m.forbid) if same(qs[2], ks[2]) else None
            continue
        replaced = finish(True) if finish is not None else []
        entry.replaced = replaced + (emit_graphed(graph, m, options) if use_graphed
                                     else emit(graph, m, options, path, ordinals))
    for n in softmaxes:  # a softmax over scores whose way to V was not recognised
        seen.add(n)
        report.sites.append(SiteReport(
            "attention", "dense", "softmax", module_path(n),
            reason="4-D softmax whose scores or path to V are not a recognised product (matmul, bmm or einsum "
                   "of Q and K^T, of P and V) with casts and dropout between"))
