"""exact_forward: training calls run the exact forward and only the backward is sparse.

The ops' backward is the exact Jacobian masked to the routed (token, block) pairs and to the selected
(query block, key block) tiles, checked against references that say so with autograd
(reference.exact_forward_mlp_reference, exact_forward_attention_reference); the compiled model's
forward under exact_forward equals the same model's forward inside disable(), bit for bit."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import spt_compile
from spt_compile.fitting.router import choose_blocks
from spt_compile.options import make_options
from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward_torch
from spt_compile.sparse_ops.attention.reference import exact_forward_attention_reference
from spt_compile.sparse_ops.routed_mlp.reference import exact_forward_mlp_reference
from spt_compile.sparse_ops.routed_mlp import (
    MlpWeights,
    exact_mlp_forward,
    permute_hidden,
    routed_mlp_backward_saved,
    routed_mlp_forward,
)

from test_block_sparse_op import make_mask, random_blocks
from test_routed_mlp_op import make_weights, spec_for
from toy_models import SPARSE_AT_EVERY_LENGTH, GQAAttention, compiled_gated_mlp


def test_off_by_default_and_run_time():
    assert "exact_forward" in make_options().runtime_dict()


def _detached(w: MlpWeights) -> MlpWeights:
    return MlpWeights(*[None if t is None else t.detach() for t in w])


@pytest.mark.parametrize("gated,layout,lora,T,hidden,nb,active", [
    (True, "oi", ("in", "gate", "out"), 29, 40, 4, 2),
    (True, "io", ("gate", "out"), 17, 36, 3, 1),
    (False, "oi", ("in", "out"), 1, 21, 4, 3),
    (False, "io", ("out",), 33, 50, 5, 2),
    (True, "oi", (), 8, 16, 2, 1),
])
def test_mlp_backward_is_the_masked_jacobian(gated, layout, lora, T, hidden, nb, active):
    """Outputs: the dense MLP's; gradients: exact_forward_mlp_reference's (fp64, permuted blocks)."""
    gen = torch.Generator().manual_seed(T + hidden)
    w = make_weights(13, hidden, 11, gated=gated, layout=layout, lora=lora, dtype=torch.float64, gen=gen)
    spec = spec_for(w, "silu" if gated else "gelu", gated, nb, layout)
    x = torch.randn(T, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    perm = torch.randperm(hidden, generator=gen)
    saved: list = []
    y, mask, norms, _, _ = exact_mlp_forward(x.detach(), _detached(w), spec, lambda n: choose_blocks(n, active), 0,
                                          saved, perm)
    assert mask.sum(1).eq(active).all() and norms.shape == (T, nb)
    assert mask.equal(choose_blocks(norms, active))
    ref = exact_forward_mlp_reference(x, permute_hidden(w, spec, perm), spec, mask)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)
    every, _, _, whole, _ = exact_mlp_forward(x.detach(), _detached(w), spec, lambda n: torch.ones_like(mask), 0, None,
                                           perm)
    assert whole
    assert torch.equal(y, every), "the output never depends on the backward's choice"
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    dx, grads = routed_mlp_backward_saved(dy, x.detach(), _detached(w), spec, mask, 0, True, needs, saved[0],
                                          perm=perm, exact_forward=True)
    names = ["x"] + [n for n, t in w._asdict().items() if t is not None]
    leaves = [x] + [t for t in w if t is not None]
    want = torch.autograd.grad(ref, leaves, dy, allow_unused=True)
    got = [dx] + [g for g, t in zip(grads, w) if t is not None]
    for name, g, r in zip(names, got, want):
        r = torch.zeros_like(g) if r is None else r
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=lambda m: f"grad of {name}: {m}")


def _assert_autograd_grads(ref, dy, x, w: MlpWeights, dx, grads: MlpWeights) -> None:
    """dx and grads (fp64) are autograd's gradients of ref for dy, slot by slot (zeros where unused)."""
    leaves = [x] + [t for t in w if t is not None]
    want = torch.autograd.grad(ref, leaves, dy, allow_unused=True)
    got = [dx] + [g for g, t in zip(grads, w) if t is not None]
    for name, g, r in zip(["x"] + [n for n, t in w._asdict().items() if t is not None], got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, atol=1e-10, rtol=1e-8,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gated,lora,ranked,one_pass", [
    (True, ("in", "gate", "out"), True, False),
    (False, ("out",), True, False),
    (True, ("in", "out"), False, False),
    (False, (), False, True),
])
def test_a_dropout_over_the_hidden_layer_is_drawn_by_the_op(gated, lora, ranked, one_pass):
    """T5's wo(dropout(act(wi(x)))) in training: the op draws the dropout per block (dropout.hidden_keep)
    and backward draws it again. Outputs: the dense MLP's with that mask; gradients: the masked
    Jacobian of it (ranked pairs, permuted blocks) or its dense gradient (every pair, block by block or
    in one pass)."""
    from spt_compile.sparse_ops.routed_mlp.dropout import hidden_keep_layer

    gen = torch.Generator().manual_seed(5)
    w = make_weights(13, 40, 11, gated=gated, layout="oi", lora=lora, dtype=torch.float64, gen=gen)
    spec = dataclasses.replace(spec_for(w, "silu" if gated else "relu", gated, 4, "oi"), hidden_dropout=0.3)
    x = torch.randn(23, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    perm = torch.randperm(40, generator=gen) if ranked else None
    saved: list = []
    choose = (lambda n: choose_blocks(n, 2)) if ranked else (lambda n: torch.ones(23, 4, dtype=torch.bool))
    y, mask, _, whole, counts = exact_mlp_forward(x.detach(), _detached(w), spec, choose, 7, saved, perm,
                                                  "jacobian" if ranked else None)
    assert whole != ranked
    kept = hidden_keep_layer(23, spec, 7, x)  # [T, F] in block order
    assert 0.2 < (kept == 0).double().mean() < 0.4
    ref = exact_forward_mlp_reference(x, permute_hidden(w, spec, perm), spec, mask, hidden_scale=kept)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)
    dense = exact_forward_mlp_reference(x, permute_hidden(w, spec, perm), spec, torch.ones_like(mask))
    assert not torch.allclose(y, dense), "the dropout changed the output"
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    dx, grads = routed_mlp_backward_saved(dy, x.detach(), _detached(w), spec, mask, 7, True, needs, saved[0],
                                          perm=perm, exact_forward=True, whole=whole,
                                          counts=counts if whole else None, one_pass=one_pass)
    _assert_autograd_grads(ref, dy, x, w, dx, grads)


