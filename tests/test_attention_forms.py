"""Every attention form of tests/attention_forms.py through the passes: matched as one site with the
rest of the graph unchanged and, in the degenerate configuration (every key kept, attention never
dense by length), outputs and q/k/v gradients equal to the form run eagerly; or left dense with
the reason explain gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from attention_forms import FORMS, Form, inputs
from graph_check import GraphCapture

EVERY = {"density": 1.0, "calibration_steps": 0, "attention_dense_below": 0}


class FormModule(nn.Module):
    def __init__(self, form: Form, p: float = 0.0):
        super().__init__()
        self.form, self.p = form, p

    def forward(self, q, k, v, mask):
        out = self.form.fn(q, k, v, mask, self.p)
        if isinstance(out, tuple) and self.form.returns_kv:  # the extra k, v are returned views only
            return out[0]
        return out


def run_capture(form: Form, p=0.0, options=EVERY, **kw):
    torch._dynamo.reset()
    cap = GraphCapture(options)
    q, k, v, mask = inputs(form, **kw)
    out = torch.compile(FormModule(form, p), backend=cap)(q, k, v, mask)
    assert cap.checked >= 1
    return cap, out, (q, k, v, mask)


def assert_same_as_eager(form, out, args, atol=2e-5):
    q, k, v, mask = args
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) + torch.linspace(0, 1, out.shape[-1]))
    want = FormModule(form)(q, k, v, mask)
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want) + torch.linspace(0, 1, want.shape[-1]))
    torch.testing.assert_close(out, want, atol=atol, rtol=1e-3)
    for name, g, w in zip("qkv", grads, want_grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_form(form):
    cap, out, args = run_capture(form)
    att = [s for s in cap.sites if s.kind == "attention"]
    if form.expect == "dense":
        assert not cap.rewritten("attention")
        assert len(att) == 1 and form.reason in att[0].reason, [s.line() for s in att]
        return
    assert len(att) == 1 and att[0].status == "rewritten", [s.line() for s in att]
    assert "dropout=0.0" in att[0].detail
    assert_same_as_eager(form, out, args)


@pytest.mark.parametrize("name", ["sfdp_3", "sfdp_13", "sfdp_17"])
def test_dropout_probability_is_carried_over(name):
    form = next(f for f in FORMS if f.name == name)
    cap, _, _ = run_capture(form, p=0.1)
    (site,) = cap.rewritten("attention")
    assert "dropout=0.1" in site.detail


@pytest.mark.parametrize("name", ["sfdp_7", "gpt2_reorder_and_upcast"])
def test_half_precision_upcast_forms(name):
    """The forms written for fp16 models: scores upcast to fp32, weights cast back. The op computes
    in fp32 for half inputs, so it matches to bf16 rounding."""
    form = next(f for f in FORMS if f.name == name)
    cap, out, args = run_capture(form, dtype=torch.bfloat16)
    assert len(cap.rewritten("attention")) == 1
    assert out.dtype == torch.bfloat16
    q, k, v, mask = args
    want = FormModule(form)(*(t.float() if t is not None else None for t in (q, k, v)),
                            mask.float() if mask is not None else None)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", ["sfdp_13", "sfdp_19", "sfdp_24", "multihead_attention_math"])
def test_through_the_backend(name):
    """The full path (backend="spt", aot_eager downstream) on one form of each rewrite shape:
    3-D one-batch, bool + additive masks, 3-D lifted back to [B, H, N, D]."""
    form = next(f for f in FORMS if f.name == name)
    torch._dynamo.reset()
    q, k, v, mask = inputs(form)
    out = torch.compile(FormModule(form), backend="spt", options={**EVERY, "compiler": "aot_eager"})(q, k, v, mask)
    assert_same_as_eager(form, out, (q, k, v, mask))
