"""Chunked linear + cross-entropy: the LM head and its loss without a saved [tokens, vocab] tensor.

    z = (h @ W^T + b) * logit_mul / logit_div;  z = cap * tanh(z / cap) when logit_softcap = cap > 0
    loss = cross_entropy(z, labels, ignore_index, reduction, label_smoothing)

h [*, d], W [V, d], b [V] or None, labels [T] (T = h's leading dims flattened). Tokens are processed
`chunk` rows at a time; only one chunk's logits [chunk, V] exist at once.

Each chunk's loss and d(logits) come from the torch ops below (CPU) or one Triton kernel that reads
the chunk's logits twice and writes d(logits) over them (triton.py; the default on CUDA, `impl`).
On the torch path (CPU) the chunks run over the rows that carry a loss only: a row whose label is
ignore_index (a prompt, padding) has a zero loss and d(logits), so it gets its logits GEMM alone, and
only when the logits are returned.

Two backward strategies, both exact:
* gradients in forward (`precompute`, the default wherever it applies): while a chunk's logits
  exist, forward also forms d(logits) = (softmax - target) * row scale for a unit d(loss) and from it
  that chunk's d(h) rows and fp32 sums of d(W), d(b); backward multiplies by d(loss). Two GEMMs of
  T x d x V in all, as the dense head with a frozen weight. d(h) is linear in each row's d(loss), so
  any reduction works; d(W) and d(b) sum over rows, so they need a scalar loss (mean / sum).
* recompute: forward keeps the per-row log-sum-exp; backward recomputes each chunk's logits and
  forms the same gradients. One GEMM more; used for reduction "none" with a trained W or b.
Saved for backward: h, W, b and labels (held by reference), lse [T] fp32, and the unit d(h) [T, d]
(d(W), d(b) in fp32 when trained). The dense path saves cross-entropy's log-softmax, T x V fp32
(403 MB for SmolLM2 at 2048 tokens), and its temporaries add about as much to the allocation peak.

With return_logits the op also returns the full logits [*, V] in h's dtype: a model that returns its
logits (Hugging Face does) gets them from here, not from a second linear. A gradient through them is
added in backward; the all-zero one AOTAutograd hands an output nobody differentiated is detected
(one read) and costs no GEMM.

A constant factor on the logits (Cohere's `logits * logit_scale`, Granite's `logits / logits_scaling`)
is applied to each chunk's logits in h's dtype, in place, as the dense model applies it, and d(logits)
gets it in the row scale (logit_mul / logit_div: 1.0 when the model has none). Soft-capping (Gemma-2's
`cap * tanh(logits / cap)`, logit_softcap = cap; 0: none) is applied the same way, three in-place ops in
h's dtype, and d(logits) is multiplied by its derivative 1 - (z / cap)^2, formed from the capped
logits before the softmax overwrites them (one [chunk, V] fp32 buffer more).

Numerics follow F.cross_entropy on the upcast logits: rows whose label is ignore_index count
neither in the sum nor in the mean's denominator (all ignored and mean: nan, as torch);
label smoothing eps mixes (1 - eps) * nll with eps * mean over classes of -log p.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import triton_runs_on
from .triton import chunk_cross_entropy_triton

REDUCTIONS = ("mean", "sum", "none")
LOSS_IMPLS = ("auto", "triton", "torch")
LOSS_IMPL_ENV = "SPT_LOSS_IMPL"


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """'auto' -> $SPT_LOSS_IMPL if set, else triton on CUDA (one kernel per chunk for the loss and its
    d(logits): triton.py), torch elsewhere."""
    if impl == "auto":
        impl = os.environ.get(LOSS_IMPL_ENV, "auto")
        if impl not in LOSS_IMPLS:
            raise ValueError(f"{LOSS_IMPL_ENV}={impl!r}: must be one of {', '.join(LOSS_IMPLS)}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    if impl not in LOSS_IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {', '.join(LOSS_IMPLS)}; got {impl!r}")
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(f"linear_cross_entropy: impl 'triton' (spt option loss_impl) needs CUDA tensors; got "
                         f"{device.type} tensors: use 'auto' or 'torch' (or TRITON_INTERPRET=1 to run the kernel "
                         "on the CPU, slowly)")
    return impl


def _row_scale(dloss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """d(loss)/d(row loss) for each row: [T] fp32, 0 on ignored rows."""
    if reduction == "none":
        s = dloss.reshape(-1).float()
    elif reduction == "sum":
        s = dloss.float().expand(valid.shape[0])
    else:  # mean: the denominator is the number of counted rows
        s = (dloss.float() / valid.sum()).expand(valid.shape[0])
    return torch.where(valid, s, 0.0)  # all ignored under mean: zero gradient, as torch (not nan)


def can_precompute(reduction: str, needs: list[bool]) -> bool:
    """d(h) is linear in each row's d(loss), so it can be formed in forward for any reduction; d(W)
    sums over rows, so only a scalar loss lets forward form it."""
    return any(needs) and (reduction != "none" or not (needs[1] or needs[2]))


def _scaled_softmax_minus_target_(e: Tensor, row_over_total: Tensor, row: Tensor, y: Tensor, valid: Tensor,
                                   eps: float) -> Tensor:
    """In place on e = exp(logits - m) [C, V] fp32 with row sums `total`: row * (softmax - smoothed
    one-hot) = d(loss)/d(logits) for row scales `row` [C], given row_over_total = row / total (the
    forward's one pass over e: no second exp; backward's recompute passes m = lse, so total = 1)."""
    e.mul_(row_over_total[:, None])
    if eps > 0.0:
        e.sub_((row * (eps / e.shape[1]))[:, None])
    idx = torch.where(valid, y, 0)[:, None]
    return e.scatter_add_(1, idx, (-(1.0 - eps) * row)[:, None].to(e.dtype))


def _linear_into(hc: Tensor, W: Tensor, b: Optional[Tensor], out: Optional[Tensor], mul: float = 1.0,
                 div: float = 1.0, cap: float = 0.0) -> Tensor:
    """F.linear(hc, W, b) * mul / div (then cap * tanh(. / cap) if cap), written into `out` (a contiguous
    row block) if given; the factors and the cap in place, in h's dtype, as the model applies them."""
    if out is None:
        z = F.linear(hc, W, b)
    elif b is None:
        z = torch.mm(hc, W.t(), out=out)
    else:
        z = torch.addmm(b, hc, W.t(), out=out)
    if mul != 1.0:
        z.mul_(mul)
    if div != 1.0:
        z.div_(div)
    if cap:
        z.div_(cap).tanh_().mul_(cap)
    return z


