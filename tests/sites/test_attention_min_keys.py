"""attention_min_keys (a floor of keys per query) and attention_backward_dense_below (the length below
which exact_forward's training calls run the exact backward too): the budget formulas, the options'
checks, the site's choice of exact or sparse, and explain()'s note."""

from __future__ import annotations

import pytest
import torch

import spt_compile
from spt_compile.options import SptOptionError, make_options
from spt_compile.sparse_ops.attention.pq import keys_per_query
from spt_compile.sparse_ops.attention.select import blocks_per_query, packed_blocks_per_query

from test_block_sparse_op import make_mask
from toy_models import SPARSE_AT_EVERY_LENGTH, GQAAttention


def test_the_floor_in_the_budget_formulas():
    lengths = torch.tensor([0, 100, 300, 512, 2048, 4096])
    # density 1/8: 0, 13, 38, 64, 256, 512 keys; a floor of 256 lifts all but the longest, never past the length
    assert keys_per_query(lengths, 0.125, None, 256).tolist() == [0, 100, 256, 256, 256, 512]
    assert keys_per_query(lengths, 0.125, None).tolist() == [0, 13, 38, 64, 256, 512]
    assert blocks_per_query(lengths, 0.125, None, 64, 64, 256).tolist() == [1, 2, 4, 4, 4, 8]
    assert blocks_per_query(lengths, 0.125, None, 64, 64).tolist() == [1, 1, 1, 1, 4, 8]
    # top_l is a fixed count: the floor does not apply to it
    assert keys_per_query(lengths, 0.125, 32, 256).tolist() == [0, 32, 32, 32, 32, 32]
    assert blocks_per_query(lengths, 0.125, 32, 64, 64, 256).tolist() == [1, 1, 1, 1, 1, 1]


