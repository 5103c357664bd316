"""Model families other than LLaMA/BERT/GPT-2, random-initialised tiny configs (transformers 5),
through torch.compile(backend="spt") in the degenerate configuration: one attention and one MLP
site per layer, the same outputs and gradients as the dense model (PEFT LoRA where a fine-tune would
put it), and explain's reason where a site is left dense."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import spt_compile
from test_models import EVERY, assert_same, count_sites, lora, padded_batch, run

pytestmark = pytest.mark.slow

V = 101  # vocabulary of the random models


def batch(N=20, pad_from=14):
    ids, mask = padded_batch(V, N=N, pad_right_of=pad_from)
    return {"input_ids": ids, "attention_mask": mask}, mask


def build(config_cls, model_cls, attn, **kw):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=V, **kw)
    config._attn_implementation = attn
    return getattr(transformers, model_cls)(config).train()


def test_opt_relu_fc1_fc2_with_lora():
    """OPT: the query pre-scaled by its Linear's output * scaling, ReLU fc1/fc2 on [B*N, d] tokens."""
    model = build("OPTConfig", "OPTForCausalLM", "eager", hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                  num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                  attention_dropout=0.0)
    model = lora(model, ["q_proj", "v_proj", "fc1", "fc2"])
    b, mask = batch()
    cap = count_sites(model, b, 1)
    assert cap.rewritten("mlp")[0].pattern == "relu" and "LoRA=in/out" in cap.rewritten("mlp")[0].detail
    assert_same(model, b, mask)
    # its logits are lm_head(h).contiguous(), returned and fed to the loss: the chunked loss takes them,
    # and the MLP site gets the loss rows
    text = str(spt_compile.explain(model, **b, labels=b["input_ids"]))
    assert "rewritten loss" in text and "logits also returned" in text and "loss rows from the labels" in text, text


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_qkv_biases_and_sliding_window(attn):
    """Qwen2: biases on q/k/v, layer 0 with a sliding window of 8 (an explicit mask), layer 1 full."""
    model = build("Qwen2Config", "Qwen2ForCausalLM", attn, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  use_sliding_window=True, sliding_window=8, max_window_layers=1,
                  layer_types=["sliding_attention", "full_attention"])
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model = lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    b, mask = batch()
    cap = count_sites(model, b, 2)
    assert all("GQA 4:2" in s.detail for s in cap.rewritten("attention"))
    assert_same(model, b, mask)


def test_gemma_type_as_norm_and_lora_dropout():
    """Gemma: RMSNorm ending in type_as (the MLP's input is a no-op cast), embeddings scaled by sqrt(d),
    a GeLU-tanh gated MLP. With PEFT's LoRA dropout the adapters read dropout(x) of that cast."""
    import peft

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    b, mask = batch()
    model = lora(build("GemmaConfig", "GemmaForCausalLM", "eager", **kw), targets)
    cap = count_sites(model, b, 1)
    assert cap.rewritten("mlp")[0].pattern == "gated gelu_tanh" and "LoRA=in/gate/out" in cap.rewritten("mlp")[0].detail
    assert_same(model, b, mask)
    dropped = peft.get_peft_model(build("GemmaConfig", "GemmaForCausalLM", "eager", **kw),
                                  peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets))
    count_sites(dropped, b, 1)  # one MLP site; before, the MLP was left dense as "unrecognised"


@pytest.mark.parametrize("family", ["Gemma2", "Gemma3Text"])
def test_gemma2_and_3_post_norm_reads_the_mlp_output_twice(family):
    """Gemma 2 and 3 norm the MLP's output (x.float(), then type_as(x)): the down projection's output
    has two readers. Without an adapter on the MLP (LoRA on q and v only) that left it dense, as an
    intermediate 'also used outside the MLP'."""
    model_cls = "Gemma3ForCausalLM" if family == "Gemma3Text" else f"{family}ForCausalLM"
    model = build(f"{family}Config", model_cls, "eager", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  attn_logit_softcapping=None)
    model = lora(model, ["q_proj", "v_proj"])
    b, mask = batch()
    cap = count_sites(model, b, 1)
    assert cap.rewritten("mlp")[0].pattern == "gated gelu_tanh" and "LoRA=none" in cap.rewritten("mlp")[0].detail
    assert_same(model, b, mask)