def _before_factors_(g: Tensor, slope: Optional[Tensor], factor: float) -> Tensor:
    """d(logits) g [C, V] fp32 -> d(the head's output before the cap and the factor), in place: times the
    cap's slope (_cap_slope, None: no cap), times logit_mul / logit_div."""
    if slope is not None:
        g.mul_(slope)
    if factor != 1.0:
        g.mul_(factor)
    return g


def _cap_slope(z: Tensor, cap: float, out: Optional[Tensor] = None) -> Tensor:
    """d(capped)/d(uncapped) = 1 - (z / cap)^2 for capped logits z, fp32 (into `out` if given)."""
    t = z.to(torch.float32, copy=True) if out is None else out.copy_(z)
    return t.div_(cap).square_().neg_().add_(1.0)


def _backprop_chunk(g: Tensor, hc: Tensor, W: Tensor, dh: Optional[Tensor], dW: Optional[Tensor],
                    db: Optional[Tensor]) -> None:
    """g [C, V] fp32 d(logits) of the rows hc [C, d]: adds into dh (those rows) and the fp32 dW, db."""
    gc = g.to(hc.dtype)  # as the dense .float()'s backward casts d(logits) back
    if dh is not None:
        dh.addmm_(gc, W)
    if dW is not None:
        if gc.dtype == torch.float32:
            dW.addmm_(gc.T, hc)
        else:  # bf16/fp16 GEMM, summed over chunks in fp32
            dW += (gc.T @ hc).float()
    if db is not None:
        db += g.sum(0)


