"""The exact forward's grouped backward (sparse_ops/routed_mlp/grouped.py): one torch._grouped_mm per
projection and direction for every block, offsets on the device. Its gradients are the block-batched
backward's (routed_mlp_backward_saved, exact_forward=True) for the same saved forward, on awkward
shapes: empty blocks, one token, permuted units, either weight layout, plain and gated, with and
without LoRA, LoRA dropout on the input projections."""

from __future__ import annotations

import pytest
import torch

from spt_compile.fitting.router import choose_blocks
from spt_compile.sparse_ops.routed_mlp import MlpWeights, exact_mlp_forward, routed_mlp_backward_saved, routed_mlp_forward
from spt_compile.sparse_ops.routed_mlp.grouped import (
    grouped_backward_saved, grouped_routed_forward, grouped_unsupported, routed_pairs,
)

from test_routed_mlp_op import make_weights, spec_for


def _detached(w: MlpWeights) -> MlpWeights:
    return MlpWeights(*[None if t is None else t.detach() for t in w])


def _lora_only(w: MlpWeights) -> MlpWeights:
    """What a LoRA run trains: the LoRA factors (and x)."""
    return MlpWeights(*[t is not None and name.endswith(("_a", "_bb")) for name, t in w._asdict().items()])


@pytest.mark.parametrize("trains", ["lora", "everything"])
@pytest.mark.parametrize("gated,layout,lora,T,hidden,nb,active,dropout,permuted", [
    (True, "oi", ("in", "gate", "out"), 29, 64, 4, 2, 0.0, True),
    (True, "io", ("gate", "out"), 17, 48, 3, 1, 0.0, False),
    (False, "oi", ("in", "out"), 1, 32, 4, 3, 0.0, True),
    (False, "io", ("out",), 33, 80, 5, 2, 0.0, True),
    (True, "oi", (), 8, 16, 2, 1, 0.0, False),
    (True, "oi", ("in", "gate", "out"), 40, 64, 8, 3, 0.25, True),
])
def test_grouped_backward_equals_the_block_batched_one(gated, layout, lora, T, hidden, nb, active, dropout, permuted,
                                                       trains):
    gen = torch.Generator().manual_seed(T + hidden)
    w = _detached(make_weights(16, hidden, 24, gated=gated, layout=layout, lora=lora, r=4, gen=gen))
    spec = spec_for(w, "silu" if gated else "gelu", gated, nb, layout, in_dropout=dropout,
                    gate_dropout=dropout if gated else 0.0)
    x = torch.randn(T, 16, generator=gen)
    assert grouped_unsupported(x, w, spec) is None
    perm = torch.randperm(hidden, generator=gen) if permuted else None
    scores = torch.rand(T, nb, generator=gen)
    scores[:, 0] = -1.0  # block 0 empty: a group of no rows

    def choose(_):  # the forward's scores are not used: a fixed choice with an empty block
        return choose_blocks(scores, active)

    ref_saved, got_saved = [], []
    y_ref, mask, _, whole, counts = exact_mlp_forward(x, w, spec, choose, 3, ref_saved, perm)
    y, mask_g, _, whole_g, counts_g = exact_mlp_forward(x, w, spec, choose, 3, got_saved, perm, grouped=True,
                                                        n_pairs=T * active)
    assert torch.equal(y, y_ref) and torch.equal(mask, mask_g) and not whole_g and counts_g is None
    assert got_saved[0].numel() == ref_saved[0].numel(), "the same bytes saved: only the routed pairs"
    dy = torch.randn(y.shape, generator=gen)
    needs = _lora_only(w) if trains == "lora" else MlpWeights(*[t is not None for t in w])
    want = routed_mlp_backward_saved(dy, x, w, spec, mask, 3, True, needs, ref_saved[0], perm=perm,
                                     exact_forward=True, counts=counts)
    got = grouped_backward_saved(dy, x, w, spec, mask, 3, True, needs, got_saved[0], perm=perm)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    for name, g, r in zip(MlpWeights._fields, got[1], want[1]):
        assert (g is None) == (r is None), name
        if r is not None:
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_routed_pairs_are_sorted_by_block_with_device_offsets():
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    pairs = routed_pairs(mask, int(mask.sum()))
    assert pairs.tokens.tolist() == [0, 2, 3, 0, 1, 3]
    assert pairs.blocks.tolist() == [0, 0, 0, 2, 2, 2]
    assert pairs.offs.tolist() == [3, 3, 6] and pairs.offs.dtype == torch.int32
    # a count that does not match the mask is caught on the device (on the CPU: raised at once)
    with pytest.raises(RuntimeError, match="differ from the count"):
        routed_pairs(mask, 5)
    assert routed_pairs(mask, 6, check=False).tokens.tolist() == pairs.tokens.tolist()  # the backward's: checked before


