"""The chunked linear + cross-entropy op against its dense reference: loss, logits and every gradient
(h, W, bias), at awkward shapes (vocab not a multiple of anything, chunks that do not divide the
tokens, one token, every label ignored), each reduction, label smoothing, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from spt_compile.sparse_ops.linear_cross_entropy import linear_cross_entropy
from spt_compile.sparse_ops.linear_cross_entropy.reference import linear_cross_entropy_reference


def make(lead, d, V, dtype, bias, ignored=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=gen).to(dtype).requires_grad_()
    W = (torch.randn(V, d, generator=gen) * d**-0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    T = h.numel() // d
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[torch.rand(T, generator=gen) < ignored] = -100
    return h, W, b, labels


def grads_of(fn, h, W, b, labels, upstream, logits_grad, **kw):
    for t in (h, W, b):
        if t is not None:
            t.grad = None
    loss, logits = fn(h, W, b, labels, **kw)
    total = (loss.float() * upstream).sum()
    if logits_grad is not None:
        total = total + (logits.float() * logits_grad).sum()
    total.backward()
    return loss.detach().float(), None if logits is None else logits.detach(), [
        None if t is None or t.grad is None else t.grad.clone() for t in (h, W, b)]


CASES = [  # lead dims, d, V, chunk
    ((2, 13), 24, 101, 7),  # V prime, chunk does not divide 26 tokens
    ((1, 1), 16, 37, 4),  # one token
    ((50,), 8, 1000, 64),  # one chunk larger than the tokens
]


@pytest.mark.parametrize("lead,d,V,chunk", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
def test_matches_dense_fp32(lead, d, V, chunk, reduction, smoothing, precompute):
    h, W, b, labels = make(lead, d, V, torch.float32, bias=True)
    if reduction == "none" and precompute:  # d(W) needs a scalar loss to be formed in forward
        W.requires_grad_(False)
        b.requires_grad_(False)
    T = labels.numel()
    upstream = torch.rand(T) if reduction == "none" else torch.tensor(1.7)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, upstream, None, **kw)
    got = grads_of(linear_cross_entropy, h, W, b, labels, upstream, None, chunk=chunk, precompute=precompute, **kw)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got[2], want[2], "hWb"):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
def test_every_label_ignored(reduction, precompute):
    h, W, b, labels = make((3, 5), 8, 29, torch.float32, bias=False, ignored=1.0)
    W.requires_grad_(not (precompute and reduction == "none"))
    upstream = torch.ones(15) if reduction == "none" else torch.tensor(1.0)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, upstream, None, reduction=reduction)
    got = grads_of(linear_cross_entropy, h, W, b, labels, upstream, None, reduction=reduction, chunk=4,
                   precompute=precompute)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)  # mean: nan, as torch
    for g, w in zip(got[2][:2], want[2][:2]):
        torch.testing.assert_close(g, w)  # zero gradients, not nan


@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
def test_returned_logits_and_their_gradient(precompute):
    """A model that returns its logits gets them from the op; a gradient through them (a second loss
    on the logits) reaches h and W exactly as through the dense linear."""
    h, W, b, labels = make((2, 9), 16, 53, torch.float32, bias=True)
    logits_grad = torch.randn(2, 9, 53)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.0), logits_grad, return_logits=True)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.0), logits_grad, chunk=5, return_logits=True,
                   precompute=precompute)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["prompt", "label-per-row"])
@pytest.mark.parametrize("return_logits", [False, True], ids=["loss-only", "logits-returned"])
@pytest.mark.parametrize("trained_head", [False, True], ids=["frozen-head", "trained-head"])
def test_prompt_rows_get_no_softmax_and_no_gradient_gemm(monkeypatch, return_logits, trained_head, layout):
    """Rows without a loss (a prompt before each answer, padding after it) are left out of the chunks'
    softmax and d(h) GEMMs: those GEMMs see the loss rows only, while loss, returned logits (every
    row) and every gradient still equal the dense reference. Long runs of loss rows are cut into
    slices of at most `chunk` rows (views); short ones (one label a row) are pooled into gathered chunks."""
    import spt_compile.sparse_ops.linear_cross_entropy.chunked as chunked

    h, W, b, labels = make((3, 20), 16, 61, torch.float32, bias=True, ignored=0.0)
    W.requires_grad_(trained_head)
    b.requires_grad_(trained_head)
    rows = labels.view(3, 20)
    if layout == "prompt":
        rows[:, :9] = -100  # the prompt
        rows[1, 15:] = -100  # padding after a short answer
        chunk_rows = [5, 6, 6, 5, 6]  # runs of 11, 6 and 11 loss rows, each cut into near-equal slices
    else:
        rows[:, :-1] = -100  # one label a row, at its end
        chunk_rows = [3]  # three runs of 1 row, pooled into one gathered chunk
    n_loss = int((labels != -100).sum())
    seen = []
    backprop = chunked._backprop_chunk
    monkeypatch.setattr(chunked, "_backprop_chunk", lambda g, hc, *a: (seen.append(g.shape[0]), backprop(g, hc, *a)))
    logits_grad = torch.zeros(3, 20, 61) if return_logits else None  # as AOTAutograd hands an unused output
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.3), logits_grad,
                    return_logits=return_logits)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.3), logits_grad, chunk=8,
                   return_logits=return_logits)
    assert seen == chunk_rows and sum(seen) == n_loss, seen  # the loss rows in chunks of <= 8, nothing else
    torch.testing.assert_close(got[0], want[0])
    if return_logits:
        torch.testing.assert_close(got[1], want[1])
    for g, w, name in zip(got[2], want[2], "hWb"):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    assert got[2][0].view(3, 20, 16)[:, :9].abs().max() == 0  # the prompt rows' d(h): exactly zero
    assert got[2][0].view(3, 20, 16)[rows == -100].abs().max() == 0  # every ignored row's d(h)


def test_evaluation_computes_the_loss_rows_only(monkeypatch):
    """Without gradients and without returned logits, only the loss rows' logits are computed."""
    import spt_compile.sparse_ops.linear_cross_entropy.chunked as chunked

    h, W, b, labels = make((2, 12), 8, 40, torch.float32, bias=False, ignored=0.5, seed=3)
    seen = []
    linear_into = chunked._linear_into
    monkeypatch.setattr(chunked, "_linear_into", lambda hc, *a: (seen.append(hc.shape[0]), linear_into(hc, *a))[1])
    with torch.no_grad():
        got, _ = linear_cross_entropy(h, W, b, labels, chunk=5)
        want, _ = linear_cross_entropy_reference(h, W, b, labels)
    assert sum(seen) == int((labels != -100).sum()) < labels.numel(), seen
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
def test_bf16_accumulates_in_fp32(reduction, precompute):
    """bf16 h and W: the loss is computed on the upcast logits as HF does; the chunked gradients are
    at least as close to an fp32 computation as the dense bf16 ones."""
    h, W, b, labels = make((4, 33), 64, 517, torch.bfloat16, bias=False)
    W.requires_grad_(not (precompute and reduction == "none"))
    T = labels.numel()
    upstream = torch.rand(T) if reduction == "none" else torch.tensor(1.0)
    kw = dict(reduction=reduction)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, upstream, None, **kw)
    got = grads_of(linear_cross_entropy, h, W, b, labels, upstream, None, chunk=32, precompute=precompute, **kw)
    h32, W32 = (h.detach().float().requires_grad_(), W.detach().float().requires_grad_(W.requires_grad))
    exact = grads_of(linear_cross_entropy_reference, h32, W32, None, labels, upstream, None, **kw)
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=2e-3)
    for g, w, e, name in zip(got[2][:2], want[2][:2], exact[2][:2], "hW"):
        if w is None:
            continue
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"d{name}: {m}")
        err_got, err_dense = (g.float() - e).norm(), (w.float() - e).norm()
        assert err_got <= 1.5 * err_dense + 1e-6, (name, err_got, err_dense)