def backprop_logits_grad(dl2: Tensor, h2: Tensor, W: Tensor, b: Optional[Tensor], dh: Optional[Tensor],
                         dW: Optional[Tensor], db: Optional[Tensor], chunk: int, logit_mul: float = 1.0,
                         logit_div: float = 1.0, logit_softcap: float = 0.0) -> None:
    """A gradient dl2 [T, V] of the returned logits, chunk by chunk through the factor and the cap, into
    dh [T, d] and the fp32 dW [V, d], db [V] (None: not wanted). The cap's slope needs the logits: they
    are recomputed one chunk at a time rather than kept from forward (no [T, V] saved)."""
    T, factor = h2.shape[0], logit_mul / logit_div
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        slope = _cap_slope(_linear_into(h2[r0:r1], W, b, None, logit_mul, logit_div, logit_softcap),
                           logit_softcap) if logit_softcap else None  # at these rows' logits, recomputed
        g = _before_factors_(dl2[r0:r1].float(), slope, factor)
        _backprop_chunk(g, h2[r0:r1], W, None if dh is None else dh[r0:r1], dW, db)


def _grad_buffers(h2: Tensor, W: Tensor, needs: list[bool]):
    V, d = W.shape
    f32 = dict(dtype=torch.float32, device=W.device)
    return (torch.zeros_like(h2) if needs[0] else None,
            torch.zeros(V, d, **f32) if needs[1] else None,  # fp32 accumulators
            torch.zeros(V, **f32) if needs[2] else None)


