"""What a routed MLP is: its static spec (travels through the graph as a string), its twelve weight
slots, its activations and hidden-layer blocks, and the implementation choice."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# Implementations of the routed MLP: triton.py (CUDA kernels), the block-batched
# PyTorch path (forward.py, backward.py), its grouped-GEMM form (grouped.py: no host sync sizes the
# blocks; calls it cannot serve run the block-batched path), or reference.routed_mlp_reference (a
# per-token loop, for checks only).
FFN_IMPLS = ("auto", "triton", "torch", "grouped", "reference")


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


def _relu2(x: Tensor) -> Tensor:
    """Squared ReLU (Primer; Nemotron, Persimmon)."""
    return F.relu(x).square()


# Activations the MLP pass recognises, by the name recorded in MlpSpec.activation.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
    "relu2": _relu2,
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
    # A dropout over the whole hidden layer, before the out projection (T5's wo(dropout(h)); p, 0 when
    # traced in eval mode): drawn by the op per block (dropout.hidden_keep), as the out LoRA's is.
    hidden_dropout: float = 0.0

    @property
    def draws_dropout(self) -> bool:
        """Whether the op draws any dropout (LoRA's, or over the hidden layer): only the torch path does."""
        return bool(self.in_dropout or self.gate_dropout or self.out_dropout or self.hidden_dropout)

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
