"""Choosing the routed MLP's implementation (ffn_impl): validation, resolution, and that mlp_site runs
forward and backward with the implementation it resolved (the Triton kernels themselves are tested
under the interpreter in tests/ops/triton_interpret/test_routed_mlp_triton.py)."""

from __future__ import annotations

import pytest
import torch

import spt_compile
from spt_compile.sites import mlp_impl, mlp_op
from spt_compile.sites.meta import MlpMeta
from spt_compile.options import SptOptionError, make_options
from spt_compile.sparse_ops.routed_mlp import FFN_IMPL_ENV, MlpSpec, MlpWeights, resolve_ffn_impl

from toy_models import GatedMLP


def test_option_validates():
    assert make_options({"ffn_impl": "triton"}).ffn_impl == "triton"
    with pytest.raises(SptOptionError, match="'ffn_impl' must be one of auto, triton, torch, grouped, reference"):
        make_options({"ffn_impl": "cutlass"})
    with pytest.raises(SptOptionError, match="'ffn_impl'"):
        with spt_compile.enable(ffn_impl="gpu"):
            pass


def test_resolution(monkeypatch):
    monkeypatch.delenv(FFN_IMPL_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_ffn_impl("auto", cpu) == "torch"
    assert resolve_ffn_impl("auto", cuda) == "torch"  # by measurement (docs/ffn.md)
    assert resolve_ffn_impl("reference", cuda) == "reference"
    assert resolve_ffn_impl("triton", cpu) == "triton"  # explicit: the launcher then names what is missing
    monkeypatch.setenv(FFN_IMPL_ENV, "reference")
    assert resolve_ffn_impl("auto", cuda) == "reference"
    assert resolve_ffn_impl("torch", cuda) == "torch"  # an explicit option wins over the variable
    monkeypatch.setenv(FFN_IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=FFN_IMPL_ENV):
        resolve_ffn_impl("auto", cpu)


def _small(dropout: float = 0.0):
    gen = torch.Generator().manual_seed(0)
    w = MlpWeights(in_w=torch.randn(12, 8, generator=gen), in_a=torch.randn(2, 8, generator=gen),
                   in_bb=torch.randn(12, 2, generator=gen), out_w=torch.randn(8, 12, generator=gen))
    spec = MlpSpec("gelu", False, 12, 3, in_dropout=dropout)
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:, 1] = True
    return torch.randn(5, 8, generator=gen), w, spec, mask


@pytest.mark.parametrize("impl", ["torch", "reference", "triton"])
def test_lora_dropout_falls_back_to_torch(impl):
    x, w, spec, mask = _small(dropout=0.2)
    saved: list = []
    y, run = mlp_impl.run_impl(x, w, spec, mask, 3, impl, saved)
    assert run.impl == "torch" and len(saved) == 1
    assert y.shape == (5, 8)


def test_triton_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, spec, mask = _small()
    with pytest.raises(ValueError, match="CUDA"):
        mlp_impl.run_impl(x, w, spec, mask, 0, "triton", [])


@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_triton_under_deterministic_algorithms_is_an_error_naming_the_fix(deterministic, monkeypatch):
    """The Triton routed MLP adds with atomics: with torch.use_deterministic_algorithms(True) it refuses
    before launching anything and names the deterministic paths; warn_only=True makes it a warning.
    The torch path runs as usual."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, spec, mask = _small()
    deterministic(True)
    with pytest.raises(RuntimeError, match="ffn_impl='torch'.*'grouped'"):
        mlp_impl.run_impl(x, w, spec, mask, 0, "triton", [])
    y, run = mlp_impl.run_impl(x, w, spec, mask, 0, "torch", [])
    assert run.impl == "torch" and y.shape == (5, 8)
    deterministic(True, warn_only=True)
    with pytest.warns(UserWarning, match="not deterministic"), pytest.raises(ValueError, match="CUDA"):
        mlp_impl.run_impl(x, w, spec, mask, 0, "triton", [])  # warned, then the CPU stops it as before


def test_site_runs_the_resolved_impl_in_forward_and_backward(monkeypatch):
    """ffn_impl='reference' through torch.compile: the reference runs forward and backward, and gives the
    torch path's output and gradients; meta is [MlpMeta.FIXED + n_blocks]."""
    calls = {"reference": 0, "reference_bwd": 0}
    ref, ref_bwd = mlp_impl.routed_mlp_reference, mlp_op.reference_backward

    def spy(*a, **k):
        calls["reference"] += 1
        return ref(*a, **k)

    def spy_bwd(*a, **k):
        calls["reference_bwd"] += 1
        return ref_bwd(*a, **k)

    monkeypatch.setattr(mlp_impl, "routed_mlp_reference", spy)
    monkeypatch.setattr(mlp_op, "reference_backward", spy_bwd)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = GatedMLP(d=16, hidden=36)
    compiled = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1,
                                                            "ffn_blocks": 3, "ffn_active": 1,
                                                            "exact_forward": False})  # the routed forward's impl
    x = torch.randn(9, 16)
    for _ in range(2):  # calibration, then the first routed call (probes and refits the router)
        compiled(x).sum().backward()
    out = {}
    for impl in ("reference", "torch"):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with spt_compile.enable(ffn_impl=impl):
            y = compiled(xi)
            y.pow(2).sum().backward()
        out[impl] = [y.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()]
    assert calls == {"reference": 2, "reference_bwd": 1}  # forward, and backward's vjp through it
    for a, b in zip(out["reference"], out["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    spec = MlpSpec("silu", True, 36, 3).to_str()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):  # pre has a data-dependent size
        w = torch.empty(36, 16)
        outs = torch.ops.spt.mlp_site(torch.empty(9, 16), w, None, None, None, w, None, None, None,
                                      torch.empty(16, 36), None, None, None, None, None, 0, spec, True)
    assert outs[4].shape == (MlpMeta.FIXED + 3,)  # the fake's meta follows n_blocks


def test_report_says_when_the_kernels_served_no_call():
    """ffn_impl picks the implementation of routed calls; a default training run (exact forward) makes
    none, so report() names the torch path as what ran and says why the asked-for one did not serve."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = GatedMLP(d=16, hidden=36)
    compiled = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1,
                                                            "ffn_blocks": 3, "ffn_active": 1,
                                                            "ffn_impl": "reference", "ffn_loss_rows": "off"})
    x = torch.randn(9, 16, requires_grad=True)
    for _ in range(3):  # calibration, then exact-forward calls
        compiled(x).sum().backward()
    site, = spt_compile.report(model)
    assert site["runs"] == {"calibration": 1, "exact_forward": 2} and site["impl"] == {"torch": 3}, site
    assert "ffn_impl='reference' serves routed calls" in site["impl_why"], site
    with spt_compile.enable(exact_forward=False):  # a routed call: the reference serves it, the note goes
        compiled(x).sum().backward()
    site, = spt_compile.report(model)
    assert site["impl"] == {"torch": 3, "reference": 1} and "impl_why" not in site, site