_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=64)
MORE_FAMILIES = {  # family: (config, model, config kwargs, LoRA targets), each what its modeling code writes
    # RMSNorm on each head's q and k before RoPE, GQA
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, num_key_value_heads=2, head_dim=8),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # fused query_key_value, partial rotary, parallel residual, GELU dense_h_to_4h / dense_4h_to_h
    "GPTNeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_SMALL), ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]),
    # fused multi-query query_key_value, parallel attention and MLP
    "Falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4),
               ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]),
    # Phi-2: partial rotary, parallel attention and MLP on one LayerNorm, GELU fc1 / fc2 with biases
    "Phi": ("PhiConfig", "PhiForCausalLM", dict(_SMALL), ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]),
    # RMSNorm on the whole q and k projections, norms after attention and MLP
    "Olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_SMALL), ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    # partial rotary, LayerNorm
    "StableLm": ("StableLmConfig", "StableLmForCausalLM", dict(_SMALL, num_key_value_heads=4),
                 ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    # interleaved rotary on rotary_dim of each head, parallel attention and MLP
    "GPTJ": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=1, n_head=4, n_positions=64, rotary_dim=4),
             ["q_proj", "v_proj", "fc_in", "fc_out"]),
    # biases everywhere, GELU c_fc / c_proj, GQA
    "Starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_SMALL, num_key_value_heads=2),
                   ["q_proj", "v_proj", "c_fc", "c_proj"]),
    # squared-ReLU MLP up_proj -> relu(x)^2 -> down_proj (torch.square of F.relu), partial rotary
    "Nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(_SMALL, num_key_value_heads=2),
                 ["q_proj", "v_proj", "up_proj", "down_proj"]),
    # fused query_key_value, q/k LayerNorm, squared-ReLU dense_h_to_4h / dense_4h_to_h
    "Persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(_SMALL),
                  ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]),
    # layers without RoPE (NoPE) among rotary ones
    "SmolLM3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(_SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
}


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_decoder_families_are_rewritten_whole_and_equal_dense(family):
    config_cls, model_cls, kw, targets = MORE_FAMILIES[family]
    model = lora(build(config_cls, model_cls, "sdpa", **kw), targets)
    b, mask = batch()
    count_sites(model, b, 1)
    assert_same(model, b, mask)


def test_gpt_neo_global_and_local_layers_masked_with_a_tensor_constant():
    """GPT-Neo: unscaled fp32 scores, where(causal or banded window, w, torch.tensor(finfo.min)), then the
    padding mask added; a global layer and a local one (window 8). Before, torch.tensor(c) was not read
    as a constant and both attentions stayed dense ("not a mask")."""
    model = build("GPTNeoConfig", "GPTNeoForCausalLM", "eager", hidden_size=32, num_layers=2, num_heads=4,
                  max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=8,
                  embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    model = lora(model, ["q_proj", "v_proj", "c_fc", "c_proj"])
    b, mask = batch()
    cap = count_sites(model, b, 2)
    assert all("scale=1 " in s.detail for s in cap.rewritten("attention")), [s.detail for s in cap.rewritten("attention")]
    assert_same(model, b, mask)


@pytest.mark.parametrize("family,shared", [("Mixtral", False), ("Qwen2Moe", True)])
def test_mixture_of_experts_is_reported_dense_with_the_reason(family, shared):
    """MoE experts run as grouped GEMMs over stacked expert weights (transformers' grouped_mm): explain
    lists them as dense with the reason (before, they were absent from it). Qwen2-MoE's shared expert
    is a dense gated MLP and is rewritten. The compiled model trains as the eager one does."""
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
    kw.update(num_local_experts=4) if family == "Mixtral" else kw.update(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)
    model = build(f"{family}Config", f"{family}ForCausalLM", "sdpa", **kw)
    b, mask = batch()
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b)
    (experts,) = report.dense("mlp")
    assert experts.pattern == "mixture of experts" and experts.path.endswith("mlp.experts"), experts.line()
    assert "grouped_mm" in experts.reason and "routes its tokens to experts itself" in experts.reason
    assert len(report.rewritten("attention")) == 1 and len(report.rewritten("mlp")) == int(shared), str(report)
    torch._dynamo.reset()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager"})
    got, got_grads = run(compiled, b, mask)
    want, want_grads = run(reference, b, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=5e-5, rtol=2e-3)


