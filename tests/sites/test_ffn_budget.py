"""ffn_budget: per-layer MLP block counts from each layer's measured error curve, spending a share of
the dense MLPs' matmul FLOPs. The allocation stays within the share and leaves no block unspent that
would fit; blocks go to the layers whose error they reduce; 1.0 is the dense model; the curves save
and load with the sparse state."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn

import spt_compile
from spt_compile.fitting.ffn_budget import allocate, block_flops, error_curve, flop_share
from spt_compile.options import SptOptionError, make_options
from spt_compile.registry import model_sites

from toy_models import GatedMLP


def decreasing_curve(nb: int, gen: torch.Generator) -> torch.Tensor:
    """A random error curve: 1 at k = 0, 0 at k = nb, decreasing in between."""
    drops = torch.rand(nb, generator=gen, dtype=torch.float64) + 0.01
    return torch.cat([torch.ones(1, dtype=torch.float64), 1 - drops.cumsum(0) / drops.sum()]).clamp(min=0)


@pytest.mark.parametrize("budget", [0.25, 0.4, 0.5, 0.61, 0.75, 0.9, 1.0])
def test_allocation_spends_the_budget_and_no_more(budget):
    """Layers of different sizes and block FLOPs: the allocation's share is at most the budget, and
    no layer that is not full has a block that would still fit."""
    gen = torch.Generator().manual_seed(0)
    sizes = [4, 4, 8, 16, 4, 8]
    flops = [block_flops(576, 576, 1536, nb, gated) for nb, gated in zip(sizes, [True, True, False, True, True, False])]
    curves = [decreasing_curve(nb, gen) for nb in sizes]
    k = allocate(curves, flops, budget)
    assert all(1 <= ki <= nb for ki, nb in zip(k, sizes))
    share = flop_share(k, sizes, flops)
    total = sum(nb * f for nb, f in zip(sizes, flops))
    assert share <= budget + 1e-9
    room = budget * total - sum(ki * f for ki, f in zip(k, flops))
    assert all(ki == nb or f > room - 1e-6 * total for ki, nb, f in zip(k, sizes, flops))
    if budget == 1.0:
        assert k == sizes


def test_blocks_go_where_they_remove_error():
    """A layer whose output sits in one block keeps one; the others share what it leaves."""
    flat = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # one block holds everything
    spread = torch.tensor([1.0, 0.6, 0.35, 0.15, 0.0], dtype=torch.float64)
    f = block_flops(32, 32, 96, 4, True)
    assert allocate([flat, spread], [f, f], 0.5) == [1, 3]
    assert allocate([spread, flat, spread], [f, f, f], 0.75) == [4, 1, 4]


def test_allocate_rejects_impossible_input():
    with pytest.raises(ValueError, match="budget must be in"):
        allocate([torch.ones(5)], [1.0], 0.0)
    with pytest.raises(ValueError, match="2 error curves but 1 FLOP counts"):
        allocate([torch.ones(5), torch.ones(5)], [1.0], 0.5)


def test_error_curve_matches_a_direct_sum():
    gen = torch.Generator().manual_seed(1)
    outs, scores = torch.randn(50, 4, 7, generator=gen), torch.randn(50, 4, generator=gen)
    curve = error_curve(outs, scores)
    dense = outs.double().sum(1)
    assert curve.shape == (5,) and curve[0] == 1 and curve[4].abs() < 1e-12
    for k in range(1, 4):
        top = scores.topk(k, dim=1).indices
        mask = torch.zeros(50, 4, dtype=torch.bool).scatter_(1, top, True)
        kept = (outs.double() * mask[:, :, None]).sum(1)
        torch.testing.assert_close(curve[k], ((dense - kept) ** 2).sum() / (dense ** 2).sum())


@pytest.mark.parametrize("value", [0.1, 0.0, 1.5, float("nan"), True, "half"])
def test_bad_budget_names_the_option_and_the_range(value):
    with pytest.raises(SptOptionError, match=r"'ffn_budget' must be None or a float in \[1/ffn_blocks, 1\]"):
        make_options({"ffn_budget": value, "ffn_blocks": 4})


def test_budget_is_run_time_and_off_by_default():
    assert make_options().ffn_budget is None
    assert "ffn_budget" in make_options().runtime_dict()
    assert make_options({"ffn_budget": 1 / 16, "ffn_blocks": 16}).ffn_budget == 1 / 16


class TwoMLPs(nn.Module):
    """Two residual gated MLPs; the first one's output lives in its first block's hidden units only
    (the others' down-projection columns are zero), so routing loses nothing there at one block."""

    def __init__(self, d=32, hidden=96):
        super().__init__()
        self.a, self.b = GatedMLP(d, hidden), GatedMLP(d, hidden)
        with torch.no_grad():
            self.a.down_proj.weight[:, hidden // 4:] = 0

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


BUDGET_TEST_OPTIONS = {"compiler": "aot_eager", "calibration_steps": 2, "ffn_blocks": 4, "exact_forward": False,
                       "ffn_cluster": False, "ffn_compensate": 0, "sparse_inference": True}


@pytest.fixture(autouse=True)
def _no_leftover_sites():
    """Sites of models freed by earlier tests must not join the allocation: the budget is shared by
    every live MLP site of the process."""
    gc.collect()


def run_calls(compiled, n=4):
    outs = []
    with torch.no_grad():
        for i in range(n):
            gen = torch.Generator().manual_seed(10 + i)
            outs.append(compiled(torch.randn(64, 32, generator=gen)))
    return outs


def test_budget_gives_the_concentrated_layer_one_block_through_the_backend():
    """At half the MLP FLOPs, the layer whose output is one block keeps one block and the other
    gets three: the same outputs as 3 of 4 blocks everywhere, for a third fewer MLP FLOPs."""
    torch.manual_seed(0)
    model = TwoMLPs().eval()
    torch._dynamo.reset()
    budgeted = run_calls(torch.compile(model, backend="spt", options={**BUDGET_TEST_OPTIONS, "ffn_budget": 0.5}))
    rows = {r["name"]: r for r in spt_compile.report(model)}
    assert {rows["a"]["ffn_active"], rows["b"]["ffn_active"]} == {1, 3} and rows["a"]["ffn_active"] == 1
    assert all(r["runs"].get("routed", 0) == 2 for r in rows.values())
    sites = [site for _, site in model_sites(model)]
    assert flop_share([1, 3], [4, 4], [s.block_flops for s in sites]) == 0.5

    clone = TwoMLPs().eval()
    clone.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    three = run_calls(torch.compile(clone, backend="spt", options={**BUDGET_TEST_OPTIONS, "ffn_active": 3}))
    for got, want in zip(budgeted[2:], three[2:]):  # the routed calls
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_error_curves_save_and_load_with_the_state(tmp_path):
    torch.manual_seed(0)
    model = TwoMLPs().eval()
    torch._dynamo.reset()
    run_calls(torch.compile(model, backend="spt", options={**BUDGET_TEST_OPTIONS, "ffn_budget": 0.5}), n=3)
    state = spt_compile.state_dict(model)
    curves = {k: v for k, v in state.items() if k.endswith("/err_curve")}
    assert len(curves) == 2 and all(v.shape == (5,) for v in curves.values())
    torch.save(state, tmp_path / "state.pt")

    clone = TwoMLPs().eval()
    clone.load_state_dict(model.state_dict())
    spt_compile.load_state_dict(clone, torch.load(tmp_path / "state.pt"))
    torch._dynamo.reset()
    run_calls(torch.compile(clone, backend="spt", options={**BUDGET_TEST_OPTIONS, "ffn_budget": 0.5}), n=1)
    loaded = {r["name"]: r["ffn_active"] for r in spt_compile.report(clone)}
    assert loaded == {"a": 1, "b": 3}  # allocated from the loaded curves: no calibration ran
    for key, value in spt_compile.state_dict(clone).items():
        if key.endswith("/err_curve"):
            assert torch.equal(value, curves[key])


def test_full_budget_is_the_dense_model_on_smollm2(smollm2_2layer):
    """The degenerate configuration through the backend on a real model: ffn_budget=1.0 gives every
    layer every block, so the routed forward and its gradients are the dense model's."""
    model = smollm2_2layer.train()
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    want = model(ids, labels=ids)
    want.loss.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1,
                                                             "exact_forward": False, "ffn_budget": 1.0})
    for step in range(2):  # after calibration: every block active, so the site runs the dense MLP
        model.zero_grad()
        got = compiled(ids, labels=ids)
        got.loss.backward()
    rows = [r for r in spt_compile.report(model) if r["kind"] == "mlp"]
    assert len(rows) == 2 and all(r["ffn_active"] == 4 for r in rows)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if n in want_grads:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-3, atol=1e-5, msg=n)
