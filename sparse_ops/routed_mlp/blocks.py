"""Per-block pieces of the routed MLP's PyTorch path: projections with LoRA, activations and their
vector-Jacobian products, token routing, and the block-ordered weights with the
LoRA factors inside the block GEMMs."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import workspace
from .spec import ACTIVATIONS, MlpSpec, MlpWeights, block_bounds


def _project(x: Tensor, W: Tensor, layout: str) -> Tensor:
    return F.linear(x, W) if layout == "oi" else x @ W


def _lora(x: Tensor, A: Optional[Tensor], Bm: Optional[Tensor], scale: float) -> Optional[Tensor]:
    return None if A is None else F.linear(F.linear(x, A), Bm) * scale


def _pre_activations(xb: Tensor, lx_in: Tensor, lx_gate: Tensor, wb: MlpWeights, spec: MlpSpec) -> tuple[Tensor, ...]:
    """What backward needs to rebuild a block's hidden activations element-wise: (gate, up) for a
    gated MLP, (pre,) for a plain one; each [Tb, Fb]."""
    u = _project(xb, wb.in_w, spec.in_layout)
    if wb.in_b is not None:
        u = u + wb.in_b
    if (d := _lora(lx_in, wb.in_a, wb.in_bb, spec.in_scale)) is not None:
        u = u + d
    if not spec.gated:
        return (u,)
    g = _project(xb, wb.gate_w, spec.gate_layout)
    if wb.gate_b is not None:
        g = g + wb.gate_b
    if (d := _lora(lx_gate, wb.gate_a, wb.gate_bb, spec.gate_scale)) is not None:
        g = g + d
    return g, u


def _activate(pre: tuple[Tensor, ...], spec: MlpSpec) -> Tensor:
    act = ACTIVATIONS[spec.activation]
    return act(pre[0]) * pre[1] if spec.gated else act(pre[0])


def _hidden(xb: Tensor, lx_in: Tensor, lx_gate: Tensor, wb: MlpWeights, spec: MlpSpec) -> Tensor:
    """The hidden activations of a block (or of the whole layer, for unsliced weights): [Tb, Fb]."""
    return _activate(_pre_activations(xb, lx_in, lx_gate, wb, spec), spec)


def _block_forward(
    xb: Tensor, lx_in: Tensor, lx_gate: Tensor, wb: MlpWeights, spec: MlpSpec, out_keep: Optional[Tensor]
) -> Tensor:
    """One block's contribution to y for its tokens: xb [Tb, d_in] -> [Tb, d_out].
    lx_* are the LoRA inputs (x after LoRA dropout); out_keep the down-LoRA dropout scale [Tb, Fb]."""
    return _block_output(_hidden(xb, lx_in, lx_gate, wb, spec), wb, spec, out_keep)


def _block_output(h: Tensor, wb: MlpWeights, spec: MlpSpec, out_keep: Optional[Tensor]) -> Tensor:
    y = _project(h, wb.out_w, spec.out_layout)  # [Tb, d_out]
    if wb.out_a is not None:
        y = y + _lora(h if out_keep is None else h * out_keep, wb.out_a, wb.out_bb, spec.out_scale)
    return y


def unit_importance(x: Tensor, w: MlpWeights, spec: MlpSpec) -> Tensor:
    """How much each hidden unit contributes to each token's output: |h_j(t)| * ||W_out[:, j]||,
    [T, F] fp32 (no dropout; the out projection's LoRA is left out)."""
    h = _hidden(x, x, x, w, spec).float()
    col_norm = w.out_w.float().norm(dim=0 if spec.out_layout == "oi" else 1)  # [F]
    return h.abs() * col_norm


def route_tokens(block_mask: Tensor, counts: Optional[list[int]] = None) -> tuple[Tensor, list[int]]:
    """Routing metadata in one place: token ids sorted by block, and tokens per block.
    block_mask [T, n_blocks] bool -> (tokens [sum of counts] int64, counts per block). The counts
    are the one host sync that sizes everything below, none when given (the forward's, in backward);
    the token list is then sized by them (nonzero_static: no second sync)."""
    T = block_mask.shape[0]
    if counts is None:
        counts = block_mask.sum(0).tolist()
    order = torch.nonzero_static(block_mask.t().reshape(-1), size=sum(counts)).squeeze(1)  # by block, then token
    return order % max(T, 1), counts


def _routed_blocks(block_mask: Tensor, spec: MlpSpec, counts: Optional[list[int]] = None):
    """(block, lo, hi, tokens, every) for each block with tokens; `every`: it serves all T tokens,
    so no gather or scatter is needed. counts: tokens per block when known (route_tokens)."""
    T = block_mask.shape[0]
    tokens, counts = route_tokens(block_mask, counts)
    start = 0
    for b, (lo, hi) in enumerate(block_bounds(spec.hidden, spec.n_blocks)):
        tok = tokens[start : start + counts[b]]
        start += counts[b]
        if counts[b]:
            yield b, lo, hi, tok, counts[b] == T


def _rows(t: Optional[Tensor], tok: Tensor, every: bool) -> Optional[Tensor]:
    return t if t is None or every else t[tok]


# --- the block-batched path: LoRA inside the block GEMMs --------------------------------------------
#
# A LoRA delta per block would be a pair of thin GEMMs (rank r) per projection per block, each
# streaming the block's whole input: on a CPU they cost more than their FLOPs say (SmolLM2's MLP at
# 2048 tokens: 15 thin GEMMs per block, ~15% of the routed MLP's time). So the LoRA factors ride inside
# the block GEMMs instead:
# - in / gate: the LoRA inputs t = dropout(x) A^T [T, r] do not depend on the block, so they are
#   computed once per layer and put beside x as columns, X = [t_gate | x | t_in] [T, K]; each
#   projection reads its window of X (gate [t_gate | x], in [x | t_in]: no zero columns for the
#   other projection's t) against a block weight with the matching columns, [s B_b | W_b] or
#   [W_b | s B_b], so one GEMM gives x W_b^T + s t B_b^T. Backward: dz [W_b | s B_b] gives d(x) and
#   d(t) in one GEMM, into the projection's window of d(X).
# - out: the block's LoRA A columns are appended to its weight as output rows, [W_out_b ; A_out_b], so
#   one GEMM gives [h W_out_b^T | h A_out_b^T]; the rank-r part is summed over blocks and multiplied by
#   s B_out once per layer. Backward: d(h) = [dy | s dy B_out] [W_out_b ; A_out_b], one GEMM.
# Per block, only the LoRA B gradients (in, gate) and A gradient (out) remain thin GEMMs. With LoRA
# dropout on the out projection, h and its LoRA input differ, so that part stays a separate GEMM.


class _LoraColumns(NamedTuple):
    """Where things sit in X = [t_gate | x | t_in] (a t only with that projection's LoRA): K columns in
    all. t, X without x, is [t_gate | t_in]."""

    K: int
    x_cols: slice
    in_cols: Optional[slice]
    gate_cols: Optional[slice]

    def of(self, proj: str) -> Optional[slice]:
        """The projection's LoRA input t in X."""
        return self.in_cols if proj == "in" else self.gate_cols

    def window(self, proj: str) -> slice:
        """The columns of X the projection reads: x and its own t."""
        own = self.of(proj)
        if own is None:
            return self.x_cols
        return slice(self.x_cols.start, own.stop) if proj == "in" else slice(own.start, self.x_cols.stop)

    def in_t(self, proj: str) -> slice:
        """The projection's LoRA input in t = [t_gate | t_in]."""
        c, shift = self.of(proj), (self.x_cols.stop - self.x_cols.start if proj == "in" else 0)
        return slice(c.start - shift, c.stop - shift)

    def present(self) -> tuple[str, ...]:
        """The projections with a LoRA input, in t's order."""
        return tuple(p for p in ("gate", "in") if self.of(p) is not None)


def _lora_columns(d_in: int, w: MlpWeights, spec: MlpSpec) -> _LoraColumns:
    """Where the input projections' LoRA inputs sit in X = [t_gate | x | t_in]."""
    r_gate = w.gate_a.shape[0] if (spec.gated and w.gate_a is not None) else 0
    r_in = 0 if w.in_a is None else w.in_a.shape[0]
    return _LoraColumns(r_gate + d_in + r_in, slice(r_gate, r_gate + d_in),
                        slice(r_gate + d_in, r_gate + d_in + r_in) if r_in else None,
                        slice(0, r_gate) if r_gate else None)


def _lora_inputs(x: Tensor, w: MlpWeights, spec: MlpSpec, cols: _LoraColumns, keep_in: Optional[Tensor],
                 keep_gate: Optional[Tensor], out: Optional[Tensor] = None) -> Optional[Tensor]:
    """t = [dropout(x) A_gate^T | dropout(x) A_in^T], X's columns beside x: [T, K - d_in] (written into
    `out` if given); None without LoRA on the input projections."""
    d_in = x.shape[1]
    if cols.K == d_in:
        return None
    present = cols.present()
    if keep_in is None and keep_gate is None:  # one GEMM for both projections
        A = torch.cat([getattr(w, f"{p}_a") for p in present]) if len(present) > 1 else getattr(w, f"{present[0]}_a")
        return x @ A.t() if out is None else torch.mm(x, A.t(), out=out)
    parts = [F.linear(x if (keep := keep_in if p == "in" else keep_gate) is None else x * keep, getattr(w, f"{p}_a"))
             for p in present]  # [T, r] each
    if out is None:
        return torch.cat(parts, 1)
    for p, part in zip(present, parts):
        out[:, cols.in_t(p)] = part
    return out


def _with_lora_inputs(x: Tensor, t: Optional[Tensor], cols: _LoraColumns) -> Tensor:
    """X = [t_gate | x | t_in] [T, K] from x and t = [t_gate | t_in]."""
    if t is None:
        return x
    parts = [t[:, cols.in_t("gate")]] if cols.gate_cols is not None else []
    parts.append(x)
    if cols.in_cols is not None:
        parts.append(t[:, cols.in_t("in")])
    return torch.cat(parts, 1)


def _take(t: Optional[Tensor], dim: int, perm: Optional[Tensor]) -> Optional[Tensor]:
    """t with its hidden units (along dim) in block order: t itself without a permutation."""
    return t if (t is None or perm is None) else t.index_select(dim, perm)


def _gather_into(dest: Tensor, t: Tensor, dim: int, perm: Optional[Tensor]) -> None:
    """dest = _take(t, dim, perm), written in place (dest may be a strided view)."""
    if perm is None:
        dest.copy_(t)
    elif dim == 1 and t.dim() == 2 and t.device.type == "cpu" and dest.is_contiguous():
        # A 2-D weight's columns (the out projection's units, "oi"): on the CPU index_select along dim 1
        # took 1.6x as long as gather with the permutation broadcast over the rows ([4096, 11008] fp32,
        # 2 threads: 32.9 against 20.5 ms; the same at SmolLM2's [576, 1536];
        # benchmarks/research/column_gather.py). The same values either way.
        torch.gather(t, 1, perm.expand(t.shape[0], -1), out=dest)
    else:
        torch.index_select(t, dim, perm, out=dest)


def _in_block_order(owner: object, role: str, t: Tensor, dim: int, perm: Optional[Tensor]) -> Tensor:
    """_take(t, dim, perm) for a whole weight, into memory `owner` borrows (workspace.empty)."""
    if perm is None:
        return t
    out = workspace.empty(owner, role, tuple(t.shape), t)
    _gather_into(out, t, dim, perm)
    return out


class _BlockOrderWeights:
    """One call's weights with the hidden units in block order (the clustering permutation, if any,
    applied) and the LoRA factors inside them, in the layouts the block GEMMs read; a block is a
    slice of them (a view). Built once per forward and once per backward, freed after: transient,
    never saved for backward.

    Built whole rather than block by block because of the out projection: gathering a block's
    columns of W_out [d_out, F] after the GEMMs have evicted it reads a cache line per element (0.7 ms
    per block for SmolLM2's MLP on this CPU), while gathering all of them row by row costs 0.35 ms.

        inputs[proj]  [F, window]         against the projection's window of X: [s B | W] (gate),
                                          [W | s B] (in), W alone without LoRA
        biases[proj]  [F]
        out           [d_out (+ r), F]    W_out, then (LoRA merged into the out GEMM) A_out as rows
        out_a         [r, F]              A_out when its input differs from h (LoRA dropout)
    """

    @torch.no_grad()  # the torch path's gradients are explicit (routed_mlp_backward_saved)
    def __init__(self, w: MlpWeights, spec: MlpSpec, cols: _LoraColumns, perm: Optional[Tensor], merged: bool,
                 with_inputs: bool = True):
        """with_inputs=False: no input projections (a backward that needs no d(X))."""
        self.perm, self.cols = perm, cols
        projections = _input_projections(spec) if with_inputs else ()
        # the large buffers come from workspace.empty, lent to this object until it is freed
        self.inputs = {p: _extended_input(self, p, w, spec, cols, perm) for p in projections}
        self.biases = {p: _take(getattr(w, f"{p}_b"), 0, perm) for p in projections}
        self.out = _extended_out(self, w, spec, perm, merged)
        self.out_a = None if (w.out_a is None or merged) else _take(w.out_a, 1, perm)

    def input_block(self, proj: str, lo: int, hi: int) -> Tensor:
        return self.inputs[proj][lo:hi]  # [Fb, width of the projection's window of X]

    def bias_block(self, proj: str, lo: int, hi: int) -> Optional[Tensor]:
        b = self.biases[proj]
        return None if b is None else b[lo:hi]  # [Fb]

    def out_block(self, lo: int, hi: int) -> Tensor:
        return self.out[:, lo:hi]  # [d_out (+ r), Fb]

    def out_a_block(self, lo: int, hi: int) -> Tensor:
        return self.out_a[:, lo:hi]  # [r, Fb]

    def units(self, lo: int, hi: int) -> Optional[Tensor]:
        """The original indices of the block's hidden units (None: they are lo:hi)."""
        return None if self.perm is None else self.perm[lo:hi]


def _extended_input(owner: object, proj: str, w: MlpWeights, spec: MlpSpec, cols: _LoraColumns,
                    perm: Optional[Tensor]) -> Tensor:
    """An input projection as [F, width] against its window of X (cols.window), units in block order (a
    view where nothing is added or moved; strided for the "io" layout), in memory `owner` borrows."""
    W = getattr(w, f"{proj}_w")
    oi = getattr(spec, f"{proj}_layout") == "oi"
    unit_dim = 0 if oi else 1
    own = cols.of(proj)
    if own is None:  # no LoRA columns
        Wp = _in_block_order(owner, proj, W, unit_dim, perm)
        return Wp if oi else Wp.t()
    win = cols.window(proj)
    d_in, F_, width = W.shape[1 - unit_dim], W.shape[unit_dim], win.stop - win.start
    # oi: rows are units, built as [F, width]; io: built as [width, F] (row by row from W [d_in, F]), viewed [F, width]
    ext = workspace.empty(owner, proj, (F_, width), W) if oi else workspace.empty(owner, proj, (width, F_), W).t()
    x_at = cols.x_cols.start - win.start
    _gather_into(ext[:, x_at : x_at + d_in] if oi else ext[:, x_at : x_at + d_in].t(), W, unit_dim, perm)
    ext[:, own.start - win.start : own.stop - win.start] = (
        _take(getattr(w, f"{proj}_bb"), 0, perm) * getattr(spec, f"{proj}_scale"))
    return ext


def _extended_out(owner: object, w: MlpWeights, spec: MlpSpec, perm: Optional[Tensor], with_lora_a: bool) -> Tensor:
    """The out projection as [d_out (+ r), F], units in block order: W_out's columns, then (with_lora_a)
    LoRA A's as extra rows; in memory `owner` borrows."""
    W = w.out_w
    oi = spec.out_layout == "oi"
    unit_dim = 1 if oi else 0
    if not with_lora_a:
        Wp = _in_block_order(owner, "out", W, unit_dim, perm)
        return Wp if oi else Wp.t()
    d_out, F_, r = W.shape[1 - unit_dim], W.shape[unit_dim], w.out_a.shape[0]
    ext = workspace.empty(owner, "out", (d_out + r, F_), W) if oi else workspace.empty(owner, "out", (F_, d_out + r), W).t()
    _gather_into(ext[:d_out] if oi else ext[:d_out].t(), W, unit_dim, perm)
    ext[d_out:] = _take(w.out_a, 1, perm)
    return ext


def _merges_out_lora(w: MlpWeights, spec: MlpSpec) -> bool:
    """The out LoRA's A rides in the block's out GEMM (its input is h itself: no LoRA dropout)."""
    return w.out_a is not None and spec.out_dropout == 0.0


def _block_pre(Xb: Tensor, proj: str, bw: _BlockOrderWeights, lo: int, hi: int, out: Optional[Tensor]) -> Tensor:
    """A block's pre-activation of one input projection, [Tb, Fb], written into `out` if given."""
    Xb = Xb[:, bw.cols.window(proj)]  # [Tb, width]
    Wt = bw.input_block(proj, lo, hi).t()  # [width, Fb]
    bias = bw.bias_block(proj, lo, hi)
    if bias is None:
        return Xb @ Wt if out is None else torch.mm(Xb, Wt, out=out)
    return torch.addmm(bias, Xb, Wt) if out is None else torch.addmm(bias, Xb, Wt, out=out)


def _input_projections(spec: MlpSpec) -> tuple[str, ...]:
    """The input projections, in the order their pre-activations are saved."""
    return ("gate", "in") if spec.gated else ("in",)


def _activation_vjp(name: str, z: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(act(z), d(act(z)) -> d(z)); aten's own backward kernels where there is one."""
    a = ACTIVATIONS[name](z)
    if name == "silu":
        return a, lambda g: torch.ops.aten.silu_backward(g, z)
    if name in ("gelu", "gelu_tanh"):
        approximate = "tanh" if name == "gelu_tanh" else "none"
        return a, lambda g: torch.ops.aten.gelu_backward(g, z, approximate=approximate)
    if name == "relu":
        return a, lambda g: torch.ops.aten.threshold_backward(g, a, 0)
    if name == "relu2":  # d relu(z)^2 = 2 relu(z)
        return a, lambda g: g * (2 * F.relu(z))
    _, vjp = torch.func.vjp(ACTIVATIONS[name], z)
    return a, lambda g: vjp(g)[0]