@pytest.mark.parametrize("gated", [True, False])
def test_a_dropout_over_the_hidden_layer_in_the_routed_forward(gated):
    """The routed forward (exact_forward off, sparse inference in training) draws the hidden layer's
    dropout for each block's routed rows; backward draws it again. Output and gradients: the per-token
    reference with that mask."""
    from spt_compile.sparse_ops.routed_mlp.dropout import hidden_keep
    from spt_compile.sparse_ops.routed_mlp.reference import routed_mlp_reference
    from spt_compile.sparse_ops.routed_mlp.spec import block_bounds

    gen = torch.Generator().manual_seed(6)
    w = make_weights(13, 40, 11, gated=gated, layout="oi", lora=("in", "out"), dtype=torch.float64, gen=gen)
    spec = dataclasses.replace(spec_for(w, "silu" if gated else "gelu", gated, 4, "oi"), hidden_dropout=0.3)
    x = torch.randn(23, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = choose_blocks(torch.rand(23, 4, generator=gen), 2)
    saved: list = []
    y = routed_mlp_forward(x.detach(), _detached(w), spec, mask, 9, saved=saved)
    scale = torch.ones(23, 40, dtype=torch.float64)
    for b, (lo, hi) in enumerate(block_bounds(40, 4)):
        rows = mask[:, b].nonzero().squeeze(1)  # the block's tokens, in the order the op routes them
        scale[rows, lo:hi] = hidden_keep(rows.numel(), lo, hi, spec, 9, b, x)
    ref = routed_mlp_reference(x, w, spec, mask, hidden_scale=scale)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    dx, grads = routed_mlp_backward_saved(dy, x.detach(), _detached(w), spec, mask, 9, True, needs, saved[0])
    _assert_autograd_grads(ref, dy, x, w, dx, grads)


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_backward_with_every_pair_kept_is_the_dense_gradient(activation, dtype, one_pass):
    """Every pair kept (LM tuning: every row carries a loss): the backward reads the whole saved [T, F]
    pre-activations, adds each block's d(X) straight into the layer's and reuses the activation's buffers
    for d(z) (relu's backward reads act(z): it must run first); block by block (the CPU) or the whole
    layer in one pass (off the CPU). Gradients: autograd's of the dense MLP."""
    gen = torch.Generator().manual_seed(3)
    w = make_weights(13, 40, 11, gated=True, layout="oi", lora=("in", "gate", "out"), dtype=dtype, gen=gen)
    spec = spec_for(w, activation, True, 4, "oi")
    x = torch.randn(23, 13, dtype=dtype, generator=gen, requires_grad=True)
    perm = torch.randperm(40, generator=gen)
    saved: list = []
    every = torch.ones(23, 4, dtype=torch.bool)
    y, mask, _, whole, counts = exact_mlp_forward(x.detach(), _detached(w), spec, lambda scores: every, 0, saved,
                                                  perm, None)  # no scores: every pair is kept
    assert whole and mask.all()
    ref = exact_forward_mlp_reference(x, permute_hidden(w, spec, perm), spec, mask)
    dy = torch.randn(y.shape, dtype=dtype, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    dx, grads = routed_mlp_backward_saved(dy, x.detach(), _detached(w), spec, mask, 0, True, needs, saved[0],
                                          perm=perm, exact_forward=True, whole=True, counts=counts,
                                          one_pass=one_pass)
    leaves = [x] + [t for t in w if t is not None]
    want = torch.autograd.grad(ref, leaves, dy, allow_unused=True)
    got = [dx] + [g for g, t in zip(grads, w) if t is not None]
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for name, g, r in zip(["x"] + [n for n, t in w._asdict().items() if t is not None], got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gated,importance,hidden,nb", [
    (True, "jacobian", 40, 4), (True, "jacobian", 37, 3), (False, "jacobian", 21, 4),
    (True, "output", 37, 5), (False, "output", 16, 2),
])
def test_mlp_pair_scores_are_the_documented_unit_sums(gated, importance, hidden, nb):
    """Each (token, block) score is the sum over the block's units of IMPORTANCES' per-unit bound,
    written here unit by unit (fp64, permuted, unequal blocks where hidden % nb != 0)."""
    from spt_compile.sparse_ops.routed_mlp import unit_norms
    from spt_compile.sparse_ops.routed_mlp.spec import block_bounds

    gen = torch.Generator().manual_seed(hidden)
    w = _detached(make_weights(13, hidden, 11, gated=gated, layout="oi", lora=("out",), dtype=torch.float64,
                               gen=gen))
    spec = spec_for(w, "silu" if gated else "gelu", gated, nb, "oi")
    x = torch.randn(19, 13, dtype=torch.float64, generator=gen)
    perm = torch.randperm(hidden, generator=gen)
    _, _, scores, _, _ = exact_mlp_forward(x, w, spec, lambda n: torch.ones_like(n, dtype=torch.bool), 0, None,
                                           perm, importance=importance)
    pw = permute_hidden(w, spec, perm)
    n = unit_norms(w, spec, perm)
    if gated:
        g, u = x @ pw.gate_w.T + pw.gate_b, x @ pw.in_w.T + pw.in_b
        act = torch.nn.functional.silu
        d_act = torch.sigmoid(g) * (1 + g * (1 - torch.sigmoid(g)))
        if importance == "jacobian":
            unit = (u * d_act).abs() * n["gate"] * n["out"] + act(g).abs() * n["in"] * n["out"]
        else:
            unit = (act(g) * u).abs() * n["out"]
    else:
        zi = x @ pw.in_w.T + pw.in_b
        gelu = torch.nn.functional.gelu
        d_act = torch.autograd.functional.vjp(gelu, zi, torch.ones_like(zi))[1]
        unit = d_act.abs() * n["in"] * n["out"] if importance == "jacobian" else gelu(zi).abs() * n["out"]
    want = torch.stack([unit[:, lo:hi].sum(1) for lo, hi in block_bounds(hidden, nb)], 1)
    torch.testing.assert_close(scores, want.float(), atol=1e-5, rtol=1e-5)


def test_mlp_saves_only_the_routed_pairs():
    """The saved flat tensor is the routed forward's for the same mask: pre-activations of the routed
    pairs, t and t_out; so the memory gain of routing stays."""
    gen = torch.Generator().manual_seed(3)
    w = _detached(make_weights(16, 48, 16, gated=True, dtype=torch.float64, gen=gen))
    spec = spec_for(w, "silu", True, 4)
    x = torch.randn(64, 16, dtype=torch.float64, generator=gen)
    exact: list = []
    _, mask, _, _, _ = exact_mlp_forward(x, w, spec, lambda n: choose_blocks(n, 2), 0, exact)
    routed: list = []
    routed_mlp_forward(x, w, spec, mask, 0, saved=routed)
    n_t = 64 * (3 + 3)  # t: the gate and up LoRA inputs (r 3 each)
    assert exact[0].numel() == routed[0].numel()
    # the same values up to GEMM rounding: the exact forward's [T, F] GEMM and the routed per-block ones
    # may take different kernels (on some CPUs they differ in the last bit of fp64)
    torch.testing.assert_close(exact[0][: -(n_t + 64 * 3)], routed[0][: -(n_t + 64 * 3)], atol=1e-12, rtol=1e-12)
    assert exact[0].numel() < 64 * 48 * 2  # less than the dense MLP's two pre-activations


@pytest.mark.parametrize("one_pass", [False, True])
def test_mlp_lora_dropout_is_replayed(one_pass):
    """With LoRA dropout, backward draws the masks the exact forward drew (for every token): with every
    block routed it equals the routed path's backward, whose forward drew the same masks (block by
    block; in one pass, the blocks' draws side by side)."""
    gen = torch.Generator().manual_seed(5)
    w = _detached(make_weights(12, 32, 12, gated=True, dtype=torch.float64, gen=gen))
    spec = spec_for(w, "silu", True, 4, in_dropout=0.3, gate_dropout=0.2, out_dropout=0.25)
    x = torch.randn(20, 12, dtype=torch.float64, generator=gen)
    saved_e, saved_r = [], []
    y_e, mask, _, whole, counts = exact_mlp_forward(x, w, spec, lambda n: torch.ones_like(n, dtype=torch.bool), 7, saved_e)
    y_r = routed_mlp_forward(x, w, spec, mask, 7, saved=saved_r)
    torch.testing.assert_close(y_e, y_r, atol=1e-12, rtol=0)
    dy = torch.randn(y_e.shape, dtype=torch.float64, generator=gen)
    needs = MlpWeights(*[t is not None for t in w])
    got = routed_mlp_backward_saved(dy, x, w, spec, mask, 7, True, needs, saved_e[0], exact_forward=True, whole=whole,
                                    counts=counts, one_pass=one_pass)
    assert counts == mask.sum(0).tolist()
    want = routed_mlp_backward_saved(dy, x, w, spec, mask, 7, True, needs, saved_r[0])
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    for g, r in zip(got[1], want[1]):
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("N,H,Hkv,causal,mask_kind,grouped,softcap", [
    (100, 4, 2, True, None, True, 0.0),
    (77, 2, 2, False, "pad-additive", False, 0.0),
    (96, 4, 1, True, "bool", True, 0.0),
    (64, 3, 3, False, "additive", False, 0.0),
    (100, 4, 2, True, "additive", True, 1.0),  # Gemma-2's soft cap (scores about N(0, 1): it bites)
])
def test_attention_backward_over_selected_tiles_is_the_masked_jacobian(N, H, Hkv, causal, mask_kind, grouped,
                                                                       softcap):
    """The block-sparse backward fed the *exact* output and lse computes the exact Jacobian masked to
    the listed tiles (what the site runs under exact_forward)."""
    gen = torch.Generator().manual_seed(N)
    B, D, bm = 2, 16, 16
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    n_b = -(-N // bm)
    idx = random_blocks(B, Hkv if grouped else H, n_b, n_b, 3, gen)
    mask = make_mask(mask_kind, B, N, gen)
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    scale = D**-0.5
    ref = exact_forward_attention_reference(q, k, v, idx, scale, causal, mask, bm, bm, softcap)
    every = torch.arange(n_b, dtype=torch.int32).expand(B, H, n_b, n_b)
    dense = exact_forward_attention_reference(q, k, v, every, scale, causal, mask, bm, bm, softcap)
    torch.testing.assert_close(ref, dense, atol=1e-14, rtol=1e-12)  # the forward is exact whatever the listing
    from spt_compile.sparse_ops.attention.block_sparse import block_sparse_forward_torch

    out, lse = block_sparse_forward_torch(q.detach(), k.detach(), v.detach(), every, scale, causal, mask, bm, bm,
                                          softcap=softcap)
    torch.testing.assert_close(out, ref.detach(), atol=1e-6, rtol=1e-5)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = block_sparse_backward_torch(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, scale, causal, mask,
                                      bm, bm, softcap=softcap)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, r in zip("qkv", got, want):  # the kernel keeps lse in fp32: fp32-level agreement
        torch.testing.assert_close(g, r, atol=2e-6, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    full = torch.autograd.grad(dense, (q, k, v), dout)
    assert any((g - f).abs().max() > 1e-6 for g, f in zip(want, full)), "the listing must drop some pairs"


def _gqa_setup(seed=0, N=160, **kw):
    torch.manual_seed(seed)
    torch._dynamo.reset()
    model = GQAAttention(d=64, heads=4, kv_heads=2, **kw).train()
    x = torch.randn(2, N, 64, requires_grad=True)
    return model, x


ATTN_OPTIONS = {"compiler": "aot_eager", "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16,
                "density": 0.25}


@pytest.mark.parametrize("softcap", [0.0, 0.5], ids=["sdpa", "soft-capped"])
def test_attention_site_forward_equals_disable_and_density_one_equals_dense(softcap):
    """With a soft cap (eager attention, Gemma-2's form) the exact forward runs the block kernels over
    every key block, under disable() too: still the same bits."""
    kw = dict(eager=True, softcap=softcap) if softcap else {}
    model, x = _gqa_setup(**kw)
    compiled = torch.compile(model, backend="spt", options={**ATTN_OPTIONS, "exact_forward": True})
    compiled(x).sum().backward()  # calibration call
    with spt_compile.disable():
        want = compiled(x.detach())
    got = compiled(x)
    assert torch.equal(got, want), "exact_forward's training forward is the dense forward, bit for bit"
    x.grad = None
    got.pow(2).sum().backward()
    sparse_grad = x.grad.clone()
    with spt_compile.enable(density=1.0):  # every key block listed: the full Jacobian
        x.grad = None
        compiled(x).pow(2).sum().backward()
    ref_model, xr = _gqa_setup(**kw)
    ref_model.load_state_dict(model.state_dict())
    ref_model(xr).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    assert (sparse_grad - xr.grad).abs().max() > 1e-4, "density 0.25 must drop pairs from the backward"


def _cpu_stand_in_for_cuda_flash(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    """aten._scaled_dot_product_flash_attention's contract (equal head counts, out and a natural-log
    logsumexp first), served by the CPU flash kernel."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "the CUDA entry point takes equal head counts"
    assert dropout_p == 0.0 and not return_debug_mask
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse, None, None, q.shape[2], k.shape[2], None, None, None


def test_cuda_flash_exact_forward_plumbing():
    """On CUDA without a mask the exact forward runs SDPA's flash kernel and keeps its logsumexp
    (cuda_flash_with_lse). Not runnable here: the kernel's contract is served by a CPU stand-in, and
    the site gives the same outputs and gradients through it as through the block-sparse kernels with
    every key block listed (benchmarks/bench_attention.py --check runs the real kernel on a GPU)."""
    from spt_compile.sites import attention as attention_site

    q, k, v = torch.randn(2, 6, 37, 16), torch.randn(2, 2, 37, 16), torch.randn(2, 2, 37, 16)
    assert not attention_site._cuda_flash_applies(q, k, v, None, True, 0.25)  # CPU tensors
    out, lse = attention_site.cuda_flash_with_lse(q, k, v, True, 0.25, kernel=_cpu_stand_in_for_cuda_flash)
    kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    s = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, s.softmax(-1) @ vv, atol=1e-5, rtol=1e-5)

    original, original_backward, flash_calls = attention_site.cuda_flash_with_lse, attention_site.cuda_flash_backward, []

    def run(patched: bool, monkeypatch):
        if patched:
            monkeypatch.setattr(attention_site, "_cpu_flash_applies", lambda *a: False)
            monkeypatch.setattr(attention_site, "_cuda_flash_applies", lambda *a: True)
            monkeypatch.setattr(attention_site, "cuda_flash_with_lse", lambda *a: flash_calls.append(1) or original(
                *a, kernel=_cpu_stand_in_for_cuda_flash))
            monkeypatch.setattr(attention_site, "cuda_flash_backward", lambda *a: original_backward(
                *a, kernel=_cpu_stand_in_for_cuda_flash_backward))  # the calibration call's (exact both ways)
        else:  # the block-sparse kernels with every key block listed
            monkeypatch.setattr(attention_site, "_cpu_flash_applies", lambda *a: False)
        model, x = _gqa_setup()
        compiled = torch.compile(model, backend="spt", options={**ATTN_OPTIONS, "exact_forward": True})
        compiled(x).sum().backward()  # calibration call
        x.grad = None
        y = compiled(x)
        y.pow(2).sum().backward()
        # report() names the kernels that served the exact forward (calibration calls run dense: not counted)
        assert [s.get("exact_forward_kernels") for s in spt_compile.report(model) if s["kind"] == "attention"] == [
            {"flash" if patched else "block": 1}]
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()]

    with pytest.MonkeyPatch.context() as mp:
        flash = run(True, mp)
    with pytest.MonkeyPatch.context() as mp:
        kernels = run(False, mp)
    assert len(flash_calls) == 2  # the calibration call (exact, with its lse kept) and the training call
    torch.testing.assert_close(flash[0], kernels[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flash[1], kernels[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(flash[2], kernels[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _cpu_stand_in_for_cuda_flash_backward(dout, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                          is_causal, philox_seed, philox_offset, *, scale):
    """aten._scaled_dot_product_flash_attention_backward's contract (equal head counts, the forward's
    out and natural-log logsumexp, no nested lengths, no dropout), computed from lse as flash does."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "the CUDA entry point takes equal head counts"
    assert cum_seq_q is None and cum_seq_k is None and dropout_p == 0.0
    assert (max_q, max_k) == (q.shape[2], k.shape[2]) and lse.dtype == torch.float32
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    p = torch.exp(s - lse.double()[..., None])  # [B, H, N, Nk]
    dp = dout.double() @ v.double().transpose(-1, -2)
    ds = p * (dp - (dout.double() * out.double()).sum(-1, keepdim=True))
    grads = (ds @ k.double() * scale, ds.transpose(-1, -2) @ q.double() * scale, p.transpose(-1, -2) @ dout.double())
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def _exact_short_runs(N: int, mask=None) -> list:
    """The GQA toy at N tokens (with `mask`) below attention_backward_dense_below: the calibration call,
    then an exact_short training call; (output, d(x), the parameters' gradients) of each."""
    model, x = _gqa_setup(N=N)
    compiled = torch.compile(model, backend="spt", options={**ATTN_OPTIONS, "attention_backward_dense_below": 2048})
    runs = []
    for _ in range(2):
        y = compiled(x) if mask is None else compiled(x, mask)
        y.pow(2).sum().backward()
        runs.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()]))
        x.grad = None
        model.zero_grad()
    return runs


