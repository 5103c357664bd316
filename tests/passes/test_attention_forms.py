"""Every attention form of tests/attention_forms.py through the passes: matched as one site with the
rest of the graph unchanged and, in the degenerate configuration (every key kept, attention never
dense by length), outputs and q/k/v gradients equal to the form run eagerly; or left dense with
the reason explain gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_forms import FORMS, Form, inputs
from graph_check import GraphCapture
from toy_models import SPARSE_AT_EVERY_LENGTH

EVERY = {"density": 1.0, "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH}


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
    """Outputs and the gradients of q, k, v, and of the mask where it requires grad (a learned bias)."""
    q, k, v, mask = args
    inputs = (q, k, v) + ((mask,) if isinstance(mask, torch.Tensor) and mask.requires_grad else ())
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out) + torch.linspace(0, 1, out.shape[-1]))
    want = FormModule(form)(q, k, v, mask)
    want_grads = torch.autograd.grad(want, inputs, torch.ones_like(want) + torch.linspace(0, 1, want.shape[-1]))
    torch.testing.assert_close(out, want, atol=atol, rtol=1e-3)
    for name, g, w in zip(("q", "k", "v", "mask"), grads, want_grads):
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


@pytest.mark.parametrize("name,selection", [("sfdp_13", "block"), ("sfdp_19", "block"), ("sfdp_24", "token"),
                                            ("multihead_attention_math", "token"), ("einsum", "block")])
def test_through_the_backend(name, selection):
    """The full path (backend="spt", aot_eager downstream) on one form of each rewrite shape:
    3-D one-batch, bool + additive masks, 3-D lifted back to [B, H, N, D], einsum; block and token
    selection, each selecting every key at density 1."""
    form = next(f for f in FORMS if f.name == name)
    torch._dynamo.reset()
    q, k, v, mask = inputs(form)
    options = {**EVERY, "compiler": "aot_eager", "attention_selection": selection}
    out = torch.compile(FormModule(form), backend="spt", options=options)(q, k, v, mask)
    assert_same_as_eager(form, out, (q, k, v, mask))


class Mha(nn.Module):
    """nn.MultiheadAttention as a model calls it (Dynamo keeps F.multi_head_attention_forward as one
    call; the pass writes it out)."""

    def __init__(self, cross=False, need_weights=False, causal=False, return_weights=False, kdim=None):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.cross, self.need_weights, self.causal, self.return_weights = cross, need_weights, causal, return_weights

    def forward(self, x, memory, key_padding_mask):
        kv = memory if self.cross else x
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        if self.causal and key_padding_mask is not None:  # the same mask type for both (a mismatch warns, and the warning breaks the graph)
            key_padding_mask = torch.zeros(key_padding_mask.shape).masked_fill(key_padding_mask, float("-inf"))
        out, w = self.mha(x, kv, kv, key_padding_mask=key_padding_mask, need_weights=self.need_weights,
                          attn_mask=mask, is_causal=self.causal)
        return (out, w) if self.return_weights else out


MHA_CASES = {
    "self-padding": dict(),
    "self-need-weights-unused": dict(need_weights=True),
    "causal-hint": dict(causal=True),
    "causal-hint-no-padding": dict(causal=True),  # the only case F.mha passes is_causal on to SDPA
    "cross": dict(cross=True),
    "cross-other-kdim": dict(cross=True, kdim=24),  # separate q/k/v projection weights
}


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention(case):
    torch.manual_seed(0)
    model = Mha(**MHA_CASES[case]).train()
    x = torch.randn(2, 11, 32, requires_grad=True)
    memory = torch.randn(2, 11, MHA_CASES[case].get("kdim") or 32, requires_grad=True)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True  # True = padding, nn.MultiheadAttention's convention
    pad = None if case.endswith("no-padding") else pad
    torch._dynamo.reset()
    cap = GraphCapture(EVERY)
    out = torch.compile(model, backend=cap)(x, memory, pad)
    (site,) = cap.rewritten("attention")
    assert site.pattern == "multihead_attention" and any(n.startswith("multi_head_attention_forward")
                                                         for n in site.replaced)
    assert ("causal=True" in site.detail) == (case == "causal-hint-no-padding")
    want = model(x, memory, pad)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    params = [x, memory] + list(model.parameters())
    got_grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_multihead_attention_weights_used_stay_dense():
    model = Mha(need_weights=True, return_weights=True)
    torch._dynamo.reset()
    cap = GraphCapture(EVERY)
    torch.compile(model, backend=cap)(torch.randn(2, 5, 32), torch.randn(2, 5, 32), None)
    (site,) = cap.dense("attention")
    assert "attention weights are used" in site.reason


def test_multihead_attention_through_the_backend():
    torch.manual_seed(0)
    model = Mha().train()
    x = torch.randn(2, 11, 32, requires_grad=True)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[0, 5:] = True
    torch._dynamo.reset()
    out = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager"})(x, x, pad)
    want = model(x, x, pad)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    params = [x] + list(model.parameters())
    for g, w in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


class ScaledByAttribute(nn.Module):
    """HF's eager attention: the scale and the dropout are float attributes of the module."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.scaling, self.attention_dropout = 0.25, 0.0

    def forward(self, x):
        q = self.proj(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        w = torch.softmax(torch.matmul(q, q.transpose(2, 3)) * self.scaling, dim=-1)
        w = F.dropout(w, p=self.attention_dropout, training=self.training)
        return torch.matmul(w, q)


class ScaledByArgument(nn.Module):
    """The scale handed to forward() as a Python float: under dynamic=True a graph value per call."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x, scaling: float):
        q = self.proj(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return torch.matmul(torch.softmax(torch.matmul(q, q.transpose(2, 3)) * scaling, dim=-1), q)


@pytest.mark.parametrize("specialize_float", [False, True])
def test_dynamic_shapes_and_float_attributes(specialize_float):
    """Under dynamic=True Dynamo makes Python float attributes graph inputs unless specialize_float is
    set; the backend reads module attributes back as constants (guarded at run time), so the site is
    rewritten either way, and its output equals dense."""
    torch._dynamo.reset()
    cap = GraphCapture(EVERY)
    model = ScaledByAttribute().eval()
    x = torch.randn(2, 9, 16)
    with torch._dynamo.config.patch(specialize_float=specialize_float):
        torch.compile(model, backend=cap, dynamic=True)(x)
    assert len(cap.rewritten("attention")) == 1
    assert bool(cap.reports[-1].floats) != specialize_float  # constants read back only when Dynamo made inputs
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=specialize_float):
        out = torch.compile(model, backend="spt", dynamic=True, options={**EVERY, "compiler": "aot_eager"})(x)
    torch.testing.assert_close(out, model(x), atol=2e-5, rtol=1e-4)


def test_dynamic_shapes_float_argument_stays_dense_and_says_why():
    """A float passed to forward() may change every call: it stays a graph value, the site dense."""
    torch._dynamo.reset()
    cap = GraphCapture(EVERY)
    torch.compile(ScaledByArgument(), backend=cap, dynamic=True)(torch.randn(2, 9, 16), 0.25)
    (site,) = cap.dense("attention")
    assert "float argument of forward()" in site.reason and "specialize_float" in site.reason
