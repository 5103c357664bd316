"""MLP pass: two-layer MLPs (plain and gated, with or without LoRA) -> spt::mlp_site.

A *projection* is `linear(x, W, b)` or `addmm(b, x, W)` (GPT-2's Conv1D; with its views around it
when PEFT adds a LoRA delta to the Conv1D's output), optionally plus a PEFT LoRA delta
`linear(linear(dropout?(x), A), B) * s`, optionally followed by a no-op `.to(dtype)`.
An MLP is
    plain   out( act(in(x)) )             (views that keep the last dim may sit around act)
    gated   out( act(gate(x)) * in(x) )
where `act` is any chain of element-wise ops on the projection's output (an identity dropout
included, as T5's act -> dropout -> wo in eval or at p = 0; a live dropout over the whole hidden
layer becomes the op's hidden_dropout, which it draws itself); it is identified by
evaluating the chain on probe values and comparing with the known activations (so GPT-2's
mul/pow/tanh/add tanh-GELU is recognised as gelu_tanh). Unknown activations, intermediates used
elsewhere, or shapes that do not fit leave the MLP dense, with the reason in the report.

Modules:
  projections.py  Projection and parse_projection: linear, x @ W.T, addmm (Conv1D), LoRA deltas
  forms.py        match_mlp: plain, gated and fused gate/up hidden layers (_trace_chain), and the
                  activation named by evaluating its chain (identify_activation)
  match.py        MlpMatch (what match_mlp reads off the graph) and Reject
  checks.py       check: the semantic guard and its reject reasons
  rewrite.py      describe (the report's detail), the op's MlpSpec, emit (spt::mlp_site)
  here            run: every projection unit parsed, each MLP matched, checked, reported, and
                  rewritten when apply is set
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch.fx import GraphModule, Node

from spt_compile.options import Options

from ..fx_utils import common_path
from ..report import GraphReport, SiteReport
from .checks import check
from .forms import MAX_CHAIN, _hidden_layer, identify_activation, match_mlp
from .match import MlpMatch, Reject
from .projections import Projection, parse_projection
from .rewrite import describe, emit

if TYPE_CHECKING:
    from ..loss_rows import RowsSource
    from ..real_rows import RealRowsSource

__all__ = [
    "run", "Reject", "Projection", "parse_projection", "MlpMatch", "match_mlp", "identify_activation", "check",
    "describe", "MAX_CHAIN",
]


def run(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict,
        rows: Optional["RowsSource"] = None, real: Optional["RealRowsSource"] = None,
        seen: Optional[set[Node]] = None, taken: Optional[set[Node]] = None) -> None:
    """rows: where the sites get the loss-row mask from (passes/loss_rows.py); real: their real-token
    rows (passes/real_rows.py, after the attention pass ran on this graph); None: no operand.
    seen: collects the nodes of every site rewritten or reported (passes/unmatched.py reads it);
    taken: collects the nodes of the sites rewritten (or, without apply, that would be)."""
    graph = gm.graph
    seen = set() if seen is None else seen
    taken = set() if taken is None else taken
    # Projection units, outermost first (a LoRA unit's add/cast comes after its base linear).
    units: dict[Node, Projection] = {}
    claimed: set[Node] = set()
    for n in reversed(list(graph.nodes)):
        if n in claimed:
            continue
        p = parse_projection(n)
        if p is not None:
            units[n] = p
            claimed |= p.nodes
    done: set[Node] = set()
    for out_node in [n for n in graph.nodes if n in units]:
        down = units[out_node]
        if out_node in done or out_node.graph is not graph:
            continue
        try:
            m = match_mlp(down, units)
            if m is None:
                continue
            check(m, options)
        except Reject as why:
            report.sites.append(SiteReport("mlp", "dense", "mlp", common_path([down.output, down.x]), reason=str(why)))
            seen.update(down.nodes, _hidden_layer(down.x, units))
            continue
        units_used = [p for p in (m.up, m.gate, m.down) if p is not None]
        path = common_path([p.output for p in units_used])
        rows_note = "" if rows is None else f", {rows.note(m.x)}"
        if rows is not None and not rows.reaches(m.x) and options.exact_forward and options.ffn_loss_rows == "dense":
            rows_note += " (so training calls keep every real row's blocks in the backward; ffn_loss_rows='off' ranks them)"
        entry = SiteReport("mlp", "rewritten", m.pattern, path,
                           describe(m) + rows_note + ("" if real is None else f", {real.note(m.x)}"))
        report.sites.append(entry)
        done |= {p.output for p in units_used}
        seen.update(m.nodes, *(p.nodes for p in units_used))
        taken.update(m.nodes, *(p.nodes for p in units_used))
        if not apply:
            continue
        entry.replaced = emit(graph, m, options, path, ordinals, rows, real)
