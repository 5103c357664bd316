"""ffn_compensate: per-block linear predictors stand in for the blocks a token skips. The predictors are
frozen state (no gradient to them or, through them, to the MLP's weights); the gradient to x through
them is exact; nothing is added when every block runs; they are saved with the sparse state."""

from __future__ import annotations


import pytest
import torch

import spt_compile
from spt_compile.fitting.compensation import fit_compensation
from spt_compile.options import SptOptionError, make_options
from spt_compile.registry import model_sites
from spt_compile.sparse_ops.routed_mlp.reference import compensation_reference, routed_mlp_reference
from spt_compile.sparse_ops.routed_mlp import (
    MlpSpec,
    MlpWeights,
    compensation,
    compensation_input_grad,
    permute_hidden,
    routed_mlp_backward_saved,
    routed_mlp_forward,
)

from test_routed_mlp_op import make_weights, spec_for
from toy_models import clone_with_saved_state, compiled_gated_mlp


@pytest.mark.parametrize("value", [-1, 1.5, True, "16", None])
def test_bad_rank_names_the_option(value):
    with pytest.raises(SptOptionError, match=r"'ffn_compensate' must be an int >= 0"):
        make_options({"ffn_compensate": value})


def test_compensate_is_run_time_and_on_by_default():
    assert make_options().ffn_compensate == 32  # docs/ffn.md: by the held-out loss measurement
    assert "ffn_compensate" in make_options().runtime_dict()


