"""Routed two-layer MLP: each token runs only its chosen blocks of the hidden layer.

The hidden layer (size F) is cut into `n_blocks` contiguous blocks. A token's chosen blocks contribute
with weight 1 (hard routing), so with every block chosen this *is* the dense MLP:

    plain:  y = out( act(in(x)) )                 e.g. BERT / GPT-2 / OPT
    gated:  y = out( act(gate(x)) * in(x) )       e.g. LLaMA's SwiGLU: gate_proj, up_proj, down_proj

Each projection is `x W^T + b` (layout "oi", nn.Linear) or `x W + b` (layout "io", GPT-2's Conv1D),
optionally plus a LoRA delta `(dropout(x) A^T) B^T * scale`. Block b uses rows lo:hi of the in/gate
weights, biases and LoRA B, and columns lo:hi of the out weight and LoRA A; the out bias is added once.

Shapes: x [T, d_in], block_mask [T, n_blocks] bool, y [T, d_out].

This is the plain PyTorch path: tokens are grouped by block (one gather per block, one GEMM per
projection per block with the LoRA factors inside it, one scatter-add; see "LoRA inside the block
GEMMs" below). Forward keeps only the routed blocks' pre-activations (gate and up, or the single
pre-activation) and the rank-r LoRA inputs: with half the blocks active that is about half of what
the dense MLP saves, and backward (routed_mlp_backward_saved, explicit formulas) recomputes no
projection. routed_mlp_backward recomputes everything from x instead (the least memory: x and the
[T, n_blocks] mask only).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# Implementations of the routed MLP: routed_mlp_triton.py (CUDA kernels), this file's block-batched
# PyTorch path, or reference.routed_mlp_reference (a per-token loop, for checks only).
FFN_IMPLS = ("auto", "triton", "torch", "reference")
FFN_IMPL_ENV = "SPT_FFN_IMPL"


def resolve_ffn_impl(impl: str, device: torch.device) -> str:
    """'auto' -> $SPT_FFN_IMPL if set, else torch. The torch path is the default on CUDA too, by
    measurement: on an H200 (LLaMA-7B MLP, 8192 tokens, bf16, 2 of 4 blocks; ffn_llama7b_h200.json)
    it ran forward + backward in 9.5 ms against 22.2 ms for the (untuned) Triton kernels."""
    if impl == "auto":
        impl = os.environ.get(FFN_IMPL_ENV, "auto")
        if impl not in FFN_IMPLS:
            raise ValueError(f"{FFN_IMPL_ENV}={impl!r}: must be one of {', '.join(FFN_IMPLS)}")
    if impl == "auto":
        impl = "torch"
    if impl not in FFN_IMPLS:
        raise ValueError(f"ffn_impl must be one of {', '.join(FFN_IMPLS)}; got {impl!r}")
    return impl


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# Activations the MLP pass recognises, by the name recorded in MlpSpec.activation.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
}


@dataclass(frozen=True)
class MlpSpec:
    """Static description of one matched MLP; travels through the graph as a string."""

    activation: str
    gated: bool
    hidden: int  # F, the intermediate size
    n_blocks: int
    in_layout: str = "oi"
    gate_layout: str = "oi"
    out_layout: str = "oi"
    in_scale: float = 1.0  # LoRA scalings
    gate_scale: float = 1.0
    out_scale: float = 1.0
    in_dropout: float = 0.0  # LoRA dropout probabilities (0 when traced in eval mode)
    gate_dropout: float = 0.0
    out_dropout: float = 0.0
    # The dtype the traced projections computed in when it differs from the input's (torch.autocast:
    # "bfloat16" / "float16"), "" otherwise. Autocast is not active inside the custom op at run time
    # (AOTAutograd made its casts explicit), so the op learns the compute dtype from here.
    compute: str = ""
    # A fused gate/up projection (one weight [2F, d] split by chunk/split in the model): "gate_up" (the
    # gate is the first half) or "up_gate". The op receives it in the gate slots and splits it
    # (split_fused); its gradients are joined back (join_fused). "": separate projections.
    fused: str = ""

    def to_str(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    @lru_cache(maxsize=None)
    def from_str(text: str) -> "MlpSpec":
        return MlpSpec(**json.loads(text))


class MlpWeights(NamedTuple):
    """The twelve parameter slots of a routed MLP (None where a projection has no such tensor).
    `*_a` / `*_bb` are the LoRA A [r, in] and B [out, r] factors."""

    in_w: Optional[Tensor] = None
    in_b: Optional[Tensor] = None
    in_a: Optional[Tensor] = None
    in_bb: Optional[Tensor] = None
    gate_w: Optional[Tensor] = None
    gate_b: Optional[Tensor] = None
    gate_a: Optional[Tensor] = None
    gate_bb: Optional[Tensor] = None
    out_w: Optional[Tensor] = None
    out_b: Optional[Tensor] = None
    out_a: Optional[Tensor] = None
    out_bb: Optional[Tensor] = None


def block_bounds(hidden: int, n_blocks: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal blocks covering 0..hidden."""
    edges = [round(i * hidden / n_blocks) for i in range(n_blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def out_features(w: MlpWeights, spec: MlpSpec) -> int:
    return w.out_w.shape[1] if spec.out_layout == "io" else w.out_w.shape[0]


def _slot_slice(slot: str, spec: MlpSpec) -> Optional[int]:
    """The dimension of a slot's tensor that is cut by hidden-layer blocks (None: used whole)."""
    proj, part = slot.split("_")
    layout = getattr(spec, f"{proj}_layout")
    if proj in ("in", "gate"):  # hidden units are this projection's outputs
        return {"w": 0 if layout == "oi" else 1, "b": 0, "a": None, "bb": 0}[part]
    return {"w": 1 if layout == "oi" else 0, "b": None, "a": 1, "bb": None}[part]  # out: hidden are inputs


def _block_weights(w: MlpWeights, spec: MlpSpec, lo: int, hi: int) -> MlpWeights:
    """The slices of every slot that block lo:hi uses (the out bias is left to the caller)."""
    sliced = {}
    for slot, t in w._asdict().items():
        dim = _slot_slice(slot, spec)
        if t is None or slot == "out_b":
            sliced[slot] = None
        else:
            sliced[slot] = t if dim is None else t.narrow(dim, lo, hi - lo)
    return MlpWeights(**sliced)


def _fused_halves(spec: MlpSpec) -> tuple[slice, slice]:
    """(the gate's rows, the up projection's rows) of a fused [2F, d] weight."""
    F = spec.hidden
    first, second = slice(0, F), slice(F, 2 * F)
    return (first, second) if spec.fused == "gate_up" else (second, first)


def split_fused(w: MlpWeights, spec: MlpSpec) -> MlpWeights:
    """A fused gate/up projection (in the gate slots) as two: row views of its weight, bias and LoRA B;
    both halves share its LoRA A. Unchanged when spec.fused is empty."""
    if not spec.fused:
        return w
    g, u = _fused_halves(spec)

    def rows(t: Optional[Tensor], sl: slice) -> Optional[Tensor]:
        return None if t is None else t[sl]

    return w._replace(in_w=rows(w.gate_w, u), in_b=rows(w.gate_b, u), in_a=w.gate_a, in_bb=rows(w.gate_bb, u),
                      gate_w=rows(w.gate_w, g), gate_b=rows(w.gate_b, g), gate_bb=rows(w.gate_bb, g))


def join_fused(grads: MlpWeights, spec: MlpSpec) -> MlpWeights:
    """Gradients of split_fused's two projections as gradients of the fused one (the in slots become
    None): the halves' rows concatenated in the fused order, the shared LoRA A's summed."""
    if not spec.fused:
        return grads
    g, _ = _fused_halves(spec)

    def cat(gate: Optional[Tensor], up: Optional[Tensor]) -> Optional[Tensor]:
        if gate is None and up is None:
            return None
        return torch.cat([gate, up] if g.start == 0 else [up, gate])

    shared = [t for t in (grads.gate_a, grads.in_a) if t is not None]
    return grads._replace(gate_w=cat(grads.gate_w, grads.in_w), gate_b=cat(grads.gate_b, grads.in_b),
                          gate_a=sum(shared[1:], shared[0]) if shared else None,
                          gate_bb=cat(grads.gate_bb, grads.in_bb), in_w=None, in_b=None, in_a=None, in_bb=None)


def permute_hidden(w: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]) -> MlpWeights:
    """The weights with hidden units reordered by perm [F] (neuron perm[i] becomes unit i), so that
    contiguous blocks of the result are the clustered groups. Copies only the slots cut by blocks;
    differentiable (index_select), so gradients flow back to the original order."""
    if perm is None:
        return w
    out = {}
    for slot, t in w._asdict().items():
        dim = _slot_slice(slot, spec)
        out[slot] = t if (t is None or dim is None) else t.index_select(dim, perm)
    return MlpWeights(**out)


def unpermute_grads(grads: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]) -> MlpWeights:
    """Gradients with respect to permute_hidden(w, spec, perm) -> gradients with respect to w."""
    if perm is None:
        return grads
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    out = {}
    for slot, g in grads._asdict().items():
        dim = _slot_slice(slot, spec)
        out[slot] = g if (g is None or dim is None) else g.index_select(dim, inverse)
    return MlpWeights(**out)


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


