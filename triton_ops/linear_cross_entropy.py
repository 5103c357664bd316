"""Chunked linear + cross-entropy: the LM head and its loss without a saved [tokens, vocab] tensor.

    loss = cross_entropy(h @ W^T + b, labels, ignore_index, reduction, label_smoothing)

h [*, d], W [V, d], b [V] or None, labels [T] (T = h's leading dims flattened). Tokens are processed
`chunk` rows at a time: forward keeps each chunk's logits only while it computes their per-row
log-sum-exp (fp32) and loss; backward recomputes each chunk's logits from h and W, turns them into
d(logits) = (softmax - target) * row scale, and writes d(h) rows and accumulates d(W), d(b) in fp32.
Saved for backward: h, W, b and labels (held by reference) and lse [T] fp32.

The dense path saves cross-entropy's log-softmax, T x V fp32 (403 MB for SmolLM2 at 2048 tokens),
and its temporaries add about as much again to the allocation peak; a chunk here costs
chunk x V fp32 at a time. The price is one recomputed GEMM (T x d x V) in backward.

With return_logits the op also returns the full logits [*, V] in h's dtype: a model that returns its
logits (Hugging Face does) gets them from here, not from a second linear. Their gradient, if any,
is added to each chunk's d(logits), so a zero gradient (what AOTAutograd hands an output nobody
differentiated) costs an element-wise add per chunk, not a T x V x d GEMM.

Numerics follow F.cross_entropy on the upcast logits: rows whose label is ignore_index count
neither in the sum nor in the mean's denominator (all ignored and mean: nan, as torch);
label smoothing eps mixes (1 - eps) * nll with eps * mean over classes of -log p.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def _row_scale(dloss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """d(loss)/d(row loss) for each row: [T] fp32, 0 on ignored rows."""
    if reduction == "none":
        s = dloss.reshape(-1).float()
    elif reduction == "sum":
        s = dloss.float().expand(valid.shape[0])
    else:  # mean: the denominator is the number of counted rows
        s = (dloss.float() / valid.sum()).expand(valid.shape[0])
    return torch.where(valid, s, 0.0)  # all ignored under mean: zero gradient, as torch (not nan)


def linear_cross_entropy_forward(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, chunk: int, return_logits: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns loss ([] or [T] for reduction none, in out_dtype), logits ([*, V] or empty) and lse [T] fp32."""
    d, V = h.shape[-1], W.shape[0]
    h2 = h.reshape(-1, d)  # [T, d]
    y = labels.reshape(-1)  # [T]
    T = h2.shape[0]
    logits = h.new_empty(T, V) if return_logits else h.new_empty(0)
    lse = torch.empty(T, dtype=torch.float32, device=h.device)
    rows = torch.empty(T, dtype=torch.float32, device=h.device)  # per-row loss
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        z = F.linear(h2[r0:r1], W, b)  # [C, V], h's dtype: rounded as the dense linear rounds
        if return_logits:
            logits[r0:r1] = z
        zf = z.float()
        lse_c = torch.logsumexp(zf, dim=-1)  # [C]
        yc = y[r0:r1]
        valid = yc != ignore_index
        z_y = zf.gather(1, torch.where(valid, yc, 0)[:, None]).squeeze(1)  # [C]
        loss_c = lse_c - z_y
        if label_smoothing > 0.0:
            loss_c = (1.0 - label_smoothing) * loss_c + label_smoothing * (lse_c - zf.mean(dim=-1))
        lse[r0:r1] = lse_c
        rows[r0:r1] = torch.where(valid, loss_c, 0.0)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:  # 0 / 0 = nan when every label is ignored, as F.cross_entropy
        loss = rows.sum() / (y != ignore_index).sum()
    return loss.to(out_dtype), logits.view(*h.shape[:-1], V) if return_logits else logits, lse


