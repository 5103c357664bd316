"""`explain(model, *args, **kwargs)`: what the backend would rewrite in this model, and why not.

Traces the model with Dynamo exactly as torch.compile would (one call with the given inputs), runs
the passes in report-only mode, and runs the model dense. No sparse state is created or changed.

A region Dynamo could not trace inside a higher-order op (a graph break inside an activation-
checkpointed layer) runs eagerly: no graph of it reaches the backend, so none of its sites can be
listed. explain() lists those graph breaks instead (`not_traced`), with Dynamo's reason. Every other
graph break is listed too (`breaks`), with Dynamo's reason and hint: the pieces are compiled apart,
so a loss after a break is not chunked and gives the MLP sites before it no loss rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from spt_compile.passes import SiteReport, rewrite_graph

from .backend import compile_options
from .options import Options
from .registry import unwrap


@dataclass
class ExplainReport:
    graphs: int = 0
    sites: list[SiteReport] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the options in effect that differ from the defaults
    compiler: str = ""  # the downstream compiler a torch.compile with these options hands the graphs to
    not_traced: list[str] = field(default_factory=list)  # regions Dynamo ran eagerly, with its reason
    breaks: list[str] = field(default_factory=list)  # other graph breaks, with Dynamo's reason and hint
    dropouts: int = 0  # training-mode dropouts that get 16-bit masks (passes/dropout.py)

    def rewritten(self, kind=None) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten" and kind in (None, s.kind)]

    def dense(self, kind=None) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "dense" and kind in (None, s.kind)]

    def __str__(self) -> str:
        lines = [f"spt explain: {self.graphs} graph(s) traced"
                 + (f" ({self.graphs - 1} graph break(s): each piece is rewritten on its own)" if self.graphs > 1 else "")
                 + (f"; downstream: {self.compiler}" if self.compiler else "")
                 + ("; options: " + ", ".join(f"{k}={v}" for k, v in self.options.items()) if self.options else ""),
                 f"  rewritten: {len(self.rewritten('attention'))} attention, {len(self.rewritten('mlp'))} MLP"
                 + (f", {len(self.rewritten('loss'))} chunked loss" if any(s.kind == "loss" for s in self.sites) else "")
                 + (f", {self.dropouts} dropout (16-bit masks)" if self.dropouts else "")
                 + "; "
                 f"left dense: {len(self.dense())}"
                 + (f"; regions not traced: {len(self.not_traced)}" if self.not_traced else "")]
        lines += ["  " + s.line() for s in self.sites]
        lines += [f"  not traced: {reason}" for reason in self.not_traced]
        lines += [f"  graph break: {reason}" for reason in self.breaks]
        return "\n".join(lines)


def explain(model: nn.Module, *args, **kwargs) -> ExplainReport:
    """Trace `model(*args, **kwargs)` and report, per attention, MLP and loss candidate, whether the spt
    backend rewrites it (module path, pattern, shapes) or leaves it dense (and why). It uses the options
    of the enclosing `spt_compile.enable(...)` blocks and lists those that differ from the defaults."""
    options = compile_options(None)
    defaults = Options()
    report = ExplainReport(options={f.name: getattr(options, f.name) for f in fields(Options)
                                    if getattr(options, f.name) != getattr(defaults, f.name)},
                           compiler=options.downstream_compiler)

    def recording_backend(gm, example_inputs, **_):
        report.graphs += 1
        graph = rewrite_graph(gm, example_inputs, options, apply=False)
        report.sites += graph.sites
        report.dropouts += len(graph.dropouts)
        return gm.forward

    from torch._dynamo.utils import counters

    kinds = ("graph_break", "unimplemented")  # Dynamo counts a break it cannot resume from under the latter
    before = {kind: dict(counters[kind]) for kind in kinds}
    # The model inside torch.compile's and DDP's wrappers: under DDP the backend rewrites the whole graph
    # before DDP splits it into gradient buckets (distributed/ddp.py), so this is the graph it sees.
    target = unwrap(model)
    torch.compile(target, backend=recording_backend)(*args, **kwargs)
    for kind in kinds:
        for message, n in counters[kind].items():
            if n <= before[kind].get(message, 0):
                continue
            if message.startswith("HOP"):
                into, text = report.not_traced, _not_traced(message)
            elif kind == "graph_break":  # "unimplemented" alone: a frame Dynamo skipped, not a split graph
                into, text = report.breaks, _graph_break(message)
            else:
                continue
            if text not in into:
                into.append(text)
    return report


def _message_parts(message: str) -> tuple[str, str, str]:
    """(reason, developer context, first hint) of a Dynamo graph-break message ("" where absent)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name + ":")), "")

    return lines[0], field("Developer debug context"), field("Hint").rstrip(".")


def _graph_break(message: str) -> str:
    """Dynamo's graph-break message, shortened to its reason, what it broke on and its hint."""
    reason, context, hint = _message_parts(message)
    text = reason + (f" ({context[:300]})" if context else "") + (f"; Dynamo's hint: {hint}" if hint else "")
    if "warning_once" in context and "loss_type=" in context:
        # transformers >= 5 logs this from `loss_function` on every call of a model whose class name
        # gives no loss type (GPT2LMHeadModel and other *LMHeadModel classes); the break puts the loss
        # in a graph of its own.
        text += ("; here the loss lands in a graph of its own, so it is not chunked and the MLP sites get no "
                 "loss rows: set `loss_type = \"ForCausalLM\"` on the transformers model (the loss it uses "
                 "anyway; under PEFT on model.get_base_model()), or add logging.Logger.warning_once to "
                 "torch._dynamo.config.ignore_logging_functions")
    return text


def _not_traced(message: str) -> str:
    """Dynamo's graph-break message inside a higher-order op, shortened to what the user needs."""
    reason, context, _ = _message_parts(message)
    text = reason + (f" ({context})" if context else "")
    text += (": Dynamo ran that higher-order-op region (e.g. an activation-checkpointed layer) eagerly, so no "
             "attention or MLP in it is rewritten or listed")
    if "skip_fwd_side_effects_in_bwd_under_checkpoint" in message:
        # transformers >= 5.25 wraps attention's forward with the kernels package's use_kernelized_func,
        # which sets a module-level variable on every call: such a side effect inside
        # torch.utils.checkpoint makes Dynamo give up on the whole layer.
        text += ("; if side effects of the checkpointed forward need not be replayed during the recomputation "
                 "(transformers >= 5.25's kernel-function switch need not), set "
                 "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True before compiling")
    return text
