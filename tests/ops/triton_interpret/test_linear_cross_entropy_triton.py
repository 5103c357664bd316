"""The chunked loss's Triton path (one kernel per chunk for the loss and d(logits), the CUDA default)
against the dense reference, run by the interpreter: loss, returned logits and every gradient at awkward
shapes, each reduction, label smoothing, ignored rows, bf16; and its launches per chunk. Runs only under
TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_linear_cross_entropy_op import grads_of, make  # noqa: E402

from spt_compile.sparse_ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from spt_compile.sparse_ops.linear_cross_entropy.reference import linear_cross_entropy_reference  # noqa: E402
from spt_compile.testing import Census  # noqa: E402

CASES = [  # lead dims, d, V, chunk
    ((2, 13), 24, 101, 7),  # V prime, chunk does not divide 26 tokens
    ((1, 1), 16, 37, 4),  # one token
    ((3, 7), 8, 2500, 8),  # three steps of 1024 along a row, the last one partial
]


def _check(got, want, tol=1e-5):
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol, equal_nan=True)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1])
    for g, w, name in zip(got[2], want[2], "hWb"):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, atol=tol, rtol=10 * tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("lead,d,V,chunk", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("precompute", [True, False], ids=["grads-in-forward", "recompute"])
def test_triton_path_matches_dense(lead, d, V, chunk, reduction, smoothing, precompute):
    h, W, b, labels = make(lead, d, V, torch.float32, bias=True)
    if reduction == "none" and precompute:  # d(W) needs a scalar loss to be formed in forward
        W.requires_grad_(False)
        b.requires_grad_(False)
    upstream = torch.rand(labels.numel()) if reduction == "none" else torch.tensor(1.7)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, upstream, None, **kw)
    got = grads_of(linear_cross_entropy, h, W, b, labels, upstream, None, chunk=chunk, precompute=precompute,
                   impl="triton", **kw)
    _check(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored(reduction):
    h, W, b, labels = make((3, 5), 8, 29, torch.float32, bias=False, ignored=1.0)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.0), None, reduction=reduction)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.0), None, reduction=reduction, chunk=4,
                   impl="triton")
    _check(got, want)  # mean: nan loss, as torch; zero gradients, not nan


def test_returned_logits_keep_their_values():
    """With the logits returned, d(logits) goes to a buffer of its own, not over them: the returned
    logits are the dense linear's, and a gradient through them still reaches h, W and b."""
    h, W, b, labels = make((2, 9), 16, 53, torch.float32, bias=True)
    logits_grad = torch.randn(2, 9, 53)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.0), logits_grad, return_logits=True)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.0), logits_grad, chunk=5,
                   return_logits=True, impl="triton")
    _check(got, want)


def test_bf16_is_as_close_to_fp32_as_the_torch_path():
    """bf16 h and W: the kernel writes d(logits) in bf16 for the GEMMs, as the torch path casts it; its
    gradients are about as close to an fp32 computation as the torch path's. The interpreter casts fp32
    to bf16 by truncation whatever rounding the kernel asks for (measured: twice the mean error of
    torch's round-to-nearest), a GPU rounds to nearest; hence 2x here, not 1x."""
    h, W, b, labels = make((4, 33), 64, 517, torch.bfloat16, bias=False)
    h32, W32 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    exact = grads_of(linear_cross_entropy_reference, h32, W32, None, labels, torch.tensor(1.0), None)
    torch_path = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.0), None, chunk=32, impl="torch")
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.0), None, chunk=32, impl="triton")
    torch.testing.assert_close(got[0], torch_path[0], atol=1e-4, rtol=1e-4)
    for g, t, e, name in zip(got[2][:2], torch_path[2][:2], exact[2][:2], "hW"):
        assert g.dtype == torch.bfloat16
        err_got, err_torch = (g.float() - e).norm(), (t.float() - e).norm()
        assert err_got <= 2.0 * err_torch + 1e-6, (name, err_got.item(), err_torch.item())


def test_a_chunk_is_three_launches_and_nothing_syncs():
    """Per chunk of a training call: the logits GEMM, the loss kernel and d(h)'s GEMM (W frozen, as in
    LoRA tuning); the backward scales the forward's d(h). No sync, and the same launches per chunk at
    two token counts."""
    def launches(T):
        h, W, _, labels = make((T,), 16, 300, torch.float32, bias=False)
        W.requires_grad_(False)
        with Census() as c:
            loss, _ = linear_cross_entropy(h, W, None, labels, chunk=8, impl="triton")
            loss.backward()
        assert c.syncs == 0, c.summary()
        return c.launches

    small, large = launches(16), launches(48)  # 2 and 6 chunks
    assert large - small == 4 * 3, (small, large)


def test_loss_impl_option_through_torch_compile(monkeypatch):
    """`loss_impl="triton"` reaches the op through the loss pass: a tiny LLaMA with a prompt not trained
    on gives the dense model's loss, logits and every gradient, and the kernel ran once per chunk."""
    import copy

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "passes"))
    from test_loss_pass import EVERY, hf_run, tiny_llama

    from spt_compile.sparse_ops.linear_cross_entropy import chunked

    calls = []
    kernel = chunked.chunk_cross_entropy_triton
    monkeypatch.setattr(chunked, "chunk_cross_entropy_triton", lambda *a: calls.append(1) or kernel(*a))
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (2, 13), generator=gen)
    labels = ids.clone()
    labels[1, :4] = -100
    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="spt", options={**EVERY, "loss_impl": "triton", "compiler": "aot_eager"})
    got = hf_run(compiled, ids, labels)
    want = hf_run(ref, ids, labels)
    assert len(calls) == 6, calls  # 26 tokens in chunks of 5
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert set(got[2]) == set(want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=5e-5, rtol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("factor", [dict(logit_mul=0.0625), dict(logit_div=1.6), dict(logit_softcap=2.0)],
                         ids=["mul", "div", "softcap"])
def test_constant_factor_on_the_logits(factor):
    """Cohere's / Granite's factor on the logits: scaled before the kernel reads them, and in its row scale."""
    h, W, b, labels = make((2, 13), 24, 101, torch.float32, bias=True)
    logits_grad = torch.randn(2, 13, 101)
    want = grads_of(linear_cross_entropy_reference, h, W, b, labels, torch.tensor(1.7), logits_grad,
                    return_logits=True, **factor)
    got = grads_of(linear_cross_entropy, h, W, b, labels, torch.tensor(1.7), logits_grad, chunk=7,
                   return_logits=True, impl="triton", **factor)
    _check(got, want)
