"""The backend as users meet it: found by name without an import, explain(), and its report."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torch.nn as nn

import spt_compile
from toy_models import SPARSE_AT_EVERY_LENGTH, NanoGPT, PlainMLP


def test_backend_is_found_by_name_without_importing_the_package():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
        assert "spt_compile" not in sys.modules
        y = torch.compile(m, backend="spt", options={"compiler": "eager", "calibration_steps": 0, "attention_dense_below": 0})(torch.randn(3, 16))
        assert y.shape == (3, 16) and "spt_compile" in sys.modules
        from spt_compile import compile_reports
        assert len(compile_reports(m)[-1].rewritten("mlp")) == 1
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_explain_lists_rewritten_sites_and_reasons_and_changes_no_state():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = NanoGPT(layers=1)
            self.odd = PlainMLP(d=97, act=lambda t: t * torch.sigmoid(2.5 * t))  # unknown activation

        def forward(self, idx):
            return self.odd(self.gpt(idx))

    model = Mixed()
    from spt_compile.registry import REGISTRY

    n_sites = len(REGISTRY.sites)
    report = spt_compile.explain(model, torch.randint(0, 97, (2, 12)))
    assert len(REGISTRY.sites) == n_sites, "explain must not create sparse state"
    paths = {(s.kind, s.status, s.path) for s in report.sites}
    assert ("attention", "rewritten", "gpt.h.0") in paths
    assert ("mlp", "rewritten", "gpt.h.0") in paths
    (dense,) = report.dense()
    assert dense.path == "odd" and "activation is not one of" in dense.reason
    text = str(report)
    assert "rewritten: 1 attention, 1 MLP; left dense: 1" in text and "q (2, 4, 12, 16)" in text
    assert "options:" not in text.splitlines()[0]  # defaults only
    # enable()'s options reach explain, which names those that differ from the defaults; hidden 256
    # cannot be cut into 512 blocks, so the MLP stays dense and says why
    torch._dynamo.reset()
    with spt_compile.enable(ffn_blocks=512, density=0.25):
        text = str(spt_compile.explain(model, torch.randint(0, 97, (2, 12))))
    assert "options: density=0.25, ffn_blocks=512" in text.splitlines()[0], text
    assert "smaller than ffn_blocks=512" in text, text


def test_report_gives_calibration_quality_per_site():
    torch._dynamo.reset()
    model = NanoGPT(layers=2)
    compiled = torch.compile(model, backend="spt", options={"compiler": "eager", "calibration_steps": 1,
                                                            **SPARSE_AT_EVERY_LENGTH})
    for i in range(3):
        compiled(torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(i))).sum().backward()
    rows = spt_compile.report(model)
    assert [r["kind"] for r in rows].count("attention") == 2 and [r["kind"] for r in rows].count("mlp") == 2
    for r in rows:
        assert r["calls"] == 3
        if r["kind"] == "attention":
            assert 0 < r["recall"] <= 1 and 0 < r["mass"] <= 1
        else:
            assert 0 < r["captured"] <= 1.5 and r["rel_error"] >= 0


def test_compile_reports_belong_to_the_model_and_go_with_it():
    """What compiling did is kept per model (filed under the parameters the graph reads): another model
    has none, and a freed model takes its reports with it."""
    import gc

    from spt_compile.compile_reports import tensors_with_reports

    torch._dynamo.reset()
    model = PlainMLP()
    compiled = torch.compile(model, backend="spt", options={"compiler": "eager", "calibration_steps": 0})
    compiled(torch.randn(2, 5, 32))
    (report,) = spt_compile.compile_reports(model)
    assert len(report.rewritten("mlp")) == 1
    assert spt_compile.compile_reports(PlainMLP()) == []
    held = tensors_with_reports()
    del model, compiled, report
    torch._dynamo.reset()
    gc.collect()
    assert tensors_with_reports() <= held - 4  # its 4 parameters no longer hold a report