def test_phi3_fused_gate_up_with_lora_dropout():
    """Phi-3: one fused gate_up_proj (chunked into gate and up) and a fused qkv_proj. Under PEFT's
    lora_dropout the fused LoRA draws one mask for both halves (before, the MLP was left dense)."""
    import peft

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    b, mask = batch()
    model = lora(build("Phi3Config", "Phi3ForCausalLM", "eager", **kw), targets)
    cap = count_sites(model, b, 1)
    assert cap.rewritten("mlp")[0].pattern == "gated fused silu", cap.rewritten("mlp")[0].line()
    assert_same(model, b, mask)
    dropped = peft.get_peft_model(build("Phi3Config", "Phi3ForCausalLM", "eager", **kw),
                                  peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets))
    count_sites(dropped, b, 1)


def test_mistral_sliding_window():
    model = build("MistralConfig", "MistralForCausalLM", "eager", hidden_size=64, intermediate_size=96,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  sliding_window=8, head_dim=16)
    b, mask = batch()
    count_sites(model, b, 1)
    assert_same(model, b, mask)


def test_roberta():
    model = build("RobertaConfig", "RobertaModel", "eager", hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    b, mask = batch()
    cap = count_sites(model, b, 1)
    assert "causal=False" in cap.rewritten("attention")[0].detail
    assert_same(model, b, mask)


def t5_encoder():
    return build("T5Config", "T5EncoderModel", "eager", d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                 dropout_rate=0.0)


def test_t5_unscaled_attention_with_relative_bias_under_lora():
    """T5: no 1/sqrt(d) scaling, the relative position bias and the padding mask added to the scores
    (two additive masks, summed), ReLU MLP with a dropout between act and wo. Under LoRA the bias
    table is frozen, so the bias is a mask like any other."""
    model = lora(t5_encoder(), ["q", "v", "wi", "wo"])
    b, mask = batch()
    cap = count_sites(model, b, 2)
    assert all("scale=1 " in s.detail and "mask=additive" in s.detail for s in cap.rewritten("attention"))
    assert_same(model, b, mask)


def test_t5_with_its_default_dropout_trains_through_the_sites():
    """T5's default dropout_rate 0.1 puts a live dropout between act and wo in training: the op draws
    it (before, every T5 MLP stayed dense in training). A LoRA step runs with finite gradients, and in
    eval mode the same compiled model is dense's."""
    model = lora(build("T5Config", "T5EncoderModel", "eager", d_model=32, d_kv=16, d_ff=64, num_layers=2,
                       num_heads=2, dropout_rate=0.1), ["q", "v", "wi", "wo"])
    b, mask = batch()
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b)
    assert len(report.rewritten("mlp")) == 2 and len(report.rewritten("attention")) == 2, str(report)
    assert all("dropout 0.1 on the hidden layer" in s.detail for s in report.rewritten("mlp"))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager"})
    _, grads = run(compiled, b, mask)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "wi" in n and "lora_A" in n)
    assert_same(copy.deepcopy(model).eval(), b, mask)


def test_t5_full_fine_tuning_trains_the_relative_bias_through_the_op():
    """With the bias table trained (full fine-tuning), the bias needs a gradient: the op returns it (the
    score gradient at the listed pairs, summed over the batch the bias broadcasts over), and the bias
    table's gradient equals dense, through the sparse code with every block and at the defaults."""
    model = t5_encoder()
    b, mask = batch()
    cap = count_sites(model, b, 2)
    assert all("learned bias (its gradient returned)" in s.detail for s in cap.rewritten("attention")), str(cap.sites)
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert_same(model, b, mask)  # every block at every length; compares every parameter's gradient
    want_grads = assert_compiled_equals_eager(model, b, mask)  # defaults: short rows run exact
    assert want_grads[table].abs().max() > 0


