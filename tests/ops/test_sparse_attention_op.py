"""spt_compile.ops.sparse_attention against its plain reference: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from spt_compile.ops import sparse_attention, sparse_attention_reference
from spt_compile.sparse_ops.attention.token_sparse import sparse_attention_backward, sparse_attention_forward


def random_indices(B, H, N, Nk, L, causal: bool, unused: float, gen) -> torch.Tensor:
    """L distinct key positions per row (causal: not after the row), a share of slots -1."""
    scores = torch.rand(B, H, N, Nk, generator=gen)
    if causal:
        scores = scores.masked_fill(torch.arange(Nk).view(1, -1) > torch.arange(N).view(-1, 1), -1.0)
    vals, idx = scores.topk(min(L, Nk), dim=-1)
    idx = idx.masked_fill(vals < 0, -1)
    idx = idx.masked_fill(torch.rand(idx.shape, generator=gen) < unused, -1)
    return idx.to(torch.int32)


def check_against_reference(B, H, Hkv, N, D, L, causal=True, unused=0.2, seed=0, atol=2e-5):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True)
    idx = random_indices(B, H, N, N, L, causal, unused, gen)
    dout = torch.randn(B, H, N, D, generator=gen)

    out = sparse_attention(q, k, v, idx)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = sparse_attention_reference(q, k, v, idx)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)

    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    return out, idx


@pytest.mark.parametrize("N", [1, 17, 100, 257])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("H,Hkv", [(1, 1), (3, 1)])
def test_matches_reference(N, D, H, Hkv):
    check_against_reference(B=2, H=H, Hkv=Hkv, N=N, D=D, L=max(1, N // 3), causal=True)


def test_soft_capped_scores_match_reference():
    """Gemma-2's cap * tanh(scores / cap) before the bias: outputs and gradients through the cap's slope,
    with scores scaled up past the cap's linear range."""
    gen = torch.Generator().manual_seed(6)
    B, H, Hkv, N, D, cap = 2, 6, 2, 70, 64, 2.0
    q = (6.0 * torch.randn(B, H, N, D, generator=gen)).requires_grad_()
    k, v = (torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True) for _ in range(2))
    idx = random_indices(B, H, N, N, 20, True, 0.2, gen)
    dout = torch.randn(B, H, N, D, generator=gen)
    out = sparse_attention(q, k, v, idx, D**-0.5, softcap=cap)  # the public op, through its autograd
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = sparse_attention_reference(q, k, v, idx, D**-0.5, softcap=cap)
    uncapped = sparse_attention_reference(q, k, v, idx, D**-0.5)
    assert (ref - uncapped).abs().max() > 0.1, "the cap must change the output"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="softcap must be 0 .* or a positive finite number; got -1.0"):
        sparse_attention(q, k, v, idx, softcap=-1.0)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dims", [(1, 6, 50, 50), (2, 1, 50, 50), (2, 1, 1, 50)], ids=["1H", "B1", "B11"])
