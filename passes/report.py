"""What the passes did to one graph: rewritten sites and candidates left dense, with reasons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SiteReport:
    kind: str  # "attention" | "mlp" | "loss"
    status: str  # "rewritten" | "dense"
    pattern: str  # e.g. "sdpa", "matmul-softmax", "gated silu", "gelu_tanh"
    path: str  # module path, as in named_modules()
    detail: str = ""  # shapes, masks, LoRA
    reason: str = ""  # why it stayed dense
    replaced: list[str] = field(default_factory=list)  # names of the graph nodes the op replaced

    def line(self) -> str:
        what = f"{self.status:9} {self.kind:9} {self.path or '<top>'}  [{self.pattern}]"
        if self.detail:
            what += f"  {self.detail}"
        if self.reason:
            what += f"\n{'':20}reason: {self.reason}"
        return what


@dataclass
class GraphReport:
    """Reports of one graph (and the higher-order-op bodies inside it)."""

    sites: list[SiteReport] = field(default_factory=list)
    floats: list = field(default_factory=list)  # FloatInputs read as constants (float_inputs.py)
    loss_rows: str = ""  # where the MLP sites' loss-row mask comes from, or why there is none (loss_rows.py)
    order: int = 0  # compile order in this process (spt_compile.compile_reports)
    dropouts: list[str] = field(default_factory=list)  # the F.dropout nodes spt::dropout replaced (dropout.py)
    compiler: str = ""  # the downstream compiler the rewritten graph went to (options.compiler resolved)

    def rewritten(self, kind: Optional[str] = None) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten" and (kind is None or s.kind == kind)]

    def dense(self, kind: Optional[str] = None) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "dense" and (kind is None or s.kind == kind)]

    def summary(self) -> str:
        n_att, n_mlp = len(self.rewritten("attention")), len(self.rewritten("mlp"))
        n_loss, left = len(self.rewritten("loss")), len(self.dense())
        text = (f"{n_att} attention and {n_mlp} MLP sites rewritten, {n_loss} chunked loss, "
                f"{left} candidates left dense")
        if self.dropouts:
            text += f", {len(self.dropouts)} dropouts with 16-bit masks"
        if self.compiler:
            text += f"; downstream: {self.compiler}"
        if self.floats:
            text += (f"; {len(self.floats)} module float attribute(s) that Dynamo passed as graph inputs read "
                     "as constants, checked on every call")
        return text
