"""Dropout masks from 16-bit uniforms, and spt::dropout, the op the dropout pass puts in place of a
graph's F.dropout (passes/dropout.py).

A mask drops each element with probability p rounded to a multiple of 2^-16 (drop_share: at most
2^-17 from p; 0.05 drops 3277 / 65536 = 0.0500031) and scales the kept ones by
1 / (1 - that share), so the expected output is exact. Four 16-bit uniforms come out of each 64-bit
draw (draw_keep): on this CPU a mask costs about 2 ns an element, against about 4 for
torch.rand(shape) >= p and 7 for F.dropout's bernoulli_ (one mt19937 call per element).

spt::dropout draws its mask from a generator seeded by a number it takes from torch's default CPU
generator (so torch.manual_seed makes runs repeat), returns that seed, and its backward draws the
same mask again from it: nothing the size of x is saved (F.dropout saves its mask, a byte an
element). The masks are not F.dropout's: a compiled model's dropout differs from eager's, as
Inductor's own does."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_LEVELS = 65536  # the masks' uniforms are 16-bit


def drop_share(p: float) -> float:
    """The probability a mask drops an element with: p on a grid of 2^-16, at most 2^-17 from p."""
    return round(p * _LEVELS) / _LEVELS


def draw_keep(shape, p: float, seed: int, device) -> Tensor:
    """bool keep mask [shape], each element dropped with probability drop_share(p): a function of
    (seed, shape) alone."""
    n = math.prod(shape)
    if drop_share(p) >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    uniform = words.view(torch.int16)[:n]  # each of -32768 .. 32767 equally likely
    return uniform.ge(round(p * _LEVELS) - _LEVELS // 2).view(*shape)


def stream_seed(seed: int, stream: int) -> int:
    """The seed of one of a call's masks: (call seed, stream number) mixed into one generator seed,
    so each stream (a chunk, a projection, a block) is drawn again alone."""
    return (seed * 1_000_003 + stream) % (2**63 - 1)


@functools.lru_cache(maxsize=64)
def scale_of(p: float, dtype) -> float:
    """The kept elements' factor, 1 / (1 - drop_share(p)) rounded to dtype (0 when everything drops).
    Both the masks here and F.dropout on a CPU multiply by a factor already in x's dtype (ATen's
    noise.div_(1 - p)), so each product is rounded once, from the same two values."""
    share = drop_share(p)
    # a host tensor, once per (p, dtype): no device is involved
    return 0.0 if share >= 1.0 else torch.tensor(1.0 / (1.0 - share), dtype=dtype).item()


def keep_scale(keep: Tensor, p: float, dtype) -> Tensor:
    """bool keep -> its inverted-dropout scale [shape of keep] in dtype: 0, or scale_of(p, dtype)."""
    return keep.to(dtype).mul_(scale_of(p, dtype))


def _apply(x: Tensor, p: float, seed: int) -> Tensor:
    """x * keep_scale(mask of `seed`): [shape of x], x's dtype. Two passes (x * keep is x or 0
    exactly, then one rounded product), the values of x * keep_scale(...) without building it."""
    keep = draw_keep(x.shape, p, seed, x.device)
    return (x * keep).mul_(scale_of(p, x.dtype))


# --- the op: differentiable in x -------------------------------------------------------------------


@torch.library.custom_op("spt::dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_op(x: Tensor, p: float, call: int = 0) -> tuple[Tensor, Tensor]:
    """(x dropped out [shape of x], the mask's seed: int64 0-d on the CPU). The seed comes from
    torch's default CPU generator (host only: no device sync). `call` numbers the dropouts of a
    graph and is otherwise unused: AOTAutograd's common-subexpression pass would merge calls with
    equal arguments (it knows aten's random ops, not this one), and PEFT's q, k and v adapters each
    drop out the same x with the same p, each with a mask of its own."""
    seed = int(torch.randint(0, 2**62, (1,)))
    return _apply(x, p, seed), torch.tensor(seed, dtype=torch.int64)


@_dropout_op.register_fake
def _(x, p, call=0):
    return x.new_empty(x.shape), torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("spt::dropout_backward", mutates_args=())
def _dropout_backward_op(dout: Tensor, seed: Tensor, p: float) -> Tensor:
    """d(x) = d(out) * mask / (1 - share): the forward's mask, drawn again from its seed."""
    return _apply(dout, p, int(seed))


@_dropout_backward_op.register_fake
def _(dout, seed, p):
    return dout.new_empty(dout.shape)


def _setup_context(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(output[1])  # the seed only
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dseed):
    if dout is None:
        return None, None, None
    (seed,) = ctx.saved_tensors
    return _dropout_backward_op(dout.contiguous(), seed, ctx.p), None, None


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout with a 16-bit mask (see the module docstring): F.dropout(x, p)'s
    distribution with p on a 2^-16 grid; nothing saved for backward but the seed."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1]; got {p}")
    return _dropout_op(x, float(p))[0]


def dropout_reference(x: Tensor, p: float, seed: int) -> Tensor:
    """The plain computation spt::dropout runs for a given seed, differentiable: x times the mask's
    scale tensor, as F.dropout computes it on a CPU (x * noise, noise already divided by 1 - p)."""
    keep = draw_keep(x.shape, p, seed, x.device)
    return x * keep_scale(keep, p, x.dtype)