def test_grouped_unsupported_names_what_stops_it():
    gen = torch.Generator().manual_seed(0)
    w = _detached(make_weights(16, 48, 16, gated=True, r=4, gen=gen))
    x = torch.randn(4, 16)
    assert "unequal blocks" in grouped_unsupported(x, w, spec_for(w, "silu", True, 5))
    assert "out projection" in grouped_unsupported(x, w, spec_for(w, "silu", True, 4, out_dropout=0.1))
    assert "float64" in grouped_unsupported(x.double(), w, spec_for(w, "silu", True, 4))
    w3 = _detached(make_weights(16, 48, 16, gated=True, r=3, gen=gen))
    assert "rank" in grouped_unsupported(x, w3, spec_for(w3, "silu", True, 4))


@pytest.mark.parametrize("gated,layout,lora,T,nb,active,comp", [
    (True, "oi", ("in", "gate", "out"), 29, 4, 2, False),
    (False, "io", ("in", "out"), 17, 4, 1, True),
    (True, "io", (), 1, 2, 1, False),
])
def test_grouped_routed_forward_equals_the_block_batched_one(gated, layout, lora, T, nb, active, comp):
    """Output, saved bytes and (through grouped_backward_saved) gradients of the routed forward."""
    gen = torch.Generator().manual_seed(T)
    w = _detached(make_weights(16, 64, 24, gated=gated, layout=layout, lora=lora, r=4, gen=gen))
    spec = spec_for(w, "silu" if gated else "gelu", gated, nb, layout)
    x = torch.randn(T, 16, generator=gen)
    perm = torch.randperm(64, generator=gen)
    mask = choose_blocks(torch.rand(T, nb, generator=gen), active)
    UVM = (torch.randn(16, nb * 2, generator=gen), torch.randn(nb * 2, 24, generator=gen),
           torch.randn(nb, 24, generator=gen)) if comp else None
    ref_saved, got_saved = [], []
    want_y = routed_mlp_forward(x, w, spec, mask, 3, saved=ref_saved, perm=perm, comp=UVM)
    y = grouped_routed_forward(x, w, spec, mask, 3, T * active, got_saved, perm, UVM)
    torch.testing.assert_close(y, want_y, atol=2e-5, rtol=1e-5)
    assert got_saved[0].numel() == ref_saved[0].numel()
    dy = torch.randn(y.shape, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    UV = None if UVM is None else UVM[:2]
    want = routed_mlp_backward_saved(dy, x, w, spec, mask, 3, True, needs, ref_saved[0], perm=perm, comp=UV)
    got = grouped_backward_saved(dy, x, w, spec, mask, 3, True, needs, got_saved[0], perm=perm, comp=UV)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    for name, g, r in zip(MlpWeights._fields, got[1], want[1]):
        if r is not None:
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_grouped_in_bfloat16_is_as_close_to_fp32_as_the_block_batched_path():
    """bf16, as on a GPU: each path's gradients are compared with the fp32 computation; the grouped
    one's error is within twice the block-batched one's (both round the per-pair products to bf16 and
    accumulate in fp32, in different groupings)."""
    gen = torch.Generator().manual_seed(11)
    w32 = _detached(make_weights(32, 64, 32, gated=True, lora=("in", "gate", "out"), r=8, gen=gen))
    spec = spec_for(w32, "silu", True, 4)
    x32 = torch.randn(48, 32, generator=gen)
    dy32 = torch.randn(48, 32, generator=gen)
    scores = torch.rand(48, 4, generator=gen)
    needs = _lora_only(w32)

    def grads(x, w, dy, grouped):
        saved: list = []
        _, mask, _, _, counts = exact_mlp_forward(x, w, spec, lambda _: choose_blocks(scores, 2), 0, saved,
                                                  grouped=grouped, n_pairs=96 if grouped else None)
        if grouped:
            return grouped_backward_saved(dy, x, w, spec, mask, 0, True, needs, saved[0])
        return routed_mlp_backward_saved(dy, x, w, spec, mask, 0, True, needs, saved[0], exact_forward=True,
                                         counts=counts)

    exact = grads(x32, w32, dy32, False)
    w16 = MlpWeights(*[None if t is None else t.to(torch.bfloat16) for t in w32])
    x16, dy16 = x32.to(torch.bfloat16), dy32.to(torch.bfloat16)
    assert grouped_unsupported(x16, w16, spec) is None
    block_batched, grouped = grads(x16, w16, dy16, False), grads(x16, w16, dy16, True)
    pairs = [("x", exact[0], block_batched[0], grouped[0])] + [
        (name, e, b, g) for name, e, b, g in zip(MlpWeights._fields, exact[1], block_batched[1], grouped[1])
        if e is not None]
    for name, e, b, g in pairs:
        assert g.dtype == b.dtype == torch.bfloat16, name
        err_b, err_g = (b.float() - e).abs().max(), (g.float() - e).abs().max()
        assert err_g <= 2 * err_b + 1e-3 * e.abs().max(), (name, float(err_g), float(err_b))
