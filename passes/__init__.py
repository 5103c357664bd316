"""Graph passes over the torch-level FX graph Dynamo hands the backend.

    report = rewrite_graph(gm, example_inputs, options)             # rewrites gm in place
    report = rewrite_graph(gm, example_inputs, options, apply=False)  # only says what it would do

Module float attributes that Dynamo passed as graph inputs (dynamic shapes) are read as constants
first (float_inputs.py); report.floats lists them, and the caller must guard on them at run time.

attention/, mlp/ and loss.py each hold their pattern family: parsers for the forms, a semantic
check, and the rewrite to one spt:: op per site (attention/ and mlp/ are packages: forms, checks,
rewrite, and run() in the __init__, which maps the modules; loss.py: the LM head + cross-entropy,
chunked). dropout.py, last: the training-mode dropouts the sites did not take in get 16-bit masks.
Higher-order-op bodies (activation checkpointing puts each layer into a tag_activation_checkpoint
subgraph) are rewritten too. Last, unmatched.py reports every attention- or MLP-like chain the
passes neither rewrote nor reported (a form no parser recognises, or one inside a higher-order-op
body they do not enter) as dense, with what it saw.
Installed as spt_compile.passes.
"""

from __future__ import annotations

from torch.fx import GraphModule

from spt_compile.options import Options

from . import attention, dropout, loss, loss_rows, mlp, real_rows, unmatched
from .float_inputs import copy_graph_module, float_inputs, specialize
from .fx_utils import op
from .report import GraphReport, SiteReport

__all__ = ["rewrite_graph", "GraphReport", "SiteReport"]


def rewrite_graph(gm: GraphModule, example_inputs, options: Options, apply: bool = True,
                  graphed: bool = False) -> GraphReport:
    """graphed: the graph is for CUDA graphs (mode="reduce-overhead"): attention sites that can get
    spt::attention_graphed (fixed shapes, no host work, no state; sites/attention_graphed.py)."""
    report = GraphReport()
    report.floats = float_inputs(gm, example_inputs)
    if report.floats:  # module floats Dynamo made graph inputs: constants for the passes (float_inputs.py)
        if not apply:
            gm = copy_graph_module(gm)
        specialize(gm, report.floats)
    # Which rows carry a loss (an operand of the MLP sites): found before the loss pass rewrites it.
    found = loss_rows.find(gm)
    report.loss_rows = found if isinstance(found, str) else found.detail
    seen = unmatched.Seen()
    _rewrite(gm, options, report, apply, ordinals={}, rows=loss_rows.RowsSource(gm.graph, found), seen=seen,
             graphed=graphed)
    unmatched.run(gm, report, seen)  # what no pass rewrote or reported, as dense with what it saw
    return report


def _rewrite(gm: GraphModule, options: Options, report: GraphReport, apply: bool, ordinals: dict,
             rows: loss_rows.RowsSource, seen: unmatched.Seen, graphed: bool = False) -> None:
    seen.graphs.add(gm)
    for node in list(gm.graph.nodes):
        if op(node) == "checkpoint" and node.args and getattr(node.args[0], "op", None) == "get_attr":
            body = getattr(gm, node.args[0].target)
            if isinstance(body, GraphModule):
                _rewrite(body, options, report, apply, ordinals, rows.into_body(node, body), seen, graphed)
    taken: set = set()  # nodes of the sites rewritten (erased when applied; explain must skip them too)
    planned: dict = {}  # without apply: the attention sites that would be rewritten, and whether masked
    attention.run(gm, options, report, apply, ordinals, seen.nodes, graphed, taken=taken, planned=planned)
    mlp.run(gm, options, report, apply, ordinals, rows, real_rows.RealRowsSource(gm.graph, planned), seen.nodes,
            taken=taken)
    loss.run(gm, options, report, apply, ordinals)
    # The dropouts the sites did not take in: 16-bit masks. Applied, the sites' own are erased by now;
    # without apply (explain) they are still there and are skipped through `taken`.
    dropout.run(gm, options, report, apply, skip=set() if apply else taken)
    if apply:
        gm.graph.lint()
        gm.recompile()

