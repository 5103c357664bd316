"""ffn_balance: the router's per-block bias that evens out how many tokens each block gets. Off changes
nothing; on, it is fitted on the router's buffered tokens, kept with the sparse state, and leaves the
every-block-active case the dense MLP."""

from __future__ import annotations


import pytest
import torch

import spt_compile
from spt_compile.fitting.balance import fit_balance
from spt_compile.fitting.router import choose_blocks, router_scores
from spt_compile.options import SptOptionError, make_options
from spt_compile.registry import model_sites

from toy_models import clone_with_saved_state, compiled_gated_mlp


def skewed_scores(n, nb, gen):
    """Scores whose blocks are picked very unevenly: block b's scores are shifted by 2 b / nb."""
    return torch.randn(n, nb, generator=gen) + torch.linspace(0, 2, nb)


def shares(mask):
    return mask.float().mean(0) / mask.float().sum(1).mean()  # each block's share of the selections


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), True, "on", None])
def test_bad_balance_names_the_option_and_the_range(value):
    with pytest.raises(SptOptionError, match=r"'ffn_balance' must be a float in \[0, 1\]"):
        make_options({"ffn_balance": value})


def test_balance_option_is_run_time_and_off_by_default():
    assert make_options().ffn_balance == 0.0
    assert "ffn_balance" in make_options().runtime_dict()
    assert make_options({"ffn_balance": 1}).ffn_balance == 1


@pytest.mark.parametrize("nb,active", [(4, 2), (16, 8), (8, 1)])
def test_balance_evens_out_a_skewed_distribution(nb, active):
    gen = torch.Generator().manual_seed(0)
    fit_on, held_out = skewed_scores(2048, nb, gen), skewed_scores(2048, nb, gen)
    fair = 1 / nb
    spread = {}
    for strength in (0.0, 0.5, 1.0):
        bias = fit_balance(fit_on, active, strength)
        assert bias.shape == (nb,) and bias.dtype == torch.float32
        s_fit = shares(choose_blocks(fit_on - bias, active))
        s_held = shares(choose_blocks(held_out - bias, active))
        spread[strength] = float(s_held.max() / s_held.min())
        if strength == 1.0:  # the tokens it was fitted on: equal shares up to a token or two
            torch.testing.assert_close(s_fit, torch.full((nb,), fair), atol=2 / (2048 * active), rtol=0)
    assert torch.equal(fit_balance(fit_on, active, 0.0), torch.zeros(nb))
    assert spread[0.0] > 3 and spread[0.0] > spread[0.5] > spread[1.0]
    assert spread[1.0] < 1.5  # held-out tokens of the same distribution: sampling noise only (8 x 1: 256 per block)


def test_balance_at_half_strength_moves_shares_half_way():
    gen = torch.Generator().manual_seed(1)
    S = skewed_scores(4096, 4, gen)
    before = shares(choose_blocks(S, 2))
    after = shares(choose_blocks(S - fit_balance(S, 2, 0.5), 2))
    torch.testing.assert_close(after, 0.5 * before + 0.5 * 0.25, atol=1e-3, rtol=0)


def compiled_mlp(seed=0, **options):
    """A GatedMLP whose inputs share an offset, so that the router favours some blocks."""
    return compiled_gated_mlp(32, 96, seed, **options)


def inputs(i, n=128):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 32, generator=gen) + 1.5 * torch.linspace(-1, 1, 32)


def test_off_is_bit_identical_to_plain_top_k_routing():
    """ffn_balance=0 (default): the mask is exactly top-k of the router's scores, the outputs and
    gradients are those of the same model compiled without the option, and no balance state exists."""
    results = []
    for opts in ({}, {"ffn_balance": 0.0}):
        model, compiled = compiled_mlp(**opts)
        outs = []
        for i in range(5):
            x = inputs(i).requires_grad_()
            y = compiled(x)
            y.pow(2).mean().backward()
            outs += [y.detach(), x.grad]
        site = next(s for _, s in model_sites(model))
        x = inputs(9)
        assert torch.equal(site.route(x, site.options), choose_blocks(router_scores(x, site.router), 2))
        assert site.balance is None
        state = spt_compile.state_dict(model)
        assert not any("balance" in k for k in state)
        results.append((outs, [p.grad for p in model.parameters()], state))
    (a, ga, sa), (b, gb, sb) = results
    for u, v in zip(a + ga, b + gb):
        assert torch.equal(u, v)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_balance_on_a_site_evens_block_counts_and_keeps_every_block_dense():
    model, compiled = compiled_mlp()
    for i in range(3):
        compiled(inputs(i))
    site = next(s for _, s in model_sites(model))
    held = torch.cat([inputs(i) for i in range(10, 14)])
    off = shares(site.route(held, make_options({"ffn_active": 2})))
    with spt_compile.enable(ffn_balance=1.0):
        compiled(inputs(3))  # fits the bias
        assert site.balance is not None and site.balance_for == (1.0, 2)
        on = shares(site.route(held, make_options({"ffn_active": 2, "ffn_balance": 1.0})))
        with spt_compile.enable(ffn_active=4):
            torch.testing.assert_close(compiled(held), model(held), atol=1e-5, rtol=1e-4)
    assert float(off.max() / off.min()) > 1.3, f"the toy should be skewed: {off}"
    assert float(on.max() / on.min()) < float(off.max() / off.min())
    assert site.describe()["balance"] == 1.0


def test_balance_follows_the_router_and_the_options():
    model, compiled = compiled_mlp(ffn_balance=0.5)
    for i in range(3):
        compiled(inputs(i))
    site = next(s for _, s in model_sites(model))
    first = site.balance.clone()
    assert site.balance_for == (0.5, 2)
    with spt_compile.enable(ffn_active=1):
        compiled(inputs(3))
    assert site.balance_for == (0.5, 1) and not torch.equal(site.balance, first)
    site._set_router(site.router * 2)
    assert site.balance is None  # refitted at the next routed call, to the new router's scores


def test_balance_state_roundtrip(tmp_path):
    model, compiled = compiled_mlp(ffn_balance=1.0)
    for i in range(4):
        compiled(inputs(i)).pow(2).mean().backward()
    site = next(s for _, s in model_sites(model))
    state = spt_compile.state_dict(model)
    (key,) = [k for k in state if k.endswith("/balance")]
    assert torch.equal(state[key], site.balance)
    torch.save(state, tmp_path / "spt.pt")

    clone, compiled_clone = clone_with_saved_state(model, tmp_path / "spt.pt", ffn_balance=1.0)
    for i in range(4, 7):
        torch.testing.assert_close(compiled_clone(inputs(i)), compiled(inputs(i)), atol=0, rtol=0)
    clone_site = next(s for _, s in model_sites(clone))
    assert torch.equal(clone_site.balance, site.balance) and clone_site.balance_for == site.balance_for

    bad = dict(state)
    bad[key] = torch.zeros(3)
    with pytest.raises(spt_compile.SptStateError, match="ffn_balance"):
        spt_compile.load_state_dict(model, bad)  # its site exists: the state is checked at once
