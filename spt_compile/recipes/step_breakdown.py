"""Where a training step's time goes, by op attribution over one profiled step.

torch.profiler (record_shapes=True) records every aten:: and spt:: op with its input shapes. Walking
the event tree from the top, the first op that can be classified takes its whole inclusive time:
* by name: spt::attention_site / SDPA kernels -> attention; spt::mlp_site -> ffn;
  spt::linear_cross_entropy, log_softmax, nll_loss -> lm_head_loss; "Optimizer.step" and
  "Optimizer.zero_grad" ranges (torch.optim emits them) -> optimizer;
* by shapes: any operand with the vocabulary size -> lm_head_loss; a 4-D operand [B, heads, N, *]
  (eager attention's scores, RoPE, repeat_kv) -> attention; any operand with the MLP's intermediate
  size -> ffn; any other matmul (q/k/v/o and their LoRA factors) -> qkvo.
Everything else (norms, residual adds, embedding, casts, Python and profiler overhead) is "other":
the step's wall time minus the classified parts. Caveats: the LoRA factors of the MLP that touch no
intermediate-sized operand (A of gate/up, B of down: r=16, about 1% of the FLOPs) count as qkvo;
Inductor's fused pointwise kernels are not recorded as ops and land in "other"; a sequence length
equal to the intermediate size would be ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("attention", "ffn", "qkvo", "lm_head_loss", "optimizer", "other")
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
_BY_NAME = (
    ("attention", ("attention_site", "scaled_dot_product", "flash_attention", "sparse_attention", "block_sparse")),
    ("ffn", ("mlp_site", "routed_mlp")),
    ("lm_head_loss", ("linear_cross_entropy", "log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("Optimizer.step", "Optimizer.zero_grad")),
)


@dataclass(frozen=True)
class Sizes:
    vocab: int
    intermediate: int
    heads: tuple  # query and kv head counts


def classify(name: str, shapes, sizes: Sizes):
    for part, keys in _BY_NAME:
        if any(k in name for k in keys):
            return part
    if not name.startswith(("aten::", "spt::")):
        return None
    dims = [tuple(s) for s in (shapes or []) if isinstance(s, (list, tuple)) and s and all(isinstance(x, int) for x in s)]
    if not dims:
        return None
    if any(sizes.vocab in s for s in dims):
        return "lm_head_loss"
    if any(len(s) == 4 and s[1] in sizes.heads for s in dims):
        return "attention"
    if any(sizes.intermediate in s for s in dims):
        return "ffn"
    return "qkvo" if name in _MATMULS else None


def breakdown(prof, wall_s: float, sizes: Sizes) -> dict[str, float]:
    """Seconds per part of one profiled step (wall_s: its wall time)."""
    totals = dict.fromkeys(PARTS, 0.0)

    def visit(e):
        part = classify(e.name, getattr(e, "input_shapes", None), sizes)
        if part is not None:
            totals[part] += e.cpu_time_total / 1e6  # inclusive, microseconds
            return
        for child in e.cpu_children:
            visit(child)

    for e in prof.events():
        if e.cpu_parent is None:
            visit(e)
    totals["other"] = max(0.0, wall_s - sum(totals.values()))
    return totals
