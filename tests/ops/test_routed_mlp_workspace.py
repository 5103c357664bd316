"""The block-order weights' reused memory (sparse_ops/routed_mlp/workspace.py): calls that build into
memory an earlier call wrote give the numbers fresh memory gives, bit for bit, on every torch path
(exact forward, routed forward, grouped) forward and backward; a buffer is never shared by two builds
alive at once; inference mode, fake tensors and small buffers are handled."""

from __future__ import annotations

import pytest
import torch

from spt_compile.fitting.router import choose_blocks
from spt_compile.sparse_ops.routed_mlp import (
    MlpWeights, exact_mlp_forward, routed_mlp_backward_saved, routed_mlp_forward, workspace,
)
from spt_compile.sparse_ops.routed_mlp.blocks import _BlockOrderWeights, _lora_columns
from spt_compile.sparse_ops.routed_mlp.grouped import grouped_backward_saved, grouped_routed_forward

from test_routed_mlp_grouped import _detached
from test_routed_mlp_op import make_weights, spec_for


@pytest.fixture
def reuse_all(monkeypatch):
    """Every build buffer reused (the tests' weights are far below the real 32 MiB threshold)."""
    workspace.release()
    monkeypatch.setattr(workspace, "REUSE_FROM_BYTES", 0)
    yield
    workspace.release()


def _calls(path, x_list, w, spec, perm, nb, active):
    """Forward and backward of each x in turn, as a training run calls the op: [(y, dx, grads), ...]."""
    results = []
    needs = MlpWeights(*[t is not None for t in w])
    for i, x in enumerate(x_list):
        gen = torch.Generator().manual_seed(100 + i)
        T = x.shape[0]
        mask = choose_blocks(torch.rand(T, nb, generator=gen), active)
        saved = []
        if path == "exact":
            y, mask, _, _, counts = exact_mlp_forward(x, w, spec, lambda s: mask, 3, saved, perm)
            dy = torch.randn(y.shape, generator=gen)
            got = routed_mlp_backward_saved(dy, x, w, spec, mask, 3, True, needs, saved[0], perm=perm,
                                            exact_forward=True, counts=counts)
        elif path == "routed":
            y = routed_mlp_forward(x, w, spec, mask, 3, saved=saved, perm=perm)
            dy = torch.randn(y.shape, generator=gen)
            got = routed_mlp_backward_saved(dy, x, w, spec, mask, 3, True, needs, saved[0], perm=perm)
        else:
            y = grouped_routed_forward(x, w, spec, mask, 3, T * active, saved, perm)
            dy = torch.randn(y.shape, generator=gen)
            got = grouped_backward_saved(dy, x, w, spec, mask, 3, True, needs, saved[0], perm=perm)
        results.append((y, got[0], got[1]))
    return results


CASES = [  # gated, layout, LoRA on, permuted, out LoRA dropout
    (True, "oi", ("in", "gate", "out"), True, 0.0),
    (True, "oi", ("in", "gate", "out"), True, 0.1),
    (False, "io", ("in", "out"), True, 0.0),
    (True, "io", (), True, 0.0),
    (True, "oi", ("gate", "out"), False, 0.0),
]


# the grouped path takes no LoRA dropout on the out projection (grouped_unsupported)
@pytest.mark.parametrize("path,gated,layout,lora,permuted,out_dropout",
                         [(p, *c) for p in ("exact", "routed", "grouped") for c in CASES if not (p == "grouped" and c[4])])
def test_reused_memory_gives_the_numbers_fresh_memory_gives(path, gated, layout, lora, permuted, out_dropout,
                                                           monkeypatch):
    gen = torch.Generator().manual_seed(7)
    hidden, nb = 48, 4
    w = _detached(make_weights(16, hidden, 24, gated=gated, layout=layout, lora=lora, r=4, gen=gen))
    spec = spec_for(w, "silu" if gated else "gelu", gated, nb, layout, out_dropout=out_dropout)
    perm = torch.randperm(hidden, generator=gen) if permuted else None
    xs = [torch.randn(T, 16, generator=gen) for T in (29, 7, 33)]
    workspace.release()
    fresh = _calls(path, xs, w, spec, perm, nb, 2)
    assert workspace.held_bytes() == 0, "test weights are below the real threshold: nothing reused"
    monkeypatch.setattr(workspace, "REUSE_FROM_BYTES", 0)
    try:
        reused = _calls(path, xs, w, spec, perm, nb, 2)
        moved = permuted or lora  # natural order without LoRA: the weights are read in place
        assert (workspace.held_bytes() > 0) == bool(moved)
    finally:
        workspace.release()
    for (y, dx, grads), (y_r, dx_r, grads_r) in zip(fresh, reused):
        assert torch.equal(y, y_r) and torch.equal(dx, dx_r)
        for name, g, g_r in zip(MlpWeights._fields, grads, grads_r):
            assert (g is None) == (g_r is None), name
            assert g is None or torch.equal(g, g_r), name


