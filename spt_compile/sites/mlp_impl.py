"""Which implementation of the routed MLP a call runs, and running it.

Implementation (`ffn_impl`, resolve_ffn_impl): the Triton kernels (sparse_ops/routed_mlp/triton.py), the
torch path (sparse_ops/routed_mlp/forward.py, backward.py), its grouped-GEMM form (grouped.py) or the
per-token reference. Calls the kernels
cannot serve run the torch path: LoRA dropout > 0, and dense calibration calls (they measure each
block's output norm on the way).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spt_compile.sparse_ops.routed_mlp import (
    MlpSpec, MlpWeights, compensation, permute_hidden, resolve_ffn_impl, routed_mlp_forward,
)
from spt_compile.sparse_ops.routed_mlp.grouped import grouped_routed_forward, grouped_unsupported
from spt_compile.sparse_ops.routed_mlp.reference import routed_mlp_reference

from .meta import MlpRun


class LazyPermuted:
    """permute_hidden(weights, spec, perm), copied on the first get() (the torch path needs no copy)."""

    def __init__(self, weights: MlpWeights, spec: MlpSpec, perm: Optional[Tensor]):
        self.weights, self.spec, self.perm, self.value = weights, spec, perm, None

    def get(self) -> MlpWeights:
        if self.value is None:
            self.value = permute_hidden(self.weights, self.spec, self.perm)
        return self.value


def takes_torch_path(option: str, x2: Tensor, spec: MlpSpec) -> bool:
    """Whether a call runs the torch path or its grouped form (ffn_impl, or a dropout the op draws, which
    only the torch path has: spec.draws_dropout)."""
    return resolve_ffn_impl(option, x2.device) in ("torch", "grouped") or spec.draws_dropout


def kernel_impl_unused(option: str, ran: dict[str, int]) -> Optional[str]:
    """Why ffn_impl's Triton kernels (or the reference) served none of a site's calls, for report():
    they run routed calls only, and a default training run makes none (its training calls run the exact
    forward, which has its own torch code). None when they served some call, or were not asked for."""
    impl = resolve_ffn_impl(option, torch.device("cpu"))  # the device does not enter the choice
    if impl not in ("triton", "reference") or impl in ran or not ran:
        return None
    return (f"ffn_impl={impl!r} serves routed calls without LoRA dropout (exact_forward=False, or sparse_inference="
            "True without gradients); the exact forward's training calls, dense and calibration calls run the torch "
            "path, as these did")


def grouped_choice(option: str, x2: Tensor, w: MlpWeights, spec: MlpSpec) -> tuple[bool, Optional[str]]:
    """(whether routed calls run grouped GEMMs, why not when ffn_impl asks for them): ffn_impl says
    "grouped" and grouped_unsupported says nothing against it; else the block-batched torch path
    serves them, the same numbers."""
    if resolve_ffn_impl(option, x2.device) != "grouped":
        return False, None
    why = grouped_unsupported(x2, w, spec)
    return why is None, why


def run_impl(x2: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor, seed: int, option: str,
             saved: list, perm: Optional[Tensor] = None,
             comp: Optional[tuple[Tensor, Tensor, Tensor]] = None, grouped: bool = False,
             n_pairs: Optional[int] = None) -> tuple[Tensor, MlpRun]:
    """y by the chosen implementation, with hidden units reordered by perm (the clustering) if given,
    plus compensation(x2, ~block_mask, *comp) if given; appends what backward needs to `saved` (the
    pre-activations in a layout the Triton path shares; the torch path appends its LoRA inputs).
    grouped: run the grouped form (grouped_choice); n_pairs: block_mask's number of (token, block) pairs,
    when known on the host (the grouped form then needs no sync). Returns (y, how it ran)."""
    impl = resolve_ffn_impl(option, x2.device)
    if grouped:
        return grouped_routed_forward(x2, w, spec, block_mask, seed, n_pairs, saved, perm, comp), MlpRun("grouped")
    if impl == "grouped" or spec.draws_dropout:
        impl = "torch"  # grouped_unsupported; neither the kernels nor the reference have LoRA dropout
    if impl == "torch":  # adds the compensation where its blocks accumulate; puts units in block order itself
        y = routed_mlp_forward(x2, w, spec, block_mask, seed, saved=saved, perm=perm, comp=comp)
        return y, MlpRun()
    y, run = _run_kernel_impl(impl, x2, w, spec, block_mask, saved, perm)
    return (y if comp is None else y + compensation(x2, ~block_mask, *comp).to(y.dtype)), run


def _run_kernel_impl(impl: str, x2: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor,
                     saved: list, perm: Optional[Tensor]) -> tuple[Tensor, MlpRun]:
    """The Triton kernels (reading the weights through perm: no block-order copy) or the reference (on
    permute_hidden's copy)."""
    if impl == "triton":
        from spt_compile.sparse_ops.routed_mlp.triton import compute_dtype, routed_mlp_forward_triton

        # The traced dtype (autocast, recorded by the pass), else autocast if active here, else x's.
        cd = getattr(torch, spec.compute) if spec.compute else compute_dtype(x2)
        y, pre, counts = routed_mlp_forward_triton(x2, w, spec, block_mask, cd, perm=perm)
        saved.append(pre)
        return y, MlpRun("triton", None if cd == x2.dtype else cd, tuple(counts))
    return routed_mlp_reference(x2, permute_hidden(w, spec, perm), spec, block_mask), MlpRun("reference")


def reference_backward(dy: Tensor, x: Tensor, w: MlpWeights, spec: MlpSpec, block_mask: Tensor, needs: list[bool]):
    """Gradients of routed_mlp_reference by torch.func.vjp (recomputes everything: for checks only)."""
    slots = [n for n, t, need in zip(MlpWeights._fields, w, needs[1:]) if t is not None and need]

    def f(xv, *ts):
        return routed_mlp_reference(xv, w._replace(**dict(zip(slots, ts))), spec, block_mask)

    _, vjp = torch.func.vjp(f, x, *[getattr(w, n) for n in slots])
    dx, *gs = vjp(dy)
    got = dict(zip(slots, gs))
    return (dx if needs[0] else None), MlpWeights(**{n: got.get(n) for n in MlpWeights._fields})
