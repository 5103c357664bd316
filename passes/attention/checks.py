"""The semantic check every attention match passes before it is rewritten: q/k/v 4-D and consistent,
whole query heads per kv head, query length == key length, a constant head size and a finite
constant scale, masks broadcastable to [B, H, N, Nk] of the right dtype (one that needs a gradient, a
learned bias, only on the CPU: the op returns its gradient there, sets mask_grad), and no
intermediate read elsewhere. A failure raises Reject with the reason explain() shows."""

from __future__ import annotations

import math

import torch

from spt_compile.options import Options

from ..fx_utils import requires_grad, same, shape, static_int, users_outside, val
from .match import AttentionMatch, Reject, _divides, _shape4


def check(m: AttentionMatch, options: Options) -> None:
    """The semantic guard; raises Reject with the reason."""
    qs, ks, vs = (_shape4(t, m.merged) for t in (m.q, m.k, m.v))
    if not (qs and ks and vs and len(qs) == len(ks) == len(vs) == 4):
        raise Reject(f"q/k/v are not 4-D [B, H, N, D] (got {qs}, {ks}, {vs})")
    B, H, N, D = qs
    Hkv, Nk = ks[1], ks[2]
    pairs = {"k's batch and q's": (ks[0], B), "v's batch and q's": (vs[0], B), "k's head size and q's": (ks[3], D),
             "v's heads and k's": (vs[1], Hkv), "v's length and k's": (vs[2], Nk)}
    unequal = [what for what, (a, b) in pairs.items() if not same(a, b)]
    if unequal:
        symbolic = all(isinstance(pairs[what][0], torch.SymInt) or isinstance(pairs[what][1], torch.SymInt)
                       for what in unequal)
        raise Reject(f"q {qs}, k {ks}, v {vs} do not fit together: {', '.join(unequal)} "
                     + ("are not provably equal (dynamic shapes traced them as separate symbols, as they do a "
                        "KV cache's keys and values)" if symbolic else "differ"))
    # q, k, v of different dtypes occur under autocast (HF's RoPE leaves q, k in fp32, v comes from a
    # bf16 linear): the site computes in the narrowest of them, as autocast's dense attention does.
    if not _divides(Hkv, H):
        raise Reject(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if not same(N, Nk) and m.is_causal:
        # is_causal with fewer queries than keys: SDPA aligns the causal mask to the top left, where a
        # decoding step means the bottom right; the op's causal mask is for queries at the keys' positions
        raise Reject(f"is_causal with query length {N} and key length {Nk}: the op's causal mask is for queries and "
                     "keys at the same positions (cross-attention and decoding steps with an explicit mask or none "
                     "are rewritten)")
    d = static_int(D)
    if d is None:
        raise Reject(f"head size {D} is not a constant")
    if m.scale is None:
        m.scale = d ** -0.5
    if isinstance(m.scale, torch.SymFloat) or not math.isfinite(float(m.scale)):
        raise Reject("softmax scale is not a finite constant")
    m.scale = float(m.scale)
    masks = [(x, "additive mask") for x in m.additive] + [(x, "boolean mask") for x in m.allow + m.forbid]
    for mask, what in masks:
        ms = shape(mask)
        if mask in m.unflatten:  # [B*H, N, Nk], read as [B, H, N, Nk] (scores.py checked the merged axis)
            ms = (B, H, *ms[1:])
        if ms is None or len(ms) > 4 or len(ms) == 0:
            raise Reject(f"{what} of shape {ms} is not broadcastable to [B, H, N, Nk]")
        ms = (1,) * (4 - len(ms)) + ms
        if not (same(ms[3], Nk) and all(same(x, 1) or same(x, y) for x, y in zip(ms[:3], (B, H, N)))):
            raise Reject(f"{what} of shape {ms} is not broadcastable to [B, H, N, Nk] = {(B, H, N, Nk)}")
        dtype = val(mask).dtype
        if what == "additive mask" and not dtype.is_floating_point:
            raise Reject(f"additive mask has dtype {dtype}")
        if what == "boolean mask" and dtype != torch.bool:
            raise Reject(f"mask condition has dtype {dtype}, not bool")
        if requires_grad(mask):  # only a float mask can: a learned bias (T5's, BEiT's in full fine-tuning)
            device = val(mask).device
            if device.type != "cpu":
                raise Reject(f"the {what} requires grad (a learned bias) on {device.type}: the Triton kernels give "
                             "no bias gradient, and SDPA's memory-efficient kernel does (it stays dense)")
            m.mask_grad = True
    leaking = users_outside(m.nodes, keep=[m.output])
    if leaking:
        raise Reject(f"intermediate '{leaking[0].name}' is also used elsewhere (e.g. attention weights "
                     "returned with output_attentions=True)")
