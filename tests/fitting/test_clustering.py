"""Neuron clustering: balanced groups of co-active units, applied as a permutation that leaves the
dense output and the order of every gradient unchanged, and stays out of the user's weights."""

from __future__ import annotations

import copy

import pytest
import torch

import spt_compile
from spt_compile.registry import model_sites
from spt_compile.fitting.clustering import cluster_neurons
from spt_compile.sparse_ops.routed_mlp.reference import routed_mlp_reference
from spt_compile.sparse_ops.routed_mlp import (
    block_bounds,
    permute_hidden,
    routed_mlp_backward,
    routed_mlp_backward_saved,
    routed_mlp_forward,
    unpermute_grads,
)

from test_routed_mlp_op import make_weights, spec_for
from toy_models import GatedMLP


def test_clusters_are_balanced_and_group_co_active_units():
    gen = torch.Generator().manual_seed(0)
    F_, T = 30, 200
    group = torch.randperm(F_, generator=gen) % 3  # three hidden groups of 10 units
    token_group = torch.randint(0, 3, (T,), generator=gen)
    importance = (token_group[:, None] == group[None, :]).float() * (1 + torch.rand(T, F_, generator=gen))
    perm = cluster_neurons(importance, 3, generator=gen)
    assert sorted(perm.tolist()) == list(range(F_))
    for lo, hi in block_bounds(F_, 3):
        assert len(set(group[perm[lo:hi]].tolist())) == 1, "a block mixes units of different groups"
    uneven = cluster_neurons(torch.rand(50, 431, generator=gen), 4, generator=gen)
    assert sorted(uneven.tolist()) == list(range(431))


@pytest.mark.parametrize("gated,layout", [(True, "oi"), (False, "io")])
def test_permuted_routing_matches_reference_on_permuted_weights(gated, layout):
    """Routing over permuted units equals the reference run on explicitly permuted weights, and the
    gradients come back in the original unit order (the same as autograd through the permutation)."""
    gen = torch.Generator().manual_seed(1)
    w = make_weights(13, 43, 11, gated=gated, layout=layout, gen=gen)
    spec = spec_for(w, "silu" if gated else "gelu", gated, 4, layout=layout)
    perm = torch.randperm(43, generator=gen)
    x = torch.randn(37, 13, generator=gen, requires_grad=True)
    mask = torch.rand(37, 4, generator=gen) < 0.5
    dy = torch.randn(37, 11, generator=gen)

    y = routed_mlp_forward(x.detach(), permute_hidden(w, spec, perm), spec, mask)
    ref = routed_mlp_reference(x, permute_hidden(w, spec, perm), spec, mask)  # autograd through index_select
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    present = [t for t in w if t is not None]
    ref_grads = torch.autograd.grad(ref, [x, *present], dy)
    needs = type(w)(*[t is not None for t in w])
    dx, grads = routed_mlp_backward(dy, x.detach(), permute_hidden(w, spec, perm), spec, mask, 0, True, needs)
    grads = unpermute_grads(grads, spec, perm)
    torch.testing.assert_close(dx, ref_grads[0], atol=1e-5, rtol=1e-4)
    for g, r in zip([g for g in grads if g is not None], ref_grads[1:]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gated,layout,bias", [(True, "oi", False), (False, "io", True)])
def test_torch_path_permutes_block_by_block(gated, layout, bias):
    """routed_mlp_forward(..., perm=) equals the run on explicitly permuted weights, and
    routed_mlp_backward_saved(..., perm=) returns the gradients in the original unit order, without
    either copying the whole weights (the site's torch path)."""
    gen = torch.Generator().manual_seed(3)
    w = make_weights(13, 43, 11, gated=gated, layout=layout, gen=gen, bias=bias)
    spec = spec_for(w, "silu" if gated else "gelu", gated, 4, layout=layout)
    perm = torch.randperm(43, generator=gen)
    x = torch.randn(37, 13, generator=gen)
    mask = torch.rand(37, 4, generator=gen) < 0.5
    dy = torch.randn(37, 11, generator=gen)
    needs = type(w)(*[t is not None for t in w])

    saved_p, saved_q = [], []
    with torch.no_grad():  # as inside the site's custom op
        y = routed_mlp_forward(x, w, spec, mask, saved=saved_p, perm=perm)
        want = routed_mlp_forward(x, permute_hidden(w, spec, perm), spec, mask, saved=saved_q)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved_p[0], saved_q[0], atol=1e-5, rtol=1e-5)
    dx, grads = routed_mlp_backward_saved(dy, x, w, spec, mask, 0, True, needs, saved_p[0], perm=perm)
    dx_q, grads_q = routed_mlp_backward_saved(dy, x, permute_hidden(w, spec, perm), spec, mask, 0, True, needs,
                                              saved_q[0])
    torch.testing.assert_close(dx, dx_q, atol=1e-5, rtol=1e-5)
    for name, g, q in zip(type(w)._fields, grads, unpermute_grads(grads_q, spec, perm)):
        assert (g is None) == (q is None), name
        if g is not None:
            torch.testing.assert_close(g, q, atol=1e-5, rtol=1e-5, msg=name)


def test_every_block_with_clustering_is_the_dense_mlp():
    gen = torch.Generator().manual_seed(2)
    w = make_weights(16, 80, 16, gated=True, gen=gen)
    spec = spec_for(w, "silu", True, 4)
    perm = torch.randperm(80, generator=gen)
    x = torch.randn(20, 16, generator=gen)
    every = torch.ones(20, 4, dtype=torch.bool)
    torch.testing.assert_close(routed_mlp_forward(x, permute_hidden(w, spec, perm), spec, every),
                               routed_mlp_forward(x, w, spec, every), atol=1e-5, rtol=1e-5)


def test_site_clusters_at_calibration_without_touching_the_model(tmp_path):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = GatedMLP(d=32, hidden=80)
    before = copy.deepcopy(model.state_dict())
    opts = {"compiler": "aot_eager", "calibration_steps": 2, "ffn_blocks": 4, "ffn_active": 2}
    compiled = torch.compile(model, backend="spt", options=opts)
    xs = [torch.randn(64, 32) for _ in range(4)]
    for x in xs[:3]:  # 2 calibration calls, then routed
        compiled(x).pow(2).mean().backward()
    site = next(s for _, s in model_sites(model))
    assert site.perm is not None and sorted(site.perm.tolist()) == list(range(80))
    assert not torch.equal(site.perm, torch.arange(80)), "clustering should reorder co-active units"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: clustering must not touch the user's weights"
    with spt_compile.enable(ffn_active=4):  # every block: exactly the dense MLP, clustered or not
        torch.testing.assert_close(compiled(xs[3]), model(xs[3]), atol=1e-5, rtol=1e-4)
    state = spt_compile.state_dict(model)
    perm_keys = [k for k in state if k.endswith("@mlp0/perm")]
    assert len(perm_keys) == 1 and torch.equal(state[perm_keys[0]], site.perm)
    torch.save(state, tmp_path / "spt.pt")
    clone = copy.deepcopy(model)
    spt_compile.load_state_dict(clone, torch.load(tmp_path / "spt.pt"))
    compiled_clone = torch.compile(clone, backend="spt", options=opts)
    torch.testing.assert_close(compiled_clone(xs[3]), compiled(xs[3]), atol=1e-6, rtol=1e-6)


def test_cluster_off_keeps_contiguous_blocks():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = GatedMLP(d=32, hidden=80)
    compiled = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1,
                                                            "ffn_cluster": False})
    for _ in range(2):
        compiled(torch.randn(16, 32))
    assert next(s for _, s in model_sites(model)).perm is None
