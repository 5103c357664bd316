"""Backward of the routed MLP: from the saved pre-activations (explicit formulas) or recomputed
from x."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .blocks import (
    _BlockOrderWeights, _LoraColumns, _activation_vjp, _block_forward, _input_projections,
    _lora_columns, _merges_out_lora, _routed_blocks, _rows,
)
from .dropout import hidden_keep, hidden_keep_layer, lora_input_scales, out_keep, out_keep_layer
from .compensation import compensation_input_grad
from .spec import MlpSpec, MlpWeights, _block_weights, _slot_slice


_PENDING = "pending"  # a wanted gradient nothing was added to yet


def _zero_columns(t: Tensor, lo: int, hi: int) -> None:
    """t[:, lo:hi] = 0, with no call at all for no columns (a launch on a GPU's host)."""
    if hi > lo:
        t[:, lo:hi].zero_()


class _Grads:
    """dx and the wanted slot gradients of one backward, accumulated block by block in fp32 (or
    wider), then cast to the inputs' dtypes. A slot's first addition that covers all of it is kept as
    it is, not added into zeros: a backward in one pass (or a slot computed once, per layer) fills no
    buffer and adds nothing (a launch each on a GPU); later additions add in place."""

    def __init__(self, x: Tensor, w: MlpWeights, spec: MlpSpec, needs_x: bool, needs: MlpWeights,
                 zero_dx: bool = True):
        self.acc = torch.promote_types(x.dtype, torch.float32)  # half-precision grads accumulate in fp32
        self.x, self.w, self.spec = x, w, spec
        self.needs_x = needs_x
        # zero_dx=False: the caller assigns self.dx whole instead of accumulating into it
        self.dx = torch.zeros_like(x, dtype=self.acc) if (needs_x and zero_dx) else None
        self.grads = {slot: _PENDING if (t is not None and need) else None
                      for (slot, t), need in zip(w._asdict().items(), needs)}

    def add(self, slot: str, g: Tensor, dim: Optional[int] = None, lo: int = 0, hi: int = 0,
            units: Optional[Tensor] = None) -> None:
        """Adds g to the slot's gradient: to all of it (dim None), to its hidden units lo:hi along dim,
        or to the units `units` (the block's perm[lo:hi]) along dim."""
        weight = getattr(self.w, slot)
        if self.grads[slot] is _PENDING and (dim is None or (lo == 0 and hi == weight.shape[dim])):
            if dim is None and g.shape != weight.shape:
                raise RuntimeError(f"spt routed MLP: a {tuple(g.shape)} gradient for {slot} {tuple(weight.shape)}")
            g = g.to(self.acc)
            if units is not None:  # units covering lo:hi = all of them are a permutation: each written once
                g = torch.empty_like(g).index_copy_(dim, units, g)
            elif g._base is not None:  # a view (of a GEMM serving two slots): a gradient must own its memory
                g = g.clone()
            self.grads[slot] = g
            return
        if self.grads[slot] is _PENDING:
            self.grads[slot] = torch.zeros_like(weight, dtype=self.acc)
        target = self.grads[slot]
        if units is not None:
            target.index_add_(dim, units, g.to(self.acc))
        else:
            (target if dim is None else target.narrow(dim, lo, hi - lo)).add_(g)

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
            self.add(slot, gs, dim, lo, hi, None if dim is None else units)

    def finish(self, dy: Tensor) -> tuple[Optional[Tensor], MlpWeights]:
        if self.grads["out_b"] is not None:
            self.add("out_b", dy.to(self.acc).sum(0))
        cast = {s: (None if g is None else
                    torch.zeros_like(getattr(self.w, s)) if g is _PENDING else g.to(getattr(self.w, s).dtype))
                for s, g in self.grads.items()}
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
    keep_in, keep_gate = lora_input_scales(x, spec, seed)
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
            return _block_forward(xv, lx_in, lx_gate, slots, spec, out_keep(n, lo, hi, spec, seed, b, x))

        primals = ([xb] if needs_x else []) + [getattr(wb, s) for s in wanted]
        if not primals:
            continue
        # torch.func.vjp, not autograd.grad: inside a custom op's kernel autograd records nothing.
        _, vjp = torch.func.vjp(block, *primals)
        g = vjp(dy if every else dy[tok])
        out.add_block(g[0] if needs_x else None, tok, every, dict(zip(wanted, g[int(needs_x):])), lo, hi)
    return out.finish(dy)


def whole_in_one_pass(x: Tensor) -> bool:
    """Whether a backward that keeps every pair runs the whole layer as one block (off the CPU) rather
    than block by block (the CPU). One block launches the same kernels at any block count, about half
    of four blocks' (SmolLM2's MLP with LoRA on its three projections: 33 against 90); on the CPU one
    pass took 0.97-1.10x of four blocks' time at SmolLM2's 512 to 4096 tokens over six runs (about
    1.04x on their mean at 2048 and 4096), four blocks' elementwise passes over [T, F/4] staying in
    cache (docs/ffn.md, "The backward when every pair is kept"; benchmarks/research/ab_one_pass.py)."""
    return x.device.type != "cpu"


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
    counts: Optional[list[int]] = None,
    one_pass: Optional[bool] = None,
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
    (exact_mlp_forward's layout then: no gather); each block reads its columns, or with `one_pass`
    the whole layer is one block (None: whole_in_one_pass(x), see there)."""
    out = _Grads(x, w, spec, needs_x, needs, zero_dx=False)
    wanted = {s for s, g in out.grads.items() if g is not None}
    T, d_in, d_out = x.shape[0], x.shape[1], dy.shape[1]
    projections = _input_projections(spec)
    if whole and (whole_in_one_pass(x) if one_pass is None else one_pass):
        blocks = [(None, 0, spec.hidden, None, True)]  # every unit of every row: one block
        n_pre = len(projections) * T * spec.hidden
    else:
        blocks = list(_routed_blocks(block_mask, spec, counts))  # counts: the forward's, when given (no sync)
        n_pre = len(projections) * sum(tok.numel() * (hi - lo) for _, lo, hi, tok, _ in blocks)
    cols = _lora_columns(d_in, w, spec)
    n_t = T * (cols.K - d_in)
    t = saved[n_pre : n_pre + n_t].view(T, cols.K - d_in) if cols.K > d_in else None  # [T, K - d_in]
    keep_in, keep_gate = lora_input_scales(x, spec, seed)
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
        _zero_columns(dX, 0, cols.x_cols.start)
        _zero_columns(dX, cols.x_cols.stop, cols.K)
    elif dX is not None:
        dX.zero_()
    bw = _BlockOrderWeights(w, spec, cols, perm, merged, with_inputs=wants_dX)
    offset = 0
    full = [saved[i * T * spec.hidden : (i + 1) * T * spec.hidden].view(T, spec.hidden)
            for i in range(len(projections))] if whole else None  # [T, F] each
    for b, lo, hi, tok, every in blocks:
        n, Fb = (T if every else tok.numel()), hi - lo
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
        kept = _hidden_kept(T, n, b, lo, hi, tok, every, spec, seed, x, exact_forward)  # [Tb, Fb] or None
        hd = h if kept is None else h * kept  # what the out projection read
        Wo = bw.out_block(lo, hi)  # [d_out (+ r), Fb]
        dh = dYb @ Wo  # [Tb, Fb]: d(hd) until the hidden dropout's scale below
        if "out_w" in wanted:
            block_grads["out_w"] = dyb.t() @ hd if spec.out_layout == "oi" else hd.t() @ dyb
        if r_out:
            if merged:
                keep = None
            elif b is None:  # one pass: every block's draw, side by side
                keep = out_keep_layer(T, spec, seed, x)
            else:
                keep = out_keep(T if exact_forward else n, lo, hi, spec, seed, b, x)
            if keep is not None and exact_forward and not every:
                keep = keep.index_select(0, tok)  # the exact forward drew it for every token
            dtb = dYb[:, d_out:] if merged else (dt_out if every else dt_out.index_select(0, tok))  # [Tb, r]
            out_a = Wo[d_out:] if merged else bw.out_a_block(lo, hi)  # [r, Fb]
            if not merged:
                dhk = dtb @ out_a
                dh = dh + (dhk if keep is None else dhk * keep)
            hk = hd if keep is None else hd * keep
            if "out_a" in wanted:
                block_grads["out_a"] = dtb.t() @ hk  # [r, Fb]
        if kept is not None:
            dh = dh * kept  # d(h) = d(hd) scaled where kept, 0 where dropped
        # through the activation to the input projections
        if spec.gated and dh.dtype == h.dtype:  # h = act(z) * pre_in: its own buffer, as act(z)'s
            # into the buffers of h and a, which nothing reads after: two [Tb, Fb] buffers fewer per block.
            # With d(X) accumulated in place below, a SmolLM2 MLP's whole backward took 0.93x (2048 tokens)
            # and 0.97x (4096) of its time before (benchmarks/research/ab_mlp_backward.py)
            dz = {"gate": act_vjp(torch.mul(dh, pre[1], out=h))}
            dz["in"] = a.mul_(dh)  # after the gate's: act_vjp may read a (relu)
        else:
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
                if every and g.dtype == dX.dtype:  # straight into d(X): no d(X_b) [T, K] to fill and add
                    dX[:, win].addmm_(g, Wb)
                elif dXb is None:
                    dXb = g.new_empty(n, cols.K)
                    torch.mm(g, Wb, out=dXb[:, win])
                    _zero_columns(dXb, 0, win.start)
                    _zero_columns(dXb, win.stop, cols.K)
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
        out.add("out_bb", (dy.to(out.acc).t() @ t_out.to(out.acc)) * spec.out_scale)
    return out.finish(dy)


def _hidden_kept(T: int, n: int, b: Optional[int], lo: int, hi: int, tok: Tensor, every: bool, spec: MlpSpec,
                 seed: int, x: Tensor, exact_forward: bool) -> Optional[Tensor]:
    """The hidden layer's dropout scale of one block's rows [Tb, Fb], as its forward drew it: per block,
    for every token under the exact forward (then gathered to the block's rows) or for the routed rows
    (routed_mlp_forward); every block side by side for the one-pass block (b None)."""
    if not spec.hidden_dropout:
        return None
    if b is None:
        return hidden_keep_layer(T, spec, seed, x)
    kept = hidden_keep(T if exact_forward else n, lo, hi, spec, seed, b, x)
    return kept.index_select(0, tok) if (exact_forward and not every) else kept


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
                    out.add(f"{p}_a", dA[cols.in_t(p)])
        if out.needs_x:
            out.dx = torch.addmm(dx, dt, A)
        return
    for proj in present:
        keep = keep_in if proj == "in" else keep_gate
        dt = dX[:, cols.of(proj)]  # [T, r]: d(dropout(x) A^T)
        if f"{proj}_a" in wanted:
            lx = x if keep is None else x * keep
            out.add(f"{proj}_a", dt.t() @ lx.to(out.acc))
        if out.needs_x:
            dlx = dt @ getattr(w, f"{proj}_a").to(out.acc)
            dx = dx + (dlx if keep is None else dlx * keep)
    if out.needs_x:
        out.dx = dx.contiguous()
