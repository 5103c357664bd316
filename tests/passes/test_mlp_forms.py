"""MLP forms as model code writes them, each also with PEFT LoRA: matched as one site and, with
every block active (ffn_active == ffn_blocks), the same outputs and parameter gradients as dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_passes import assert_dense_equivalent, capture

R = 4


def with_lora(model, targets):
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0,
                                                       target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0; make the adapters matter
            nn.init.normal_(p, std=0.1)
    return model


class Gpt2Mlp(nn.Module):
    """GPT-2's MLP: Conv1D (addmm on flattened tokens, weight [in, out]) and NewGELU written out."""

    def __init__(self, d=24, hidden=96):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.c_proj = Conv1D(hidden, d), Conv1D(d, hidden)

    def forward(self, x):
        h = self.c_fc(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.c_proj(h)


class OptMlp(nn.Module):
    """OPT's decoder layer MLP: tokens flattened to [B*N, d], fc1 -> ReLU -> fc2, shape restored."""

    def __init__(self, d=24, hidden=80):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.activation_fn = nn.ReLU()

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, x.size(-1))
        h = self.fc2(self.activation_fn(self.fc1(h)))
        return h.view(shape)


class FunctionalMlp(nn.Module):
    """F.linear on the module's own parameters (no nn.Linear), optionally with a LoRA delta written
    the way PEFT's Linear.forward computes it (PEFT can only wrap modules)."""

    def __init__(self, d=24, hidden=72, lora=False):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(hidden, d) / d**0.5), nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(d, hidden) / hidden**0.5)
        self.lora = lora
        if lora:
            self.a1, self.bb1 = nn.Parameter(torch.randn(R, d)), nn.Parameter(0.1 * torch.randn(hidden, R))
            self.a2, self.bb2 = nn.Parameter(torch.randn(R, hidden)), nn.Parameter(0.1 * torch.randn(d, R))

    def forward(self, x):
        h = F.linear(x, self.w1, self.b1)
        if self.lora:
            h = h + F.linear(F.linear(x, self.a1), self.bb1) * 2.0
        h = F.silu(h)
        y = F.linear(h, self.w2)
        if self.lora:
            y = y + F.linear(F.linear(h, self.a2), self.bb2) * 2.0
        return y


class T5DenseReluDense(nn.Module):
    def __init__(self, d=24, hidden=64, p=0.0):
        super().__init__()
        self.wi, self.wo = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.wo(self.dropout(F.relu(self.wi(x))))


