"""The attention site under each selection and implementation, through torch.compile(backend="spt"):
run-time switching without recompiling, exactness at density 1.0, gradients, dropout replay."""

from __future__ import annotations

import pytest
import torch

import spt_compile
from spt_compile import compile_reports

from toy_models import SPARSE_AT_EVERY_LENGTH, NanoGPT


def compiled_gpt(seed=0, dropout=0.0, **options):
    torch._dynamo.reset()  # a fresh cache: many compiles of one forward would hit Dynamo's recompile limit
    torch.manual_seed(seed)
    model = NanoGPT(d=64, heads=4, layers=2, block_size=160, dropout=dropout)
    # exact_forward off: these tests are about the sparse forward (tests/sites/test_exact_forward.py has the default)
    opts = {"compiler": "aot_eager", "calibration_steps": 1, "sparse_ffn": False, **SPARSE_AT_EVERY_LENGTH,
            "exact_forward": False, **options}
    return model, torch.compile(model, backend="spt", options=opts)


def loss_and_grads(model, compiled, idx):
    loss = compiled(idx).float().pow(2).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss.detach(), grads


@pytest.mark.parametrize("selection,impl,proxy", [("block", "torch", "adc"), ("block", "reference", "adc"),
                                                  ("token", "torch", "adc"), ("token", "torch", "agreement")])
def test_density_one_is_exact_for_each_selection_and_impl(selection, impl, proxy):
    model, compiled = compiled_gpt(attention_selection=selection, attention_impl=impl, attention_block=16,
                                   pq_proxy=proxy)
    idx = torch.randint(0, 97, (2, 150))
    compiled(idx)  # calibration call (dense)
    with spt_compile.enable(density=1.0):
        got, got_grads = loss_and_grads(model, compiled, idx)
    want, want_grads = loss_and_grads(model, model, idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_selection_block_size_and_impl_switch_at_run_time_without_recompiling():
    model, compiled = compiled_gpt(attention_block=16)
    idx = torch.randint(0, 97, (1, 140))
    compiled(idx)
    n_graphs = len(compile_reports(model))
    outs = {}
    for selection, block, impl in [("block", 16, "torch"), ("block", 32, "torch"), ("token", 16, "torch"),
                                   ("block", 16, "reference")]:
        with spt_compile.enable(attention_selection=selection, attention_block=block, attention_impl=impl, density=0.25):
            out = compiled(idx)
            out.float().pow(2).mean().backward()
            outs[(selection, block, impl)] = out.detach()
    assert len(compile_reports(model)) == n_graphs, "run-time options must not recompile"
    torch.testing.assert_close(outs[("block", 16, "torch")], outs[("block", 16, "reference")], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outs[("block", 16, "torch")], outs[("token", 16, "torch")]), "token != block selection"
    report = spt_compile.report(model)
    attention = [r for r in report if r["kind"] == "attention"]
    assert len(attention) == 2 and all(0 <= r["recall"] <= 1 and 0 < r["mass"] <= 1 for r in attention)


def test_attention_dropout_gradients_replay_the_forward_mask():
    """Training with attention dropout: backward must use the forward's dropped weights. Two
    identical models and seeds give identical losses and gradients, and the gradients differ from
    a dropout-free run."""
    results = []
    for dropout in (0.2, 0.2, 0.0):
        model, compiled = compiled_gpt(seed=1, dropout=dropout, attention_block=16, calibration_steps=0)
        model.train()
        torch.manual_seed(5)
        idx = torch.randint(0, 97, (1, 100))
        results.append(loss_and_grads(model, compiled, idx))
    (l1, g1), (l2, g2), (l0, g0) = results
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(l1, l0)


def test_bf16_autocast_runs_sparse_and_matches_dense_at_density_one():
    model, compiled = compiled_gpt(seed=2, attention_block=16)
    idx = torch.randint(0, 97, (1, 96))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(idx)  # calibration
        with spt_compile.enable(density=1.0):
            got, got_grads = loss_and_grads(model, compiled, idx)
        want, want_grads = loss_and_grads(model, model, idx)
        with spt_compile.enable(density=0.25):
            sparse, sparse_grads = loss_and_grads(model, compiled, idx)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)
    assert torch.isfinite(sparse) and all(torch.isfinite(g).all() for g in sparse_grads)


def test_short_sequences_run_exact_attention_and_are_counted():
    model, compiled = compiled_gpt(attention_dense_below=120, attention_block=16)  # the sparse forward's threshold
    compiled(torch.randint(0, 97, (1, 100)))  # calibration
    short, long = torch.randint(0, 97, (1, 100)), torch.randint(0, 97, (1, 130))
    torch.testing.assert_close(compiled(short), model(short), atol=1e-5, rtol=1e-4)  # below 120 keys: exact

    def counts():
        return [r["exact_short_calls"] for r in spt_compile.report(model) if r["kind"] == "attention"]

    assert counts() == [1, 1]  # counted by the call itself, not at the next one
    assert not torch.allclose(compiled(long), model(long), atol=1e-3)  # at or above: sparse
    assert counts() == [1, 1]
    with spt_compile.enable(**SPARSE_AT_EVERY_LENGTH):
        assert not torch.allclose(compiled(short), model(short), atol=1e-3)