def test_gpt2_reorder_and_upcast_with_lora_on_conv1d():
    """GPT-2 with reorder_and_upcast_attn: fp32 baddbmm on [B*H, N, D] read back as [B, H, N, D];
    PEFT LoRA on the Conv1D projections (fan_in_fan_out) of attention and MLP."""
    model = build("GPT2Config", "GPT2LMHeadModel", "eager", n_layer=1, n_embd=32, n_head=2, n_positions=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, reorder_and_upcast_attn=True,
                  bos_token_id=0, eos_token_id=0)
    model = lora(model, ["c_attn", "c_fc", "c_proj"])
    b, mask = batch()
    cap = count_sites(model, b, 1)
    assert cap.rewritten("attention")[0].pattern == "bmm-softmax"
    mlp = cap.rewritten("mlp")[0]
    assert mlp.pattern == "gelu_tanh" and "Conv1D" in mlp.detail and "LoRA=in/out" in mlp.detail
    assert_same(model, b, mask)


def test_gpt2_loss_after_a_logging_graph_break_is_explained_with_the_fix(caplog):
    """transformers' GPT2LMHeadModel logs a loss_type warning from `loss_function` on every call; Dynamo
    breaks the graph there, so the loss is compiled apart: explain() lists the break with Dynamo's
    reason and the fix, and with the fix (loss_type set on the base model) the loss is one site."""
    model = build("GPT2Config", "GPT2LMHeadModel", "sdpa", n_layer=1, n_embd=32, n_head=2, n_positions=64,
                  bos_token_id=0, eos_token_id=0)
    model = lora(model, ["c_attn", "c_fc", "c_proj"])
    b, _ = batch(pad_from=20)
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b, labels=b["input_ids"])
    assert report.graphs == 2 and not report.rewritten("loss") and len(report.breaks) == 1, str(report)
    assert "warning_once" in report.breaks[0] and 'loss_type = "ForCausalLM"' in report.breaks[0], str(report)
    assert "graph break: logging.Logger method" in str(report)
    # compiled and run, the backend warns (once per process) that the loss's logits came from another graph
    from spt_compile import backend

    backend._warned.clear()
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="spt_compile"):
        torch.compile(model, backend="spt", options={"compiler": "eager"})(**b, labels=b["input_ids"])
    assert sum("the loss is not chunked" in r.getMessage() for r in caplog.records) == 1, caplog.text
    model.get_base_model().loss_type = "ForCausalLM"
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b, labels=b["input_ids"])
    assert report.graphs == 1 and len(report.rewritten("loss")) == 1 and not report.breaks, str(report)


def test_modernbert_fused_geglu_behind_an_identity_dropout_with_a_normed_head():
    """ModernBERT: Wo(drop(act(input) * gate)) with `input, gate = Wi(x).chunk(2)` and nn.Dropout(p=0)
    over the whole hidden layer (was neither rewritten nor listed), global and sliding-window layers;
    its classifier reads position 0 through dense -> GELU -> LayerNorm, and the loss rows follow it."""
    model = build("ModernBertConfig", "ModernBertModel", "sdpa", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                  local_attention=8, global_attn_every_n_layers=2)
    model = lora(model, ["Wqkv", "Wi", "Wo"])
    b, mask = batch()
    cap = count_sites(model, b, 3)
    mlp = cap.rewritten("mlp")[0]
    assert mlp.pattern == "gated fused gelu" and "LoRA=gate/out" in mlp.detail, mlp.line()
    assert_same(model, b, mask)
    classifier = build("ModernBertConfig", "ModernBertForSequenceClassification", "sdpa", hidden_size=32,
                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                       pad_token_id=0)
    torch._dynamo.reset()
    report = spt_compile.explain(classifier, **b, labels=torch.tensor([0, 1]))
    assert "loss rows from the labels (position 0)" in report.rewritten("mlp")[0].detail, str(report)