class MatmulLinear(nn.Linear):
    """A custom Linear that writes its projection as `x @ W.T (+ b)` (as some model families do)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class TransposedLinear(nn.Linear):
    """The same with W.t() and the bias first."""

    def forward(self, x):
        return self.bias + torch.matmul(x, self.weight.t()) if self.bias is not None else x.matmul(self.weight.t())


class SubclassMlp(nn.Module):
    def __init__(self, linear=MatmulLinear, gated=False, bias=True, d=24, hidden=64):
        super().__init__()
        self.up, self.down = linear(d, hidden, bias=bias), linear(hidden, d, bias=bias)
        self.gate = linear(d, hidden, bias=bias) if gated else None

    def forward(self, x):
        if self.gate is None:
            return self.down(F.gelu(self.up(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedGateUpMlp(nn.Module):
    """One projection for gate and up, split in the model (Phi-3's gate_up_proj + chunk); with
    up_first, split() and the up half first."""

    def __init__(self, d=24, hidden=64, up_first=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.hidden, self.up_first = hidden, up_first

    def forward(self, x):
        if self.up_first:
            up, gate = self.gate_up_proj(x).split(self.hidden, dim=-1)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DroppedGatedMlp(nn.Module):
    """ModernBERT's MLP: Wo(drop(act(input) * gate)), `input, gate = Wi(x).chunk(2)`, the dropout over the
    whole gated product (identity at p = 0 or in eval)."""

    def __init__(self, d=24, hidden=64, p=0.0):
        super().__init__()
        self.Wi, self.Wo = nn.Linear(d, 2 * hidden, bias=False), nn.Linear(hidden, d, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        input, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(F.gelu(input) * gate))


class DropoutInsideChainMlp(nn.Module):
    """An identity dropout inside the activation's chain, not next to the down projection."""

    def __init__(self, d=24, hidden=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.down(self.drop(F.gelu(self.up(x))) * 1.0)


def sequential(act):
    return nn.Sequential(nn.Linear(24, 80), act, nn.Linear(80, 24))


CASES = {
    # name: (model factory, LoRA targets or None, pattern, detail piece)
    "gpt2-conv1d": (Gpt2Mlp, None, "gelu_tanh", "Conv1D"),
    "gpt2-conv1d-lora": (Gpt2Mlp, ["c_fc", "c_proj"], "gelu_tanh", "Conv1D LoRA=in/out"),
    "opt-relu-fc1-fc2-lora": (OptMlp, ["fc1", "fc2"], "relu", "LoRA=in/out"),
    "sequential-gelu": (lambda: sequential(nn.GELU()), None, "gelu", "LoRA=none"),
    "sequential-relu-lora": (lambda: sequential(nn.ReLU()), ["0", "2"], "relu", "LoRA=in/out"),
    "sequential-silu-lora-on-down": (lambda: sequential(nn.SiLU()), ["2"], "silu", "LoRA=out"),
    "functional-linear": (FunctionalMlp, None, "silu", "LoRA=none"),
    "functional-linear-lora": (lambda: FunctionalMlp(lora=True), None, "silu", "LoRA=in/out"),
    "t5-dense-relu-dense-lora": (T5DenseReluDense, ["wi", "wo"], "relu", "LoRA=in/out"),
    "fused-gate-up-chunk": (FusedGateUpMlp, None, "gated fused silu", "fused gate/up (gate then up) LoRA=none"),
    "fused-gate-up-chunk-lora": (FusedGateUpMlp, ["gate_up_proj", "down_proj"], "gated fused silu", "LoRA=gate/out"),
    "fused-up-gate-split-lora": (lambda: FusedGateUpMlp(up_first=True), ["gate_up_proj"], "gated fused silu",
                                 "fused gate/up (up then gate) LoRA=gate"),
    "fused-geglu-behind-identity-dropout-lora": (DroppedGatedMlp, ["Wi", "Wo"], "gated fused gelu",
                                                 "fused gate/up (gate then up) LoRA=gate/out"),
    "dropout-inside-activation-chain": (DropoutInsideChainMlp, ["up", "down"], "gelu", "LoRA=in/out"),
    "linear-subclass-x-at-wT-bias": (SubclassMlp, None, "gelu", "LoRA=none"),
    "linear-subclass-x-at-wT-bias-lora": (SubclassMlp, ["up", "down"], "gelu", "LoRA=in/out"),
    "linear-subclass-t-bias-first": (lambda: SubclassMlp(TransposedLinear), None, "gelu", "LoRA=none"),
    "linear-subclass-gated-no-bias-lora": (lambda: SubclassMlp(gated=True, bias=False), ["gate", "up", "down"],
                                           "gated silu", "LoRA=in/gate/out"),
}


@pytest.mark.parametrize("name", CASES)
def test_mlp_form(name):
    factory, targets, pattern, detail = CASES[name]
    torch.manual_seed(0)
    model = factory()
    if targets:
        model = with_lora(model, targets)
    x = torch.randn(2, 7, 24, requires_grad=True)
    cap = capture(model, x)
    (site,) = cap.rewritten("mlp")
    assert site.pattern == pattern and detail in site.detail, site.line()
    assert not cap.dense()
    assert_dense_equivalent(model, x)


@pytest.mark.parametrize("factory", [T5DenseReluDense, DroppedGatedMlp], ids=["t5-relu", "gated"])
def test_live_dropout_over_the_hidden_layer_is_drawn_by_the_op(factory):
    """T5's wo(dropout(relu(wi(x)))) and a gated product under a dropout, in training: rewritten, the op
    drawing the dropout (before, the MLP stayed dense). In eval mode the dropout is the identity."""
    import spt_compile

    torch.manual_seed(0)
    model = factory(p=0.1).train()
    x = torch.randn(2, 7, 24)
    (site,) = capture(model, x).rewritten("mlp")
    assert "dropout 0.1 on the hidden layer (drawn by the op)" in site.detail, site.line()
    (site,) = capture(model.eval(), x).rewritten("mlp")
    assert "dropout" not in site.detail
    # Through the backend at every block, many training calls: the mean output and the mean input
    # gradient are the dense model's (the dropout keeps the expected value), and calls draw anew.
    model.train()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 0,
                                                        "ffn_active": 4, "sparse_attention": False})
    x = torch.randn(1, 5, 24, requires_grad=True)
    w = torch.randn(1, 5, 24)
    outs, grads = [], []
    for _ in range(400):
        x.grad = None
        y = fast(x)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad.clone())
    assert not torch.equal(outs[0], outs[1]), "each call draws its own mask"
    with torch.no_grad():
        want = model.eval()(x)
    x.grad = None
    (model(x) * w).sum().backward()
    sd_y = torch.stack(outs).std(0) / 400**0.5  # standard error of the mean, per element
    assert ((torch.stack(outs).mean(0) - want).abs() < 5 * sd_y + 1e-6).all()
    sd_g = torch.stack(grads).std(0) / 400**0.5
    assert ((torch.stack(grads).mean(0) - x.grad).abs() < 5 * sd_g + 1e-6).all()
    assert spt_compile.report(model)[0]["runs"].get("dense") == 400