def _keep_scale(shape, p: float, seed: int, stream: int, device, dtype) -> Optional[Tensor]:
    """Inverted-dropout scale (0 or 1/(1-p)), reproducible from (seed, stream) in backward."""
    if p <= 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + stream) % (2**63 - 1))
    return (torch.rand(shape, generator=gen, device=device) >= p).to(dtype) / (1.0 - p)


def _lora_input_scales(x: Tensor, spec: MlpSpec, seed: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """LoRA dropout on x for the in and gate projections (independent masks, as PEFT's modules)."""
    keep_in = _keep_scale(x.shape, spec.in_dropout, seed, 1, x.device, x.dtype)
    keep_gate = _keep_scale(x.shape, spec.gate_dropout, seed, 2, x.device, x.dtype) if spec.gated else None
    return keep_in, keep_gate


def _out_keep(n_tokens: int, lo: int, hi: int, spec: MlpSpec, seed: int, block: int, x: Tensor):
    return _keep_scale((n_tokens, hi - lo), spec.out_dropout, seed, 16 + block, x.device, x.dtype)


def route_tokens(block_mask: Tensor) -> tuple[Tensor, list[int]]:
    """Routing metadata in one place: token ids sorted by block, and tokens per block.
    block_mask [T, n_blocks] bool -> (tokens [sum of counts] int64, counts per block)."""
    T = block_mask.shape[0]
    counts = block_mask.sum(0).tolist()  # the one host sync that sizes everything below
    order = block_mask.t().reshape(-1).nonzero().squeeze(1)  # sorted by block, then token
    return order % max(T, 1), counts


def _routed_blocks(block_mask: Tensor, spec: MlpSpec):
    """(block, lo, hi, tokens, every) for each block with tokens; `every`: it serves all T tokens,
    so no gather or scatter is needed."""
    T = block_mask.shape[0]
    tokens, counts = route_tokens(block_mask)
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
    else:
        torch.index_select(t, dim, perm, out=dest)


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
        self.inputs = {p: _extended_input(p, w, spec, cols, perm) for p in projections}
        self.biases = {p: _take(getattr(w, f"{p}_b"), 0, perm) for p in projections}
        self.out = _extended_out(w, spec, perm, merged)
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


def _extended_input(proj: str, w: MlpWeights, spec: MlpSpec, cols: _LoraColumns, perm: Optional[Tensor]) -> Tensor:
    """An input projection as [F, width] against its window of X (cols.window), units in block order (a
    view where nothing is added or moved; strided for the "io" layout)."""
    W = getattr(w, f"{proj}_w")
    oi = getattr(spec, f"{proj}_layout") == "oi"
    unit_dim = 0 if oi else 1
    own = cols.of(proj)
    if own is None:  # no LoRA columns
        Wp = _take(W, unit_dim, perm)
        return Wp if oi else Wp.t()
    win = cols.window(proj)
    d_in, F_, width = W.shape[1 - unit_dim], W.shape[unit_dim], win.stop - win.start
    # oi: rows are units, built as [F, width]; io: built as [width, F] (row by row from W [d_in, F]), viewed [F, width]
    ext = W.new_empty(F_, width) if oi else W.new_empty(width, F_).t()
    x_at = cols.x_cols.start - win.start
    _gather_into(ext[:, x_at : x_at + d_in] if oi else ext[:, x_at : x_at + d_in].t(), W, unit_dim, perm)
    ext[:, own.start - win.start : own.stop - win.start] = (
        _take(getattr(w, f"{proj}_bb"), 0, perm) * getattr(spec, f"{proj}_scale"))
    return ext


def _extended_out(w: MlpWeights, spec: MlpSpec, perm: Optional[Tensor], with_lora_a: bool) -> Tensor:
    """The out projection as [d_out (+ r), F], units in block order: W_out's columns, then (with_lora_a)
    LoRA A's as extra rows."""
    W = w.out_w
    oi = spec.out_layout == "oi"
    unit_dim = 1 if oi else 0
    if not with_lora_a:
        Wp = _take(W, unit_dim, perm)
        return Wp if oi else Wp.t()
    d_out, F_, r = W.shape[1 - unit_dim], W.shape[unit_dim], w.out_a.shape[0]
    ext = W.new_empty(d_out + r, F_) if oi else W.new_empty(F_, d_out + r).t()
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


@torch.no_grad()  # gradients: routed_mlp_backward_saved (routed_mlp wraps both in an autograd.Function)
def routed_mlp_forward(
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    block_mask: Tensor,
    seed: int = 0,
    block_norms: Optional[Tensor] = None,
    saved: Optional[list] = None,
    perm: Optional[Tensor] = None,
    comp: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """y [T, d_out], plus compensation(x, ~block_mask, *comp) if `comp` (U, V, M) is given (written
    where the blocks' outputs accumulate: no zero fill, no extra pass); with `perm`, that of
    permute_hidden(w, spec, perm) (the weights are put in block order once per call:
    _BlockOrderWeights). If `block_norms` ([T, n_blocks]) is given, it receives ||block output|| per
    routed token (the router's calibration target). If `saved` is a list, it receives one flat tensor:
    each routed block's pre-activations (block after block; per block gate then up, or the single
    pre-activation, each [Tb, Fb]), then the LoRA inputs t [T, r_in + r_gate] (see _lora_inputs):
    with them routed_mlp_backward_saved recomputes no projection; then (with a LoRA on the out
    projection) t_out = sum over blocks of dropout(h_b) A_out_b^T [T, r_out], which B_out's gradient
    needs."""
    T, d_out = x.shape[0], out_features(w, spec)
    blocks = list(_routed_blocks(block_mask, spec))
    projections = _input_projections(spec)
    n_pre = len(projections) * sum(tok.numel() * (hi - lo) for _, lo, hi, tok, _ in blocks)
    cols = _lora_columns(x.shape[1], w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    n_t = T * (cols.K - x.shape[1])
    flat = t = t_out = None
    if saved is not None:  # [pre-activations | t | t_out]: t, X's LoRA columns, [T, K - d_in]
        flat = x.new_empty(n_pre + n_t + T * r_out)
        t = flat[n_pre : n_pre + n_t].view(T, cols.K - x.shape[1])
        t_out = flat[n_pre + n_t :].view(T, r_out)
    t = _lora_inputs(x, w, spec, cols, *_lora_input_scales(x, spec, seed), out=t)
    X = _with_lora_inputs(x, t, cols)  # [T, K]
    merged = _merges_out_lora(w, spec)
    bw = _BlockOrderWeights(w, spec, cols, perm, merged)
    # One accumulator: index_add_ of a block's [Tb, d_out + r] output into two would read it strided,
    # 8x slower on this CPU than the whole row.
    Y = x.new_empty(T, d_out + r_out)  # [y without the out LoRA | sum over blocks of h A_out_b^T]
    if comp is None:
        Y.zero_()
    else:
        compensation(x, ~block_mask, *comp, out=Y[:, :d_out])
        Y[:, d_out:].zero_()
    offset = 0
    for b, lo, hi, tok, every in blocks:
        n, Fb = tok.numel(), hi - lo
        Xb = X if every else X.index_select(0, tok)  # [Tb, K]
        pre = []
        for proj in projections:
            dest = None if flat is None else flat[offset : offset + n * Fb].view(n, Fb)
            offset += n * Fb
            pre.append(_block_pre(Xb, proj, bw, lo, hi, dest))
        h = _activate(tuple(pre), spec)  # [Tb, Fb]
        yb = F.linear(h, bw.out_block(lo, hi))  # [Tb, d_out (+ r)]
        if r_out and not merged:
            keep = _out_keep(n, lo, hi, spec, seed, b, x)
            yb = torch.cat([yb, F.linear(h if keep is None else h * keep, bw.out_a_block(lo, hi))], 1)
        if block_norms is not None:
            own = yb[:, :d_out]
            if r_out:
                own = own + (yb[:, d_out:] @ w.out_bb.t()) * spec.out_scale
            block_norms[tok, b] = own.detach().float().norm(dim=-1).to(block_norms.dtype)
        if every:
            Y += yb
        else:
            Y.index_add_(0, tok, yb)
    if saved is not None:
        if r_out:
            t_out.copy_(Y[:, d_out:])
        saved.append(flat)
    y = Y[:, :d_out]
    if r_out:
        y = torch.addmm(y, Y[:, d_out:], w.out_bb.t(), alpha=spec.out_scale)
    if w.out_b is not None:
        y = y + w.out_b
    return y


class _Grads:
    """dx and the wanted slot gradients of one backward, accumulated block by block in fp32 (or
    wider), then cast to the inputs' dtypes."""

    def __init__(self, x: Tensor, w: MlpWeights, spec: MlpSpec, needs_x: bool, needs: MlpWeights,
                 zero_dx: bool = True):
        self.acc = torch.promote_types(x.dtype, torch.float32)  # half-precision grads accumulate in fp32
        self.x, self.w, self.spec = x, w, spec
        self.needs_x = needs_x
        # zero_dx=False: the caller assigns self.dx whole instead of accumulating into it
        self.dx = torch.zeros_like(x, dtype=self.acc) if (needs_x and zero_dx) else None
        self.grads = {slot: torch.zeros_like(t, dtype=self.acc) if (t is not None and need) else None
                      for (slot, t), need in zip(w._asdict().items(), needs)}

    def add_block(self, dxb: Optional[Tensor], tok: Tensor, every: bool, block_grads: dict, lo: int, hi: int,
                  units: Optional[Tensor] = None):
        """units: the block's hidden units perm[lo:hi] when they are permuted (None: lo:hi)."""
        if self.dx is not None and dxb is not None:
            if every:
                self.dx += dxb
            else:
                self.dx.index_add_(0, tok, dxb.to(self.acc))
        for slot, gs in block_grads.items():
            dim = _slot_slice(slot, self.spec)
            if dim is not None and units is not None:
                self.grads[slot].index_add_(dim, units, gs.to(self.acc))
                continue
            target = self.grads[slot] if dim is None else self.grads[slot].narrow(dim, lo, hi - lo)
            target += gs

    def finish(self, dy: Tensor) -> tuple[Optional[Tensor], MlpWeights]:
        if self.grads["out_b"] is not None:
            self.grads["out_b"] += dy.to(self.acc).sum(0)
        cast = {s: (None if g is None else g.to(getattr(self.w, s).dtype)) for s, g in self.grads.items()}
        return (None if self.dx is None else self.dx.to(self.x.dtype)), MlpWeights(**cast)


def routed_mlp_backward(
    dy: Tensor,
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    block_mask: Tensor,
    seed: int,
    needs_x: bool,
    needs: MlpWeights,
) -> tuple[Optional[Tensor], MlpWeights]:
    """Gradients of routed_mlp_forward: (dx, grads per slot). `needs` holds a bool per slot;
    slots not needed (or absent) get None. Each block's intermediates are recomputed here."""
    out = _Grads(x, w, spec, needs_x, needs)
    keep_in, keep_gate = _lora_input_scales(x, spec, seed)
    for b, lo, hi, tok, every in _routed_blocks(block_mask, spec):
        n = tok.numel()
        xb, k_in, k_gate = _rows(x, tok, every), _rows(keep_in, tok, every), _rows(keep_gate, tok, every)
        wb = _block_weights(w, spec, lo, hi)
        wanted = [s for s, t in wb._asdict().items() if t is not None and out.grads[s] is not None]

        def block(*primals, xb=xb, wb=wb, wanted=wanted, k_in=k_in, k_gate=k_gate):
            # primals: xb (if dx is needed), then the wanted weight slices. LoRA inputs derive
            # from xb here, so their gradients reach x through the dropout scale.
            xv = primals[0] if needs_x else xb
            slots = wb._replace(**dict(zip(wanted, primals[int(needs_x):])))
            lx_in = xv if k_in is None else xv * k_in
            lx_gate = xv if k_gate is None else xv * k_gate
            return _block_forward(xv, lx_in, lx_gate, slots, spec, _out_keep(n, lo, hi, spec, seed, b, x))

        primals = ([xb] if needs_x else []) + [getattr(wb, s) for s in wanted]
        if not primals:
            continue
        # torch.func.vjp, not autograd.grad: inside a custom op's kernel autograd records nothing.
        _, vjp = torch.func.vjp(block, *primals)
        g = vjp(dy if every else dy[tok])
        out.add_block(g[0] if needs_x else None, tok, every, dict(zip(wanted, g[int(needs_x):])), lo, hi)
    return out.finish(dy)


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
    _, vjp = torch.func.vjp(ACTIVATIONS[name], z)
    return a, lambda g: vjp(g)[0]


@torch.no_grad()  # explicit formulas: nothing here is differentiated again
def routed_mlp_backward_saved(
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
    exact_forward: bool = False,
    whole: bool = False,
) -> tuple[Optional[Tensor], MlpWeights]:
    """Gradients of routed_mlp_forward from what it saved (one flat tensor: pre-activations, then t and t_out),
    with respect to w (un-permuted: `perm` as in the forward; `comp` (U, V): the forward added the
    compensation, whose d(x) is added here): the same results as routed_mlp_backward without
    recomputing any projection. Explicit formulas, in the forward's extended layout (see above): per
    block, d(h) from [dy | s dy B_out] in one GEMM, through the activation (aten's backward kernels),
    then d(X) = sum over projections of dz [W_b | s B_b | 0], the LoRA B (in, gate) and A (out)
    gradients and, if asked, weight and bias gradients; per layer, d(x) and the LoRA A (in, gate) and B (out) gradients from the accumulated
    d(X) and the sum over blocks of h A_out_b^T.

    exact_forward: what `saved` holds came from exact_mlp_forward (every block ran forward; block_mask
    is the backward's choice): the result is the exact Jacobian masked to the routed (token, block)
    pairs, and the out LoRA's dropout masks are replayed as that forward drew them, for every token.
    whole: every pair was kept and `saved` holds each projection's pre-activations as one [T, F]
    (exact_mlp_forward's layout then: no gather); each block reads its columns."""
    out = _Grads(x, w, spec, needs_x, needs, zero_dx=False)
    wanted = {s for s, g in out.grads.items() if g is not None}
    T, d_in, d_out = x.shape[0], x.shape[1], dy.shape[1]
    blocks = list(_routed_blocks(block_mask, spec))
    projections = _input_projections(spec)
    n_pre = len(projections) * sum(tok.numel() * (hi - lo) for _, lo, hi, tok, _ in blocks)
    cols = _lora_columns(d_in, w, spec)
    n_t = T * (cols.K - d_in)
    t = saved[n_pre : n_pre + n_t].view(T, cols.K - d_in) if cols.K > d_in else None  # [T, K - d_in]
    keep_in, keep_gate = _lora_input_scales(x, spec, seed)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    t_out = saved[n_pre + n_t :].view(T, r_out) if r_out else None  # [T, r]: sum over blocks of h A_out_b^T
    merged = _merges_out_lora(w, spec)
    dt_out = (dy @ w.out_bb.to(dy.dtype)) * spec.out_scale if r_out else None  # [T, r]: d(sum h A_out_b^T)
    dY = torch.cat([dy, dt_out], 1) if merged else dy  # [T, d_out (+ r)]
    # d(X) [T, K] gives d(x) and the input projections' LoRA A gradients
    wants_dX = needs_x or bool({"in_a", "gate_a"} & wanted)
    dX = torch.empty(T, cols.K, dtype=out.acc, device=x.device) if wants_dX else None
    if dX is not None and comp is not None and needs_x:  # the compensation's d(x) starts the sum
        U, V = (c.to(out.acc) for c in comp)
        compensation_input_grad(dy.to(out.acc), ~block_mask, U, V, out=dX[:, cols.x_cols])
        dX[:, : cols.x_cols.start].zero_()
        dX[:, cols.x_cols.stop :].zero_()
    elif dX is not None:
        dX.zero_()
    bw = _BlockOrderWeights(w, spec, cols, perm, merged, with_inputs=wants_dX)
    offset = 0
    full = [saved[i * T * spec.hidden : (i + 1) * T * spec.hidden].view(T, spec.hidden)
            for i in range(len(projections))] if whole else None  # [T, F] each
    for b, lo, hi, tok, every in blocks:
        n, Fb = tok.numel(), hi - lo
        pre = []
        for i, _ in enumerate(projections):
            if full is not None:
                pre.append(full[i][:, lo:hi])
                continue
            pre.append(saved[offset : offset + n * Fb].view(n, Fb))
            offset += n * Fb
        dYb = dY if every else dY.index_select(0, tok)
        dyb = dYb[:, :d_out]
        block_grads: dict[str, Tensor] = {}
        # hidden -> output
        a, act_vjp = _activation_vjp(spec.activation, pre[0])
        h = a * pre[1] if spec.gated else a  # [Tb, Fb]
        Wo = bw.out_block(lo, hi)  # [d_out (+ r), Fb]
        dh = dYb @ Wo  # [Tb, Fb]
        if "out_w" in wanted:
            block_grads["out_w"] = dyb.t() @ h if spec.out_layout == "oi" else h.t() @ dyb
        if r_out:
            keep = None if merged else _out_keep(T if exact_forward else n, lo, hi, spec, seed, b, x)
            if keep is not None and exact_forward and not every:
                keep = keep.index_select(0, tok)  # the exact forward drew it for every token
            dtb = dYb[:, d_out:] if merged else (dt_out if every else dt_out.index_select(0, tok))  # [Tb, r]
            out_a = Wo[d_out:] if merged else bw.out_a_block(lo, hi)  # [r, Fb]
            if not merged:
                dhk = dtb @ out_a
                dh = dh + (dhk if keep is None else dhk * keep)
            hk = h if keep is None else h * keep
            if "out_a" in wanted:
                block_grads["out_a"] = dtb.t() @ hk  # [r, Fb]
        # through the activation to the input projections
        dz = {"gate": act_vjp(dh * pre[1]), "in": dh * a} if spec.gated else {"in": act_vjp(dh)}
        tb = None if t is None else (t if every else t.index_select(0, tok))  # [Tb, K - d_in]: [t_gate | t_in]
        xb = None
        if {"in_w", "gate_w"} & wanted:
            xb = x if every else x.index_select(0, tok)
        dXb = None
        for proj in projections:
            g = dz[proj]  # [Tb, Fb]
            if wants_dX:  # into the projection's window of d(X_b) [Tb, K]
                Wb, win = bw.input_block(proj, lo, hi), cols.window(proj)  # [Fb, width]
                if dXb is None:
                    dXb = g.new_empty(n, cols.K)
                    torch.mm(g, Wb, out=dXb[:, win])
                    dXb[:, : win.start].zero_()
                    dXb[:, win.stop :].zero_()
                else:
                    dXb[:, win].addmm_(g, Wb)
            if f"{proj}_w" in wanted:
                block_grads[f"{proj}_w"] = g.t() @ xb if getattr(spec, f"{proj}_layout") == "oi" else xb.t() @ g
            if f"{proj}_b" in wanted:
                block_grads[f"{proj}_b"] = g.sum(0)
            if f"{proj}_bb" in wanted:
                block_grads[f"{proj}_bb"] = (g.t() @ tb[:, cols.in_t(proj)]) * getattr(spec, f"{proj}_scale")
        if dXb is not None:
            dX.add_(dXb) if every else dX.index_add_(0, tok, dXb.to(out.acc))
        out.add_block(None, tok, every, block_grads, lo, hi, bw.units(lo, hi))
    if wants_dX:
        _input_lora_backward(dX, x, w, spec, cols, keep_in, keep_gate, out, wanted)
    if "out_bb" in wanted:
        out.grads["out_bb"] += (dy.to(out.acc).t() @ t_out.to(out.acc)) * spec.out_scale
    return out.finish(dy)


def _input_lora_backward(dX: Tensor, x: Tensor, w: MlpWeights, spec: MlpSpec, cols: _LoraColumns,
                         keep_in: Optional[Tensor], keep_gate: Optional[Tensor], out: "_Grads", wanted: set) -> None:
    """Per layer, from d(X) [T, K]: d(x) into out.dx, the in / gate LoRA A gradients into out.grads."""
    dx = dX[:, cols.x_cols]
    present = cols.present()
    if present and keep_in is None and keep_gate is None:  # one GEMM each way for both projections
        dt = torch.cat([dX[:, cols.of(p)] for p in present], 1) if len(present) > 1 else dX[:, cols.of(present[0])]
        A = torch.cat([getattr(w, f"{p}_a") for p in present]).to(out.acc)  # [r_gate + r_in, d_in]
        if {f"{p}_a" for p in present} & wanted:
            dA = dt.t() @ x.to(out.acc)
            for p in present:
                if f"{p}_a" in wanted:
                    out.grads[f"{p}_a"] += dA[cols.in_t(p)]
        if out.needs_x:
            out.dx = torch.addmm(dx, dt, A)
        return
    for proj in present:
        keep = keep_in if proj == "in" else keep_gate
        dt = dX[:, cols.of(proj)]  # [T, r]: d(dropout(x) A^T)
        if f"{proj}_a" in wanted:
            lx = x if keep is None else x * keep
            out.grads[f"{proj}_a"] += dt.t() @ lx.to(out.acc)
        if out.needs_x:
            dlx = dt @ getattr(w, f"{proj}_a").to(out.acc)
            dx = dx + (dlx if keep is None else dlx * keep)
    if out.needs_x:
        out.dx = dx.contiguous()


# How exact_mlp_forward scores a (token, block) pair for the backward (BACKWARD_IMPORTANCE):
#   "jacobian"      sum over the block's units of a bound on the unit's Jacobian norm,
#                   ||w_out_j|| (|u_j act'(g_j)| ||w_gate_j|| + |act(g_j)| ||w_up_j||) (plain: ||w_out_j||
#                   |act'(z_j)| ||w_in_j||): what the unit passes back to x and to its LoRA factors;
#   "output"        sum over the block's units of |h_j| ||w_out_j|| (a bound on the block's output norm);
#   "block_output"  the block's output norm itself (one GEMM per block for the out projection).
IMPORTANCES = ("jacobian", "output", "block_output")


def _unit_norms(w: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]) -> dict[str, Tensor]:
    """Per hidden unit (block order), the norm of its weight row in each input projection and of its
    column in the out projection (base weights): {proj: [F]} fp32."""
    out = {}
    for proj in _input_projections(spec) + ("out",):
        W = getattr(w, f"{proj}_w")
        unit_dim = _slot_slice(f"{proj}_w", spec)
        out[proj] = _take(W.float().norm(dim=1 - unit_dim), 0, perm)
    return out


@torch.no_grad()  # gradients: routed_mlp_backward_saved(..., exact_forward=True)
def exact_mlp_forward(
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    choose: Callable[[Tensor], Tensor],
    seed: int = 0,
    saved: Optional[list] = None,
    perm: Optional[Tensor] = None,
    importance: Optional[str] = "jacobian",
) -> tuple[Tensor, Tensor, Optional[Tensor], bool]:
    """The exact MLP (every unit for every token, LoRA and its dropout included) whose backward is
    sparse: one GEMM per projection over the whole hidden layer. Returns (y [T, d_out], block_mask
    [T, nb], scores [T, nb], whole: every pair kept, see below): `scores` rates each (token, block) pair for the backward (`importance`,
    see IMPORTANCES; None: not computed, choose(None) decides alone), and block_mask = choose(scores)
    the pairs the backward keeps (every pair: the dense MLP, whose backward is routed_mlp_backward_saved
    over every block).

    `saved` receives routed_mlp_forward's flat layout for that mask: the routed pairs'
    pre-activations, t, and t_out, the latter from *every* unit (the exact forward's, so B_out's
    gradient is exact). The whole layer's pre-activations exist only while this runs (two [T, F]
    for a gated MLP); only the routed pairs' are kept, so the saved bytes are the routed forward's.
    When every pair is kept, `saved` holds them whole instead ([T, F] per projection, the buffer the
    GEMMs wrote: no gather; routed_mlp_backward_saved(..., whole=True))."""
    T, d_in = x.shape
    d_out, nb = out_features(w, spec), spec.n_blocks
    projections = _input_projections(spec)
    cols = _lora_columns(d_in, w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    t = _lora_inputs(x, w, spec, cols, *_lora_input_scales(x, spec, seed))  # [T, K - d_in] or None
    X = _with_lora_inputs(x, t, cols)  # [T, K]
    merged = _merges_out_lora(w, spec)
    bw = _BlockOrderWeights(w, spec, cols, perm, merged)
    bounds = block_bounds(spec.hidden, nb)
    # The pre-activations go straight into what a dense call saves, [pre per projection (T x F each) | t |
    # t_out]; when the backward keeps fewer pairs, the kept ones are gathered out of it instead.
    n_t = T * (cols.K - d_in)
    flat = x.new_empty(len(projections) * T * spec.hidden + n_t + T * r_out)
    pre = tuple(_block_pre(X, proj, bw, 0, spec.hidden, flat[i * T * spec.hidden : (i + 1) * T * spec.hidden]
                           .view(T, spec.hidden)) for i, proj in enumerate(projections))  # each [T, F]
    a, act_vjp = _activation_vjp(spec.activation, pre[0])
    h = a * pre[1] if spec.gated else a  # [T, F]
    Y = F.linear(h, bw.out)  # [T, d_out (+ r)]: y without the out LoRA | h A_out^T (merged)
    if r_out and not merged:  # the out LoRA's dropout, drawn per block as routed_mlp_forward draws it
        keep = torch.cat([_out_keep(T, lo, hi, spec, seed, b, x) for b, (lo, hi) in enumerate(bounds)], 1)
        Y = torch.cat([Y, F.linear(h * keep, bw.out_a)], 1)
    scores = None if importance is None else torch.empty(T, nb, dtype=torch.float32, device=x.device)
    if importance is None:
        pass  # choose() decides without scores
    elif importance == "block_output":
        for b, (lo, hi) in enumerate(bounds):
            own = F.linear(h[:, lo:hi], bw.out_block(lo, hi)[:d_out])
            if r_out:
                lora = F.linear(h[:, lo:hi], (bw.out_block(lo, hi)[d_out:] if merged else bw.out_a_block(lo, hi)))
                own = torch.addmm(own, lora, w.out_bb.t(), alpha=spec.out_scale)
            scores[:, b] = own.float().norm(dim=-1)
    else:
        norms = _unit_norms(w, spec, perm)
        if importance == "output":
            unit = h.abs().float() * norms["out"]
        elif spec.gated:
            unit = (act_vjp(pre[1]).abs().float() * norms["gate"] + a.abs().float() * norms["in"]) * norms["out"]
        else:
            unit = act_vjp(torch.ones_like(pre[0])).abs().float() * (norms["in"] * norms["out"])
        for b, (lo, hi) in enumerate(bounds):
            scores[:, b] = unit[:, lo:hi].sum(1)
    block_mask = choose(scores)
    whole = bool(block_mask.all())
    if saved is not None:
        n_pre = len(projections) * T * spec.hidden
        if t is not None:
            flat[n_pre : n_pre + n_t] = t.reshape(-1)
        if r_out:
            flat[n_pre + n_t :] = Y[:, d_out:].reshape(-1)
        if whole:  # every pair kept: save it whole (routed_mlp_backward_saved(whole=True))
            saved.append(flat)
        else:
            parts = []
            for b, lo, hi, tok, every in _routed_blocks(block_mask, spec):
                parts += [(p[:, lo:hi] if every else p[:, lo:hi].index_select(0, tok)).reshape(-1) for p in pre]
            saved.append(torch.cat(parts + [flat[n_pre:]]))
    y = Y[:, :d_out]
    if r_out:
        y = torch.addmm(y, Y[:, d_out:], w.out_bb.t(), alpha=spec.out_scale)
    if w.out_b is not None:
        y = y + w.out_b
    return y, block_mask, scores, whole


def block_outputs(x: Tensor, w: MlpWeights, spec: MlpSpec) -> Tensor:
    """Every block's output for every token, without dropout or out bias: [T, n_blocks, d_out].
    Used on small token samples to fit the router and measure what routing keeps."""
    outs = []
    for lo, hi in block_bounds(spec.hidden, spec.n_blocks):
        outs.append(_block_forward(x, x, x, _block_weights(w, spec, lo, hi), spec, None))
    return torch.stack(outs, dim=1)


def compensation(x: Tensor, skipped: Tensor, U: Tensor, V: Tensor, M: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """What the blocks a token skips are predicted to add (ffn_compensate): for each skipped block b,
    x U_b V_b + M_b. x [T, d_in], skipped [T, nb] bool, U [d_in, nb * r] (U_b: columns b r : (b + 1) r),
    V [nb * r, d_out] (V_b: rows b r : (b + 1) r), M [nb, d_out] -> [T, d_out] in x's dtype (written
    into `out` if given; it may be a strided view). One GEMM into every block's rank-r coordinates,
    masked, one GEMM out, with the skip indicators as extra coordinates and M as V's extra rows (a
    separate [T, nb] x [nb, d_out] product and the add took a quarter of the term's time on this
    CPU): T (d_in + d_out) nb r multiply-adds (SmolLM2, 4 blocks, r 32: 148k per token)."""
    T, nb = skipped.shape
    nbr = U.shape[1]
    C = x.new_empty(T, nbr + nb)  # [the skipped blocks' coordinates (others 0) | skip indicators]
    torch.mm(x, U, out=C[:, :nbr])
    s = skipped.to(x.dtype)
    C[:, :nbr].view(T, nb, -1).mul_(s[:, :, None])
    C[:, nbr:] = s
    VM = torch.cat([V, M])  # [nb r + nb, d_out]
    return C @ VM if out is None else torch.mm(C, VM, out=out)


def compensation_input_grad(dy: Tensor, skipped: Tensor, U: Tensor, V: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """d(x) of compensation(x, skipped, U, V, M) (U, V and M are constants): [T, d_in] (written into
    `out` if given)."""
    T, nb = skipped.shape
    dt = (dy @ V.t()).view(T, nb, -1).mul_(skipped.to(dy.dtype)[:, :, None])  # [T, nb, r]
    return dt.view(T, -1) @ U.t() if out is None else torch.mm(dt.view(T, -1), U.t(), out=out)


class _RoutedMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block_mask, spec, seed, *slots):
        w = MlpWeights(*slots)
        saved: list = []
        y = routed_mlp_forward(x, w, spec, block_mask, seed, saved=saved)
        pre = saved[0]
        ctx.save_for_backward(x, block_mask, pre, *[t if t is not None else torch.empty(0) for t in slots])
        ctx.present = [t is not None for t in slots]
        ctx.spec, ctx.seed = spec, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, block_mask, pre, *saved = ctx.saved_tensors
        w = MlpWeights(*[t if p else None for t, p in zip(saved, ctx.present)])
        needs = MlpWeights(*ctx.needs_input_grad[4:])
        dx, grads = routed_mlp_backward_saved(dy, x, w, ctx.spec, block_mask, ctx.seed, ctx.needs_input_grad[0],
                                              needs, pre)
        return (dx, None, None, None, *grads)


def routed_mlp(x: Tensor, weights: MlpWeights, spec: MlpSpec, block_mask: Tensor, seed: int = 0) -> Tensor:
    """Differentiable routed MLP (see the module docstring): x [T, d_in], block_mask [T, n_blocks]
    bool -> y [T, d_out]. Same signature as reference.routed_mlp_reference, plus the dropout seed."""
    if block_mask.shape != (x.shape[0], spec.n_blocks) or block_mask.dtype != torch.bool:
        raise ValueError(f"routed_mlp: block_mask must be bool [{x.shape[0]}, {spec.n_blocks}]; "
                         f"got {block_mask.dtype} {tuple(block_mask.shape)}")
    return _RoutedMlp.apply(x, block_mask, spec, seed, *weights)