def _serve_cuda_kernels(mp, kind: str, forward, backward, calls: list) -> None:
    """The attention site as on CUDA with its `kind` kernel path ("flash", "efficient") applying: the
    two aten kernels served by CPU stand-ins of their contracts (each call recorded in `calls`), and a
    recompute in backward a failure."""
    from spt_compile.sites import attention as site

    with_lse, backward_fn = getattr(site, f"cuda_{kind}_with_lse"), getattr(site, f"cuda_{kind}_backward")
    mp.setattr(site, "_cpu_flash_applies", lambda *a: False)
    mp.setattr(site, f"_cuda_{kind}_applies", lambda *a: True)
    mp.setattr(site, f"cuda_{kind}_with_lse", lambda *a: calls.append("forward") or with_lse(*a, kernel=forward))
    mp.setattr(site, f"cuda_{kind}_backward", lambda *a: calls.append("backward") or backward_fn(*a, kernel=backward))
    mp.setattr(site, "dense_attention", lambda *a: pytest.fail("no recompute in backward"))


def _assert_stand_ins_match_the_path_without(run, calls: list) -> None:
    """run(patched, monkeypatch) -> _exact_short_runs: with the CUDA kernels' stand-ins each call ran
    their forward and backward once, and outputs and gradients equal those of the path without them."""
    with pytest.MonkeyPatch.context() as mp:
        cuda = run(True, mp)
    with pytest.MonkeyPatch.context() as mp:
        without = run(False, mp)
    assert calls == ["forward", "backward"] * 2
    _assert_runs_close(cuda, without)


