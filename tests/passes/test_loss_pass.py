"""The chunked-loss pass: which LM head + cross-entropy forms are rewritten (and only their nodes),
which stay dense and why, and that the rewritten graph gives the dense loss, logits and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spt_compile
from graph_check import GraphCapture
from toy_models import SPARSE_AT_EVERY_LENGTH

EVERY = {"density": 1.0, "ffn_active": 4, "ffn_blocks": 4, "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH,
         "loss_chunk": 5}


def capture(model, *args, options=None, **kwargs) -> GraphCapture:
    torch._dynamo.reset()
    cap = GraphCapture({**EVERY, **(options or {})})
    torch.compile(model, backend=cap)(*args, **kwargs)
    assert cap.checked >= 1
    return cap


class Head(nn.Module):
    """A final norm, an LM head and the loss, written the ways user loops write them."""

    def __init__(self, d=24, vocab=101, bias=False, form="plain"):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=bias)
        self.form = form
        self.register_buffer("final_logits_bias", torch.randn(1, vocab) * 0.1)

    def forward(self, x, targets):
        logits = self.lm_head(self.norm(x))  # [B, N, V]
        V = logits.size(-1)
        if self.form == "plain":  # nanoGPT
            return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
        if self.form == "shifted":  # logits[:-1] predict targets[1:]
            return F.cross_entropy(logits[:, :-1, :].reshape(-1, V), targets[:, 1:].reshape(-1), reduction="sum")
        if self.form == "returns_logits":
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1), label_smoothing=0.1), logits
        if self.form == "none":
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        if self.form == "softcap":  # Gemma-2's final soft-capping, the capped logits returned too
            logits = torch.tanh(logits / 3.0) * 3.0
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1)), logits
        if self.form == "softcap_other_cap":  # tanh(z / 3) * 2: not a soft-cap
            return F.cross_entropy((torch.tanh(logits / 3.0) * 2.0).view(-1, V), targets.view(-1))
        if self.form == "softcap_tanh_used":  # the tanh inside also feeds something else
            t = torch.tanh(logits / 3.0)
            return F.cross_entropy((t * 3.0).view(-1, V), targets.view(-1)) + t.mean()
        if self.form == "shared_upcast":  # the fp32 "copy" (the logits themselves in fp32) feeds something else too
            up = logits.float()
            return F.cross_entropy(up.view(-1, V), targets.view(-1)) + up.logsumexp(-1).mean()
        if self.form == "shared_view":  # a reshaped view feeds something else too
            flat = logits.view(-1, V)
            return F.cross_entropy(flat, targets.view(-1)) + flat.logsumexp(-1).mean()
        if self.form == "contiguous_returned":  # OPT: lm_head(h).contiguous() is the returned logits
            logits = logits.contiguous()
            return F.cross_entropy(logits.view(-1, V), targets.view(-1)), logits
        if self.form == "scaled_returned":  # Cohere: logits * logit_scale, returned and fed to the loss
            logits = logits * 0.0625
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1)), logits
        if self.form == "divided":  # Granite: logits / logits_scaling
            return F.cross_entropy((logits / 1.6).float().view(-1, V), targets.view(-1))
        if self.form == "scaled_unscaled_used":  # the unscaled logits feed something else too
            return F.cross_entropy((logits * 0.5).view(-1, V), targets.view(-1)) + logits.logsumexp(-1).mean()
        if self.form == "scaled_after_upcast":  # the factor after a cast: not the head's output in its dtype
            return F.cross_entropy((logits.float().view(-1, V) * 2.0), targets.view(-1))
        if self.form == "final_bias":  # BART: lm_head(h) + final_logits_bias (a [1, V] buffer), returned too
            logits = logits + self.final_logits_bias
            return F.cross_entropy(logits.view(-1, V), targets.view(-1)), logits
        if self.form == "final_bias_scaled":  # the same, then a factor
            return F.cross_entropy(((logits + self.final_logits_bias) * 0.5).view(-1, V), targets.view(-1))
        if self.form == "weighted":
            return F.cross_entropy(logits.view(-1, V), targets.view(-1), weight=torch.ones(V))
        if self.form == "lora":  # a LoRA adapter on the head, as PEFT writes it
            h = self.norm(x)
            lora = F.linear(F.linear(h, self.lora_a), self.lora_b) * 2.0
            return F.cross_entropy((self.lm_head(h) + lora).view(-1, V), targets.view(-1))
        raise ValueError(self.form)


def head_inputs(B=2, N=9, d=24, vocab=101, seed=0, ignore=-100):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (B, N), generator=gen)
    targets[0, :3] = ignore  # not trained on (the plain form says ignore_index=-1)
    return x, targets


def assert_dense_equivalent(model, *args, atol=1e-5):
    torch._dynamo.reset()
    ref_model = copy.deepcopy(model)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    got = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager"})(*args)
    want = ref_model(*ref_args)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5)
    sum(g.float().sum() for g in got).backward()
    sum(w.float().sum() for w in want).backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(args[0].grad, ref_args[0].grad, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("form,bias", [("plain", False), ("shifted", True), ("returns_logits", False), ("none", True),
                                       ("contiguous_returned", False), ("shared_upcast", True),
                                       ("scaled_returned", True), ("divided", False), ("final_bias", False),
                                       ("final_bias_scaled", False), ("softcap", True)])
def test_head_forms_are_rewritten_and_equal_dense(form, bias):
    model = Head(bias=bias, form=form)
    x, targets = head_inputs(ignore=-1 if form == "plain" else -100)
    cap = capture(model, x, targets)
    (site,) = cap.rewritten("loss")
    assert site.path == "lm_head" and "vocab=101" in site.detail
    assert not cap.dense()
    # the head's linear and the cross_entropy go; returned logits come from the op
    assert "logits" in site.replaced and any(n.startswith("cross_entropy") for n in site.replaced)
    assert ("logits also returned" in site.detail) == (form in ("returns_logits", "contiguous_returned", "shared_upcast",
                                                                "scaled_returned", "final_bias", "softcap"))
    if form == "softcap":
        assert "soft-capped at 3" in site.detail
    if form.startswith("final_bias"):
        assert "added to the logits" in site.detail and ("logits * 0.5" in site.detail) == form.endswith("scaled")
    if form == "scaled_returned":
        assert "logits * 0.0625" in site.detail
    if form == "divided":
        assert "logits / 1.6" in site.detail
    if form == "shifted":
        assert "token slice" in site.detail
    if form == "returns_logits":
        assert "label_smoothing=0.1" in site.detail
    assert_dense_equivalent(model, x, targets)


@pytest.mark.parametrize("form,reason", [
    ("softcap_other_cap", "not a linear layer's output"),
    ("softcap_tanh_used", "inside the logits' soft-capping is also used elsewhere"),
    ("weighted", "class weights"),
    ("shared_view", "also used elsewhere"),
    ("lora", "LoRA adapter"),
    ("scaled_unscaled_used", "used elsewhere without the factor"),
    ("scaled_after_upcast", "not a linear layer's output"),
])
def test_other_forms_stay_dense_with_a_reason(form, reason):
    model = Head(form=form)
    if form == "lora":
        model.lora_a = nn.Parameter(torch.randn(4, 24) * 0.1)
        model.lora_b = nn.Parameter(torch.randn(101, 4) * 0.1)
    cap = capture(model, *head_inputs())
    assert not cap.rewritten("loss")
    (site,) = cap.dense("loss")
    assert reason in site.reason, site.reason


def test_switched_off_leaves_the_graph_alone():
    cap = capture(Head(), *head_inputs(ignore=-1), options={"chunked_loss": False})
    (site,) = cap.dense("loss")
    assert site.reason == "chunked_loss=False" and not site.replaced


# --- Hugging Face causal LMs ---------------------------------------------------------------------


def tiny_llama(dtype=torch.float32, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).to(dtype).train()


def hf_run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "sum_over_num_items"])
def test_hf_causal_lm_loss(num_items):
    """ForCausalLMLoss: labels padded and shifted, logits upcast, view(-1, V), mean or sum / N."""
    model = tiny_llama(tie=not num_items)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (2, 13), generator=gen)
    labels = ids.clone()
    labels[1, :4] = -100  # a prompt not trained on
    kw = {"num_items_in_batch": torch.tensor(int((labels[:, 1:] != -100).sum()))} if num_items else {}
    cap = capture(model, input_ids=ids, labels=labels, **kw)
    (site,) = cap.rewritten("loss")
    assert site.path == "lm_head" and "logits also returned" in site.detail
    assert f"reduction={'sum' if num_items else 'mean'}" in site.detail
    assert any(n.startswith("loss") for n in site.replaced)
    assert len(cap.rewritten("attention")) == len(cap.rewritten("mlp")) == 2

    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager"})
    got, want = hf_run(compiled, ids, labels, **kw), hf_run(ref, ids, labels, **kw)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_returned_logits_get_no_zero_gradient_and_their_own_outside_the_graph(monkeypatch, compiler):
    """HF returns the logits beside the loss. They leave the compiled graph outside autograd, so a
    backward of the loss alone hands the op no zero-filled [T, V] gradient to scan (before: one per
    step); a term of the logits still gets its gradient, attached outside the graph, into h and a
    trained head's W. Under no_grad nothing is attached."""
    import spt_compile.sparse_ops.linear_cross_entropy.chunked as chunked

    scanned = []
    any_nonzero = chunked._any_nonzero
    monkeypatch.setattr(chunked, "_any_nonzero", lambda t: scanned.append(tuple(t.shape)) or any_nonzero(t))
    model = tiny_llama(tie=False)  # every weight trained, the head's W too
    ids = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = -100
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={**EVERY, "compiler": compiler})
    for through_logits in (False, True):
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        got, want = compiled(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
        assert "LogitsGradient" in type(got.logits.grad_fn).__name__
        (got.loss + (got.logits.square().mean() if through_logits else 0.0)).backward()
        (want.loss + (want.logits.square().mean() if through_logits else 0.0)).backward()
        assert not scanned, scanned  # no gradient of the logits reached the op
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        grads = {n: p.grad for n, p in ref.named_parameters()}
        assert grads["lm_head.weight"] is not None
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{n} (through the logits: {through_logits}): {m}")
    with torch.no_grad():
        out = compiled(input_ids=ids, labels=labels)
    assert not out.logits.requires_grad and out.logits.grad_fn is None


def test_hf_bf16_upcast_copy_is_not_kept():
    """bf16 model: the fp32 copy of the logits only ever exists one chunk at a time; the model's
    bf16 logits are the op's output. Nothing [T, V]-sized is saved for backward."""
    model = tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 211, (2, 40), generator=torch.Generator().manual_seed(2))
    cap = capture(model, input_ids=ids, labels=ids)
    (site,) = cap.rewritten("loss")
    assert "upcast bfloat16->float32" in site.detail
    assert any(n.startswith("logits_1") for n in site.replaced)  # the .float() node is gone

    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager", "loss_chunk": 16})
    T, V = 80, 211
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = compiled(input_ids=ids, labels=ids)
    assert T * V not in sizes, "a [tokens, vocab] tensor was saved for backward"
    out.loss.backward()
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    # bf16 through two layers of spt ops: rounding differs from eager, not the result
    torch.testing.assert_close(out.logits, want.logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.loss, want.loss, atol=5e-3, rtol=5e-3)
    g, w = model.model.embed_tokens.weight.grad.float(), ref.model.embed_tokens.weight.grad.float()
    assert (g - w).norm() <= 0.02 * w.norm()


