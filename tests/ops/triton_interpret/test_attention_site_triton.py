"""The attention site through torch.compile(backend="spt") with attention_impl="triton": the Triton
selection and block-sparse kernels (under the interpreter) give the same outputs and gradients as the
torch path on the same compiled model, over several key blocks, in the sparse forward and under
exact_forward. Runs only under TRITON_INTERPRET=1 (tests/ops/test_triton_interpret.py)."""

from __future__ import annotations

import pytest
import torch

import spt_compile
from toy_models import SPARSE_AT_EVERY_LENGTH, GQAAttention


def spy_kernels(monkeypatch) -> dict:
    """Counts the block-sparse Triton forward and backward calls."""
    import spt_compile.sparse_ops.attention.block_sparse_triton as bst

    seen = {"fwd": 0, "bwd": 0}
    fwd, bwd = bst.block_sparse_forward_triton, bst.block_sparse_backward_triton

    def spy_fwd(*a, **k):
        seen["fwd"] += 1
        return fwd(*a, **k)

    def spy_bwd(*a, **k):
        seen["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(bst, "block_sparse_forward_triton", spy_fwd)
    monkeypatch.setattr(bst, "block_sparse_backward_triton", spy_bwd)
    return seen


@pytest.mark.parametrize("exact_forward,softcap", [(False, 0.0), (True, 0.0), (True, 0.5)],
                         ids=["sparse", "exact_forward", "exact_forward-soft-capped"])
def test_site_triton_and_torch_impls_agree(monkeypatch, exact_forward, softcap):
    """softcap: eager attention with Gemma-2's cap, whose exact forward runs the Triton forward over
    every key block (no flash kernel has the cap)."""
    seen = spy_kernels(monkeypatch)
    torch.manual_seed(0)
    model = GQAAttention(d=64, heads=4, kv_heads=2, **(dict(eager=True, softcap=softcap) if softcap else {}))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={
        "compiler": "aot_eager", "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16,
        "density": 0.4, "exact_forward": exact_forward})
    x = torch.randn(2, 80, 64)  # 5 key blocks of 16: selection keeps 2 per query block
    compiled(x).sum().backward()  # calibration (exact)
    results = {}
    for impl in ("triton", "torch"):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with spt_compile.enable(attention_impl=impl):
            y = compiled(xi)
            y.pow(2).sum().backward()
        results[impl] = (y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()])
    # the triton call's backward ran the kernels; its forward too, unless the exact forward took SDPA's flash
    assert seen["bwd"] == 1 and seen["fwd"] == (seen["fwd"] if exact_forward and not softcap else 1) <= 1
    (site,) = spt_compile.report(model)
    assert site["runs"].get("exact_forward" if exact_forward else "sparse") == 2, site
    (yt, dxt, gt), (yc, dxc, gc) = results["triton"], results["torch"]
    torch.testing.assert_close(yt, yc, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dxt, dxc, atol=1e-5, rtol=1e-4)
    for a, b in zip(gt, gc):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exact_forward", [False, True])
def test_cross_attention_triton_and_torch_impls_agree(monkeypatch, exact_forward):
    """Queries of one sequence over another's keys (70 over 200, a key padding mask): the Triton
    kernels give the torch path's outputs and gradients."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sites"))
    from test_cross_attention import CrossAttention, masks

    seen = spy_kernels(monkeypatch)
    torch.manual_seed(0)
    model = CrossAttention()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={
        "compiler": "aot_eager", "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16,
        "density": 0.4, "exact_forward": exact_forward})
    xq, xkv, mask = torch.randn(2, 70, 64), torch.randn(2, 200, 64), masks(2, 70, 200)["key-padding"]
    results = {}
    for impl in ("triton", "torch"):
        model.zero_grad()
        xi = xq.clone().requires_grad_()
        with spt_compile.enable(attention_impl=impl):
            y = compiled(xi, xkv, mask)
            y.pow(2).sum().backward()
        results[impl] = (y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()])
    assert seen["bwd"] == 1
    (yt, dxt, gt), (yc, dxc, gc) = results["triton"], results["torch"]
    torch.testing.assert_close(yt, yc, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dxt, dxc, atol=1e-5, rtol=1e-4)
    for a, b in zip(gt, gc):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
