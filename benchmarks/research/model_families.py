#!/usr/bin/env python
"""Which Hugging Face model families `backend="spt"` rewrites, and what it leaves dense and why.

Each family is a random-initialised one- or two-layer model from its config (no download), in training
mode with its default dropouts, traced by `spt_compile.explain` on a padded batch (labels where the
model takes them). Per family: the sites rewritten (attention, MLP, chunked loss), each site left dense
with explain's reason, and Dynamo's graph breaks. Shape coverage only: nothing here is a quality or
speed claim. The tests hold the families that are rewritten whole to dense equality
(tests/models/test_model_families.py); this probe also lists the ones that are not.

    python benchmarks/research/model_families.py --json benchmarks/research/results/model_families_cpu.json
    python benchmarks/research/model_families.py --families T5 Bloom    # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

V = 101  # vocabulary of the random text models
_T = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
          max_position_embeddings=64)
_VIS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            patch_size=8)
_S2S = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family: (config class, model class, config kwargs, inputs: "text", "text-labels", "pixels", "audio", "speech")
FAMILIES = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "Mistral": ("MistralConfig", "MistralForCausalLM", dict(_T, num_key_value_heads=2, sliding_window=8), "text-labels"),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_T, num_key_value_heads=2, head_dim=8), "text-labels"),
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_T, num_key_value_heads=2, head_dim=8), "text-labels"),
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_T, num_key_value_heads=2, head_dim=8), "text-labels"),
    "Gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_T, num_key_value_heads=2, head_dim=8), "text-labels"),
    "Phi": ("PhiConfig", "PhiForCausalLM", dict(_T), "text-labels"),
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_T, num_key_value_heads=2, pad_token_id=0), "text-labels"),
    "Olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_T), "text-labels"),
    "Olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_T), "text-labels"),
    "StableLm": ("StableLmConfig", "StableLmForCausalLM", dict(_T, num_key_value_heads=4), "text-labels"),
    "Starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "SmolLM3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(_T, num_key_value_heads=2, **_IDS), "text-labels"),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "Cohere": ("CohereConfig", "CohereForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "Helium": ("HeliumConfig", "HeliumForCausalLM", dict(_T, num_key_value_heads=2, head_dim=8), "text-labels"),
    "Exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "Nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(_T, num_key_value_heads=2), "text-labels"),
    "Persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(_T), "text-labels"),
    "GPTNeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_T), "text-labels"),
    "GPTJ": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                    rotary_dim=4), "text-labels"),
    "GPTNeo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                                         max_position_embeddings=64, window_size=8,
                                                         attention_types=[[["global", "local"], 1]]), "text-labels"),
    "GPT2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64),
             "text-labels"),
    "GPTBigCode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4,
                                                                      n_positions=64), "text-labels"),
    "CodeGen": ("CodeGenConfig", "CodeGenForCausalLM", dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4,
                                                            n_positions=64, rotary_dim=4), "text-labels"),
    "Falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4), "text-labels"),
    "MPT": ("MptConfig", "MptForCausalLM", dict(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=64),
            "text-labels"),
    "Bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=32, n_layer=1, n_head=4), "text-labels"),
    "OPT": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                                num_attention_heads=4, max_position_embeddings=64,
                                                word_embed_proj_dim=32), "text-labels"),
    "XGLM": ("XGLMConfig", "XGLMForCausalLM", dict(vocab_size=V, d_model=32, ffn_dim=64, num_layers=1,
                                                   attention_heads=4, max_position_embeddings=64), "text-labels"),
    "BioGpt": ("BioGptConfig", "BioGptForCausalLM", dict(_T), "text-labels"),
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_T, num_key_value_heads=2, num_local_experts=4), "text-labels"),
    "Qwen2Moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_T, num_key_value_heads=2, num_experts=4,
                                                               num_experts_per_tok=2, moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=32), "text-labels"),
    "OlmoE": ("OlmoeConfig", "OlmoeForCausalLM", dict(_T, num_experts=4, num_experts_per_tok=2), "text-labels"),
    "Bert": ("BertConfig", "BertModel", dict(_T), "text"),
    "Roberta": ("RobertaConfig", "RobertaModel", dict(_T), "text"),
    "XLMRoberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(_T), "text"),
    "Albert": ("AlbertConfig", "AlbertModel", dict(_T, embedding_size=16), "text"),
    "DistilBert": ("DistilBertConfig", "DistilBertModel", dict(vocab_size=V, dim=32, hidden_dim=64, n_layers=1,
                                                               n_heads=4), "text"),
    "Electra": ("ElectraConfig", "ElectraModel", dict(_T, embedding_size=32), "text"),
    "Ernie": ("ErnieConfig", "ErnieModel", dict(_T), "text"),
    "ModernBert": ("ModernBertConfig", "ModernBertModel", dict(_T, cls_token_id=1, sep_token_id=2, **_IDS), "text"),
    "DebertaV2": ("DebertaV2Config", "DebertaV2Model", dict(_T, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                            position_buckets=8, max_relative_positions=16), "text"),
    "MPNet": ("MPNetConfig", "MPNetModel", dict(_T), "text"),
    "T5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                          num_heads=4, feed_forward_proj="gated-gelu",
                                                          decoder_start_token_id=0, pad_token_id=0), "text-labels"),
    "Bart": ("BartConfig", "BartForConditionalGeneration", dict(_S2S), "text-labels"),
    "MBart": ("MBartConfig", "MBartForConditionalGeneration", dict(_S2S), "text-labels"),
    "Pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", dict(_S2S), "text-labels"),
    "ViT": ("ViTConfig", "ViTModel", dict(_VIS), "pixels"),
    "DeiT": ("DeiTConfig", "DeiTModel", dict(_VIS), "pixels"),
    "Dinov2": ("Dinov2Config", "Dinov2Model", dict(_VIS, mlp_ratio=2), "pixels"),
    "Beit": ("BeitConfig", "BeitModel", dict(_VIS, use_relative_position_bias=True), "pixels"),
    "Swin": ("SwinConfig", "SwinModel", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2],
                                             window_size=4), "pixels"),
    "CLIPVision": ("CLIPVisionConfig", "CLIPVisionModel", dict(_VIS), "pixels"),
    "SiglipVision": ("SiglipVisionConfig", "SiglipVisionModel", dict(_VIS), "pixels"),
    "CLIPText": ("CLIPTextConfig", "CLIPTextModel", dict(_T, max_position_embeddings=32), "text"),
    "Whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                     max_source_positions=20, max_target_positions=32, decoder_start_token_id=1, **_IDS), "speech"),
    "Wav2Vec2": ("Wav2Vec2Config", "Wav2Vec2Model",
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4), "audio"),
}


def inputs(kind: str, torch) -> dict:
    gen = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    if kind == "audio":
        return {"input_values": torch.randn(2, 1600, generator=gen)}
    if kind == "speech":
        return {"input_features": torch.randn(2, 16, 40, generator=gen),
                "labels": torch.randint(3, V, (2, 12), generator=gen)}
    ids = torch.randint(3, V, (2, 20), generator=gen)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 14:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "text-labels":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def probe(name: str) -> dict:
    import torch
    import transformers

    import spt_compile

    config_cls, model_cls, kw, kind = FAMILIES[name]
    torch.manual_seed(0)
    torch._dynamo.reset()
    config = getattr(transformers, config_cls)(**kw)
    try:
        config._attn_implementation = "sdpa"
        model = getattr(transformers, model_cls)(config)
    except ValueError:  # no SDPA path in this family: its eager attention
        config._attn_implementation = "eager"
        model = getattr(transformers, model_cls)(config)
    model.train()
    report = spt_compile.explain(model, **inputs(kind, torch))
    count = lambda kind: len(report.rewritten(kind))  # noqa: E731
    return {"family": name, "attention_impl": config._attn_implementation,
            "rewritten": {"attention": count("attention"), "mlp": count("mlp"), "loss": count("loss")},
            "dense": [{"kind": s.kind, "pattern": s.pattern, "path": s.path, "reason": s.reason} for s in report.dense()],
            "graph_breaks": list(report.breaks), "not_traced": list(report.not_traced)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                   help=f"default: all {len(FAMILIES)}")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    os.environ.setdefault("SPT_COMPILER", "eager")  # explain traces only; nothing downstream is compiled
    warnings.filterwarnings("ignore")
    import logging

    import torch
    import transformers
    from tqdm import tqdm

    from provenance import scrub_paths, source_commit

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    rows = []
    for name in tqdm(args.families, desc="families", unit="family", file=sys.stderr):
        try:
            rows.append(probe(name))
        except Exception as e:  # noqa: BLE001 - a family that does not build or trace is a row too
            rows.append({"family": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    for r in rows:
        if "error" in r:
            print(f"{r['family']:13} ERROR {r['error']}")
            continue
        w = r["rewritten"]
        print(f"{r['family']:13} [{r['attention_impl']:5}] rewritten: {w['attention']} attention, {w['mlp']} MLP, "
              f"{w['loss']} loss; dense: {len(r['dense'])}; graph breaks: {len(r['graph_breaks'])}")
        for d in r["dense"]:
            print(f"{'':15}dense {d['kind']} {d['path']}: {d['reason'][:160]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"commit": source_commit(), "command": "python benchmarks/research/model_families.py " + " ".join(argv or sys.argv[1:]),
                  "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}
        args.json.write_text(json.dumps(scrub_paths(record), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