@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
def test_saves_no_token_by_vocab_tensor(precompute):
    h, W, b, labels = make((2, 64), 32, 4096, torch.float32, bias=False)
    T, V = 128, 4096
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, logits = linear_cross_entropy(h, W, b, labels, chunk=16, return_logits=True, precompute=precompute)
    assert max(sizes) == V * 32 < T * V, sizes  # W [V, d] by reference, h and dh [T, d], labels, lse: nothing T x V
    loss.backward()


def test_bad_inputs_are_named():
    h, W, b, labels = make((2, 3), 8, 11, torch.float32, bias=False)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, W, b, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, W, b, labels, chunk=0)
    with pytest.raises(ValueError, match="W must be"):
        linear_cross_entropy(h, W.T, b, labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, W, b, labels[:3])
    with pytest.raises(ValueError, match="precompute"):
        linear_cross_entropy(h, W, b, labels, reduction="none", precompute=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(h, W, b, labels, impl="cuda")


def test_triton_impl_on_cpu_tensors_is_named(monkeypatch):
    """loss_impl='triton' on CPU tensors (no interpreter) fails before any launch, naming the option."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, W, b, labels = make((2, 3), 8, 11, torch.float32, bias=False)
    with pytest.raises(ValueError, match="loss_impl.*needs CUDA tensors"):
        linear_cross_entropy(h, W, b, labels, impl="triton")


def test_only_the_logits_differentiated():
    h, W, b, labels = make((3, 4), 8, 19, torch.float32, bias=True)
    g = torch.randn(3, 4, 19)
    _, logits = linear_cross_entropy(h, W, b, labels, chunk=5, return_logits=True)
    (logits * g).sum().backward()
    got = [t.grad.clone() for t in (h, W, b)]
    for t in (h, W, b):
        t.grad = None
    (torch.nn.functional.linear(h, W, b) * g).sum().backward()
    for x, t in zip(got, (h, W, b)):
        torch.testing.assert_close(x, t.grad)


@pytest.mark.parametrize("value", [-3.0, 2.0, float("nan")], ids=["negative", "positive", "nan"])
def test_a_single_nonzero_logit_gradient_is_not_skipped(value):
    """Grads in forward skip the logits' GEMMs only when their gradient is all zero (AOTAutograd's
    tangent for logits nobody differentiated); one element of either sign, or a NaN, must reach h."""
    h, W, b, labels = make((2, 9), 16, 53, torch.float32, bias=True)
    logits_grad = torch.zeros(2, 9, 53)
    logits_grad[1, 4, 17] = value
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.0), logits_grad, return_logits=True)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.0), logits_grad, chunk=5, return_logits=True,
                   precompute=True)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_any_nonzero():
    from spt_compile.sparse_ops.linear_cross_entropy.chunked import _any_nonzero

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.zeros(7, 13, dtype=dtype)
        assert not _any_nonzero(t)
        t[3, 5] = -0.0
        assert not _any_nonzero(t)
        for v in (1e-30 if dtype == torch.float32 else 1e-3, -2.0, float("nan"), float("-inf")):
            u = t.clone()
            u[6, 12] = v
            assert _any_nonzero(u), (dtype, v)


@pytest.mark.parametrize("factor", [dict(logit_mul=0.0625), dict(logit_div=1.6), dict(logit_mul=3.0, logit_div=2.0),
                                    dict(logit_softcap=2.0), dict(logit_mul=2.0, logit_softcap=1.5)],
                         ids=["cohere-mul", "granite-div", "both", "gemma2-softcap", "factor-and-softcap"])
@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_factor_on_the_logits(factor, precompute, dtype):
    """Cohere's logits * logit_scale, Granite's logits / logits_scaling, Gemma-2's soft-capping: loss, the
    returned logits and every gradient, with a gradient through the logits too, as the dense form gives them."""
    h, W, b, labels = make((3, 11), 16, 203, dtype, bias=True)
    logits_grad = torch.randn(3, 11, 203)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.3), logits_grad,
                    return_logits=True, **factor)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.3), logits_grad, chunk=8,
                   return_logits=True, precompute=precompute, **factor)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)  # the scaled logits
        for g, w, name in zip(got[2], want[2], "hWb"):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    else:  # bf16: as close to an fp32 computation as the dense bf16 form is
        torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=2e-2)
        exact = grads_of(linear_cross_entropy_reference, *(t.detach().float().requires_grad_() for t in (h, W, b)),
                         labels, torch.tensor(1.3), logits_grad, return_logits=True, **factor)
        for g, w, e, name in zip(got[2], want[2], exact[2], "hWb"):
            assert (g.float() - e).norm() <= 1.5 * (w.float() - e).norm() + 1e-6, name
    with pytest.raises(ValueError, match="logit_div must be a finite, non-zero number"):
        linear_cross_entropy(h, W, b, labels, logit_div=0.0)
    with pytest.raises(ValueError, match="logit_softcap must be a finite number >= 0"):
        linear_cross_entropy(h, W, b, labels, logit_softcap=-1.0)
