"""LoRA dropout inside the routed MLP: keep scales (0 or 1/(1-p)) drawn from (seed, stream), so
backward draws the forward's masks again instead of saving them.

Each mask has a stream: 1 for the in projection's LoRA input, 2 for the gate's (both [T, d_in]),
16 + b for the out projection's in block b ([rows of b, Fb]), 2^16 + b for a dropout over the whole
hidden layer in block b (spec.hidden_dropout: T5's wo(dropout(h)); it comes first, and the out LoRA
reads the dropped layer); each is drawn from its own generator seeded by (call seed, stream), so any
of them can be drawn again alone.

The masks are sparse_ops/dropout.py's: p rounded to a multiple of 2^-16, the kept elements scaled
by 1 / (1 - that share), at half torch.rand's cost. Drawn this fast, a mask costs about what
unpacking it from saved bits would (docs/ffn.md, "LoRA dropout"), so backward draws again and the
saved tensors hold no masks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dropout import draw_keep, keep_scale, stream_seed
from .spec import MlpSpec, block_bounds

IN_STREAM, GATE_STREAM, OUT_STREAM = 1, 2, 16  # OUT_STREAM + b for block b
HIDDEN_STREAM = 1 << 16  # + b: the hidden layer's own dropout in block b (far above any OUT_STREAM + b)


def _keep_scale(shape, p: float, seed: int, stream: int, device, dtype) -> Optional[Tensor]:
    """Inverted-dropout scale for one stream, [shape] in dtype: 0 where dropped, else
    1 / (1 - drop_share(p)); the same values whenever (seed, stream) is drawn again."""
    if p <= 0.0:
        return None
    return keep_scale(draw_keep(shape, p, stream_seed(seed, stream), device), p, dtype)


def lora_input_scales(x: Tensor, spec: MlpSpec, seed: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """LoRA dropout on x for the in and gate projections: independent masks, as PEFT's modules draw
    them, except for a fused gate/up projection (spec.fused), which is one PEFT module with one LoRA
    A for both halves and so one mask on its input: both halves get the gate stream's."""
    keep_gate = _keep_scale(x.shape, spec.gate_dropout, seed, GATE_STREAM, x.device, x.dtype) if spec.gated else None
    if spec.fused:
        return keep_gate, keep_gate
    keep_in = _keep_scale(x.shape, spec.in_dropout, seed, IN_STREAM, x.device, x.dtype)
    return keep_in, keep_gate


def _block_keep(n_tokens: int, lo: int, hi: int, p: float, seed: int, stream: int, x: Tensor) -> Optional[Tensor]:
    """One block's mask of a per-block stream, [n_tokens, hi - lo] (None: p is 0)."""
    return _keep_scale((n_tokens, hi - lo), p, seed, stream, x.device, x.dtype)


def _layer_keep(n_tokens: int, spec: MlpSpec, p: float, seed: int, first_stream: int, x: Tensor) -> Optional[Tensor]:
    """Every block's draw of a per-block stream side by side, [n_tokens, F], in the order of the
    weights' units (None: p is 0)."""
    if p <= 0.0:
        return None
    bounds = block_bounds(spec.hidden, spec.n_blocks)
    return torch.cat([_block_keep(n_tokens, lo, hi, p, seed, first_stream + b, x) for b, (lo, hi) in enumerate(bounds)], 1)


def out_keep(n_tokens: int, lo: int, hi: int, spec: MlpSpec, seed: int, block: int, x: Tensor) -> Optional[Tensor]:
    """The out projection's LoRA dropout in one block, [n_tokens, hi - lo]."""
    return _block_keep(n_tokens, lo, hi, spec.out_dropout, seed, OUT_STREAM + block, x)


def out_keep_layer(n_tokens: int, spec: MlpSpec, seed: int, x: Tensor) -> Optional[Tensor]:
    """out_keep for every unit, [n_tokens, F] (None: no dropout)."""
    return _layer_keep(n_tokens, spec, spec.out_dropout, seed, OUT_STREAM, x)


def hidden_keep(n_tokens: int, lo: int, hi: int, spec: MlpSpec, seed: int, block: int, x: Tensor) -> Optional[Tensor]:
    """The hidden layer's own dropout in one block, [n_tokens, hi - lo] (None: spec.hidden_dropout is 0)."""
    return _block_keep(n_tokens, lo, hi, spec.hidden_dropout, seed, HIDDEN_STREAM + block, x)


def hidden_keep_layer(n_tokens: int, spec: MlpSpec, seed: int, x: Tensor) -> Optional[Tensor]:
    """hidden_keep for every unit, [n_tokens, F] (None: no dropout)."""
    return _layer_keep(n_tokens, spec, spec.hidden_dropout, seed, HIDDEN_STREAM, x)
