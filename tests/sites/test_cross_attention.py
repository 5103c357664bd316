"""Cross-attention (queries of one sequence, keys and values of another: a decoder reading an encoder)
and decoding steps (fewer queries than keys, no is_causal) through torch.compile(backend="spt"): every
key block kept, outputs and gradients equal the dense module's, with no mask, a key padding mask and a
full [B, 1, Nq, Nk] mask (bool and additive), in the sparse forward and under exact_forward; is_causal
with fewer queries than keys stays dense with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spt_compile
from test_passes import capture
from toy_models import SPARSE_AT_EVERY_LENGTH


class CrossAttention(nn.Module):
    """q from xq [B, Nq, d]; k, v from xkv [B, Nk, d]."""

    def __init__(self, d=64, heads=4, causal=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads, self.causal = heads, causal

    def forward(self, xq, xkv, mask=None):
        B, Nq, d = xq.shape
        Nk, H = xkv.shape[1], self.heads
        q = self.q(xq).view(B, Nq, H, -1).transpose(1, 2)
        k = self.k(xkv).view(B, Nk, H, -1).transpose(1, 2)
        v = self.v(xkv).view(B, Nk, H, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return y.transpose(1, 2).reshape(B, Nq, d)


def masks(B, Nq, Nk):
    gen = torch.Generator().manual_seed(3)
    pad = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    pad[1, ..., Nk * 3 // 4:] = False  # the second sequence's keys end early
    full = torch.rand(B, 1, Nq, Nk, generator=gen) > 0.3
    return {"none": None, "key-padding": pad, "full-bool": full,
            "full-additive": torch.where(full, 0.0, float("-inf"))}


@pytest.mark.parametrize("exact_forward", [True, False], ids=["exact-forward", "sparse-forward"])
@pytest.mark.parametrize("mask_name", ["none", "key-padding", "full-bool", "full-additive"])
@pytest.mark.parametrize("Nq,Nk", [(70, 200), (1, 130)], ids=["cross", "decoding-step"])
def test_cross_attention_every_key_block_equals_dense(exact_forward, mask_name, Nq, Nk):
    torch.manual_seed(0)
    model = CrossAttention()
    xq, xkv = torch.randn(2, Nq, 64, requires_grad=True), torch.randn(2, Nk, 64, requires_grad=True)
    mask = masks(2, Nq, Nk)[mask_name]
    cap = capture(model, xq, xkv, mask)
    (site,) = cap.rewritten("attention")
    assert f"q (2, 4, {Nq}, 16) k (2, 4, {Nk}, 16)" in site.detail, site.line()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={
        "compiler": "aot_eager", "density": 1.0, "calibration_steps": 0, "exact_forward": exact_forward,
        **SPARSE_AT_EVERY_LENGTH})
    got = compiled(xq, xkv, mask)
    got_grads = torch.autograd.grad(got.pow(2).sum(), (xq, xkv, *model.parameters()))
    want = model(xq, xkv, mask)
    want_grads = torch.autograd.grad(want.pow(2).sum(), (xq, xkv, *model.parameters()))
    (s,) = spt_compile.report(model)
    assert s["runs"].get("exact_forward" if exact_forward else "sparse") == 1, s  # the block-sparse path ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_causal_with_fewer_queries_than_keys_stays_dense_with_the_reason():
    model = CrossAttention(causal=True)
    cap = capture(model, torch.randn(2, 8, 64), torch.randn(2, 20, 64))
    (site,) = cap.dense("attention")
    assert "is_causal with query length 8 and key length 20" in site.reason, site.reason


@pytest.mark.parametrize("pattern", ["left-padding", "holes"])
@pytest.mark.parametrize("Nq", [130, 1], ids=["self", "one-query"])
def test_real_keys_not_starting_at_key_0_get_every_block(pattern, Nq):
    """A [B, 1, 1, Nk] key mask whose real keys are not a prefix: at density 1 every block that holds a
    real key is listed (the budget was ceil(real keys / block), two blocks short here: the gradients
    differed from dense by 2.4 on left padding)."""
    torch.manual_seed(0)
    Nk = 130
    model = CrossAttention()
    xkv = torch.randn(2, Nk, 64, requires_grad=True)
    xq = xkv if Nq == Nk else torch.randn(2, Nq, 64, requires_grad=True)
    mask = torch.ones(2, 1, 1, Nk, dtype=torch.bool)
    if pattern == "left-padding":
        mask[1, ..., :40] = False
    else:
        mask = torch.rand(2, 1, 1, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={
        "compiler": "aot_eager", "density": 1.0, "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH})
    params = list(model.parameters())
    got = torch.autograd.grad(compiled(xq, xkv, mask).pow(2).sum(), params)
    want = torch.autograd.grad(model(xq, xkv, mask).pow(2).sum(), params)
    assert spt_compile.report(model)[0]["runs"] == {"exact_forward": 1}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