@pytest.mark.parametrize("family,config,factor", [
    ("Cohere", dict(logit_scale=0.0625), "logits * 0.0625"),
    ("Granite", dict(logits_scaling=1.6), "logits / 1.6"),
])
def test_scaled_logits_get_the_chunked_loss(family, config, factor):
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling: the chunked
    loss applies the factor (it was left dense), and the loss, returned logits and LoRA gradients equal
    the dense model's."""
    model = build(f"{family}Config", f"{family}ForCausalLM", "sdpa", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  **config)
    model = lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    b, _ = batch()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    assert_loss_rewritten_and_equal(model, b, labels, factor)


def assert_loss_rewritten_and_equal(model, b, labels, detail):
    """explain() shows one chunked loss with `detail`; compiled with spt (every key and block), the HF
    loss, the returned logits and the LoRA gradients equal the dense model's: of the loss alone (the
    logits leave the graph without a gradient of their own) and of the loss plus a term of the logits
    (the gradient attached to them outside the graph)."""
    from test_models import EVERY

    torch._dynamo.reset()
    (site,) = spt_compile.explain(model, **b, labels=labels).rewritten("loss")
    assert detail in site.detail and "logits also returned" in site.detail, site.line()
    model.zero_grad(set_to_none=True)  # a second call on the same model starts from no gradients either
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spt", options={**EVERY, "compiler": "aot_eager"})
    got, want = compiled(**b, labels=labels), reference(**b, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    for through_logits in (False, True):
        if through_logits:
            model.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            got, want = compiled(**b, labels=labels), reference(**b, labels=labels)
        assert got.logits.requires_grad
        extra = [o.logits.float().square().mean() if through_logits else 0.0 for o in (got, want)]
        (got.loss + extra[0]).backward()
        (want.loss + extra[1]).backward()
        grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        assert grads
        for n, p in model.named_parameters():
            if n in grads:
                torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4,
                                           msg=lambda m: f"{n} (through the logits: {through_logits}): {m}")


def test_bart_final_logits_bias_gets_the_chunked_loss():
    """BART adds final_logits_bias (a [1, V] buffer) to its head's output: the chunked loss takes it as the
    head's bias (it was left dense, and the decoder's MLP sites had no loss rows)."""
    model = build("BartConfig", "BartForConditionalGeneration", "sdpa", d_model=32, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.1)
    model = lora(model, ["q_proj", "v_proj", "fc1", "fc2"])
    b, _ = batch()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    assert_loss_rewritten_and_equal(model, b, labels, "added to the logits")
    # a target shorter than the source: the decoder's cross-attention (10 queries over 20 keys) is rewritten
    torch._dynamo.reset()
    short = labels[:, :10].contiguous()
    report = spt_compile.explain(model, **b, labels=short)
    assert len(report.rewritten("attention")) == 3 and not report.dense(), str(report)
    assert_loss_rewritten_and_equal(model, b, short, "added to the logits")


def test_gemma2_soft_capped_logits_get_the_chunked_loss():
    """Gemma-2 soft-caps its logits (cap * tanh(logits / cap)) before the loss: the chunked loss applies the
    cap and its derivative (it was left dense); its soft-capped attention is rewritten too."""
    model = build("Gemma2Config", "Gemma2ForCausalLM", "eager", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, final_logit_softcapping=3.0, attn_logit_softcapping=50.0)
    model = lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    b, _ = batch()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b, labels=labels)
    assert len(report.rewritten("attention")) == 1 and len(report.rewritten("mlp")) == 1, str(report)
    assert_loss_rewritten_and_equal(model, b, labels, "soft-capped at 3")


def assert_compiled_equals_eager(model, b, mask, options=None) -> dict:
    """model compiled with backend="spt" (the default options, or `options`) against a copy run eagerly:
    outputs at the real rows and every parameter's gradient. Returns the eager gradients."""
    torch._dynamo.reset()
    reference = copy.deepcopy(model)
    got, got_grads = run(torch.compile(model, backend="spt", options=options), b, mask)
    want, want_grads = run(reference, b, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=5e-5, rtol=2e-3,
                                   msg=lambda m: f"grad of {name}: {m}")
    return want_grads


def gemma2(attn_cap):
    """Two layers (a sliding-window one and a global one), GQA, LoRA on attention and MLP. The q and k
    projections are scaled up so that scores are O(1), as in a trained model (at the random init's
    scale, about 0.002, no cap would change them)."""
    model = build("Gemma2Config", "Gemma2ForCausalLM", "eager", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, attn_logit_softcapping=attn_cap, sliding_window=8)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    return lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])