def _assert_runs_close(got: list, want: list) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g[0], w[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g[1], w[1], atol=1e-5, rtol=1e-4)
        for a, b in zip(g[2], w[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cuda_flash_exact_short_calls_keep_lse_and_run_the_flash_backward(monkeypatch):
    """Below attention_backward_dense_below, a CUDA training call without mask or dropout runs SDPA's flash kernel
    keeping its lse, and backward runs the flash backward kernel from it: no second forward. Served by
    CPU stand-ins of both kernels' contracts; outputs and gradients equal the CPU flash path's."""
    calls = []

    def run(patched: bool, mp):
        if patched:
            _serve_cuda_kernels(mp, "flash", _cpu_stand_in_for_cuda_flash, _cpu_stand_in_for_cuda_flash_backward, calls)
        return _exact_short_runs(37)

    _assert_stand_ins_match_the_path_without(run, calls)


def _math_attention(q, k, v, bias, is_causal, scale):
    """fp64 scores [B, H, N, Nk] with the additive bias (and causal mask), and their logsumexp."""
    s = q.double() @ k.double().transpose(-1, -2) * scale + bias.double()
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return s, s.logsumexp(-1)


def _cpu_stand_in_for_cuda_efficient(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
    """aten._scaled_dot_product_efficient_attention's contract: equal head counts, an additive bias
    [B, H, N, Nk] whose rows start 8-element aligned, out and a natural-log logsumexp [B, H, N rounded up
    to 32] (the rows past N are the kernel's padding)."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "the CUDA entry point takes equal head counts"
    assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and bias.dtype == q.dtype
    assert all(st % 8 == 0 for st in bias.stride()[:-1]) and bias.stride(-1) == 1
    assert compute_log_sumexp and dropout_p == 0.0
    s, lse = _math_attention(q, k, v, bias, is_causal, scale)
    out = (torch.softmax(s, -1) @ v.double()).to(q.dtype)
    padded = torch.full((*lse.shape[:2], -(-q.shape[2] // 32) * 32), float("nan"), dtype=torch.float32)
    padded[..., : q.shape[2]] = lse
    return out, padded, torch.empty(()), torch.empty(())


def _cpu_stand_in_for_cuda_efficient_backward(dout, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask,
                                              is_causal, *, scale):
    """aten._scaled_dot_product_efficient_attention_backward's contract: the forward's out and its
    logsumexp at the kernel's padded length, computed from lse as the kernel does."""
    assert q.shape[1] == k.shape[1] == v.shape[1] and dropout_p == 0.0
    assert lse.shape[-1] % 32 == 0 and lse.shape[-1] >= q.shape[2] and lse.dtype == torch.float32
    assert list(grad_input_mask) == [True, True, True, False]
    s, _ = _math_attention(q, k, v, bias, is_causal, scale)
    p = torch.exp(s - lse.double()[..., : q.shape[2], None])  # [B, H, N, Nk]
    dp = dout.double() @ v.double().transpose(-1, -2)
    ds = p * (dp - (dout.double() * out.double()).sum(-1, keepdim=True))
    grads = (ds @ k.double() * scale, ds.transpose(-1, -2) @ q.double() * scale, p.transpose(-1, -2) @ dout.double())
    return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None)


@pytest.mark.parametrize("N", [37, 40])  # keys not a multiple of 8 (the bias rows padded), and a multiple
def test_cuda_efficient_exact_calls_with_a_mask_keep_lse_and_run_its_backward(monkeypatch, N):
    """With EFFICIENT_WITH_MASK, a CUDA training call with a padding mask runs the memory-efficient
    kernel keeping its lse, and backward runs that kernel's backward: no second forward. Served by CPU
    stand-ins of both kernels' contracts; outputs and gradients equal the path without it (SDPA, then
    SDPA again in backward)."""
    from spt_compile.sites import attention as attention_site

    assert not attention_site.EFFICIENT_WITH_MASK, "off until gpu_check.sh has checked and timed it"
    calls = []
    real = torch.ones(2, N, dtype=torch.bool)
    real[1, N - 9:] = False  # the second row's last 9 positions are padding
    mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]  # [2, 1, N, N], as HF's

    def run(patched: bool, mp):
        mp.setattr(attention_site, "_cpu_flash_applies", lambda *a: False)  # as on CUDA: no CPU flash kernel
        if patched:
            assert not attention_site._cuda_efficient_applies(torch.randn(1, 2, 8, 8), torch.randn(1, 1, 8, 8),
                                                              torch.randn(1, 1, 8, 8), mask[:1, :, :8, :8], False)
            _serve_cuda_kernels(mp, "efficient", _cpu_stand_in_for_cuda_efficient,
                                _cpu_stand_in_for_cuda_efficient_backward, calls)
        return _exact_short_runs(N, mask)

    _assert_stand_ins_match_the_path_without(run, calls)


@pytest.mark.parametrize("loss_rows", ["dense", "off"])
def test_mlp_site_forward_equals_disable(loss_rows):
    """The exact forward is the dense MLP: bit for bit where the backward keeps whole rows (the same
    code as disable()'s, weights in place), to rounding where it ranks pairs (the block path sums the
    out projection in the clustered unit order)."""
    # the loss is outside the graph: "dense" keeps every row whole, "off" ranks (keeps 2 of 4)
    model, compiled = compiled_gated_mlp(24, 64, exact_forward=True, ffn_loss_rows=loss_rows)
    x = torch.randn(3, 37, 24, requires_grad=True)
    for _ in range(3):  # calibration (2 calls), then exact-forward calls
        compiled(x).sum().backward()
    with spt_compile.disable():
        want = compiled(x.detach())
    got = compiled(x)
    if loss_rows == "dense":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with spt_compile.enable(exact_forward=False):  # the routed forward differs
        assert not torch.allclose(compiled(x), want, atol=1e-4)
    got.sum().backward()
    report = spt_compile.report(model)
    if loss_rows == "off":
        assert report and report[0]["captured"] < 1.0  # the backward kept 2 of 4 blocks
    assert report[0]["backward"] == ({"ranked": 0, "whole_rows": 2} if loss_rows == "dense"
                                            else {"ranked": 2, "whole_rows": 0}), report[0]


@pytest.mark.parametrize("loss_rows", ["dense", "off"])
def test_whole_rows_put_no_weight_in_block_order(loss_rows):
    """With the clustering's permutation, a training call that keeps whole rows (every row carries a
    loss) and an evaluation call run in the units' own order: no gather of a weight into block order
    and no gather of tokens (every row runs every block). A call that ranks pairs gathers both."""
    from spt_compile.testing.census import Census

    model, compiled = compiled_gated_mlp(24, 64, exact_forward=True, ffn_loss_rows=loss_rows)
    x = torch.randn(3, 37, 24, requires_grad=True)
    for _ in range(3):  # calibration (2 calls; fits the clustering), then the first exact call (it probes)
        compiled(x).sum().backward()
    site = next(s for _, s in spt_compile.registry.model_sites(model))
    assert site.perm is not None and not torch.equal(site.perm, torch.arange(64))
    with Census() as train:  # aten ops inside the site's op calls, forward and backward
        compiled(x).sum().backward()
    with Census() as evaluation, torch.no_grad():
        compiled(x)
    gathers = {name: c.ops["index_select"] + c.ops["gather"] for name, c in (("train", train), ("eval", evaluation))}
    assert gathers == ({"train": 0, "eval": 0} if loss_rows == "dense" else {"train": gathers["train"], "eval": 0})
    if loss_rows == "off":
        assert gathers["train"] >= 6, gathers  # the three weights, forward and backward, and the tokens


def test_eval_calls_run_exact_unless_sparse_inference():
    """Calls without gradients run exact by default (evaluation measures the model users ship);
    sparse_inference=True runs the routed forward, and report() counts how each call ran."""
    model, compiled = compiled_gated_mlp(24, 64, exact_forward=True)
    x = torch.randn(2, 19, 24)
    for _ in range(2):
        compiled(x.requires_grad_()).sum().backward()
    with torch.no_grad():
        default = compiled(x)
        with spt_compile.enable(sparse_inference=True):
            sparse = compiled(x)
        with spt_compile.disable():
            dense = compiled(x)
    assert torch.equal(default, dense)
    assert not torch.allclose(sparse, dense, atol=1e-4)
    runs = spt_compile.report(model)[0]["runs"]
    assert runs == {"calibration": 2, "exact_inference": 1, "routed": 1, "disabled": 1}, runs


def test_frozen_weights_score_weights_are_computed_once(monkeypatch):
    """The backward's scores read the base weights' per-unit norms (as score_weights' per-block
    matrices): kept with the weights, computed on the first training call and again only when a weight
    (an input projection's, or the out projection's, which anchors them) changes in place."""
    from spt_compile.sites import mlp as site_mlp

    calls = []
    real = site_mlp.score_weights
    monkeypatch.setattr(site_mlp, "score_weights", lambda *a: calls.append(1) or real(*a))
    model, compiled = compiled_gated_mlp(24, 64, exact_forward=True, ffn_active=2, ffn_loss_rows="off")
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 10, 24, requires_grad=True)
    for _ in range(4):
        compiled(x).sum().backward()
    n = len(calls)
    assert n >= 1
    for _ in range(3):
        compiled(x).sum().backward()
    assert len(calls) == n, "frozen weights: no new computation"
    for weight in (model.up_proj.weight, model.down_proj.weight):
        with torch.no_grad():
            weight.mul_(2.0)  # a change in place: the norms are stale
        compiled(x).sum().backward()
        n += 1
        assert len(calls) == n