def linear_cross_entropy_backward(
    dloss: Tensor, dlogits: Optional[Tensor], h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor,
    lse: Tensor, ignore_index: int, reduction: str, label_smoothing: float, chunk: int, needs: list[bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dh, dW, db), None where `needs` (for h, W, b) is False. dlogits: gradient of the returned
    logits ([*, V]) or None."""
    d, V = h.shape[-1], W.shape[0]
    h2 = h.reshape(-1, d)  # [T, d]
    y = labels.reshape(-1)
    T = h2.shape[0]
    dl2 = dlogits.reshape(T, V) if dlogits is not None and dlogits.numel() else None
    valid = y != ignore_index
    scale = _row_scale(dloss, valid, reduction)  # [T] fp32
    dh = torch.empty_like(h2) if needs[0] else None
    dW = torch.zeros(V, d, dtype=torch.float32, device=W.device) if needs[1] else None  # fp32 accumulators
    db = torch.zeros(V, dtype=torch.float32, device=W.device) if needs[2] else None
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        hc = h2[r0:r1]  # [C, d]
        g = F.linear(hc, W, b).float()  # [C, V]: the chunk's logits again
        g.sub_(lse[r0:r1, None]).exp_()  # softmax
        if label_smoothing > 0.0:
            g.sub_(label_smoothing / V)
        yc = torch.where(valid[r0:r1], y[r0:r1], 0)[:, None]
        g.scatter_add_(1, yc, torch.full_like(yc, -(1.0 - label_smoothing), dtype=g.dtype))
        g.mul_(scale[r0:r1, None])  # ignored rows -> 0
        if dl2 is not None:
            g.add_(dl2[r0:r1])
        gc = g.to(h.dtype)  # as the dense .float()'s backward casts d(logits) back
        if dh is not None:
            dh[r0:r1] = gc @ W
        if dW is not None:
            if gc.dtype == torch.float32:
                dW.addmm_(gc.T, hc)
            else:  # bf16/fp16 GEMM, summed over chunks in fp32
                dW += (gc.T @ hc).float()
        if db is not None:
            db += g.sum(0)
    return (None if dh is None else dh.view(h.shape),
            None if dW is None else dW.to(W.dtype),
            None if db is None else db.to(b.dtype))


# --- the custom op: differentiable in h, W, b --------------------------------------------------


@torch.library.custom_op("spt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, chunk: int, return_logits: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return linear_cross_entropy_forward(h, W, b, labels, ignore_index, reduction, label_smoothing, chunk,
                                        return_logits, out_dtype)


@_linear_cross_entropy_op.register_fake
def _(h, W, b, labels, ignore_index, reduction, label_smoothing, chunk, return_logits, out_dtype):
    T = labels.numel()
    loss = h.new_empty(T, dtype=out_dtype) if reduction == "none" else h.new_empty((), dtype=out_dtype)
    logits = h.new_empty(*h.shape[:-1], W.shape[0]) if return_logits else h.new_empty(0)
    return loss, logits, h.new_empty(T, dtype=torch.float32)


@torch.library.custom_op("spt::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    dloss: Tensor, dlogits: Optional[Tensor], h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor,
    lse: Tensor, ignore_index: int, reduction: str, label_smoothing: float, chunk: int, needs: list[bool],
) -> list[Tensor]:
    """[dh, dW, db]; an empty tensor where no gradient is needed."""
    grads = linear_cross_entropy_backward(dloss, dlogits, h, W, b, labels, lse, ignore_index, reduction,
                                          label_smoothing, chunk, needs)
    return [h.new_empty(0) if g is None else g for g in grads]


@_linear_cross_entropy_backward_op.register_fake
def _(dloss, dlogits, h, W, b, labels, lse, ignore_index, reduction, label_smoothing, chunk, needs):
    return [t.new_empty(t.shape) if (need and t is not None) else h.new_empty(0) for t, need in zip((h, W, b), needs)]


def _setup_context(ctx, inputs, output):
    h, W, b, labels, ignore_index, reduction, label_smoothing, chunk, return_logits, out_dtype = inputs
    _, _, lse = output
    ctx.save_for_backward(h, W, b, labels, lse)  # no [T, V] tensor
    ctx.args = (ignore_index, reduction, label_smoothing, chunk)
    ctx.return_logits = return_logits
    # Called eagerly, a logits output nobody differentiates would otherwise get a [T, V] zero
    # gradient allocated for it (None is handled below).
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, dlogits, dlse):
    h, W, b, labels, lse = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]) and b is not None]
    if not any(needs):
        return (None,) * 10
    dlogits = dlogits.contiguous() if (ctx.return_logits and dlogits is not None) else None
    if dloss is None:  # only the logits were differentiated
        dloss = torch.zeros(labels.numel() if ctx.args[1] == "none" else (), dtype=torch.float32, device=h.device)
    dh, dW, db = _linear_cross_entropy_backward_op(dloss.contiguous(), dlogits, h, W, b, labels, lse, *ctx.args, needs)
    return (dh if needs[0] else None, dW if needs[1] else None, db if needs[2] else None) + (None,) * 7


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, reduction: str,
                 label_smoothing: float, chunk: int) -> None:
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


def linear_cross_entropy(
    h: Tensor, W: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, chunk: int = 1024, return_logits: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """cross_entropy(linear(h, W, b).float().view(-1, V), labels.view(-1), ...) computed `chunk` tokens
    at a time (see the module docstring). Returns (loss in fp32, logits [*, V] or None)."""
    check_inputs(h, W, b, labels, reduction, label_smoothing, chunk)
    loss, logits, _ = _linear_cross_entropy_op(h, W, b, labels.reshape(-1), int(ignore_index), reduction,
                                               float(label_smoothing), int(chunk), return_logits, torch.float32)
    return loss, (logits if return_logits else None)