def test_gemma2_soft_capped_attention_is_rewritten_and_equals_dense():
    """Gemma-2 caps its attention scores, cap * tanh(scores / cap), before the mask (eager attention:
    SDPA has no cap). The op carries the cap: its kernels apply it and its slope in backward, and its
    exact calls run the block kernels over every key block. A cap of 1 bites on these scores (the
    test checks that it changes the output), so a site that dropped it would fail the comparison."""
    model = gemma2(1.0)
    b, mask = batch()
    cap = count_sites(model, b, 2)
    assert all("softcap=1 " in s.detail + " " for s in cap.rewritten("attention")), [s.detail for s in cap.sites]
    uncapped = copy.deepcopy(model)
    for layer in uncapped.base_model.model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    keep = mask.bool()
    assert (run(model, b, mask)[0] - run(uncapped, b, mask)[0])[keep].abs().max() > 1e-2
    assert_same(model, b, mask)  # sparse code at every length, every key block selected


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gemma2_soft_capped_attention_at_the_defaults_equals_dense(training):
    """At the default options these short rows run exact attention: with a cap, that is the block kernels
    over every key block (not SDPA, which would drop the cap). Outputs and gradients equal dense."""
    model = gemma2(1.0).train(training)
    b, mask = batch()
    assert_compiled_equals_eager(model, b, mask)
    runs = [s["runs"] for s in spt_compile.report(model) if s["kind"] == "attention"]
    exact = {"calibration", "exact_inference"}  # the first training call calibrates; eval runs exact
    assert len(runs) == 2 and all(set(r) <= exact and sum(r.values()) == 1 for r in runs), runs


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "no-mask"])
def test_explain_says_what_the_compile_does_about_real_rows(padded):
    """explain() runs the passes without rewriting, so no attention op exists to read a mask from: it
    reads the sites it would rewrite instead, and its MLP notes equal those of a real compile."""
    model = build("LlamaConfig", "LlamaForCausalLM", "sdpa", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    b, _ = batch()
    if not padded:  # causal only: nothing to read real rows from
        del b["attention_mask"]
    torch._dynamo.reset()
    explained = [s.detail for s in spt_compile.explain(model, **b).rewritten("mlp")]
    torch._dynamo.reset()
    torch.compile(model, backend="spt", options={"compiler": "eager"})(**b)
    compiled = [s.detail for s in spt_compile.compile_reports(model)[-1].rewritten("mlp")]
    assert explained == compiled and len(compiled) == 2, (explained, compiled)
    # Without attention_mask, HF passes SDPA is_causal under torch 2.13, but builds an explicit causal
    # mask under 2.11 (the GPU machine's torch); real rows are read from whatever mask the graph holds.
    masked = any("mask=none" not in s.detail for s in spt_compile.compile_reports(model)[-1].rewritten("attention"))
    assert padded <= masked
    assert all(("real rows from the attention mask" in d) == masked for d in compiled), compiled


def test_greedy_generation_through_spt_equals_eager():
    """A user who compiles the forward HF's generate() calls (prefill, then one token a step with a KV
    cache, left-padded rows) gets eager's tokens: calls without gradients run exact."""
    model = build("LlamaConfig", "LlamaForCausalLM", "sdpa", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0).eval()
    model.generation_config.pad_token_id = 0
    ids, mask = padded_batch(V, N=12, pad_right_of=12)
    mask[1, :4] = 0  # left padding, as for generation
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(**kw)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="spt", options={"compiler": "eager"})
        got = model.generate(**kw)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    for g, w in zip(got.scores, want.scores):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    sites = spt_compile.report(model)
    assert {s["kind"] for s in sites} == {"attention", "mlp"} and all(s["calls"] for s in sites), sites
    # Once the cache length is traced dynamic, the cached keys and values get a symbol each: explain()
    # says why such a step's attention stays dense
    for graph in spt_compile.compile_reports(model):
        for site in graph.dense("attention"):
            assert "not provably equal" in site.reason, site.reason


