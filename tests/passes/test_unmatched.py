"""The last sweep (passes/unmatched.py): an attention- or MLP-like chain that no pass rewrites or
reports (a form no parser recognises, or one inside a higher-order-op body the passes do not enter)
is in explain() and in the compile report as dense, with what was not recognised; recognised models
get no extra entry, and a candidate a pass already left dense is not reported twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spt_compile

from test_passes import capture
from toy_models import GQAAttention, GatedMLP, NanoGPT, PlainMLP


class ScaledHiddenMlp(nn.Module):
    """The hidden layer scaled by a learned vector between the activation and the down projection."""

    def __init__(self, d=32, hidden=80):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.hidden_scale = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return self.down(F.gelu(self.up(x)) * self.hidden_scale)


class Relu6Mlp(nn.Module):
    """ReLU6 (hardtanh), an activation the MLP pass's element-wise chain does not follow."""

    def __init__(self, d=32, hidden=80):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.relu6(self.fc1(x)))


class ScaledFusedGegluMlp(nn.Module):
    """A fused gate/up projection (chunked) with a constant factor on the gated product: no MLP form
    reads it; the sweep must follow the halves back through the chunk to see the projection."""

    def __init__(self, d=32, hidden=80):
        super().__init__()
        self.Wi, self.Wo = nn.Linear(d, 2 * hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        a, g = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(F.gelu(a) * g * 2.0)


class _CustomGelu(torch.autograd.Function):
    """A GELU with its own backward, as BLOOM writes its MLP's activation."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t))


class CustomFunctionMlp(nn.Module):
    def __init__(self, d=32, hidden=80):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(_CustomGelu.apply(self.fc1(x)))


class ExpLogSoftmaxAttention(nn.Module):
    """Attention weights written as exp(log_softmax(scores)): the parser finds no softmax before V."""

    def forward(self, q, k, v):
        return torch.exp(F.log_softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)) @ v


class HeadMaskedBmmAttention(nn.Module):
    """[B*H, N, D] attention with the weights multiplied by a head mask before V (old BERT's head_mask
    on merged heads): the parser returns None, and the pass's 4-D softmax fallback does not see 3-D."""

    def forward(self, q, k, v, head_mask):
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1) * head_mask, v)


class ClampedBmmAttention(nn.Module):
    """XGLM's eager attention: [B*H, N, D] scores clamped by torch.max against finfo.min, the weights
    viewed to [B, H, N, N] and back after the softmax. Before, the sweep did not follow torch.max, and
    explain said nothing about this attention."""

    def forward(self, q, k, v):
        w = torch.bmm(q, k.transpose(1, 2))
        w = torch.max(w, torch.full((), torch.finfo(w.dtype).min))
        w = torch.softmax(w, dim=-1).view(2, 2, 8, 8).view(4, 8, 8)
        return torch.bmm(w, v)


