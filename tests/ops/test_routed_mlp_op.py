"""The routed MLP against a per-token reference loop: output and every gradient, odd sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spt_compile.ops import MlpSpec, MlpWeights, routed_mlp, routed_mlp_reference
from spt_compile.sparse_ops.routed_mlp import block_outputs


def make_weights(d_in, hidden, d_out, *, gated, layout="oi", bias=True, lora=("in", "gate", "out"), r=3,
                 dtype=torch.float32, gen=None) -> MlpWeights:
    def w(o, i):
        t = torch.randn(o, i, generator=gen, dtype=dtype) / i**0.5
        return (t if layout == "oi" else t.t().contiguous()).requires_grad_()

    def b(n):
        return (torch.randn(n, generator=gen, dtype=dtype) * 0.1).requires_grad_() if bias else None

    def ab(name, i, o):
        if name not in lora:
            return None, None
        return (torch.randn(r, i, generator=gen, dtype=dtype).requires_grad_(),
                (torch.randn(o, r, generator=gen, dtype=dtype) * 0.1).requires_grad_())

    in_a, in_bb = ab("in", d_in, hidden)
    out_a, out_bb = ab("out", hidden, d_out)
    slots = dict(in_w=w(hidden, d_in), in_b=b(hidden), in_a=in_a, in_bb=in_bb,
                 out_w=w(d_out, hidden), out_b=b(d_out), out_a=out_a, out_bb=out_bb)
    if gated:
        gate_a, gate_bb = ab("gate", d_in, hidden)
        slots.update(gate_w=w(hidden, d_in), gate_b=b(hidden), gate_a=gate_a, gate_bb=gate_bb)
    return MlpWeights(**slots)


def spec_for(w: MlpWeights, activation, gated, n_blocks, layout="oi", **kw) -> MlpSpec:
    hidden = w.in_w.shape[0] if layout == "oi" else w.in_w.shape[1]
    return MlpSpec(activation, gated, hidden, n_blocks, in_layout=layout, gate_layout=layout, out_layout=layout,
                   in_scale=0.5, gate_scale=2.0, out_scale=1.5, **kw)


def compare(x, w, spec, mask, atol=1e-9):
    """In float64, so that a mismatch is a bug and not rounding."""
    y = routed_mlp(x, w, spec, mask)
    ref = routed_mlp_reference(x, w, spec, mask)
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-7)
    dy = torch.randn_like(y)
    leaves = [x] + [t for t in w if t is not None]
    got = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, dy, allow_unused=True)
    names = ["x"] + [n for n, t in w._asdict().items() if t is not None]
    for name, g, r in zip(names, got, want):
        if r is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-7, msg=lambda m: f"grad of {name}: {m}")


def random_mask(T, n_blocks, active, gen):
    top = torch.rand(T, n_blocks, generator=gen).topk(active, dim=-1).indices
    return torch.zeros(T, n_blocks, dtype=torch.bool).scatter_(-1, top, True)


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu"), (False, "relu"), (False, "gelu_tanh"),
                                               (False, "relu2"), (True, "relu2")])
@pytest.mark.parametrize("layout", ["oi", "io"])
def test_matches_per_token_reference(gated, activation, layout):
    gen = torch.Generator().manual_seed(0)
    w = make_weights(123, 431, 123, gated=gated, layout=layout, gen=gen, dtype=torch.float64)
    spec = spec_for(w, activation, gated, 4, layout)
    x = torch.randn(37, 123, generator=gen, dtype=torch.float64, requires_grad=True)
    compare(x, w, spec, random_mask(37, 4, 2, gen))


@pytest.mark.parametrize("case", ["one token", "empty block", "all tokens one block", "no bias no lora",
                                  "lora on down only", "lora on gate only", "lora on up and down"])
def test_edge_cases(case):
    gen = torch.Generator().manual_seed(1)
    T = 1 if case == "one token" else 19
    kwargs = {}
    if case == "no bias no lora":
        kwargs = dict(bias=False, lora=())
    if case == "lora on down only":
        kwargs = dict(lora=("out",))
    if case == "lora on gate only":  # X = [t_gate | x]: gate reads all of it, up only the x window
        kwargs = dict(lora=("gate",))
    if case == "lora on up and down":
        kwargs = dict(lora=("in", "out"))
    w = make_weights(24, 50, 16, gated=True, gen=gen, dtype=torch.float64, **kwargs)
    spec = spec_for(w, "silu", True, 3)
    x = torch.randn(T, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_mask(T, 3, 1, gen)
    if case == "empty block":
        mask[:, 2] = False
        mask[:, 0] = True
    if case == "all tokens one block":
        mask[:] = False
        mask[:, 1] = True
    compare(x, w, spec, mask)


def test_input_without_grad_still_trains_lora():
    """x needs no gradient (e.g. the first layer of a frozen stack): the LoRA A gradients of gate and up
    still come from d(X), and match the reference."""
    gen = torch.Generator().manual_seed(5)
    w = make_weights(24, 50, 16, gated=True, gen=gen, dtype=torch.float64)
    spec = spec_for(w, "silu", True, 3)
    x = torch.randn(19, 24, generator=gen, dtype=torch.float64)
    mask = random_mask(19, 3, 2, gen)
    y, ref = routed_mlp(x, w, spec, mask), routed_mlp_reference(x, w, spec, mask)
    dy = torch.randn_like(y)
    leaves = [t for t in w if t is not None]
    for g, r in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7)


def test_every_block_active_is_the_dense_mlp():
    gen = torch.Generator().manual_seed(2)
    w = make_weights(40, 96, 40, gated=True, gen=gen, lora=("in", "gate", "out"))
    spec = spec_for(w, "silu", True, 4)
    x = torch.randn(11, 40, generator=gen)
    y = routed_mlp(x, w, spec, torch.ones(11, 4, dtype=torch.bool))

    def proj(x, W, b, A, B, s):
        return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s

    h = F.silu(proj(x, w.gate_w, w.gate_b, w.gate_a, w.gate_bb, 2.0)) * proj(x, w.in_w, w.in_b, w.in_a, w.in_bb, 0.5)
    dense = proj(h, w.out_w, w.out_b, w.out_a, w.out_bb, 1.5)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


def test_block_outputs_sum_to_the_dense_output():
    gen = torch.Generator().manual_seed(3)
    w = make_weights(16, 40, 8, gated=False, gen=gen)
    spec = spec_for(w, "gelu", False, 5)
    x = torch.randn(6, 16, generator=gen)
    every = routed_mlp(x, w, spec, torch.ones(6, 5, dtype=torch.bool))
    torch.testing.assert_close(block_outputs(x, w, spec).sum(1) + w.out_b, every, atol=1e-5, rtol=1e-5)


def test_lora_dropout_forward_and_backward_agree():
    """With LoRA dropout on every projection, gradcheck (float64) sees one consistent function."""
    gen = torch.Generator().manual_seed(4)
    w = make_weights(6, 10, 5, gated=True, dtype=torch.float64, gen=gen, r=2)
    spec = spec_for(w, "silu", True, 2, in_dropout=0.3, gate_dropout=0.2, out_dropout=0.4)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_mask(5, 2, 1, gen)
    leaves = [x] + [t for t in w if t is not None]

    def f(*args):
        slots = iter(args[1:])
        return routed_mlp(args[0], MlpWeights(*[next(slots) if t is not None else None for t in w]), spec, mask, seed=7)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)
    no_drop = routed_mlp(x, w, spec_for(w, "silu", True, 2), mask)
    assert not torch.allclose(f(*leaves), no_drop), "LoRA dropout had no effect"


def test_bad_mask_is_named():
    gen = torch.Generator().manual_seed(5)
    w = make_weights(8, 12, 8, gated=False, gen=gen)
    spec = spec_for(w, "relu", False, 3)
    with pytest.raises(ValueError, match="block_mask"):
        routed_mlp(torch.randn(4, 8), w, spec, torch.ones(4, 2, dtype=torch.bool))


def test_fused_gate_up_lora_dropout_is_one_mask_for_both_halves():
    """A fused gate/up projection is one PEFT module: one LoRA A for both halves and one dropout mask
    on its input. The op draws that one mask (lora_input_scales) for both halves; its output is the
    fused formula with it, and forward and backward agree (gradcheck, float64)."""
    from spt_compile.sparse_ops.routed_mlp import split_fused
    from spt_compile.sparse_ops.routed_mlp.dropout import lora_input_scales

    gen = torch.Generator().manual_seed(6)
    d, F_, r, p, s = 6, 8, 2, 0.3, 2.0
    t = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    fused = MlpWeights(gate_w=t(2 * F_, d), gate_a=t(r, d), gate_bb=t(2 * F_, r), out_w=t(d, F_), out_a=t(r, F_),
                       out_bb=t(d, r))
    spec = MlpSpec("silu", True, F_, 2, in_scale=s, gate_scale=s, out_scale=s, in_dropout=p, gate_dropout=p,
                   fused="gate_up")
    x = t(5, d)
    keep_in, keep_gate = lora_input_scales(x, spec, 7)
    assert keep_in is keep_gate and keep_in is not None and (keep_in == 0).any()
    every = torch.ones(5, 2, dtype=torch.bool)
    y = routed_mlp(x, split_fused(fused, spec), spec, every, seed=7)
    gu = F.linear(x, fused.gate_w) + s * F.linear(F.linear(x * keep_in, fused.gate_a), fused.gate_bb)  # [T, 2F]
    h = F.silu(gu[:, :F_]) * gu[:, F_:]
    want = F.linear(h, fused.out_w) + s * F.linear(F.linear(h, fused.out_a), fused.out_bb)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=1e-8)
    leaves = [x, *[v for v in fused if v is not None]]

    def f(x, *slots):
        return routed_mlp(x, split_fused(fused._replace(**dict(zip(
            [k for k, v in fused._asdict().items() if v is not None], slots))), spec), spec, every, seed=7)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)