def test_site_state_is_copied_to_the_device_once():
    """The router, permutation and predictors live on the host; a call on another device uses a kept
    copy (a copy per call from pageable memory would sync on CUDA), made again when the state changes.
    The meta device stands in for a GPU here."""
    from spt_compile.sites.mlp import on_device

    perm = torch.randperm(16)
    assert on_device(perm, perm.device) is perm and on_device(None, "meta") is None
    first = on_device(perm, torch.device("meta"))
    assert first.device.type == "meta" and on_device(perm, torch.device("meta")) is first
    assert on_device(perm, torch.device("meta"), torch.float32).dtype == torch.float32
    perm.add_(0)  # changed in place: copied again
    assert on_device(perm, torch.device("meta")) is not first


def test_no_loss_rows_in_the_graph_keeps_every_row_whole():
    """The loss outside the compiled graph (a graph break before it, a compiled submodule): no loss rows
    reach the site, so under the default ffn_loss_rows="dense" every real row keeps every block in the
    backward (an LM's rows all carry a loss), the gradients are the dense ones, and report() says why.
    "off" ranks them (2 of 4 blocks per row here)."""
    x = torch.randn(2, 23, 24)
    grads = {}
    for rows in ("dense", "off", "disabled"):
        model, compiled = compiled_gated_mlp(24, 64, exact_forward=True, **({} if rows == "disabled" else {"ffn_loss_rows": rows}))
        for _ in range(3):  # calibration (2 calls), then exact-forward calls
            xi = x.clone().requires_grad_()
            if rows == "disabled":
                with spt_compile.disable():
                    compiled(xi).square().sum().backward()
            else:
                compiled(xi).square().sum().backward()
        grads[rows] = xi.grad  # the last call's: an exact-forward call (or the disabled one)
        if rows != "disabled":
            (site,) = [s for s in spt_compile.report(model) if s["kind"] == "mlp"]
            if rows == "dense":
                assert site["backward"].get("ranked", 0) == 0 and site["backward"]["whole_rows"] == 1, site
                assert "no loss rows reach this site" in site["backward_why"], site
            else:
                assert site["backward"]["ranked"] == 1 and site["backward"].get("whole_rows", 0) == 0, site
    torch.testing.assert_close(grads["dense"], grads["disabled"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grads["off"], grads["disabled"], rtol=1e-3, atol=1e-4)


class _LearnedBiasAttention(torch.nn.Module):
    """SDPA with a trained additive bias [1, H, N, N] (T5's relative bias in full fine-tuning, BEiT's)."""

    def __init__(self, d=64, heads=4, n=80):
        super().__init__()
        self.h = heads
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(1, heads, n, n))

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return y.transpose(1, 2).reshape(B, N, d)


@pytest.mark.parametrize("selection,exact_forward", [("block", True), ("block", False), ("token", False)])
def test_a_learned_bias_gets_its_gradient_through_the_site(selection, exact_forward):
    """Every key listed (density 1): the bias's gradient, which the op returns, equals dense's in each mode
    (block selection under the exact forward and the sparse one, token selection), and at density 1/4
    it differs (the score gradient only at the listed pairs)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _LearnedBiasAttention()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 80, 64)
    compiled = torch.compile(model, backend="spt", options={
        "compiler": "aot_eager", "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16,
        "density": 1.0, "attention_selection": selection, "exact_forward": exact_forward})
    compiled(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    (site,) = [s for s in spt_compile.report(model) if s["kind"] == "attention"]
    assert site["runs"].get("exact_forward" if exact_forward else "sparse") == 1, site
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    model.zero_grad()
    with spt_compile.enable(density=0.25):
        compiled(x).pow(2).sum().backward()
    assert (model.bias.grad - reference.bias.grad).abs().max() > 1e-4
