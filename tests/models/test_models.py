"""The invariants on real models, through torch.compile(..., backend="spt"):
every key kept and every block active => the same outputs and gradients as the dense model;
one attention and one MLP site per layer; the rest of each graph unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from graph_check import GraphCapture
from toy_models import SPARSE_AT_EVERY_LENGTH

pytestmark = pytest.mark.slow

# Degenerate options: every key and every block. Key blocks of 16, so that the test sequences (19 to 24
# tokens) span several blocks and block selection is not trivial.
EVERY = {"density": 1.0, "ffn_blocks": 4, "ffn_active": 4, "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH,
         "attention_block": 16}


def lora(model, targets, r=8):
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0; make the adapters matter for the comparison
            torch.nn.init.normal_(p, std=0.02)
    return model


def run(model, batch, loss_mask):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss = (hidden.float().pow(2).mean(-1) * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return hidden.detach(), grads


def assert_same(model, batch, loss_mask, compiler="aot_eager", atol=5e-5, extra=None):
    """Compiled with spt (degenerate options, updated by `extra`) vs the same model run eagerly and dense."""
    import spt_compile

    torch._dynamo.reset()
    reference = copy.deepcopy(model)
    before = {s["key"]: s["runs"] for s in spt_compile.report(model)}  # count_sites' capture ran the ops once
    compiled = torch.compile(model, backend="spt", options={**EVERY, **(extra or {}), "compiler": compiler})
    got, got_grads = run(compiled, batch, loss_mask)
    want, want_grads = run(reference, batch, loss_mask)
    # The compile whose outputs are compared rewrote every attention and MLP, and each site ran its
    # sparse code (attention: block selection over every key block; not an exact fallback).
    (report,) = spt_compile.compile_reports(model)
    assert report.rewritten("attention") and len(report.rewritten("mlp")) == len(report.rewritten("attention"))
    assert not report.dense(), [s.line() for s in report.dense()]
    sites = spt_compile.report(model)
    assert len(sites) == 2 * len(report.rewritten("attention"))
    for site in sites:
        old = before.get(site["key"], {})
        ran = {how: n - old.get(how, 0) for how, n in site["runs"].items() if n != old.get(how, 0)}  # this compile's
        if site["kind"] == "attention":
            assert ran.get("exact_forward", 0) + ran.get("sparse", 0) == 1 and not ran.get("exact_short"), site
        else:
            assert sum(ran.values()) == 1, site
    keep = loss_mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=atol, rtol=1e-4)
    assert want_grads and want_grads.keys() <= got_grads.keys()
    for name in got_grads.keys() - want_grads.keys():  # compiled graphs give zeros where eager gives None
        assert got_grads[name].abs().max() == 0, name
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=atol, rtol=2e-3,
                                   msg=lambda m: f"grad of {name}: {m}")


def count_sites(model, batch, n_layers):
    torch._dynamo.reset()
    cap = GraphCapture(EVERY)
    torch.compile(model, backend=cap)(**batch)
    assert len(cap.rewritten("attention")) == n_layers, cap.sites
    assert len(cap.rewritten("mlp")) == n_layers, cap.sites
    assert not cap.dense(), [s.line() for s in cap.dense()]
    return cap


def padded_batch(vocab, B=2, N=24, pad_right_of=17):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, N), generator=gen)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, pad_right_of:] = 0
    return ids, mask


def test_smollm2_with_peft_lora(smollm2_2layer):
    model = lora(smollm2_2layer, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model.train()
    ids, mask = padded_batch(49152)
    batch = {"input_ids": ids, "attention_mask": mask}
    cap = count_sites(model, batch, 2)
    att = cap.rewritten("attention")[0]
    assert "GQA 9:3" in att.detail and "mask=bool (a bool mask that is exactly causal runs as causal)" in att.detail
    assert cap.rewritten("mlp")[0].pattern == "gated silu"
    assert "LoRA=in/gate/out" in cap.rewritten("mlp")[0].detail
    assert_same(model, batch, mask)


def test_smollm2_every_key_block_by_the_floor(smollm2_2layer):
    """Density 1/8 (3 of 24 keys: one 16-key block) with attention_min_keys=23: the floor lists both
    key blocks of every query block (the padded row's 17 real keys: all of them), so the sparse
    kernels compute the dense model's outputs and gradients."""
    model = lora(smollm2_2layer, ["q_proj", "v_proj", "gate_proj", "down_proj"])
    model.train()
    ids, mask = padded_batch(49152)
    assert_same(model, {"input_ids": ids, "attention_mask": mask}, mask,
                extra={"density": 0.125, "attention_min_keys": 23, "attention_dense_below": 4096,
                       "attention_backward_dense_below": 0})


def test_smollm2_through_inductor(smollm2_2layer):
    """The default downstream compiler (Inductor; the suite runs aot_eager), no padding (the is_causal SDPA path)."""
    model = lora(smollm2_2layer, ["q_proj", "v_proj", "gate_proj", "down_proj"])
    ids, mask = padded_batch(49152, pad_right_of=24)
    assert_same(model, {"input_ids": ids}, mask, compiler="inductor")


def test_minilm_bert_padded_batch(minilm_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.encoder.layer = model.encoder.layer[:3]
    model.train()
    ids, mask = padded_batch(30522, N=20, pad_right_of=13)
    batch = {"input_ids": ids, "attention_mask": mask}
    cap = count_sites(model, batch, 3)
    assert cap.rewritten("mlp")[0].pattern == "gelu"
    assert "causal=False" in cap.rewritten("attention")[0].detail
    assert_same(model, batch, mask)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_random_gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=211, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = attn
    model = GPT2LMHeadModel(config).train()
    ids, mask = padded_batch(211, N=19, pad_right_of=19)
    batch = {"input_ids": ids}
    cap = count_sites(model, batch, 2)
    assert cap.rewritten("mlp")[0].pattern == "gelu_tanh" and "Conv1D" in cap.rewritten("mlp")[0].detail
    assert cap.rewritten("attention")[0].pattern == ("sdpa" if attn == "sdpa" else "matmul-softmax")
    assert_same(model, batch, mask)
