"""The routed MLP as grouped GEMMs: each projection, in each direction, for every block in one GEMM,
with the blocks' row ends on the device, so no host sync sizes anything (ffn_impl="grouped").

The block-batched path (forward.py, backward.py) runs one GEMM per projection per block, sized by the
tokens per block: the host must read them (a sync per call) and the launches grow with the block
count. torch._grouped_mm takes the groups' ends as a device tensor instead (a CUTLASS kernel for bf16
on Hopper; a loop of GEMMs on the CPU, fp32/bf16/fp16). What the host still needs is the number of
routed pairs S, the rows of every grouped operand: the site derives it from ffn_active and the row
counts it reads once per step (sites/row_counts.py); a caller that does not know it passes None and
it is read here (one sync).

The routed pairs, [S] rows sorted by block then token (routed_pairs):
    tokens  [S] int64     the token of each row
    blocks  [S] int64     its block
    offs    [nb] int32    where each block's rows end (cumulative counts; empty blocks allowed)

Saved for backward by exact_mlp_forward(grouped=True) and grouped_routed_forward, one flat tensor:
    [pre-activations per projection, each [S, Fb] (gate then up, or the single one) | t | t_out]
with t and t_out as in routed_mlp_forward's layout (blocks.py, _lora_inputs). Equal block widths
(Fb = F / nb) make the block-ordered weights [F, *] views [nb, Fb, *].
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .backward import _Grads, _input_lora_backward, _zero_columns
from .blocks import (
    _BlockOrderWeights, _activate, _activation_vjp, _input_projections, _lora_columns, _lora_inputs,
    _with_lora_inputs,
)
from .compensation import compensation, compensation_input_grad
from .dropout import lora_input_scales
from .spec import MlpSpec, MlpWeights, out_features

# torch._grouped_mm wants every stride but the unit one to be a multiple of 16 bytes
_ALIGN_BYTES = 16


class Pairs:
    """The routed pairs of a block mask, sorted by block, then token. Each index is computed when first
    read (one launch each), so a caller that needs only some launches only those."""

    def __init__(self, order: Tensor, T: int, offs: Tensor):
        self._order, self._T = order, max(T, 1)  # order [S] int64: block * T + token
        self.offs = offs  # [nb] int32: where each block's rows end in that order

    @functools.cached_property
    def tokens(self) -> Tensor:  # [S] int64: the token of each routed pair
        return self._order % self._T

    @functools.cached_property
    def blocks(self) -> Tensor:  # [S] int64: its block
        return self._order // self._T


def routed_pairs(block_mask: Tensor, n_pairs: int, check: bool = True) -> Pairs:
    """block_mask [T, nb] bool with exactly n_pairs True -> its pairs sorted by block; no host sync.
    check=False skips the device-side check of n_pairs, for a mask whose count was checked already
    (the backward's: its forward checked it, and the saved sizes carry the same count)."""
    T = block_mask.shape[0]
    order = torch.nonzero_static(block_mask.t().reshape(-1), size=n_pairs).squeeze(1)  # block * T + token
    offs = block_mask.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if check:
        # A wrong count would drop pairs or pad with token 0: checked on the device, without a sync (on CUDA a
        # device-side assert stops the run; on the CPU it raises here)
        torch._assert_async(offs[-1] == n_pairs, "spt routed MLP: the block mask's pairs differ from the count "
                            "the host derived for it (a bug: please report it with the options used)")
    return Pairs(order, T, offs)


def pair_rows(pre: Tensor, block_mask: Tensor, pairs: Pairs) -> Tensor:
    """A whole pre-activation [T, F] (units in block order) -> its routed pairs' rows [S, Fb]."""
    T, nb = block_mask.shape
    return pre.reshape(T * nb, -1).index_select(0, pairs.tokens * nb + pairs.blocks)


def grouped_unsupported(x: Tensor, w: MlpWeights, spec: MlpSpec) -> Optional[str]:
    """Why the grouped backward cannot serve this call (None: it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm is missing (torch < 2.8)"
    if spec.hidden % spec.n_blocks:
        return f"unequal blocks ({spec.hidden} hidden units in {spec.n_blocks} blocks)"
    if spec.out_dropout:
        return "LoRA dropout on the out projection (drawn per block)"
    if spec.hidden_dropout:
        return "dropout over the hidden layer (drawn per block)"
    if x.dtype not in ((torch.bfloat16,) if x.device.type == "cuda" else (torch.float32, torch.bfloat16, torch.float16)):
        return f"dtype {x.dtype} on {x.device.type}"
    cols = _lora_columns(x.shape[1], w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    dims = {"hidden units per block": spec.hidden // spec.n_blocks, "d_in": x.shape[1], "d_out": out_features(w, spec),
            "LoRA ranks": cols.K - x.shape[1], "out LoRA rank": r_out}
    dims.update({f"{p} LoRA rank": (cols.of(p).stop - cols.of(p).start) for p in cols.present()})
    for name, n in dims.items():
        if n * x.element_size() % _ALIGN_BYTES:
            return f"{name} = {n}: not a multiple of {_ALIGN_BYTES // x.element_size()} elements"
    return None


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [S, K] @ b [nb, K, N] -> [S, N] (block g's rows times b[g]), or a [M, S] @ b [S, N] -> [nb, M, N]
    (per block, the sum over its rows)."""
    return torch._grouped_mm(a, b, offs=offs)


def _weight_grad(g: Tensor, inp: Tensor, offs: Tensor, layout: str, units_first: bool) -> Tensor:
    """A base weight's gradient, per block the sum over its rows of g_b^T inp_b (g [S, Fb] on the hidden
    side when units_first, else inp [S, Fb] is): [F, n] or [n, F] as the weight's layout stores it."""
    hid, other = (g, inp) if units_first else (inp, g)  # [S, Fb], [S, n]
    per_block = _gmm(hid.t(), other, offs)  # [nb, Fb, n]
    nb, Fb, n = per_block.shape
    units_are_rows = (layout == "oi") == units_first  # oi in/gate: [F, d_in]; oi out: [d_out, F]
    return per_block.reshape(nb * Fb, n) if units_are_rows else per_block.permute(2, 0, 1).reshape(n, nb * Fb)


@torch.no_grad()  # explicit formulas, as routed_mlp_backward_saved
def grouped_backward_saved(
    dy: Tensor,
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    block_mask: Tensor,
    seed: int,
    needs_x: bool,
    needs: MlpWeights,
    saved: Tensor,
    perm: Optional[Tensor] = None,
    comp: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Optional[Tensor], MlpWeights]:
    """routed_mlp_backward_saved for what exact_mlp_forward(grouped=True) or grouped_routed_forward
    saved: the same gradients (x, LoRA factors, base weights and biases; grouped_unsupported lists what
    it leaves to the block-batched path), every block's GEMMs in one grouped GEMM per projection and
    direction."""
    out = _Grads(x, w, spec, needs_x, needs, zero_dx=False)
    wanted = {s for s, g in out.grads.items() if g is not None}
    T, d_in, d_out = x.shape[0], x.shape[1], dy.shape[1]
    nb, F = spec.n_blocks, spec.hidden
    Fb = F // nb
    projections = _input_projections(spec)
    cols = _lora_columns(d_in, w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    n_t = T * (cols.K - d_in)
    S = (saved.numel() - n_t - T * r_out) // (len(projections) * Fb)  # the pairs' rows: from sizes, no sync
    pairs = routed_pairs(block_mask, S, check=False)  # the forward checked this mask's count
    pre = [saved[i * S * Fb : (i + 1) * S * Fb].view(S, Fb) for i in range(len(projections))]
    n_pre = len(projections) * S * Fb
    t = saved[n_pre : n_pre + n_t].view(T, cols.K - d_in) if n_t else None  # [T, K - d_in]
    t_out = saved[n_pre + n_t :].view(T, r_out) if r_out else None  # [T, r]
    # the out LoRA's A rides in the out GEMM (grouped_unsupported: no out dropout)
    dY = torch.cat([dy, (dy @ w.out_bb.to(dy.dtype)) * spec.out_scale], 1) if r_out else dy  # [T, d_out (+ r)]
    wants_dX = needs_x or bool({"in_a", "gate_a"} & wanted)
    bw = _BlockOrderWeights(w, spec, cols, perm, merged=bool(r_out), with_inputs=wants_dX)
    dYs = dY.index_select(0, pairs.tokens)  # [S, d_out (+ r)]
    a, act_vjp = _activation_vjp(spec.activation, pre[0])
    h = a * pre[1] if spec.gated else a  # [S, Fb]
    dh = _gmm(dYs, bw.out.unflatten(1, (nb, Fb)).transpose(0, 1), pairs.offs)  # [S, Fb]
    block_grads: dict[str, Tensor] = {}  # whole [.., F] in block order
    if "out_a" in wanted:  # per block dt_b^T h_b: [nb, r, Fb] -> [r, F]
        block_grads["out_a"] = _gmm(dYs[:, d_out:].t(), h, pairs.offs).transpose(0, 1).reshape(r_out, F)
    if "out_w" in wanted:  # per block dy_b^T h_b
        block_grads["out_w"] = _weight_grad(dYs[:, :d_out], h, pairs.offs, spec.out_layout, units_first=False)
    dz = {"gate": act_vjp(dh * pre[1]), "in": dh * a} if spec.gated else {"in": act_vjp(dh)}  # [S, Fb] each
    ts = None if t is None else t.index_select(0, pairs.tokens)  # [S, K - d_in]
    xs = x.index_select(0, pairs.tokens) if {"in_w", "gate_w"} & wanted else None  # [S, d_in]
    dX = None
    if wants_dX:  # d(X) [T, K]: d(x) and the input projections' LoRA A gradients
        dX = torch.zeros(T, cols.K, dtype=out.acc, device=x.device)
        if comp is not None and needs_x:  # the compensation's d(x)
            U, V = (c.to(out.acc) for c in comp)
            compensation_input_grad(dy.to(out.acc), ~block_mask, U, V, out=dX[:, cols.x_cols])
    dXs = None  # [S, K]: the pairs' rows of d(X), one scatter-add into dX (into a column window: 3x slower)
    for proj in projections:
        if wants_dX:
            win = cols.window(proj)
            part = _gmm(dz[proj], bw.inputs[proj].unflatten(0, (nb, Fb)), pairs.offs)  # [S, width]
            if dXs is None:  # the first projection's window written, the rest zeroed (no fill of it all)
                dXs = part.new_empty(S, cols.K)
                dXs[:, win] = part
                _zero_columns(dXs, 0, win.start)
                _zero_columns(dXs, win.stop, cols.K)
            else:
                dXs[:, win] += part
        if f"{proj}_w" in wanted:  # per block dz_b^T x_b
            block_grads[f"{proj}_w"] = _weight_grad(dz[proj], xs, pairs.offs, getattr(spec, f"{proj}_layout"),
                                                    units_first=True)
        if f"{proj}_b" in wanted:  # per block, the sum of dz_b's rows: [nb, Fb] -> [F]
            block_grads[f"{proj}_b"] = dz[proj].new_zeros(nb, Fb, dtype=out.acc).index_add_(
                0, pairs.blocks, dz[proj].to(out.acc)).reshape(F)
        if f"{proj}_bb" in wanted:  # per block dz_b^T t_b: [nb, Fb, r] -> [F, r]
            tb = ts[:, cols.in_t(proj)].contiguous()
            block_grads[f"{proj}_bb"] = _gmm(dz[proj].t(), tb, pairs.offs).reshape(F, -1) * getattr(spec, f"{proj}_scale")
    out.add_block(None, pairs.tokens, False, block_grads, 0, F, bw.units(0, F))
    if wants_dX:
        dX.index_add_(0, pairs.tokens, dXs.to(out.acc))
        keep_in, keep_gate = lora_input_scales(x, spec, seed)
        _input_lora_backward(dX, x, w, spec, cols, keep_in, keep_gate, out, wanted)
    if "out_bb" in wanted:
        out.add("out_bb", (dy.to(out.acc).t() @ t_out.to(out.acc)) * spec.out_scale)
    return out.finish(dy)


@torch.no_grad()  # gradients: grouped_backward_saved
def grouped_routed_forward(
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    block_mask: Tensor,
    seed: int = 0,
    n_pairs: Optional[int] = None,
    saved: Optional[list] = None,
    perm: Optional[Tensor] = None,
    comp: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """routed_mlp_forward (without its block_norms) by grouped GEMMs: y [T, d_out]. `saved` receives
    grouped_backward_saved's layout (the routed pairs' pre-activations [S, Fb] per projection, t,
    t_out: the sum over the routed blocks of h A_out_b^T). n_pairs: block_mask's number of pairs
    when the caller knows it (else read: one sync)."""
    T, d_in = x.shape
    d_out, nb = out_features(w, spec), spec.n_blocks
    Fb = spec.hidden // nb
    S = int(block_mask.sum()) if n_pairs is None else n_pairs
    pairs = routed_pairs(block_mask, S)
    cols = _lora_columns(d_in, w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    t = _lora_inputs(x, w, spec, cols, *lora_input_scales(x, spec, seed))  # [T, K - d_in] or None
    Xs = _with_lora_inputs(x, t, cols).index_select(0, pairs.tokens)  # [S, K]
    bw = _BlockOrderWeights(w, spec, cols, perm, merged=bool(r_out))
    pre = []
    for proj in _input_projections(spec):
        z = _gmm(Xs[:, cols.window(proj)], bw.inputs[proj].unflatten(0, (nb, Fb)).transpose(1, 2), pairs.offs)
        if (bias := bw.biases[proj]) is not None:
            z += bias.view(nb, Fb).index_select(0, pairs.blocks)
        pre.append(z)  # [S, Fb]
    h = _activate(tuple(pre), spec)  # [S, Fb]
    Ys = _gmm(h, bw.out.unflatten(1, (nb, Fb)).permute(1, 2, 0), pairs.offs)  # [S, d_out (+ r)]
    Y = x.new_zeros(T, d_out + r_out)  # [y without the out LoRA | sum over blocks of h A_out_b^T]
    if comp is not None:
        compensation(x, ~block_mask, *comp, out=Y[:, :d_out])
    Y.index_add_(0, pairs.tokens, Ys)
    if saved is not None:
        saved.append(torch.cat([p.reshape(-1) for p in pre] + [x.new_empty(0) if t is None else t.reshape(-1)]
                               + [Y[:, d_out:].reshape(-1)]))
    y = Y[:, :d_out]
    if r_out:
        y = torch.addmm(y, Y[:, d_out:], w.out_bb.t(), alpha=spec.out_scale)
    if w.out_b is not None:
        y = y + w.out_b
    return y