def test_the_floor_in_packed_rows_budgets_each_sequence_alone():
    """A row packing sequences of 96 and 160 keys (block-diagonal causal mask, 32-key blocks, both
    block-aligned): each sequence gets the floor of its own length, 64 keys = 2 blocks, where density
    1/8 alone lists 1 (12 and 20 keys)."""
    N, bn = 256, 32
    seg = torch.cat([torch.zeros(96, dtype=torch.long), torch.ones(160, dtype=torch.long)])
    pos = torch.arange(N)
    mask = ((seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]  # [1, 1, N, N]
    real = torch.ones(1, N, dtype=torch.bool)
    with_floor = packed_blocks_per_query(mask, real, N, 0.125, None, bn, bn, min_keys=64)[0]
    without = packed_blocks_per_query(mask, real, N, 0.125, None, bn, bn)[0]
    assert with_floor[0].tolist() == [2] * 8
    assert without[0].tolist() == [1] * 8
    assert (with_floor >= without).all()


def test_options_are_checked_and_the_rule_says_why():
    for bad in (-1, 1.5, "256", True):
        with pytest.raises(SptOptionError, match="attention_min_keys"):
            make_options({"attention_min_keys": bad})
    for bad in (-1, 2.0, "0"):
        with pytest.raises(SptOptionError, match="attention_backward_dense_below"):
            make_options({"attention_backward_dense_below": bad})
    o = make_options({"attention_backward_dense_below": 0, "attention_min_keys": 256})
    assert o.attention_exact_below(training=True) == 0
    assert o.attention_exact_below(training=False) == 2048  # sparse-forward calls keep attention_dense_below
    assert "within attention_min_keys=256" in o.attention_short_reason(256, training=True)
    assert o.attention_short_reason(257, training=True) is None
    assert "below attention_dense_below=2048" in o.attention_short_reason(512, training=False)
    sparse_forward = make_options({"attention_backward_dense_below": 0, "exact_forward": False})
    assert sparse_forward.attention_exact_below(training=True) == 2048
    assert make_options({}).attention_exact_below(True) == 1024  # the defaults: 1024 for training, 2048 else
    assert make_options({}).attention_exact_below(False) == 2048
    assert make_options({"attention_backward_dense_below": None}).attention_exact_below(True) == 2048  # follows
    fixed = make_options({"attention_min_keys": 256, "top_l": 8, "attention_backward_dense_below": 0})
    assert fixed.attention_short_reason(200, training=True) is None  # top_l is fixed: no floor, no shortcut


# block 16, N = 160 (10 key blocks): density 1/8 asks for 20 keys (2 blocks); a floor of 64 keys asks for 4
BASE = {"compiler": "aot_eager", "calibration_steps": 1, "attention_block": 16, "density": 0.125,
        "sparse_ffn": False, **SPARSE_AT_EVERY_LENGTH}


def _model_and_grads(options: dict, runs: list[dict], N=160, mask=None, seed=0):
    """One compiled GQA attention; x.grad of a training step under each run-time setting in `runs`."""
    torch.manual_seed(seed)
    torch._dynamo.reset()
    model = GQAAttention(d=64, heads=4, kv_heads=2).train()
    x = torch.randn(2, N, 64, requires_grad=True)
    compiled = torch.compile(model, backend="spt", options=options)
    compiled(x, mask).sum().backward()  # calibration call
    grads = []
    for run in runs:
        x.grad = None
        with spt_compile.enable(**run):
            compiled(x, mask).pow(2).sum().backward()
        grads.append(x.grad.clone())
    return model, x, grads


def test_floor_selects_as_the_density_it_amounts_to_and_eval_keeps_attention_dense_below():
    """With attention_backward_dense_below=0 and a floor of 64 keys at 160 tokens, training calls run
    exact_forward with 4 key blocks per query block: the same backward as density 0.4 (64 keys)
    without a floor. Calls without gradients under sparse_inference still run exact below
    attention_dense_below (2048 here)."""
    floor = {"attention_backward_dense_below": 0, "attention_min_keys": 64}
    model, x, (got, same, fewer) = _model_and_grads(BASE, [
        floor, {"density": 0.4}, {}])
    torch.testing.assert_close(got, same, atol=0, rtol=0)
    assert (got - fewer).abs().max() > 1e-5, "the floor must keep more than density 1/8's 2 blocks"
    site = spt_compile.report(model)[0]
    assert site["runs"] == {"calibration": 1, "exact_forward": 3}, site["runs"]
    compiled = torch.compile(model, backend="spt", options={**BASE, "attention_dense_below": 2048})
    with torch.no_grad(), spt_compile.enable(sparse_inference=True, **floor):
        compiled(x)
    runs = [s for s in spt_compile.report(model) if s["kind"] == "attention"][-1]["runs"]
    assert runs.get("exact_short") == 1, runs


@pytest.mark.parametrize("padded", [False, True])
def test_floor_covering_every_key_runs_exact_and_equals_dense(padded):
    """A floor at least as long as the longest real sequence keeps every key: the call runs exact
    (counted exact_short), and the gradient is the dense model's."""
    N = 160
    mask = make_mask("pad-additive", 2, N, None) if padded else None
    options = {**BASE, "attention_backward_dense_below": 0, "attention_min_keys": N}
    model, x, (got,) = _model_and_grads(options, [{}], N=N, mask=mask)
    site = spt_compile.report(model)[0]
    assert site["runs"] == {"calibration": 1, "exact_short": 1}, site["runs"]
    torch.manual_seed(0)
    ref = GQAAttention(d=64, heads=4, kv_heads=2).train()
    ref.load_state_dict(model.state_dict())
    xr = x.detach().clone().requires_grad_()
    ref(xr, mask).pow(2).sum().backward()
    torch.testing.assert_close(got, xr.grad, atol=1e-5, rtol=1e-4)


def test_explain_says_which_rule_keeps_a_traced_length_exact():
    torch._dynamo.reset()
    model = GQAAttention(d=64, heads=4, kv_heads=2).train()
    x = torch.randn(1, 160, 64, requires_grad=True)
    with spt_compile.enable(attention_backward_dense_below=0, attention_min_keys=256):
        text = str(spt_compile.explain(model, x))
    assert "within attention_min_keys=256" in text and "lower attention_min_keys" in text, text
    with spt_compile.enable(attention_backward_dense_below=0, attention_min_keys=64):
        text = str(spt_compile.explain(model, x))
    assert "run exact attention" not in text, text
    with spt_compile.enable(attention_backward_dense_below=1024):
        text = str(spt_compile.explain(model, x))
    assert "below attention_backward_dense_below=1024" in text, text