def test_a_dropout_inside_the_activation_chain_or_with_p_from_the_graph_stays_dense():
    class ChainDropout(nn.Module):  # act -> live dropout -> mul: inside the hidden layer, not over it
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(24, 64), nn.Linear(24, 64), nn.Linear(64, 24)

        def forward(self, x):
            return self.down(F.dropout(F.silu(self.gate(x)), 0.1, True) * self.up(x))

    (site,) = capture(ChainDropout().train(), torch.randn(2, 7, 24)).dense("mlp")
    assert "dropout" in site.reason and "routed op has none" in site.reason, site.line()


class CastNormThenMlp(nn.Module):
    """An RMSNorm that ends in type_as (Gemma's: a no-op cast in fp32) before a gated MLP: the MLP's
    input x is itself a cast node."""

    def __init__(self, d=24, hidden=64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight.float())).type_as(x)
        return self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))


def test_lora_dropout_on_an_input_that_is_a_no_op_cast():
    """PEFT's LoRA dropout reads the same x as the base projection; x being a no-op cast (Gemma) must
    not send the adapter's input walk past it (it did: the MLP was left dense as 'unrecognised')."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(CastNormThenMlp(), peft.LoraConfig(
        r=R, lora_alpha=2 * R, lora_dropout=0.1, target_modules=["gate_proj", "up_proj", "down_proj"])).train()
    cap = capture(model, torch.randn(2, 7, 24, requires_grad=True))
    (site,) = cap.rewritten("mlp")
    assert site.pattern == "gated gelu_tanh" and "LoRA=in/gate/out" in site.detail, site.line()
    assert not cap.dense("mlp")
    assert_dense_equivalent(model.eval(), torch.randn(2, 7, 24, requires_grad=True))  # dropout off: exact


@pytest.mark.parametrize("up_first", [False, True])
def test_fused_gate_up_with_lora_dropout_is_rewritten(up_first):
    """Phi-3's fused gate_up_proj under PEFT's usual lora_dropout: one site (the op draws one mask for
    both halves, as the one PEFT module does; tests/ops/test_routed_mlp_op.py checks the formula),
    trained through spt with finite adapter gradients, and equal to dense in eval mode."""
    import peft

    import spt_compile

    torch.manual_seed(0)
    model = peft.get_peft_model(FusedGateUpMlp(up_first=up_first), peft.LoraConfig(
        r=R, lora_alpha=2 * R, lora_dropout=0.1, target_modules=["gate_up_proj", "down_proj"])).train()
    cap = capture(model, torch.randn(2, 7, 24, requires_grad=True))
    (site,) = cap.rewritten("mlp")
    assert site.pattern == "gated fused silu" and "LoRA=gate/out" in site.detail, site.line()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1})
    for _ in range(2):
        compiled(torch.randn(2, 7, 24)).square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert spt_compile.report(model)[0]["runs"], spt_compile.report(model)
    model.zero_grad(set_to_none=True)
    assert_dense_equivalent(model.eval(), torch.randn(2, 7, 24, requires_grad=True))