def test_learned_bias_gradient_matches_a_dense_reference(dims):
    """A learned additive bias, read at the listed keys: backward returns d(bias), the score gradient at
    those keys summed over the bias's broadcast dims (here against autograd through a dense softmax
    restricted to the listed keys)."""
    gen = torch.Generator().manual_seed(8)
    B, H, Hkv, N, D = 2, 6, 2, 50, 32
    q, k, v = (torch.randn(B, h, N, D, generator=gen, requires_grad=True) for h in (H, Hkv, Hkv))
    bias = torch.randn(dims, generator=gen, requires_grad=True)
    idx = random_indices(B, H, N, N, 12, False, 0.2, gen)
    listed = torch.zeros(B, H, N, N + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, N, idx).long(), True)
    s = q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) * D**-0.5 + bias
    p = torch.softmax(s.masked_fill(~listed[..., :N], float("-inf")), -1).nan_to_num(0.0)
    ref = p @ v.repeat_interleave(H // Hkv, 1)
    dout = torch.randn(ref.shape, generator=gen)
    want = torch.autograd.grad(ref, (q, k, v, bias), dout)
    out, lse = sparse_attention_forward(q.detach(), k.detach(), v.detach(), idx, D**-0.5, bias.detach())
    got = sparse_attention_backward(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, D**-0.5, bias.detach(),
                                    bias_grad=True)
    assert got[3].shape == bias.shape and want[3].abs().max() > 0.01
    for name, g, r in zip(("q", "k", "v", "bias"), got, want):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_bidirectional_gqa_long():
    check_against_reference(B=1, H=6, Hkv=2, N=1000, D=80, L=37, causal=False, unused=0.1)


def test_every_key_listed_equals_dense_attention():
    """The degenerate pattern (every allowed key listed) is exact causal attention."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hkv, N, D = 2, 9, 3, 33, 64
    q, k, v = (torch.randn(B, h, N, D, generator=gen, requires_grad=True) for h in (H, Hkv, Hkv))
    allowed = torch.arange(N).view(1, -1) <= torch.arange(N).view(-1, 1)
    idx = torch.where(allowed, torch.arange(N).view(1, -1), -1).expand(B, H, N, N).to(torch.int32)
    out = sparse_attention(q, k, v, idx)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    gd = torch.autograd.grad(dense, (q, k, v), dout)
    for a, b in zip(g, gd):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_rows_without_keys_give_zeros_not_nan():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 64, generator=gen, requires_grad=True) for _ in range(3))
    idx = random_indices(1, 2, 5, 5, 3, True, 0.0, gen)
    idx[:, :, 2] = -1  # row 2 lists nothing
    out = sparse_attention(q, k, v, idx)
    assert torch.isfinite(out).all()
    assert out[:, :, 2].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:, :, 2].abs().max() == 0


def test_dropout_backward_is_consistent():
    """Forward and backward draw the same dropout mask: gradcheck in float64 passes."""
    gen = torch.Generator().manual_seed(2)
    B, H, Hkv, N, D = 1, 2, 1, 7, 8
    q, k, v = (torch.randn(B, h, N, D, generator=gen, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    idx = random_indices(B, H, N, N, 4, True, 0.0, gen)

    class WithDropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = sparse_attention_forward(q, k, v, idx, 0.3, None, 0.4, 1234)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            return sparse_attention_backward(dout, q, k, v, idx, out, lse, 0.3, None, 0.4, 1234)

    assert torch.autograd.gradcheck(WithDropout.apply, (q, k, v), eps=1e-6, atol=1e-5)
    a = WithDropout.apply(q, k, v)
    b, _ = sparse_attention_forward(q, k, v, idx, 0.3, None, 0.0, 0)
    assert not torch.allclose(a, b), "dropout had no effect"


def test_additive_bias_is_read_at_selected_keys():
    gen = torch.Generator().manual_seed(4)
    B, H, N, D = 1, 2, 9, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    bias = torch.randn(B, 1, N, N, generator=gen)
    idx = random_indices(B, H, N, N, 5, False, 0.0, gen)
    out, _ = sparse_attention_forward(q, k, v, idx, 0.25, bias)
    allowed = torch.zeros(B, H, N, N, dtype=torch.bool).scatter_(-1, idx.long(), True)
    s = (q @ k.transpose(-1, -2)) * 0.25 + bias
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_custom_op_registration_is_sound():
    """torch.library.opcheck: schema, fake kernel and autograd registration agree with the kernel."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3, 6, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 6, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 6, 16, generator=gen, requires_grad=True)
    idx = random_indices(1, 3, 6, 6, 3, True, 0.1, gen)
    torch.library.opcheck(torch.ops.spt.sparse_attention.default, (q, k, v, idx, 0.25))


def test_bad_inputs_are_named():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sparse_attention(q, k, k, torch.zeros(1, 3, 4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices must be"):
        sparse_attention(q, q, q, torch.zeros(1, 3, 5, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer"):
        sparse_attention(q, q, q, torch.zeros(1, 3, 4, 2))
