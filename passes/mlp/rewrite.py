"""The rewrite of a checked MLP match: the report's description of the site (describe), the MlpSpec
the op reads its structure from (_spec), and emit, which inserts spt::mlp_site (with the loss-row
and real-token-row operands) and erases what it replaced."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Optional

import torch

from spt_compile.options import Options
from spt_compile.sparse_ops.routed_mlp import MlpSpec

from ..fx_utils import erase_unused, requires_grad, shape, static_int, val
from .match import MlpMatch
from .projections import Projection

if TYPE_CHECKING:
    from ..loss_rows import RowsSource
    from ..real_rows import RealRowsSource


def describe(m: MlpMatch) -> str:
    lora = [name for name, p in (("in", m.up), ("gate", m.gate), ("out", m.down)) if p is not None and p.lora_a is not None]
    first = m.up or m.gate
    layout = " Conv1D" if first.layout == "io" else ""
    fused = f" fused gate/up ({m.fused.replace('_', ' then ')})" if m.fused else ""
    wide = next((p.adapter_dtype for p in (m.up, m.gate, m.down) if p is not None and p.adapter_dtype), None)
    cast = "" if wide is None else (
        f" (adapters {str(wide).removeprefix('torch.')}: computed in {str(val(m.x).dtype).removeprefix('torch.')} "
        "as under torch.autocast, their gradients cast back)")
    dropped = f" dropout {m.hidden_dropout:g} on the hidden layer (drawn by the op)" if m.hidden_dropout else ""
    return f"x {tuple(shape(m.x))} hidden={m.hidden}{layout}{fused} LoRA={'/'.join(lora) or 'none'}{dropped}{cast}"


def _spec(m: MlpMatch, options: Options) -> MlpSpec:
    g = m.gate
    x_dtype, out_dtype = val(m.x).dtype, val(m.down.output).dtype
    autocast = x_dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float16)
    up = m.up or g  # fused: both halves are the gate projection's
    return MlpSpec(
        activation=m.activation, gated=g is not None, hidden=static_int(m.hidden),
        n_blocks=options.ffn_blocks, in_layout=up.layout, gate_layout=g.layout if g else "oi",
        out_layout=m.down.layout, in_scale=up.scale, gate_scale=g.scale if g else 1.0,
        out_scale=m.down.scale, in_dropout=up.dropout, gate_dropout=g.dropout if g else 0.0,
        out_dropout=m.down.dropout, compute=str(out_dtype).removeprefix("torch.") if autocast else "",
        fused=m.fused, hidden_dropout=m.hidden_dropout,
    )


def _slots(p: Optional[Projection]) -> tuple:
    return (None, None, None, None) if p is None else (p.weight, p.bias, p.lora_a, p.lora_b)


def _adapters_cast(graph, p: Optional[Projection], dtype: torch.dtype) -> tuple:
    """_slots(p), with adapters wider than the MLP (fp32 on a bf16 model) cast to its dtype: the op
    computes the LoRA path in the MLP's dtype, as torch.autocast would; autograd takes the gradients
    back through the cast to the fp32 weights."""
    slots = _slots(p)
    if p is None or p.adapter_dtype is None:
        return slots
    return (*slots[:2], *(graph.call_method("to", (t, dtype)) for t in slots[2:]))


def emit(graph, m: MlpMatch, options: Options, path: str, ordinals: dict,
         rows: Optional["RowsSource"], real: Optional["RealRowsSource"]) -> list[str]:
    """Insert spt::mlp_site before the down projection's output, hand it that output's uses, and
    erase the matched nodes; returns their names."""
    from spt_compile.registry import REGISTRY, SiteTemplate

    units_used = [p for p in (m.up, m.gate, m.down) if p is not None]
    anchor = (m.gate or m.up).weight  # the op finds the layer's site by this tensor at run time
    key = ("mlp", anchor)
    ordinal = ordinals.get(key, 0)
    ordinals[key] = ordinal + 1
    template = REGISTRY.template_id(SiteTemplate("mlp", ordinal, path, options, (static_int((m.up or m.gate).in_features),)))
    args = (m.x, *_slots(m.up), *_slots(m.gate), *_slots(m.down))
    training = torch.is_grad_enabled() and any(requires_grad(a) for a in args if a is not None)
    loss_rows = None if rows is None else rows.for_input(m.x)[0]
    real_rows = None if real is None else real.for_input(m.x)
    with graph.inserting_before(m.down.output):
        slots = [t for p in (m.up, m.gate, m.down) for t in _adapters_cast(graph, p, val(m.x).dtype)]
        call = graph.call_function(torch.ops.spt.mlp_site.default, (
            m.x, *slots, loss_rows, real_rows, template, _spec(m, options).to_str(), training))
        out = graph.call_function(operator.getitem, (call, 0))
        out.meta.update(m.down.output.meta)
        want = val(m.down.output).dtype
        if want != val(m.x).dtype:  # e.g. autocast: the projections produced a lower precision
            out = graph.call_method("to", (out, want))
            out.meta.update(m.down.output.meta)
    m.down.output.replace_all_uses_with(out)
    everything = set(m.nodes).union(*(p.nodes for p in units_used))
    return [n.name for n in erase_unused(graph, everything)]