def _build(w, spec, perm):
    return _BlockOrderWeights(w, spec, _lora_columns(16, w, spec), perm, merged=True)


def _small():
    gen = torch.Generator().manual_seed(0)
    w = _detached(make_weights(16, 32, 16, gated=True, r=4, gen=gen))
    return w, spec_for(w, "silu", True, 4), torch.randperm(32, generator=gen)


def test_a_buffer_is_lent_to_one_build_at_a_time(reuse_all):
    w, spec, perm = _small()
    first = _build(w, spec, perm)
    out_first = first.out.untyped_storage().data_ptr()
    second = _build(w, spec, perm)  # the first still holds its buffers
    assert second.out.untyped_storage().data_ptr() != out_first
    assert {t.untyped_storage().data_ptr() for t in first.inputs.values()}.isdisjoint(
        t.untyped_storage().data_ptr() for t in second.inputs.values())
    kept = second.out.clone()
    del first  # hands its buffers back
    third = _build(w, spec, None)
    assert third.out.untyped_storage().data_ptr() == out_first, "the freed build's memory is reused"
    assert torch.equal(second.out, kept), "a build still alive is not written over"


def test_inference_mode_builds_leave_memory_training_can_write(reuse_all):
    w, spec, perm = _small()
    with torch.inference_mode():
        under = _build(w, spec, perm).out.clone()
    assert workspace.held_bytes() > 0
    assert torch.equal(_build(w, spec, perm).out, under)  # would raise if the buffer were an inference tensor


def test_fake_and_small_and_released(reuse_all, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, spec, perm = _small()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fw = MlpWeights(*[None if t is None else mode.from_tensor(t) for t in w])
        _build(fw, spec, mode.from_tensor(perm))
    assert workspace.held_bytes() == 0, "a fake tensor is never kept for real calls"
    _build(w, spec, perm)
    assert workspace.held_bytes() > 0
    workspace.release()
    assert workspace.held_bytes() == 0
    monkeypatch.setattr(workspace, "REUSE_FROM_BYTES", 32 * 2**20)
    _build(w, spec, perm)
    assert workspace.held_bytes() == 0, "small buffers come from the allocator"


@pytest.mark.parametrize("exact_forward", [True, False])
def test_training_through_the_backend_is_unchanged_by_reuse(exact_forward, monkeypatch):
    """A compiled MLP trained a few steps (calibration, clustering, then routed backwards, the weights
    updated in place between steps) and then evaluated sparse: every loss, gradient and output equal
    with its buffers reused or fresh."""
    import spt_compile
    from toy_models import compiled_gated_mlp

    def run():
        model, compiled = compiled_gated_mlp(24, 64, exact_forward=exact_forward, ffn_loss_rows="off")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        seen = []
        for _ in range(5):
            x = torch.randn(3, 37, 24, generator=gen, requires_grad=True)
            loss = compiled(x).square().mean()
            loss.backward()
            seen += [loss.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
        with torch.no_grad(), spt_compile.enable(sparse_inference=True):
            seen.append(compiled(torch.randn(2, 11, 24, generator=gen)))
        return seen

    workspace.release()
    fresh = run()
    monkeypatch.setattr(workspace, "REUSE_FROM_BYTES", 0)
    try:
        reused = run()
        assert workspace.held_bytes() > 0
    finally:
        workspace.release()
    assert len(fresh) == len(reused)
    for i, (a, b) in enumerate(zip(fresh, reused)):
        assert torch.equal(a, b), i
