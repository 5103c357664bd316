"""The semantic check every MLP match passes before it is rewritten: gate, up and down sizes that fit,
a hidden size of at least ffn_blocks, the same tokens in and out, one dtype for the input and every
weight (LoRA adapters in a wider dtype excepted: the rewrite casts them), and no intermediate read
outside the MLP. A failure raises Reject with the reason explain() shows."""

from __future__ import annotations

from spt_compile.options import Options

from ..fx_utils import same, shape, static_int, users_outside, val
from .match import MlpMatch, Reject


def check(m: MlpMatch, options: Options) -> None:
    F = m.hidden
    if m.gate is not None and not m.fused and not same(m.gate.out_features, F):
        raise Reject(f"gate ({m.gate.out_features}) and up ({F}) projections differ in size")
    if not same(m.down.in_features, F):
        raise Reject(f"down projection reads {m.down.in_features} features, the hidden layer has {F}")
    F = static_int(F)
    if F is None or F < options.ffn_blocks:
        raise Reject(f"hidden size {F} is smaller than ffn_blocks={options.ffn_blocks}")
    xs, ys = shape(m.x), shape(m.down.output)
    if not (xs and ys and len(xs) == len(ys) and all(same(a, b) for a, b in zip(xs[:-1], ys[:-1]))):
        raise Reject(f"the MLP reshapes tokens between input {xs} and output {ys}")
    dtype = val(m.x).dtype
    for p in filter(None, (m.up, m.gate, m.down)):
        adapters = (p.lora_a, p.lora_b) if p.adapter_dtype is not None else ()  # cast to x's dtype by the rewrite
        for t in filter(None, (p.weight, p.bias, p.lora_a, p.lora_b)):
            if val(t).dtype != dtype and t not in adapters:
                raise Reject(f"'{t.name}' is {val(t).dtype} while the MLP input is {dtype}")
    units = [p for p in (m.up, m.gate, m.down) if p is not None]
    everything = set(m.nodes).union(*(p.nodes for p in units))
    leaking = users_outside(everything, keep=[m.down.output])
    if leaking:
        raise Reject(f"intermediate '{leaking[0].name}' is also used outside the MLP")
