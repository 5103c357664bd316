"""Property-based tests (hypothesis): the sparse ops against their plain references over random
shapes, GQA ratios, masks, causal or not, densities, token counts and block choices: outputs and
gradients. The attention references compute in float32 (so the tolerances are float32's); the
routed FFN runs in float64 against a reference in the input dtype, so a mismatch there is a bug and
not rounding. A few dozen examples each (CI runs them on 2 CPU cores)."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spt_compile.ops import MlpSpec, MlpWeights, routed_mlp, routed_mlp_reference, sparse_attention
from spt_compile.ops import sparse_attention_reference
from spt_compile.sparse_ops.attention import pq
from spt_compile.sparse_ops.attention.select import blocks_per_query, select_key_blocks
from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward_torch, block_sparse_forward_torch
from spt_compile.sparse_ops.attention.reference import block_sparse_attention_reference
from spt_compile.sparse_ops.routed_mlp import ACTIVATIONS

# SPT_HYPOTHESIS_EXAMPLES=500 for a deeper search than CI's
PROPERTY = settings(max_examples=int(os.environ.get("SPT_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64
TOL = dict(atol=1e-9, rtol=1e-7)  # routed FFN, float64
ATT = torch.float32
ATOL = dict(atol=3e-5, rtol=1e-4)  # attention: the references compute in float32
MASKS = [None, "pad-additive", "pad-bool", "bool", "additive"]


# --- attention cases --------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, max_n=70):
    """Shapes, GQA ratio, mask kind, causal flag and a seed; tensors come from the seed."""
    return dict(
        B=draw(st.integers(1, 2)), Hkv=draw(st.integers(1, 2)), G=draw(st.sampled_from([1, 2, 3])),
        N=draw(st.integers(1, max_n)), D=draw(st.sampled_from([8, 16, 24])),
        causal=draw(st.booleans()), mask=draw(st.sampled_from(MASKS)), seed=draw(st.integers(0, 2**31 - 1)),
        pad=draw(st.integers(0, max_n)),  # padded keys at the end of the last sequence
    )


def make_attention(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, N, D = c["B"], c["Hkv"] * c["G"], c["Hkv"], c["N"], c["D"]
    q = torch.randn(B, H, N, D, generator=gen, dtype=ATT, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, dtype=ATT, requires_grad=True) for _ in range(2))
    real = torch.ones(B, N, dtype=torch.bool)
    real[-1, N - min(c["pad"], N - 1):] = False  # never a sequence of padding only
    kind = c["mask"]
    if kind is None:
        mask = None
    elif kind == "pad-additive":  # HF's extended mask: 0 / finfo.min, [B, 1, 1, N]
        mask = torch.zeros(B, 1, 1, N, dtype=ATT).masked_fill(~real[:, None, None], torch.finfo(ATT).min)
    elif kind == "pad-bool":
        mask = real[:, None, None, :]
    elif kind == "bool":  # an explicit mask; some rows may allow nothing
        mask = (torch.rand(B, 1, N, N, generator=gen) > 0.3) & real[:, None, None, :]
    else:  # additive with a real bias and forbidden (-inf) entries
        mask = 0.5 * torch.randn(B, 1, N, N, generator=gen, dtype=ATT)
        mask = mask.masked_fill(torch.rand(B, 1, N, N, generator=gen) < 0.2, float("-inf"))
        mask = mask.masked_fill(~real[:, None, None], torch.finfo(ATT).min)
    return q, k, v, mask, real, gen


def allowed_keys(c, mask, N) -> torch.Tensor:
    """[B, 1, N, N] bool: what exact attention lets each query see."""
    allowed = torch.ones(1, 1, N, N, dtype=torch.bool)
    if c["causal"]:
        allowed = allowed & torch.tril(torch.ones(N, N, dtype=torch.bool))
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > pq.MASK_FORBIDDEN_AT_OR_BELOW)
    return allowed


def dense_masked_attention(q, k, v, allowed, bias, scale):
    """softmax(q k^T * scale + bias) v over the allowed keys; rows with none give zeros."""
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    if bias is not None and bias.dtype != torch.bool:
        s = s + bias
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ v.repeat_interleave(G, 1)


def random_block_lists(B, S, n_qb, n_kb, Lb, gen):
    picked = torch.rand(B, S, n_qb, n_kb, generator=gen).argsort(-1)[..., :Lb]
    idx = torch.full((B, S, n_qb, Lb), -1, dtype=torch.int64)
    idx[..., : picked.shape[-1]] = picked
    idx[torch.rand(idx.shape, generator=gen) < 0.25] = -1
    return idx.to(torch.int32)


def assert_grads(got, want):
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, **ATOL, msg=lambda m: f"d{name}: {m}")


# --- block-sparse attention: the torch path against reference.py -----------------------------------------


@PROPERTY
@given(c=attention_cases(), blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]), grouped=st.booleans(),
       lb=st.integers(1, 6))
def test_block_sparse_torch_matches_reference_on_any_block_lists(c, blocks, grouped, lb):
    q, k, v, mask, _, gen = make_attention(c)
    bm, bn = blocks
    B, H, N = q.shape[:3]
    n_qb, n_kb = -(-N // bm), -(-N // bn)
    idx = random_block_lists(B, c["Hkv"] if grouped else H, n_qb, n_kb, lb, gen)
    scale = c["D"] ** -0.5
    out, lse = block_sparse_forward_torch(q.detach(), k.detach(), v.detach(), idx, scale, c["causal"], mask, bm, bn)
    ref = block_sparse_attention_reference(q, k, v, idx, scale, c["causal"], mask, bm, bn)
    torch.testing.assert_close(out, ref, **ATOL)
    dout = torch.randn(ref.shape, generator=gen, dtype=ATT)
    got = block_sparse_backward_torch(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, scale, c["causal"],
                                      mask, bm, bn)
    assert_grads(got, torch.autograd.grad(ref, (q, k, v), dout))


@PROPERTY
@given(c=attention_cases(), density=st.floats(0.05, 1.0), grouped=st.booleans())
def test_block_selection_at_any_density_is_exact_attention_over_what_it_lists(c, density, grouped):
    """The site's path: selection by density, then the torch kernel. Whatever is listed is attended
    exactly; at density 1.0 everything a query may see is listed (= dense masked attention)."""
    q, k, v, mask, real, gen = make_attention(c)
    bm = bn = 16
    N = q.shape[2]
    n_kb = -(-N // bn)
    if mask is None:  # no mask: every key is real
        real = torch.ones_like(real)
    elif mask.shape[2] != 1:  # as the site derives it: keys some query may see
        real = pq.real_key_mask(mask, q.shape[0], N)
    lb = blocks_per_query(real.sum(-1), density, None, bn, n_kb)
    idx = select_key_blocks(q.detach(), k.detach(), 0.3, lb, c["causal"], mask, real, bm, bn, per_group=grouped)
    out, lse = block_sparse_forward_torch(q.detach(), k.detach(), v.detach(), idx, 0.3, c["causal"], mask, bm, bn)
    ref = block_sparse_attention_reference(q, k, v, idx, 0.3, c["causal"], mask, bm, bn)
    torch.testing.assert_close(out, ref, **ATOL)
    dout = torch.randn(ref.shape, generator=gen, dtype=ATT)
    got = block_sparse_backward_torch(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, 0.3, c["causal"],
                                      mask, bm, bn)
    assert_grads(got, torch.autograd.grad(ref, (q, k, v), dout))
    if density == 1.0:
        dense = dense_masked_attention(q, k, v, allowed_keys(c, mask, N), mask, 0.3)
        torch.testing.assert_close(out, dense.detach(), **ATOL)


# --- token-level sparse attention --------------------------------------------------------------------------


@PROPERTY
@given(c=attention_cases(max_n=40), L=st.integers(1, 45), factor=st.floats(0.25, 2.0))
def test_token_sparse_attention_matches_reference(c, L, factor):
    q, k, v, _, _, gen = make_attention(c)
    scale = factor * c["D"] ** -0.5  # around the usual 1/sqrt(D): sharper softmaxes are float32 rounding tests
    B, H, N = q.shape[:3]
    scores = torch.rand(B, H, N, N, generator=gen)
    if c["causal"]:
        scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -1.0)
    vals, idx = scores.topk(min(L, N), dim=-1)
    idx = idx.masked_fill((vals < 0) | (torch.rand(idx.shape, generator=gen) < 0.2), -1).to(torch.int32)
    out = sparse_attention(q, k, v, idx, scale)
    ref = sparse_attention_reference(q, k, v, idx, scale)
    torch.testing.assert_close(out, ref, **ATOL)
    dout = torch.randn(ref.shape, generator=gen, dtype=ATT)
    assert_grads(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout))


@PROPERTY
@given(c=attention_cases(max_n=40))
def test_token_selection_with_every_real_key_is_dense_masked_attention(c):
    """density 1.0 in token mode: L = the sequence's real length selects exactly the keys each query
    may see (causal, mask, padding), and attention over them is dense masked attention."""
    q, k, v, mask, real, _ = make_attention(c)
    N = q.shape[2]
    lengths = real.sum(-1) if mask is not None else torch.full((q.shape[0],), N)
    idx = pq.select_keys(q.detach(), k.detach(), 0.25, pq.keys_per_query(lengths, 1.0, None), c["causal"], mask)
    allowed = allowed_keys(c, mask, N).expand(q.shape[0], q.shape[1], N, N)
    chosen = torch.zeros(*idx.shape[:3], N + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(idx < 0, N, idx.long()), True)
    assert torch.equal(chosen[..., :N], allowed), "selection at density 1 must be exactly the allowed keys"
    bias = mask if mask is not None and mask.dtype != torch.bool else None
    from spt_compile.sparse_ops.attention.token_sparse import sparse_attention_forward

    out, _ = sparse_attention_forward(q.detach(), k.detach(), v.detach(), idx, 0.25, bias)
    torch.testing.assert_close(out, dense_masked_attention(q, k, v, allowed, bias, 0.25).detach(), **ATOL)


# --- routed FFN ---------------------------------------------------------------------------------------


@st.composite
def ffn_cases(draw):
    n_blocks = draw(st.integers(1, 5))
    return dict(
        T=draw(st.integers(0, 24)), d_in=draw(st.integers(1, 12)), d_out=draw(st.integers(1, 12)),
        n_blocks=n_blocks, hidden=draw(st.integers(n_blocks, 30)), gated=draw(st.booleans()),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        layouts=draw(st.tuples(*[st.sampled_from(["oi", "io"])] * 3)), bias=draw(st.booleans()),
        lora=draw(st.frozensets(st.sampled_from(["in", "gate", "out"]))),
        blocks=draw(st.sampled_from(["random", "empty block", "all in one block", "every block", "some tokens none"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_ffn(c):
    gen = torch.Generator().manual_seed(c["seed"])
    F_, r = c["hidden"], 3

    def weight(o, i, layout):
        w = torch.randn(o, i, generator=gen, dtype=F64) / i**0.5
        return (w if layout == "oi" else w.t().contiguous()).requires_grad_()

    def slots(name, i, o, layout):
        b = (0.1 * torch.randn(o, generator=gen, dtype=F64)).requires_grad_() if c["bias"] else None
        a = bb = None
        if name in c["lora"]:
            a = torch.randn(r, i, generator=gen, dtype=F64).requires_grad_()
            bb = (0.1 * torch.randn(o, r, generator=gen, dtype=F64)).requires_grad_()
        return dict(**{f"{name}_w": weight(o, i, layout), f"{name}_b": b, f"{name}_a": a, f"{name}_bb": bb})

    lin, lgate, lout = c["layouts"]
    w = {**slots("in", c["d_in"], F_, lin), **slots("out", F_, c["d_out"], lout)}
    if c["gated"]:
        w.update(slots("gate", c["d_in"], F_, lgate))
    spec = MlpSpec(c["activation"], c["gated"], F_, c["n_blocks"], in_layout=lin, gate_layout=lgate, out_layout=lout,
                   in_scale=0.5, gate_scale=2.0, out_scale=1.5)
    T, nb = c["T"], c["n_blocks"]
    x = torch.randn(T, c["d_in"], generator=gen, dtype=F64, requires_grad=True)
    mask = torch.rand(T, nb, generator=gen) < 0.5
    if c["blocks"] == "empty block":
        mask[:, -1] = False
    elif c["blocks"] == "all in one block":
        mask[:] = False
        mask[:, int(torch.randint(nb, (1,), generator=gen))] = True
    elif c["blocks"] == "every block":
        mask[:] = True
    elif c["blocks"] == "some tokens none":
        mask[::2] = False
    return x, MlpWeights(**w), spec, mask, gen


@PROPERTY
@given(c=ffn_cases())
def test_routed_ffn_matches_per_token_reference(c):
    x, w, spec, mask, gen = make_ffn(c)
    y = routed_mlp(x, w, spec, mask)
    ref = routed_mlp_reference(x, w, spec, mask)
    torch.testing.assert_close(y, ref, **TOL)
    if c["T"] == 0:  # no tokens: an empty output (the reference's has no graph to differentiate)
        assert y.shape == (0, c["d_out"])
        return
    leaves = [x] + [t for t in w if t is not None]
    names = ["x"] + [n for n, t in w._asdict().items() if t is not None]
    dy = torch.randn(ref.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, dy, allow_unused=True)
    for name, g, r in zip(names, got, want):
        if r is None:  # e.g. nothing routed through the weights
            assert g is None or g.abs().max() == 0, name
        else:
            torch.testing.assert_close(g if g is not None else torch.zeros_like(r), r, **TOL,
                                       msg=lambda m: f"grad of {name}: {m}")
