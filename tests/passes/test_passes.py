"""Graph tests: each written form is matched (or left dense, with the reason), the rewrite replaces
exactly the matched nodes, and in the degenerate configuration the numbers equal dense."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spt_compile

from graph_check import GraphCapture
from toy_models import SPARSE_AT_EVERY_LENGTH, GQAAttention, GatedMLP, NanoGPT, PlainMLP

EVERY = {"density": 1.0, "ffn_active": 4, "ffn_blocks": 4, "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH}


def capture(model, *args, options=None, **kwargs) -> GraphCapture:
    torch._dynamo.reset()
    cap = GraphCapture(options or {})
    torch.compile(model, backend=cap)(*args, **kwargs)
    assert cap.checked >= 1
    return cap


def assert_dense_equivalent(model, *args, options=EVERY, compiler="aot_eager", atol=1e-5):
    """torch.compile(backend="spt") in the degenerate configuration: same outputs, same gradients."""
    torch._dynamo.reset()
    ref_model = copy.deepcopy(model)
    out = torch.compile(model, backend="spt", options={**options, "compiler": compiler})(*args)
    ref = ref_model(*args)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    grad_out = torch.randn_like(ref)
    out.backward(grad_out)
    ref.backward(grad_out)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# --- attention forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "masked_fill"])
def test_nanogpt_attention_and_mlp(flash):
    model = NanoGPT(layers=2, flash=flash)
    idx = torch.randint(0, 97, (2, 21))
    cap = capture(model, idx)
    att = cap.rewritten("attention")
    assert len(att) == 2 and len(cap.rewritten("mlp")) == 2
    assert {s.pattern for s in att} == {"sdpa" if flash else "matmul-softmax"}
    if flash:
        assert all("causal=True" in s.detail for s in att)
        assert all(len(s.replaced) == 1 and s.replaced[0].startswith("y") for s in att)  # just the SDPA call
    else:  # matmul, transpose, mul, masked_fill, softmax, dropout, matmul -- and the mask is kept
        assert all(len(s.replaced) >= 6 for s in att)
    assert not cap.dense()
    assert_dense_equivalent(model, idx)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_repeat_kv_is_unwrapped_and_masks_are_honoured(eager):
    attn = GQAAttention(d=64, heads=4, kv_heads=2, eager=eager)
    x = torch.randn(2, 13, 64, requires_grad=True)
    pad = torch.ones(2, 13, dtype=torch.bool)
    pad[1, 9:] = False
    causal = torch.tril(torch.ones(13, 13, dtype=torch.bool))
    allowed = (causal[None] & pad[:, None, :])[:, None]  # [B, 1, N, N]
    mask = allowed if not eager else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cap = capture(attn, x, mask)
    (site,) = cap.rewritten("attention")
    assert "GQA 4:2" in site.detail
    assert any(n.startswith("reshape") or n.startswith("k") for n in site.replaced)  # repeat_kv nodes went too

    torch._dynamo.reset()
    ref = copy.deepcopy(attn)
    out = torch.compile(attn, backend="spt", options={**EVERY, "compiler": "aot_eager"})(x, mask)
    want = ref(x, mask)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    want.sum().backward()
    torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-4)


def test_sdpa_enable_gqa_reads_kv_heads_directly():
    class NativeGQA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 11, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, 16, generator=gen, requires_grad=True) for _ in range(2))
    cap = capture(NativeGQA(), q, k, v)
    (site,) = cap.rewritten("attention")
    assert "GQA 6:2" in site.detail
    torch._dynamo.reset()
    out = torch.compile(NativeGQA(), backend="spt", options={**EVERY, "compiler": "aot_eager"})(q, k, v)
    want = NativeGQA()(q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_bert_style_scaled_additive_mask_with_dropout_in_eval():
    class BertSelf(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, ext_mask):
            B, N, _ = x.shape
            q, k, v = (l(x).view(B, N, 2, 16).permute(0, 2, 1, 3) for l in (self.q, self.k, self.v))
            s = torch.matmul(q, k.transpose(-1, -2)) / 4.0 + ext_mask  # [B, 1, 1, N] mask, old BERT style
            p = self.drop(nn.functional.softmax(s, dim=-1))
            return torch.matmul(p, v).permute(0, 2, 1, 3).reshape(B, N, 32)

    model = BertSelf().eval()
    x = torch.randn(2, 10, 32)
    ext = torch.zeros(2, 1, 1, 10)
    ext[1, ..., 7:] = -10000.0
    cap = capture(model, x, ext)
    (site,) = cap.rewritten("attention")
    assert "scale=0.25" in site.detail and "dropout=0.0" in site.detail and "mask=additive" in site.detail
    assert_dense_equivalent(model, x, ext)


def test_attention_weights_used_elsewhere_stay_dense():
    class ReturnsWeights(nn.Module):
        def forward(self, q, k, v):
            w = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)
            return w @ v, w

    q = torch.randn(1, 2, 8, 64)
    cap = capture(ReturnsWeights(), q, q, q)
    (site,) = cap.dense("attention")
    assert "used elsewhere" in site.reason


def test_softmax_over_another_axis_stays_dense():
    class WrongAxis(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v

    q = torch.randn(1, 2, 8, 64)
    cap = capture(WrongAxis(), q, q, q)
    (site,) = cap.dense("attention")
    assert "not over the keys" in site.reason


def test_decoding_step_is_rewritten_but_causal_with_fewer_queries_stays_dense():
    """One query over a KV cache without is_causal (or a decoder reading an encoder) is rewritten
    (tests/sites/test_cross_attention.py checks it equals dense); is_causal with fewer queries than keys
    means a top-left causal mask in SDPA, which the op does not have: dense, with the reason."""
    class Decode(nn.Module):
        def __init__(self, causal):
            super().__init__()
            self.causal = causal

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    q, k = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 9, 64)
    assert len(capture(Decode(False), q, k, k).rewritten("attention")) == 1
    q = torch.randn(1, 2, 4, 64)
    (site,) = capture(Decode(True), q, k, k).dense("attention")
    assert "is_causal with query length 4 and key length 9" in site.reason, site.reason


class OddHeads(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_head_size_not_divisible_by_subspace_is_rewritten_for_block_selection():
    """Block selection needs no PQ: a head size of 20 (not a multiple of pq_subspace_dim=8) is
    rewritten and runs sparse; asking for token selection there is an error that names the fix."""
    cap = capture(OddHeads(), torch.randn(1, 2, 8, 20))
    assert len(cap.rewritten("attention")) == 1 and not cap.dense()
    torch._dynamo.reset()
    q = torch.randn(1, 2, 128, 20)
    compiled = torch.compile(OddHeads(), backend="spt", options={
        "compiler": "aot_eager", "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16,
        "sparse_inference": True})
    for _ in range(2):
        compiled(q)
    with spt_compile.enable(attention_selection="token"):
        with pytest.raises(spt_compile.SptOptionError, match="head size that is a multiple of pq_subspace_dim=8.*"
                                                            "attention_selection='block'"):
            compiled(q)


# --- MLP forms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,name", [(F.silu, "silu"), (F.gelu, "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh")])
def test_gated_mlp(act, name):
    mlp = GatedMLP(act=act)
    x = torch.randn(2, 7, 32, requires_grad=True)
    cap = capture(mlp, x)
    (site,) = cap.rewritten("mlp")
    assert site.pattern == f"gated {name}"
    assert sorted(site.replaced) == sorted(["linear", "linear_1", "linear_2", "mul",
                                            {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu"}[name]])
    assert_dense_equivalent(mlp, x)


@pytest.mark.parametrize("act,name", [(F.relu, "relu"), (F.gelu, "gelu"), (F.silu, "silu"),
                                      (lambda t: 0.5 * t * (1 + torch.tanh(0.7978845608028654 * (t + 0.044715 * t**3))),
                                       "gelu_tanh")])
def test_plain_mlp_including_written_out_activations(act, name):
    mlp = PlainMLP(act=act)
    x = torch.randn(3, 5, 32, requires_grad=True)
    cap = capture(mlp, x)
    (site,) = cap.rewritten("mlp")
    assert site.pattern == name
    assert_dense_equivalent(mlp, x)


def test_unknown_activation_stays_dense_with_reason():
    mlp = PlainMLP(act=lambda t: t * torch.sigmoid(2.5 * t))
    cap = capture(mlp, torch.randn(2, 4, 32))
    (site,) = cap.dense("mlp")
    assert "activation is not one of" in site.reason
    assert not cap.rewritten()


def test_intermediate_used_outside_stays_dense():
    class Leaky(PlainMLP):
        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h), h.mean()

    cap = capture(Leaky(), torch.randn(2, 4, 32))
    (site,) = cap.dense("mlp")
    assert "used outside the MLP" in site.reason


def test_conv1d_addmm_mlp_with_views():
    """GPT-2's Conv1D: view -> addmm(b, x, W[in, out]) -> view, tanh-GELU written element-wise."""
    from transformers.pytorch_utils import Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(96, 24), Conv1D(24, 96)

        def forward(self, x):
            h = self.c_fc(x)
            h = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))
            return self.c_proj(h)

    mlp = Gpt2Mlp()
    x = torch.randn(2, 6, 24, requires_grad=True)
    cap = capture(mlp, x)
    (site,) = cap.rewritten("mlp")
    assert site.pattern == "gelu_tanh" and "Conv1D" in site.detail
    assert_dense_equivalent(mlp, x)