class Block(nn.Module):
    """Puts a module under a path, as a model's layer would."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


class CondAttention(nn.Module):
    """SDPA inside a torch.cond branch: a higher-order-op body the passes do not enter."""

    def forward(self, q):
        return torch.cond(q.sum() > 0, lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True),
                          lambda t: t.clone(), (q,))


class CondMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = GatedMLP()

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.mlp(t), lambda t: t.clone(), (x,))


def only_site(report, kind):
    assert not report.rewritten(), [s.line() for s in report.sites]
    (site,) = report.sites
    assert site.kind == kind and site.status == "dense", site.line()
    return site


def both_ways(model, *args):
    """The report from explain() (report-only) and from a rewriting compile (graph checked unchanged)."""
    torch._dynamo.reset()
    explained = spt_compile.explain(model, *args)
    cap = capture(model, *args)
    return explained, cap


Q4 = torch.randn(1, 2, 8, 16)
Q3 = torch.randn(4, 8, 16)

UNRECOGNISED = {
    # name: (model, inputs, kind, pieces of the reason)
    "mlp-learned-hidden-scale": (lambda: Block(ScaledHiddenMlp()), (torch.randn(2, 5, 32),), "mlp",
                                 ["-> gelu ->", "also reads", "hidden_scale", "(80,)", "learned scale"]),
    "mlp-relu6": (lambda: Block(Relu6Mlp()), (torch.randn(2, 5, 32),), "mlp", ["relu6", "does not follow"]),
    "mlp-custom-autograd-function": (lambda: Block(CustomFunctionMlp()), (torch.randn(2, 5, 32, requires_grad=True),),
                                     "mlp", ["autograd_function_apply", "custom torch.autograd.Function"]),
    "mlp-scaled-fused-geglu": (lambda: Block(ScaledFusedGegluMlp()), (torch.randn(2, 5, 32),), "mlp",
                               ["-> gelu ->", "none of the MLP pass's forms"]),
    "attention-exp-log-softmax": (lambda: Block(ExpLogSoftmaxAttention()), (Q4, Q4, Q4), "attention",
                                  ["log_softmax", "not read as softmax"]),
    "attention-clamped-scores-viewed-weights": (lambda: Block(ClampedBmmAttention()), (Q3, Q3, Q3), "attention",
                                                ["(bmm of two activations)", "weights pass through view"]),
    "attention-head-mask-after-softmax": (lambda: Block(HeadMaskedBmmAttention()), (Q3, Q3, Q3, torch.rand(4, 1, 1)),
                                          "attention", ["'bmm'", "softmax", "weights pass through mul"]),
}


@pytest.mark.parametrize("name", UNRECOGNISED)
def test_unrecognised_form_is_reported_dense_with_what_was_not_recognised(name):
    factory, args, kind, pieces = UNRECOGNISED[name]
    for report in both_ways(factory(), *args):
        site = only_site(report, kind)
        assert site.pattern == f"unrecognised {kind}-like chain" and site.path == "inner", site.line()
        for piece in pieces:
            assert piece in site.reason, site.line()


@pytest.mark.parametrize("model,args,kind,pattern", [
    (CondAttention, (Q4,), "attention", "attention call"),
    (CondMlp, (torch.randn(2, 5, 32),), "mlp", "mlp-like chain"),
], ids=["sdpa", "gated-mlp"])
def test_chain_in_a_body_the_passes_do_not_enter_is_reported_dense(model, args, kind, pattern):
    """A torch.cond branch is a higher-order-op body the passes do not enter: its (otherwise
    recognised) site is reported dense with that reason, not rewritten and not silently absent."""
    for report in both_ways(Block(model()), *args):
        site = only_site(report, kind)
        assert site.pattern == pattern, site.line()
        assert "inside a cond body the passes do not enter" in site.reason, site.line()
        assert site.path.startswith("inner"), site.line()


def test_candidates_a_pass_left_dense_are_not_reported_twice():
    class ReturnsWeights(nn.Module):
        def forward(self, q, k, v):
            w = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)
            return w @ v, w

    for report in both_ways(ReturnsWeights(), Q4, Q4, Q4):
        assert "used elsewhere" in only_site(report, "attention").reason
    for report in both_ways(PlainMLP(act=lambda t: t * torch.sigmoid(2.5 * t)), torch.randn(2, 4, 32)):
        assert "activation is not one of" in only_site(report, "mlp").reason


class CheckpointedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([GatedMLP(), GatedMLP()])

    def forward(self, x):
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
        return x


class DroppedInputProjection(nn.Module):
    """A projection reading a live dropout (PEFT's lora_A(lora_dropout(x)), BART's layers): not an MLP's
    down projection, so no MLP entry at all, while the MLP after it is rewritten."""

    def __init__(self, d=32):
        super().__init__()
        self.proj, self.mlp = nn.Linear(d, d), GatedMLP()

    def forward(self, x):
        return self.mlp(self.proj(F.dropout(x, 0.1, self.training)))


@pytest.mark.parametrize("model,args,n_att,n_mlp", [
    (DroppedInputProjection, (torch.randn(2, 6, 32, requires_grad=True),), 0, 1),
    (lambda: NanoGPT(layers=2, flash=False), (torch.randint(0, 97, (2, 21)),), 2, 2),
    (lambda: NanoGPT(layers=1, flash=True), (torch.randint(0, 97, (2, 21)),), 1, 1),
    (lambda: GQAAttention(eager=True), (torch.randn(2, 13, 64),), 1, 0),
    (CheckpointedBlocks, (torch.randn(2, 6, 32, requires_grad=True),), 0, 2),
], ids=["dropped-input-projection", "nanogpt-masked-fill", "nanogpt-sdpa", "gqa-eager", "checkpointed-gated"])
def test_recognised_models_get_no_extra_entry(model, args, n_att, n_mlp):
    torch.manual_seed(0)
    for report in both_ways(model(), *args):
        assert not report.dense(), [s.line() for s in report.dense()]
        assert len(report.rewritten("attention")) == n_att and len(report.rewritten("mlp")) == n_mlp


CALLS = []


class AppendsOnEveryCall(nn.Module):
    """A forward with a Python side effect outside itself, as transformers >= 5.25's kernel-function
    switch (the `kernels` package) sets a module-level variable in every attention forward."""

    def __init__(self):
        super().__init__()
        self.mlp = GatedMLP()

    def forward(self, x):
        CALLS.append(1)
        return self.mlp(x)


class CheckpointedSideEffect(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = AppendsOnEveryCall()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_checkpointed_region_dynamo_cannot_trace_is_listed_with_the_fix():
    """Dynamo runs a checkpointed region with an outside side effect eagerly: no graph of it reaches
    the backend, so explain() lists the region as not traced, with Dynamo's setting that lets it trace."""
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch._dynamo.reset()
    report = spt_compile.explain(CheckpointedSideEffect(), x)
    assert not report.sites and len(report.not_traced) == 1, str(report)
    assert "HOP: Unsafe side effect" in report.not_traced[0]
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint = True" in report.not_traced[0]
    assert "regions not traced: 1" in str(report)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        report = spt_compile.explain(CheckpointedSideEffect(), x)
    assert len(report.rewritten("mlp")) == 1 and not report.not_traced and not report.dense(), str(report)