def linear_cross_entropy_forward(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, chunk: int, return_logits: bool, out_dtype: torch.dtype, precompute: bool,
    needs: list[bool], impl: str = "auto", logit_mul: float = 1.0, logit_div: float = 1.0,
    logit_softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns loss ([] or [T] for reduction none, in out_dtype), logits ([*, V] or empty), lse [T]
    fp32, and with `precompute` the gradients for a unit d(loss): dh [T, d] (per row for reduction
    none), dW [V, d] and db [V] fp32 where `needs` asks (else empty)."""
    d, V = h.shape[-1], W.shape[0]
    h2 = h.reshape(-1, d)  # [T, d]
    y = labels.reshape(-1)  # [T]
    T = h2.shape[0]
    logits = h.new_empty(T, V) if return_logits else h.new_empty(0)
    valid_all = y != ignore_index
    fused = resolve_loss_impl(impl, h.device) == "triton"
    # Rows whose label is ignored (a prompt, padding, the label shifted off a row's end) have no loss and
    # a zero d(logits) row: the torch path gives them no softmax and no d(h) GEMM, only their logits when
    # those are returned. Not on CUDA, where sizing the rows would sync (and the Triton kernel runs every
    # row), nor on the recompute path, whose backward reads every row's lse.
    may_skip = not fused and h.device.type == "cpu" and (precompute or not any(needs))
    chunks = _loss_row_chunks(valid_all, chunk) if may_skip else None  # None also when every row has a loss
    skipping = chunks is not None
    if not skipping:  # every row, in contiguous blocks
        chunks = [slice(r0, min(T, r0 + chunk)) for r0 in range(0, T, chunk)]
    lse = (torch.zeros if skipping else torch.empty)(T, dtype=torch.float32, device=h.device)  # 0: not computed
    rows = (torch.zeros if skipping else torch.empty)(T, dtype=torch.float32, device=h.device)  # per-row loss
    grads = _grad_buffers(h2, W, needs) if precompute else (None, None, None)
    if precompute:
        unit = _row_scale(torch.ones((T,) if reduction == "none" else (), device=h.device), valid_all, reduction)
        if logit_mul != 1.0 or logit_div != 1.0:  # d(logits before the factor) = factor * d(logits)
            unit = unit * (logit_mul / logit_div)
    if return_logits:  # every row's logits in one GEMM, straight into the returned tensor (as the dense
        # linear computes them; on this CPU one [T, V] GEMM ran 0.8x the time of T / 512 row blocks)
        _linear_into(h2, W, b, logits, logit_mul, logit_div, logit_softcap)
    work = None  # [chunk, V] fp32 (torch path; the Triton path: h's dtype), reused chunk after chunk
    slope_buf = None  # [chunk, V] fp32, soft-capping's derivative (logit_softcap), reused
    zbuf = None  # [chunk, V] in h's dtype: a chunk's logits, computed or gathered, of our own; reused
    for rs in chunks:  # a slice of rows, or the indices of scattered loss rows
        hc = h2[rs]  # [C, d]
        C = hc.shape[0]
        owned = not (return_logits and isinstance(rs, slice))  # z is ours to overwrite (not the returned logits)
        if owned and zbuf is None:
            zbuf = torch.empty(min(chunk, T), V, dtype=h.dtype, device=h.device)
        if not return_logits:  # [C, V] in h's dtype, rounded as the dense linear rounds
            z = _linear_into(hc, W, b, zbuf[:C], logit_mul, logit_div, logit_softcap)
        elif isinstance(rs, slice):
            z = logits[rs]
        else:
            z = torch.index_select(logits, 0, rs, out=zbuf[:C])
        yc, valid = y[rs], valid_all[rs]
        slope = None  # soft-capping's derivative for this chunk, [C, V] fp32, before z is overwritten
        if logit_softcap and precompute:
            if slope_buf is None:
                slope_buf = torch.empty(min(chunk, T), V, dtype=torch.float32, device=h.device)
            slope = _cap_slope(z, logit_softcap, slope_buf[:C])
        if fused:  # loss, lse and d(logits) in one kernel; d(logits) over z unless z is returned
            g = None
            if precompute:
                if not owned and work is None:
                    work = torch.empty(min(chunk, T), V, dtype=h.dtype, device=h.device)
                g = z if owned else work[:C]
            chunk_cross_entropy_triton(z, yc, ignore_index, label_smoothing, unit[rs] if precompute else None,
                                       lse[rs], rows[rs], g)
            if precompute:
                if slope is not None:
                    g = g.float().mul_(slope).to(g.dtype)
                dh, dW, db = grads
                _backprop_chunk(g, hc, W, None if dh is None else dh[rs], dW, db)
            del z, g
            continue
        z_y = z.gather(1, torch.where(valid, yc, 0)[:, None]).squeeze(1).float()  # [C]
        m = z.amax(dim=-1).float()  # [C]
        m = m.masked_fill(m.isinf(), 0.0)  # rows of -inf keep lse = -inf, as torch.logsumexp
        mean_c = z.mean(dim=-1, dtype=torch.float32) if label_smoothing > 0.0 else None
        # e = exp(z - m) [C, V] fp32, in place where z is fp32 and ours, else into `work`
        if z.dtype == torch.float32 and owned:
            e = z.sub_(m[:, None])
        else:
            if work is None:
                work = torch.empty(min(chunk, T), V, dtype=torch.float32, device=h.device)
            e = torch.sub(z, m[:, None], out=work[:C])
        e.exp_()
        total = e.sum(dim=-1)  # [C]
        lse_c = m + total.log()
        loss_c = lse_c - z_y
        if label_smoothing > 0.0:
            loss_c = (1.0 - label_smoothing) * loss_c + label_smoothing * (lse_c - mean_c)
        lse[rs] = lse_c
        rows[rs] = torch.where(valid, loss_c, 0.0)
        if precompute:  # the backward's work, now, while the chunk's logits exist: no recompute
            g = _scaled_softmax_minus_target_(e, unit[rs] / total, unit[rs], yc, valid, label_smoothing)
            if slope is not None:
                g.mul_(slope)
            dh, dW, db = grads
            if dh is not None and not isinstance(rs, slice):  # scattered rows: their d(h) into a block, then into place
                dh_c = torch.zeros_like(hc)
                _backprop_chunk(g, hc, W, dh_c, dW, db)
                dh.index_copy_(0, rs, dh_c)
            else:
                _backprop_chunk(g, hc, W, None if dh is None else dh[rs], dW, db)
            del g
        del z, e  # this chunk's [C, V] views, before the next chunk
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:  # 0 / 0 = nan when every label is ignored, as F.cross_entropy
        loss = rows.sum() / valid_all.sum()
    return (loss.to(out_dtype), logits.view(*h.shape[:-1], V) if return_logits else logits, lse,
            *(h.new_empty(0) if g is None else g for g in grads))  # outputs may not alias: one empty each


def _loss_row_chunks(valid: Tensor, chunk: int) -> Optional[list]:
    """The chunks that cover the rows carrying a loss (valid [T] bool), None when every row carries one.
    Each run of consecutive loss rows at least chunk / 4 long is cut into near-equal slices of at most
    `chunk` rows, whose logits and d(h) are views (nothing gathered, nothing scattered back); shorter
    runs (a few answer tokens, a label per sequence) are pooled, in row order, into index chunks of at
    most `chunk` rows, so that their GEMMs stay large. Host reads of the run boundaries: CPU only."""
    T = valid.numel()
    v = valid.to(torch.int8)
    steps = torch.diff(v, prepend=v.new_zeros(1), append=v.new_zeros(1)).tolist()  # the one host read
    edges = [i for i, s in enumerate(steps) if s]  # +1 where a run starts, -1 where it ends
    starts, ends = edges[0::2], edges[1::2]  # run i covers rows [starts[i], ends[i])
    if len(starts) == 1 and starts[0] == 0 and ends[0] == T:
        return None
    chunks, pooled = [], []
    for r0, r1 in zip(starts, ends):
        if 4 * (r1 - r0) < chunk:
            pooled.append(torch.arange(r0, r1, device=valid.device))
            continue
        pieces = -(-(r1 - r0) // chunk)
        cuts = [r0 + (r1 - r0) * i // pieces for i in range(pieces + 1)]
        chunks += [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    if pooled:
        idx = torch.cat(pooled)
        chunks += list(idx.split(chunk))
    return chunks


def _any_nonzero(t: Tensor) -> bool:
    """Whether t has an element other than zero (NaN counts). One reading pass and no [T, V]
    temporary: Tensor.any() on floats first converts the whole tensor to bool (at 4096 x 49152 fp32,
    0.13 s against 0.03 s for this)."""
    lo, hi = torch.aminmax(t)
    return bool((lo != 0) | (hi != 0))


def linear_cross_entropy_backward(
    dloss: Tensor, dlogits: Optional[Tensor], h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor,
    lse: Tensor, unit: list[Tensor], ignore_index: int, reduction: str, label_smoothing: float, chunk: int,
    needs: list[bool], logit_mul: float = 1.0, logit_div: float = 1.0, logit_softcap: float = 0.0,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dh, dW, db), None where `needs` (for h, W, b) is False. dlogits: gradient of the returned
    logits ([*, V]) or None. unit: forward's precomputed (dh, dW, db) for a unit d(loss) (empty
    tensors: recompute each chunk's logits instead)."""
    d, V = h.shape[-1], W.shape[0]
    h2 = h.reshape(-1, d)  # [T, d]
    y = labels.reshape(-1)
    T = h2.shape[0]
    dl2 = dlogits.reshape(T, V) if dlogits is not None and dlogits.numel() else None
    dh, dW, db = _grad_buffers(h2, W, needs)
    factor = logit_mul / logit_div  # d(logits before the factor) = factor * d(logits)
    if any(u.numel() for u in unit):  # precomputed in forward: scale by d(loss)
        f = dloss.float().reshape(-1, 1) if reduction == "none" else dloss.float()
        for buf, u in zip((dh, dW, db), unit):
            if buf is not None:
                buf += u.float() * (f if buf is dh else dloss.float())
        # AOTAutograd hands zeros to a returned output nobody differentiated: skip their GEMMs
        if dl2 is not None and _any_nonzero(dl2):
            backprop_logits_grad(dl2, h2, W, b, dh, dW, db, chunk, logit_mul, logit_div, logit_softcap)
    else:
        valid = y != ignore_index
        scale = _row_scale(dloss, valid, reduction)  # [T] fp32
        for r0 in range(0, T, chunk):
            r1 = min(T, r0 + chunk)
            g = _linear_into(h2[r0:r1], W, b, None, logit_mul, logit_div, logit_softcap).float()  # the chunk's logits again
            slope = _cap_slope(g, logit_softcap) if logit_softcap else None  # before g becomes d(logits)
            g.sub_(lse[r0:r1, None]).exp_()  # softmax: lse is the rows' log-sum-exp
            sc = scale[r0:r1]  # ignored rows -> 0
            g = _scaled_softmax_minus_target_(g, sc, sc, y[r0:r1], valid[r0:r1], label_smoothing)
            if dl2 is not None:
                g.add_(dl2[r0:r1])
            _before_factors_(g, slope, factor)
            _backprop_chunk(g, h2[r0:r1], W, None if dh is None else dh[r0:r1], dW, db)
            del g  # free this chunk's [C, V] before the next one is allocated
    return (None if dh is None else dh.view(h.shape),
            None if dW is None else dW.to(W.dtype),
            None if db is None else db.to(b.dtype))


# --- the custom op: differentiable in h, W, b --------------------------------------------------


@torch.library.custom_op("spt::linear_cross_entropy", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _linear_cross_entropy_op(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, chunk: int, return_logits: bool, out_dtype: torch.dtype, precompute: bool,
    needs: list[bool], impl: str = "auto", logit_mul: float = 1.0, logit_div: float = 1.0,
    logit_softcap: float = 0.0, logits_differentiable: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """needs: which of h, W, b will want a gradient (precompute forms those in forward). impl: the
    forward's per-chunk loss (LOSS_IMPLS; backward's recompute path is torch either way). logit_mul,
    logit_div: a constant factor on the logits (1.0: none); logit_softcap: soft-capping (0.0: none).
    logits_differentiable=False returns the logits outside autograd (the backend gives them their
    gradient outside the compiled graph: passes/returned_logits.py)."""
    return linear_cross_entropy_forward(h, W, b, labels, ignore_index, reduction, label_smoothing, chunk,
                                        return_logits, out_dtype, precompute, needs, impl, logit_mul, logit_div,
                                        logit_softcap)


@_linear_cross_entropy_op.register_fake
def _(h, W, b, labels, ignore_index, reduction, label_smoothing, chunk, return_logits, out_dtype, precompute, needs,
      impl="auto", logit_mul=1.0, logit_div=1.0, logit_softcap=0.0, logits_differentiable=True):
    T = labels.numel()
    loss = h.new_empty(T, dtype=out_dtype) if reduction == "none" else h.new_empty((), dtype=out_dtype)
    logits = h.new_empty(*h.shape[:-1], W.shape[0]) if return_logits else h.new_empty(0)
    V, d = W.shape
    unit = [h.new_empty(T, d) if precompute and needs[0] else h.new_empty(0),
            h.new_empty(V, d, dtype=torch.float32) if precompute and needs[1] else h.new_empty(0),
            h.new_empty(V, dtype=torch.float32) if precompute and needs[2] else h.new_empty(0)]
    return loss, logits, h.new_empty(T, dtype=torch.float32), *unit


@torch.library.custom_op("spt::linear_cross_entropy_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _linear_cross_entropy_backward_op(
    dloss: Tensor, dlogits: Optional[Tensor], h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor,
    lse: Tensor, unit_h: Tensor, unit_W: Tensor, unit_b: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, chunk: int, needs: list[bool], logit_mul: float = 1.0, logit_div: float = 1.0,
    logit_softcap: float = 0.0,
) -> list[Tensor]:
    """[dh, dW, db]; an empty tensor where no gradient is needed."""
    grads = linear_cross_entropy_backward(dloss, dlogits, h, W, b, labels, lse, [unit_h, unit_W, unit_b],
                                          ignore_index, reduction, label_smoothing, chunk, needs, logit_mul, logit_div,
                                          logit_softcap)
    return [h.new_empty(0) if g is None else g for g in grads]


@_linear_cross_entropy_backward_op.register_fake
def _(dloss, dlogits, h, W, b, labels, lse, unit_h, unit_W, unit_b, ignore_index, reduction, label_smoothing,
      chunk, needs, logit_mul=1.0, logit_div=1.0, logit_softcap=0.0):
    return [t.new_empty(t.shape) if (need and t is not None) else h.new_empty(0) for t, need in zip((h, W, b), needs)]


def _setup_context(ctx, inputs, output):
    h, W, b, labels, ignore_index, reduction, label_smoothing, chunk, return_logits, out_dtype, precompute, needs, *rest = inputs
    _, logits, lse, *unit = output
    ctx.save_for_backward(h, W, b, labels, lse, *unit)  # no [T, V] tensor
    ctx.args = (ignore_index, reduction, label_smoothing, chunk)
    ctx.factors = tuple(rest[1:4])  # (logit_mul, logit_div, logit_softcap): inputs hold every argument, defaults too
    if not rest[4]:  # logits_differentiable=False: no gradient (AOTAutograd then gives them no zero-filled one)
        ctx.mark_non_differentiable(logits)
    ctx.n_inputs = len(inputs)
    ctx.return_logits = return_logits
    ctx.precomputed = list(needs) if precompute else [False] * 3
    # Called eagerly, a logits output nobody differentiates would otherwise get a [T, V] zero
    # gradient allocated for it (None is handled below).
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, dlogits, dlse, *dunit):
    h, W, b, labels, lse, *unit = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]) and b is not None]
    if not any(needs):
        return (None,) * ctx.n_inputs
    if not all(p for p, n in zip(ctx.precomputed, needs) if n):  # asked for more than forward formed
        unit = [h.new_empty(0)] * 3
    dlogits = dlogits.contiguous() if (ctx.return_logits and dlogits is not None) else None
    if dloss is None:  # only the logits were differentiated
        dloss = torch.zeros(labels.numel() if ctx.args[1] == "none" else (), dtype=torch.float32, device=h.device)
    dh, dW, db = _linear_cross_entropy_backward_op(dloss.contiguous(), dlogits, h, W, b, labels, lse, *unit,
                                                   *ctx.args, needs, *ctx.factors)
    return (dh if needs[0] else None, dW if needs[1] else None, db if needs[2] else None) + (None,) * (ctx.n_inputs - 3)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, reduction: str,
                 label_smoothing: float, chunk: int, logit_mul: float = 1.0, logit_div: float = 1.0,
                 logit_softcap: float = 0.0) -> None:
    """Clear errors for the public function's inputs, naming the argument at fault."""
    if W.dim() != 2 or h.shape[-1] != W.shape[1]:
        raise ValueError(f"linear_cross_entropy: W must be [V, d] with d = h.shape[-1] = {h.shape[-1]}; got {tuple(W.shape)}")
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"linear_cross_entropy: b must be [V] = [{W.shape[0]}]; got {tuple(b.shape)}")
    if h.dtype != W.dtype or (b is not None and b.dtype != W.dtype):
        raise ValueError(f"linear_cross_entropy: h, W (and b) must share a dtype; got {h.dtype}, {W.dtype}")
    if labels.dtype not in (torch.int64, torch.int32) or labels.numel() != h.numel() // h.shape[-1]:
        raise ValueError(f"linear_cross_entropy: labels must be integer class indices, one per row of h "
                         f"({h.numel() // max(1, h.shape[-1])}); got {labels.dtype} {tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1]; got {label_smoothing}")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1; got {chunk}")
    for name, f in (("logit_mul", logit_mul), ("logit_div", logit_div)):
        if not (isinstance(f, (int, float)) and math.isfinite(f) and f != 0):
            raise ValueError(f"linear_cross_entropy: {name} must be a finite, non-zero number; got {f!r}")
    if not (isinstance(logit_softcap, (int, float)) and math.isfinite(logit_softcap) and logit_softcap >= 0):
        raise ValueError(f"linear_cross_entropy: logit_softcap must be a finite number >= 0 (0: none); got "
                         f"{logit_softcap!r}")


