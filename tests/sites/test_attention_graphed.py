"""spt::attention_graphed, the attention op for CUDA graphs (options={"compiler": "inductor", "mode":
"reduce-overhead"}), checked on the CPU for what can be checked without a capture: fixed output shapes
and no CPU output (against the regular op, which has both), no per-call state, the same numbers as
the regular op, and the sites it cannot serve keeping the regular op with the reason in the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

import spt_compile
from toy_models import SPARSE_AT_EVERY_LENGTH

GRAPHED = {"compiler": "inductor", "mode": "reduce-overhead"}


class _Attention(torch.nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, mask, is_causal: bool):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True,
                                              dropout_p=self.dropout if self.training else 0.0)


def _inputs(form: str, N: int = 256):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, N, 32, generator=g, requires_grad=True)
    k = torch.randn(2, 2, N, 32, generator=g, requires_grad=True)
    v = torch.randn(2, 2, N, 32, generator=g, requires_grad=True)
    if form == "causal":
        return q, k, v, None, True
    real = torch.ones(2, N, dtype=torch.bool)
    real[1, 3 * N // 4:] = False  # the second row padded
    return q, k, v, torch.ones(N, N, dtype=torch.bool).tril() & real[:, None, None, :], False


def _run(module, form: str, options: dict):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="spt", options={"calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH,
                                                              "attention_block": 32, **options})
    for _ in range(3):
        q, k, v, mask, causal = _inputs(form)
        compiled(q, k, v, mask, causal).sum().backward()
    q, k, v, mask, causal = _inputs(form)
    out = compiled(q, k, v, mask, causal)
    out.backward(torch.cos(out.detach()))
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("floor", [0, 96])
@pytest.mark.parametrize("form", ["causal", "padded"])
def test_graphed_attention_equals_the_regular_op(form, floor):
    """Same block lists (budgets by the same formula, on the device), same kernels: the same output
    (the exact forward) and the same sparse backward as the regular op; with attention_min_keys too
    (96 keys: 3 blocks of 32 where density 1/8 asks for 1)."""
    want = _run(_Attention(), form, {"attention_min_keys": floor})
    model = _Attention()
    got = _run(model, form, {**GRAPHED, "attention_min_keys": floor})
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    detail = spt_compile.compile_reports(None)[-1].sites[0].detail
    assert "spt::attention_graphed" in detail, detail
    assert spt_compile.report(model) == [], "no per-call state: no site was made"


def test_outputs_have_fixed_shapes_and_stay_on_the_device():
    """Fake tensors on a CUDA device (no GPU needed to trace): the graphed op's outputs have sizes known
    at trace time, all on q's device; the regular op's selection has a run-time size and its meta lives
    on the CPU, which is what keeps CUDA graphs from capturing it."""
    with FakeTensorMode(shape_env=ShapeEnv()):
        q = torch.empty(2, 4, 256, 32, device="cuda")
        k, v = torch.empty(2, 2, 256, 32, device="cuda"), torch.empty(2, 2, 256, 32, device="cuda")
        graphed = torch.ops.spt.attention_graphed(q, k, v, None, True, 0.18, 64, 0.125, -1, 0, True, "auto")
        regular = torch.ops.spt.attention_site(q, k, v, None, None, 0, True, 0.18, 0.0, True)
    assert not any(free_unbacked_symbols(o) for o in graphed)
    assert all(o.device.type == "cuda" for o in graphed)
    assert graphed[2].shape == (2, 2, 4, 1)  # [B, Hkv, query blocks, a full row's budget: 32 keys in 64-blocks]
    assert free_unbacked_symbols(regular[2]) and regular[3].device.type == "cpu"


def test_sites_it_cannot_serve_keep_the_regular_op_and_say_why():
    model = _Attention(dropout=0.1).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH,
                                                             **GRAPHED})
    q, k, v, mask, causal = _inputs("causal")
    compiled(q, k, v, mask, causal).sum().backward()
    detail = spt_compile.compile_reports(None)[-1].sites[0].detail
    assert "the regular op under CUDA graphs: attention dropout" in detail, detail


def test_a_short_sequence_stays_as_traced():
    """Below attention_backward_dense_below (a training call: 1024 keys) the regular op runs exact
    attention; under CUDA graphs that choice is made at trace time, so the SDPA call stays as it was
    (the report says why)."""
    torch._dynamo.reset()
    compiled = torch.compile(_Attention(), backend="spt", options={"calibration_steps": 1, **GRAPHED})
    q, k, v, mask, causal = _inputs("causal")
    out = compiled(q, k, v, mask, causal)
    site = spt_compile.compile_reports(None)[-1].sites[0]
    assert site.status == "dense" and "below attention_backward_dense_below=1024" in site.reason, site
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_a_hugging_face_step_under_reduce_overhead_equals_the_regular_one():
    """A LLaMA with a padded batch and labels, compiled with Inductor in mode="reduce-overhead":
    attention gets the graphed op, the MLPs, the loss and the real-rows op (tagged cudagraph_unsafe)
    run between the captured partitions; the loss and the gradients equal the regular compile's."""
    pytest.importorskip("transformers")
    from toy_models import tiny_llama_batch

    def step(options):
        model, ids, attention, labels = tiny_llama_batch()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="spt", options={"calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH,
                                                                 "attention_block": 32, **options})
        for _ in range(3):
            model.zero_grad()
            loss = compiled(input_ids=ids, attention_mask=attention, labels=labels).loss
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model

    want_loss, want, _ = step({})
    loss, got, model = step(GRAPHED)
    torch.testing.assert_close(loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    sites = [s for r in spt_compile.compile_reports(model) for s in r.sites]
    attention = [s for s in sites if s.kind == "attention"]
    assert len(attention) == 2 and all("spt::attention_graphed" in s.detail for s in attention)
    assert all("real rows from the attention mask" in s.detail for s in sites if s.kind == "mlp")