def test_peft_lora_on_every_projection():
    import peft

    mlp = GatedMLP()
    model = peft.get_peft_model(nn.Sequential(mlp), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    cap = capture(model, x)
    (site,) = cap.rewritten("mlp")
    assert "LoRA=in/gate/out" in site.detail
    assert_dense_equivalent(model, x)


# --- graph structure ---------------------------------------------------------------------------------


def test_passes_rewrite_inside_activation_checkpoint_bodies():
    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([PlainMLP(), PlainMLP()])

        def forward(self, x):
            for b in self.blocks:
                x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
            return x

    model = Ckpt()
    x = torch.randn(2, 6, 32, requires_grad=True)
    cap = capture(model, x)
    assert len(cap.rewritten("mlp")) == 2
    assert_dense_equivalent(model, x)


def test_dynamic_shapes_rewrite_and_do_not_recompile_per_length():
    from spt_compile import compile_reports

    torch._dynamo.reset()
    model = NanoGPT(layers=1)
    compiled = torch.compile(model, backend="spt", dynamic=True,
                             options={"compiler": "aot_eager", "calibration_steps": 0, "density": 0.5,
                                      **SPARSE_AT_EVERY_LENGTH})
    compiled(torch.randint(0, 97, (2, 9))).sum().backward()
    after_first = len(compile_reports(model))
    last = compile_reports(model)[-1]
    assert len(last.rewritten("attention")) == 1 and len(last.rewritten("mlp")) == 1
    assert "s" in last.rewritten("attention")[0].detail  # symbolic sizes in the matched shapes
    for n in (17, 30):
        compiled(torch.randint(0, 97, (2, n))).sum().backward()
    assert len(compile_reports(model)) == after_first, "a new length must not recompile"