def linear_cross_entropy(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, chunk: int = 1024, return_logits: bool = False, precompute: Optional[bool] = None,
    impl: str = "auto", logit_mul: float = 1.0, logit_div: float = 1.0, logit_softcap: float = 0.0,
) -> tuple[Tensor, Optional[Tensor]]:
    """cross_entropy(z.float().view(-1, V), labels.view(-1), ...) for z = linear(h, W, b) * logit_mul /
    logit_div, soft-capped to logit_softcap * tanh(z / logit_softcap) if logit_softcap > 0,
    computed `chunk` tokens at a time (see the module docstring). Returns (loss in fp32, logits [*, V]
    (with the factor) or None).
    precompute: form the gradients in forward (None: whenever can_precompute allows). impl: 'triton'
    (one kernel per chunk), 'torch', or 'auto' (resolve_loss_impl: triton on CUDA)."""
    check_inputs(h, W, b, labels, reduction, label_smoothing, chunk, logit_mul, logit_div, logit_softcap)
    resolve_loss_impl(impl, h.device)  # a bad name fails here, not inside the op
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (h, W, b)]
    if precompute is None:
        precompute = can_precompute(reduction, needs)
    elif precompute and not can_precompute(reduction, needs):
        raise ValueError("linear_cross_entropy: precompute needs a scalar loss when W or b is trained")
    loss, logits, *_ = _linear_cross_entropy_op(h, W, b, labels.reshape(-1), int(ignore_index), reduction,
                                                float(label_smoothing), int(chunk), return_logits, torch.float32,
                                                bool(precompute), needs, impl, float(logit_mul), float(logit_div),
                                                float(logit_softcap))
    return loss, (logits if return_logits else None)
