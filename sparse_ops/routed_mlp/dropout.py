"""LoRA dropout inside the routed MLP: keep scales (0 or 1/(1-p)) drawn from (seed, stream), so
backward draws the forward's masks again instead of saving them.

Each mask has a stream: 1 for the in projection's LoRA input, 2 for the gate's (both [T, d_in]),
16 + b for the out projection's in block b ([rows of b, Fb]); each is drawn from its own generator
seeded by (call seed, stream), so any of them can be drawn again alone.

A mask drops each element with probability p rounded to a multiple of 2^-16 (drop_share: at most
2^-17 from p) and scales the kept ones by 1 / (1 - that share), so the expected output is exact.
The rounding buys masks at half torch.rand's cost (_draw_keep). Drawn this fast, a mask costs
about what unpacking it from saved bits would (measured: benchmarks/research/dropout_bits_ab.py),
so backward draws again and the saved tensors hold no masks."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .spec import MlpSpec

IN_STREAM, GATE_STREAM, OUT_STREAM = 1, 2, 16  # OUT_STREAM + b for block b
_LEVELS = 65536  # the masks' uniforms are 16-bit


def drop_share(p: float) -> float:
    """The probability a mask drops an element with: p on a grid of 2^-16 (the masks compare 16-bit
    uniforms, see _draw_keep); at most 2^-17 from p (p = 0.05 drops 3277 / 65536 = 0.0500031)."""
    return round(p * _LEVELS) / _LEVELS


def _draw_keep(shape, p: float, gen: torch.Generator, device) -> Tensor:
    """bool keep mask [shape], each element dropped with probability drop_share(p). Four 16-bit
    uniforms come out of each 64-bit draw: half the time of torch.rand(shape).ge_(p) on this CPU
    (12 against 26 ms for [4096, 1536], mask scaled), where each fp32 uniform costs one mt19937 call."""
    n = math.prod(shape)
    if drop_share(p) >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    uniform = words.view(torch.int16)[:n]  # each of -32768 .. 32767 equally likely
    return uniform.ge(round(p * _LEVELS) - _LEVELS // 2).view(*shape)


def _keep_scale(shape, p: float, seed: int, stream: int, device, dtype) -> Optional[Tensor]:
    """Inverted-dropout scale for one stream, [shape] in dtype: 0 where dropped, else
    1 / (1 - drop_share(p)); the same values whenever (seed, stream) is drawn again."""
    if p <= 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + stream) % (2**63 - 1))
    share = drop_share(p)
    if share >= 1.0:  # everything dropped
        return torch.zeros(shape, dtype=dtype, device=device)
    scale = _draw_keep(shape, p, gen, device).to(torch.float32).div_(1.0 - share)
    return scale if scale.dtype == dtype else scale.to(dtype)


def lora_input_scales(x: Tensor, spec: MlpSpec, seed: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """LoRA dropout on x for the in and gate projections (independent masks, as PEFT's modules)."""
    keep_in = _keep_scale(x.shape, spec.in_dropout, seed, IN_STREAM, x.device, x.dtype)
    keep_gate = _keep_scale(x.shape, spec.gate_dropout, seed, GATE_STREAM, x.device, x.dtype) if spec.gated else None
    return keep_in, keep_gate


def out_keep(n_tokens: int, lo: int, hi: int, spec: MlpSpec, seed: int, block: int, x: Tensor) -> Optional[Tensor]:
    """The out projection's LoRA dropout in one block, [n_tokens, hi - lo]."""
    return _keep_scale((n_tokens, hi - lo), spec.out_dropout, seed, OUT_STREAM + block, x.device, x.dtype)