@pytest.mark.slow
def test_smollm2_loss_and_lora_grads_equal_dense(smollm2_2layer):
    """The real SmolLM2 (2 layers) with PEFT LoRA, through backend="spt" at the exact settings:
    the chunked loss gives the dense loss and LoRA gradients; explain() lists it."""
    from test_models import lora

    model = lora(smollm2_2layer, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]).train()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 49152, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    report = spt_compile.explain(model, **batch)
    (site,) = report.rewritten("loss")
    assert site.path.endswith("lm_head") and "vocab=49152" in site.detail
    assert "1 chunked loss" in str(report)

    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="spt", options={**EVERY, "loss_chunk": 7, "compiler": "aot_eager"})
    from spt_compile import compile_reports

    got = hf_run(compiled, **{"ids": ids, "labels": labels}, attention_mask=mask)
    assert len(compile_reports(model)[-1].rewritten("loss")) == 1
    want = hf_run(ref, **{"ids": ids, "labels": labels}, attention_mask=mask)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=5e-5, rtol=1e-4)
    assert want[2] and all("lora" in n for n in want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=5e-5, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_dynamic_shapes():
    """dynamic=True: the token count is symbolic; one compiled graph serves two lengths."""
    torch._dynamo.reset()
    model = Head(form="none", bias=True)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="spt", dynamic=True, options={**EVERY, "compiler": "aot_eager"})
    from spt_compile import compile_reports

    for N in (7, 12):
        x, targets = head_inputs(N=N, seed=N)
        torch.testing.assert_close(compiled(x, targets), ref(x, targets), atol=1e-5, rtol=1e-5)
        assert len(compile_reports(model)[-1].rewritten("loss")) == 1