@pytest.mark.parametrize("T,d_in,d_out,nb,r", [(37, 13, 11, 3, 2), (1, 5, 7, 4, 1), (20, 9, 9, 1, 3)])
def test_compensation_and_its_input_grad_match_the_per_token_reference(T, d_in, d_out, nb, r):
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    skipped = torch.rand(T, nb, generator=gen) < 0.5
    U = torch.randn(d_in, nb * r, generator=gen, dtype=torch.float64)
    V = torch.randn(nb * r, d_out, generator=gen, dtype=torch.float64)
    M = torch.randn(nb, d_out, generator=gen, dtype=torch.float64)
    ref = compensation_reference(x, skipped, U, V, M)
    torch.testing.assert_close(compensation(x.detach(), skipped, U, V, M), ref, atol=1e-12, rtol=1e-12)
    dy = torch.randn(T, d_out, generator=gen, dtype=torch.float64)
    (want,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(compensation_input_grad(dy, skipped, U, V), want, atol=1e-12, rtol=1e-12)
    # written into strided views (the torch path's accumulators), the columns beside them untouched
    buf = torch.full((T, d_out + 2), 7.0, dtype=torch.float64)
    compensation(x.detach(), skipped, U, V, M, out=buf[:, :d_out])
    torch.testing.assert_close(buf[:, :d_out], ref.detach(), atol=1e-12, rtol=1e-12)
    assert (buf[:, d_out:] == 7).all()
    buf = torch.full((T, d_in + 3), 7.0, dtype=torch.float64)
    compensation_input_grad(dy, skipped, U, V, out=buf[:, :d_in])
    torch.testing.assert_close(buf[:, :d_in], want, atol=1e-12, rtol=1e-12)
    assert (buf[:, d_in:] == 7).all()


def test_fit_recovers_low_rank_linear_blocks_on_the_tokens_that_skip_them():
    """Blocks whose output is exactly x A_b + c_b with rank(A_b) <= r are predicted exactly where they
    are skipped; a block no token skips gets zeros; the rank is capped at min(d_in, d_out)."""
    gen = torch.Generator().manual_seed(0)
    n, d, d_out, nb, r = 400, 12, 10, 3, 2
    x = torch.randn(n, d, generator=gen)
    A = [torch.randn(d, r, generator=gen) @ torch.randn(r, d_out, generator=gen) for _ in range(nb)]
    c = torch.randn(nb, d_out, generator=gen)
    outs = torch.stack([x @ A[b] + c[b] for b in range(nb)], dim=1)
    skipped = torch.rand(n, nb, generator=gen) < 0.5
    skipped[:, 2] = False
    U, V, M = fit_compensation(x, outs, skipped, r, ridge=1e-6)
    assert U.shape == (d, nb * r) and V.shape == (nb * r, d_out) and M.shape == (nb, d_out)
    for b in range(2):
        rows = skipped[:, b]
        pred = x[rows] @ U[:, b * r : (b + 1) * r] @ V[b * r : (b + 1) * r] + M[b]
        assert (pred - outs[rows, b]).norm() / outs[rows, b].norm() < 1e-4
    assert U[:, 2 * r :].abs().max() == 0 and M[2].abs().max() == 0
    U_big, _, _ = fit_compensation(x, outs, skipped, 100)
    assert U_big.shape == (d, nb * min(d, d_out))


def compiled_mlp(seed=0, **options):
    return compiled_gated_mlp(24, 72, seed, **options)


def inputs(i, n=96):
    """With an offset: a gated MLP on zero-mean Gaussian inputs has no linear part to predict (its
    output is even in x to first order), real activations do (docs/ffn.md)."""
    return torch.randn(n, 24, generator=torch.Generator().manual_seed(200 + i)) + torch.linspace(-1, 1, 24)


def weights_of(model):
    return MlpWeights(in_w=model.up_proj.weight, gate_w=model.gate_proj.weight, out_w=model.down_proj.weight)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_site_output_and_gradients_match_autograd_of_the_reference(impl):
    """y = routed blocks + the skipped blocks' predictions; d(x) goes through the prediction GEMMs,
    the weights' gradients are those of the routed blocks alone (the predictors are constants)."""
    model, compiled = compiled_mlp(ffn_compensate=3, ffn_impl=impl)
    for i in range(2):
        compiled(inputs(i))
    site = next(s for _, s in model_sites(model))
    x = inputs(5).requires_grad_()
    dy = torch.randn(96, 24, generator=torch.Generator().manual_seed(7))
    y = compiled(x)
    got = torch.autograd.grad(y, [x, *model.parameters()], dy)
    assert site.comp is not None and site.comp_for == (3, 2, 0.0)
    U, V, M = site.comp
    assert U.shape == (24, 4 * 3) and V.shape == (4 * 3, 24) and M.shape == (4, 24)

    spec = MlpSpec("silu", True, 72, 4)
    mask = site.route(x.detach(), make_options({"ffn_active": 2}))
    xr = x.detach().clone().requires_grad_()
    ref = routed_mlp_reference(xr, permute_hidden(weights_of(model), spec, site.perm), spec, mask)
    ref = ref + compensation_reference(xr, ~mask, U, V, M)
    want = torch.autograd.grad(ref, [xr, *model.parameters()], dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_compensation_lowers_the_error_and_every_block_is_still_dense():
    model, compiled = compiled_mlp(ffn_compensate=0)
    for i in range(3):
        compiled(inputs(i, 512))
    held = torch.cat([inputs(i) for i in range(10, 13)])
    dense = model(held)
    plain = compiled(held)
    site = next(s for _, s in model_sites(model))
    assert site.comp is None and not any("comp" in k for k in spt_compile.state_dict(model))
    with spt_compile.enable(ffn_compensate=8):
        compensated = compiled(held)
        with spt_compile.enable(ffn_active=4):
            torch.testing.assert_close(compiled(held), dense, atol=1e-5, rtol=1e-4)
    err = lambda y: float((y - dense).detach().norm() / dense.detach().norm())  # noqa: E731
    assert err(compensated) < 0.9 * err(plain), (err(compensated), err(plain))  # 0.54 -> 0.46 here
    assert site.describe()["compensate"] == 8


def test_predictors_follow_the_options_and_the_router():
    model, compiled = compiled_mlp(ffn_compensate=2)
    for i in range(3):
        compiled(inputs(i))
    site = next(s for _, s in model_sites(model))
    first = site.comp
    with spt_compile.enable(ffn_active=1):
        compiled(inputs(3))
    assert site.comp_for == (2, 1, 0.0) and not torch.equal(site.comp[0], first[0])
    site._set_router(site.router * 2)
    assert site.comp is None


def test_compensate_state_roundtrip(tmp_path):
    model, compiled = compiled_mlp(ffn_compensate=4)
    for i in range(4):
        compiled(inputs(i)).pow(2).mean().backward()
    site = next(s for _, s in model_sites(model))
    state = spt_compile.state_dict(model)
    for name, t in zip(("comp_u", "comp_v", "comp_m"), site.comp):
        (key,) = [k for k in state if k.endswith("/" + name)]
        assert torch.equal(state[key], t)
    torch.save(state, tmp_path / "spt.pt")

    clone, compiled_clone = clone_with_saved_state(model, tmp_path / "spt.pt", ffn_compensate=4)
    for i in range(4, 7):
        torch.testing.assert_close(compiled_clone(inputs(i)), compiled(inputs(i)), atol=0, rtol=0)
    clone_site = next(s for _, s in model_sites(clone))
    assert clone_site.comp_for == site.comp_for

    bad = dict(state)
    (key,) = [k for k in state if k.endswith("/comp_m")]
    bad[key] = torch.zeros(3, 24)
    with pytest.raises(spt_compile.SptStateError, match="ffn_compensate"):
        spt_compile.load_state_dict(model, bad)


def test_randomized_top_vectors_span_the_exact_top_subspace():
    """The range finder fit_compensation uses for r + 8 < min(n, d): on a matrix with a decaying
    spectrum, its r vectors span the top-r right singular subspace."""
    from spt_compile.fitting.compensation import _top_right_vectors

    gen = torch.Generator().manual_seed(3)
    n, d, r = 300, 120, 6
    Fm = torch.randn(n, d, generator=gen) @ torch.diag(0.7 ** torch.arange(d, dtype=torch.float32)) @ torch.linalg.qr(
        torch.randn(d, d, generator=gen)).Q
    got = _top_right_vectors(Fm, r)
    want = torch.linalg.svd(Fm.double(), full_matrices=False).Vh[:r].float()
    assert got.shape == (r, d)
    torch.testing.assert_close(got @ got.T, torch.eye(r), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.T @ got, want.T @ want, atol=1e-3, rtol=0)  # the same projector


@pytest.mark.parametrize("needs_x", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_path_adds_the_term_where_its_blocks_accumulate(needs_x, dropout):
    """routed_mlp_forward(..., comp=) is the routed output plus compensation(); its backward (comp=)
    adds compensation_input_grad to d(x) and nothing to the weights' gradients."""
    gen = torch.Generator().manual_seed(5)
    w = make_weights(13, 43, 11, gated=True, gen=gen)
    spec = spec_for(w, "silu", True, 4, in_dropout=dropout, out_dropout=dropout)
    x = torch.randn(37, 13, generator=gen, dtype=torch.float64)
    mask = torch.rand(37, 4, generator=gen) < 0.5
    dy = torch.randn(37, 11, generator=gen, dtype=torch.float64)
    U, V, M = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((13, 8), (8, 11), (4, 11)))
    w = MlpWeights(*[None if t is None else t.double() for t in w])
    perm = torch.randperm(43, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    plain, with_comp = [], []
    y = routed_mlp_forward(x, w, spec, mask, 3, saved=plain, perm=perm)
    y_comp = routed_mlp_forward(x, w, spec, mask, 3, saved=with_comp, perm=perm, comp=(U, V, M))
    torch.testing.assert_close(y_comp, y + compensation(x, ~mask, U, V, M), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(with_comp[0], plain[0], atol=0, rtol=0)  # the saved tensors are the routed blocks'
    dx, grads = routed_mlp_backward_saved(dy, x, w, spec, mask, 3, needs_x, needs, plain[0], perm=perm)
    dx_c, grads_c = routed_mlp_backward_saved(dy, x, w, spec, mask, 3, needs_x, needs, plain[0], perm=perm, comp=(U, V))
    if needs_x:
        torch.testing.assert_close(dx_c, dx + compensation_input_grad(dy, ~mask, U, V), atol=1e-12, rtol=1e-12)
    else:
        assert dx is None and dx_c is None
    for name, g, gc in zip(MlpWeights._fields, grads, grads_c):
        assert (g is None) == (gc is None), name
        if g is not None:
            torch.testing.assert_close(gc, g, atol=1e-12, rtol=1e-12, msg=name)
