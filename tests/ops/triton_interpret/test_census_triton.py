"""The GPU path's host overhead (Triton kernels, run by the interpreter): launches per call do not
grow with the sequence, and no call syncs. Runs only under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from spt_compile.testing import Census

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_census import _census, _compiled, _inputs  # noqa: E402
from toy_models import SPARSE_AT_EVERY_LENGTH


def _steady_launches(N: int, block: int, form: str = "causal", B: int = 1) -> int:
    """Launches of a training call of the Triton path at length N after two warm calls; no sync. With
    a mask, a first counted call analyses it (one transfer) and the call counted is a later one on the
    same mask, as every layer after the first of a step."""
    compiled = _compiled("triton", block=block)
    for _ in range(2):
        q, k, v, mask, causal = _inputs(form, B, N)
        compiled(q, k, v, mask, causal).sum().backward()
    q, k, v, mask, causal = _inputs(form, B, N)
    if mask is not None:
        first = _census(compiled, q, k, v, mask, causal, training=True)
        assert first.syncs <= 1, first.summary()
    c = _census(compiled, q, k, v, mask, causal, training=True)
    assert c.syncs == 0, c.summary()
    return c.launches


def test_triton_cross_attention_launches_do_not_grow_and_sync_nothing():
    """Queries of one sequence over another's padded keys ([B, 1, 1, Nk] mask, Nq = Nk / 2) on the GPU
    path: the same launches at two lengths, no sync once the mask has been analysed."""
    launches = {N: _steady_launches(N, 32, "cross", B=2) for N in (128, 256)}
    assert launches[128] == launches[256], launches


def test_triton_attention_launches_do_not_grow_with_the_sequence():
    """The GPU path (Triton kernels): forward + backward of a causal training call launch the same
    number of kernels at every length, and sync nothing."""
    launches = {N: _steady_launches(N, 32) for N in (128, 256)}
    assert launches[128] == launches[256], launches
    # exact forward (1) + pooling and selection (2); backward: dq with delta (1), dk/dv reading the
    # lists directly, one program per key block at these lengths (1: no fp32 buffers to fill or cast).
    # 13 before the reverse index and the delta kernel were folded in and the all-true `real` mask
    # was dropped, 7 with the split dk/dv's two zero fills.
    assert launches[128] <= 5, launches


def test_long_rows_stay_on_triton_without_sync(monkeypatch):
    """Past the key blocks one selection program holds (256, lowered to 16 here so the interpreter
    can run it), the selection stays on Triton (_long_score_kernel + one top-k): still no sync, and
    the same launches at two lengths that are both past the limit."""
    from spt_compile.sparse_ops.attention import select_triton

    monkeypatch.setattr(select_triton, "MAX_KEY_BLOCKS", 16)
    ran = []
    long_kernel = select_triton._select_long
    monkeypatch.setattr(select_triton, "_select_long", lambda *a: ran.append(1) or long_kernel(*a))
    launches = {N: _steady_launches(N, 16) for N in (288, 416)}  # 18 and 26 key blocks of 16
    assert ran, "the long-row selection ran"
    assert launches[288] == launches[416], launches


class _AttentionThenProjection(torch.nn.Module):
    """Attention whose output is transposed back to [B, N, H * D] for a projection, as models do: its
    gradient reaches the attention op as a strided view."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6 * 32, 16)

    def forward(self, q, k, v, mask, is_causal: bool):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        B, H, N, D = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, H * D))


class _Copies(TorchDispatchMode):
    """Shapes of the copies (clone, copy_, contiguous) dispatched, inside compiled code too."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    @classmethod
    def ignore_compile_internals(cls):
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
            self.shapes.append(tuple(out.shape))
        return out


def test_triton_backward_takes_the_strided_output_gradient_without_a_copy():
    """The output gradient a model hands back is a transposed view; the Triton kernels read it through
    its strides, so the backward makes no [B, H, N, D] copy of it (the PyTorch path copies it inside
    the op, where this mode does not look), and the gradients equal the PyTorch path's."""
    grads, copies = {}, {}
    for impl in ("torch", "triton"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _AttentionThenProjection()
        compiled = torch.compile(model, backend="spt", options={
            "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_impl": impl, "attention_block": 32})
        for _ in range(2):
            q, k, v, mask, causal = _inputs("causal", 2, 128)
            compiled(q, k, v, mask, causal).sum().backward()
        q, k, v, mask, causal = _inputs("causal", 2, 128)
        loss = compiled(q, k, v, mask, causal).square().sum()
        with _Copies() as seen:
            loss.backward()
        copies[impl] = seen.shapes
        grads[impl] = (q.grad, k.grad, v.grad, model.proj.weight.grad)
    # before, the autograd wrapper called dout.contiguous(): a clone of this shape in the graph
    assert (2, 6, 128, 32) not in copies["triton"], copies["triton"]
    for a, b in zip(grads["torch"], grads["triton"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_a_whole_gpu_path_step_syncs_twice_at_any_depth():
    """A training step of a tiny HF LLaMA on the GPU path (Triton attention and loss kernels, the
    grouped MLP; padded batch, prompt rows without a loss): 2 syncs at 2 and at 4 layers, the mask's
    analysis and the row counts, none per layer. (The loss backward's check of its logits' gradient
    was a third: the returned logits now leave the graph without one, passes/returned_logits.py.)"""
    pytest.importorskip("transformers")
    from toy_models import tiny_llama_batch

    for layers in (2, 4):
        model, ids, attention, labels = tiny_llama_batch(seq=128, pad_from=100, prompt=40, layers=layers)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="spt", options={
            "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 32, "ffn_impl": "grouped",
            "attention_impl": "triton", "loss_impl": "triton"})
        for _ in range(3):
            compiled(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        with Census() as c:
            compiled(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        assert c.syncs == 2, (layers, c.summary())
        assert c.ops["triton:_bwd_dkdv_kernel"] == layers and c.ops["triton:_ce_rows_kernel"] >= 1, c.ops