def test_an_explicit_causal_mask_runs_as_is_causal():
    """Hugging Face's SDPA path passes the causal triangle as a boolean mask, its eager path as an
    additive one (0 on the triangle, finfo.min above): the site reads either as is_causal (as_causal),
    with the same sparse output and gradients as the is_causal form; a mask that differs anywhere
    (a key padded, a bias on an allowed key, an allowed key above the diagonal) stays a mask."""
    from spt_compile.sites.attention import as_causal
    from toy_models import GQAAttention

    tri = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    assert as_causal(tri, False, 1, 9, 9) == (None, True)
    assert as_causal(tri.expand(2, 1, 9, 9), False, 2, 9, 9) == (None, True)
    padded = tri.clone()
    padded[..., 0] = False  # key 0 padded
    for fill in (float("-inf"), torch.finfo(torch.float32).min, -1e4):  # -1e4: MASK_FORBIDDEN_AT_OR_BELOW
        assert as_causal(torch.zeros(9, 9).masked_fill(~tri, fill), False, 1, 9, 9) == (None, True)
    biased = torch.zeros(1, 1, 9, 9).masked_fill(~tri, float("-inf"))
    biased[..., 4, 2] = 0.5  # a bias on an allowed key
    above = torch.zeros(1, 1, 9, 9).masked_fill(~tri, float("-inf"))
    above[..., 2, 5] = -1.0  # a key above the diagonal down-weighted, not forbidden
    for m, n, nk in [(padded, 9, 9), (tri.float(), 9, 9), (tri[..., :8], 9, 8), (biased, 9, 9), (above, 9, 9)]:
        got, causal = as_causal(m, False, 1, n, nk)
        assert got is m and causal is False
    assert as_causal(tri, False, 1, 9, 9) == (None, True)
    tri[0, 0, 8, 0] = False  # changed in place after a verdict: checked again, not cached
    assert as_causal(tri, False, 1, 9, 9)[1] is False

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GQAAttention(d=64, heads=4, kv_heads=2)
    opts = {"compiler": "aot_eager", "calibration_steps": 1, "sparse_ffn": False, **SPARSE_AT_EVERY_LENGTH,
            "attention_block": 16, "density": 0.25, "exact_forward": False}
    x = torch.randn(2, 100, 64)
    mask = torch.ones(1, 1, 100, 100, dtype=torch.bool).tril()
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    results = []
    for m in (None, mask, additive):
        compiled = torch.compile(lambda x, m=m: model(x, m), backend="spt", options=opts)
        compiled(x)  # calibration (dense)
        xr = x.clone().requires_grad_()
        y = compiled(xr)
        results.append((y, torch.autograd.grad(y.pow(2).mean(), [xr, *model.parameters()])))
    (y0, g0), *masked = results
    dense = model(x, None)
    assert not torch.allclose(y0, dense, atol=1e-4), "density 0.25 must run sparse"
    for y1, g1 in masked:
        torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-5)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["is_causal", "causal bool", "padded bool", "padded float"])
def test_exact_calls_keep_the_flash_kernels_logsumexp(mask_kind, monkeypatch):
    """On the CPU an exact call (here: shorter than attention_dense_below) runs aten's flash kernel
    and returns its logsumexp, so that backward runs the kernel's backward instead of recomputing the
    forward: outputs and gradients equal eager SDPA's, and backward calls no dense forward."""
    from spt_compile.sites import attention as attention_site
    from toy_models import GQAAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GQAAttention(d=64, heads=4, kv_heads=2)
    x = torch.randn(2, 40, 64)
    mask = None if mask_kind == "is_causal" else torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    if mask_kind.startswith("padded"):
        mask[1, :, :, 30:] = False  # the second row's last 10 keys are padding
    if mask_kind == "padded float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    opts = {"compiler": "aot_eager", "calibration_steps": 0, "sparse_ffn": False, "attention_dense_below": 4096}
    compiled = torch.compile(lambda x: model(x, mask), backend="spt", options=opts)
    calls = {"flash": 0, "sdpa": 0}
    for name in ("dense_attention_with_lse", "dense_attention"):
        original = getattr(attention_site, name)

        def counted(*args, _original=original, _key="flash" if name.endswith("lse") else "sdpa", **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(attention_site, name, counted)
    results = []
    for fn in (compiled, lambda x: model(x, mask)):
        xr = x.clone().requires_grad_()
        y = fn(xr)
        results.append((y, torch.autograd.grad(y.pow(2).mean(), [xr, *model.parameters()])))
    (y, grads), (want, want_grads) = results
    assert calls == {"flash": 1, "sdpa": 0}, calls  # one forward; backward recomputed nothing
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
