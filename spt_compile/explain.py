"""`explain(model, *args, **kwargs)`: what the backend would rewrite in this model, and why not.

Traces the model with Dynamo exactly as torch.compile would (one call with the given inputs), runs
the passes in report-only mode, and runs the model dense. No sparse state is created or changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from spt_compile.passes import SiteReport, rewrite_graph

from .backend import compile_options
from .options import Options


@dataclass
class ExplainReport:
    graphs: int = 0
    sites: list[SiteReport] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the options in effect that differ from the defaults

    def rewritten(self, kind=None) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten" and kind in (None, s.kind)]

    def dense(self, kind=None) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "dense" and kind in (None, s.kind)]

    def __str__(self) -> str:
        lines = [f"spt explain: {self.graphs} graph(s) traced"
                 + (f" ({self.graphs - 1} graph break(s): each piece is rewritten on its own)" if self.graphs > 1 else "")
                 + ("; options: " + ", ".join(f"{k}={v}" for k, v in self.options.items()) if self.options else ""),
                 f"  rewritten: {len(self.rewritten('attention'))} attention, {len(self.rewritten('mlp'))} MLP"
                 + (f", {len(self.rewritten('loss'))} chunked loss" if any(s.kind == "loss" for s in self.sites) else "")
                 + "; "
                 f"left dense: {len(self.dense())}"]
        lines += ["  " + s.line() for s in self.sites]
        return "\n".join(lines)


def explain(model: nn.Module, *args, **kwargs) -> ExplainReport:
    """Trace `model(*args, **kwargs)` and report, per attention, MLP and loss candidate, whether the spt
    backend rewrites it (module path, pattern, shapes) or leaves it dense (and why). It uses the options
    of the enclosing `spt_compile.enable(...)` blocks and lists those that differ from the defaults."""
    options = compile_options(None)
    defaults = Options()
    report = ExplainReport(options={f.name: getattr(options, f.name) for f in fields(Options)
                                    if getattr(options, f.name) != getattr(defaults, f.name)})

    def recording_backend(gm, example_inputs, **_):
        report.graphs += 1
        report.sites += rewrite_graph(gm, example_inputs, options, apply=False).sites
        return gm.forward

    target = getattr(model, "_orig_mod", model)
    torch.compile(target, backend=recording_backend)(*args, **kwargs)
    return report