LEARNED_BIAS_FAMILIES = {  # full fine-tuning: the relative position bias tables train through the op
    # relative attention bias added to the scores (eager attention)
    "MPNet": ("MPNetConfig", "MPNetModel", dict(_SMALL, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0), "text"),
    # relative position bias [1, H, 1 + P, 1 + P] from a table, passed to SDPA
    "Beit": ("BeitConfig", "BeitModel", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64,
                                             use_relative_position_bias=True, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0, drop_path_rate=0.0), "pixels"),
    # windowed attention: the relative bias [1, H, w*w, w*w] per window, plus the shifted windows' mask
    "Swin": ("SwinConfig", "SwinModel", dict(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                             window_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                             drop_path_rate=0.0), "pixels"),
}


@pytest.mark.parametrize("family", list(LEARNED_BIAS_FAMILIES))
def test_learned_relative_biases_train_through_the_op(family):
    """MPNet, BEiT and Swin add a relative position bias from a trained table to the scores: in full
    fine-tuning the op returns its gradient, and every parameter's gradient, the tables' included,
    equals dense (they were left dense: 'the additive mask requires grad')."""
    config_cls, model_cls, kw, kind = LEARNED_BIAS_FAMILIES[family]
    model = build(config_cls, model_cls, "sdpa" if kind == "pixels" else "eager", **kw)
    if kind == "pixels":
        b = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
        with torch.no_grad():
            tokens = model(**b).last_hidden_state.shape[1]
        mask = torch.ones(2, tokens)
    else:
        b, mask = batch()
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b)
    assert report.rewritten("attention") and not report.dense("attention"), str(report)
    assert all("learned bias" in s.detail for s in report.rewritten("attention")), str(report)
    tables = [n for n, p in model.named_parameters() if "relative" in n and p.requires_grad]
    assert tables, [n for n, _ in model.named_parameters()]
    assert_same(model, b, mask)


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "c2p-p2c"])
def test_deberta_v2_disentangled_attention(relative):
    """DeBERTa-v2/v3: bmm on [B*H, N, D] views, K^T divided by sqrt(torch.tensor(d) * factor).to(dtype)
    (a scale made in the graph), the weights viewed back to [B*H, N, N] before the bmm with V, and with
    relative attention the content-to-position and position-to-content terms (gathered from q, k and the
    relative embeddings) added as a [B*H, N, N] bias, which needs a gradient: the op returns it, and
    every gradient equals dense (was dense: 'not a recognised product')."""
    kw = dict(_SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if relative:
        kw.update(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16)
    model = build("DebertaV2Config", "DebertaV2Model", "eager", **kw)
    b, mask = batch()
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b)
    (site,) = report.rewritten("attention")
    assert not report.dense("attention") and ("learned bias" in site.detail) == relative, site.detail
    assert f"scale={(8 * (3 if relative else 1)) ** -0.5:.4g}" in site.detail, site.detail
    assert_same(model, b, mask)


def test_bloom_alibi_through_baddbmm():
    """BLOOM adds ALiBi through `alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d))` on [B*H, N, D] views: the
    [B*H, 1, N] bias is read as [B, H, 1, N] (it was dense: the weights' view back to [B*H, N, N] before
    the bmm with V was not followed). Outputs and every gradient equal dense. Its MLP's GELU is a custom
    autograd Function and stays dense, with that reason."""
    model = lora(build("BloomConfig", "BloomForCausalLM", "eager", hidden_size=32, n_layer=1, n_head=4,
                       hidden_dropout=0.0, attention_dropout=0.0), ["query_key_value", "dense_h_to_4h"])
    b, mask = batch()
    torch._dynamo.reset()
    report = spt_compile.explain(model, **b)
    assert len(report.rewritten("attention")) == 1 and not report.dense("attention"), str(report)
    assert all("custom" in s.reason for s in report.dense("mlp")), str(report)
    assert_compiled_equals_eager(model, b, mask, {**EVERY, "compiler": "aot_eager"})
    (site,) = [s for s in spt_compile.report(model) if s["kind"] == "attention"]
    assert site["runs"].get("exact_forward") == 1, site  # the sparse code ran (its backward over every key block)
