"""Small models written the way real code writes them, for graph and backend tests."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# Options that sparsify attention at every length: no threshold (attention_dense_below for the sparse
# forward, attention_backward_dense_below for exact_forward's backward) and no floor of keys, which by
# default keeps every key of a sequence of up to 256 (so a test's short sequences would run exact).
SPARSE_AT_EVERY_LENGTH = {"attention_dense_below": 0, "attention_backward_dense_below": 0, "attention_min_keys": 0}


class NanoGPTBlock(nn.Module):
    """nanoGPT's block: fused qkv, SDPA (flash) or the written-out masked_fill softmax, GELU MLP."""

    def __init__(self, d=64, heads=4, block_size=64, flash=True, dropout=0.0):
        super().__init__()
        self.heads, self.flash, self.dropout = heads, flash, dropout
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.mlp_proj = nn.Linear(4 * d, d)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab=97, d=64, heads=4, layers=2, block_size=64, flash=True, dropout=0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList([NanoGPTBlock(d, heads, block_size, flash, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GatedMLP(nn.Module):
    def __init__(self, d=32, hidden=80, act=F.silu):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# The routed-MLP tests' options: aot_eager, 2 calibration calls, 4 blocks, and the sparse forward they
# exercise (exact_forward off, 2 of 4 blocks: the defaults before issue 16; tests/sites/test_exact_forward.py
# covers exact_forward).
MLP_TEST_OPTIONS = {"compiler": "aot_eager", "calibration_steps": 2, "ffn_blocks": 4, "exact_forward": False,
                    "ffn_active": 2}


def compiled_gated_mlp(d: int, hidden: int, seed: int = 0, **options):
    """(GatedMLP(d, hidden), the same model under torch.compile(backend="spt")) from a fresh Dynamo
    cache, with MLP_TEST_OPTIONS and `options`."""
    torch.manual_seed(seed)
    torch._dynamo.reset()  # many compiles of one forward would hit Dynamo's recompile limit
    model = GatedMLP(d=d, hidden=hidden)
    return model, torch.compile(model, backend="spt", options={**MLP_TEST_OPTIONS, **options})


def clone_with_saved_state(model: nn.Module, path, **options):
    """(a deep copy of `model` with the sparse state saved at `path` loaded, that copy compiled from a
    fresh Dynamo cache with MLP_TEST_OPTIONS and `options`)."""
    import spt_compile

    clone = copy.deepcopy(model)
    spt_compile.load_state_dict(clone, torch.load(path))
    torch._dynamo.reset()
    return clone, torch.compile(clone, backend="spt", options={**MLP_TEST_OPTIONS, **options})


class PlainMLP(nn.Module):
    def __init__(self, d=32, hidden=80, act=F.gelu):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GQAAttention(nn.Module):
    """LLaMA-style attention: separate q/k/v, repeat_kv written as HF writes it, SDPA or eager."""

    def __init__(self, d=64, heads=4, kv_heads=2, eager=False, softcap=0.0):
        super().__init__()
        self.h, self.hkv, self.hd = heads, kv_heads, d // heads
        self.softcap = softcap  # eager only: Gemma-2's cap * tanh(scores / cap) before the mask
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.eager = eager

    @staticmethod
    def repeat_kv(x, n_rep):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    def forward(self, x, mask=None):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.hkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.hkv, self.hd).transpose(1, 2)
        k = self.repeat_kv(k, self.h // self.hkv)
        v = self.repeat_kv(v, self.h // self.hkv)
        if self.eager:
            w = torch.matmul(q, k.transpose(2, 3)) * self.hd**-0.5
            if self.softcap:
                w = torch.tanh(w / self.softcap) * self.softcap
            if mask is not None:
                w = w + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            y = torch.matmul(w, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))


def tiny_llama_batch(seq: int = 256, pad_from: int = 200, prompt: int = 0, seed: int = 0, layers: int = 2):
    """(a random-initialised LlamaForCausalLM of `layers` layers in train mode, input_ids, attention_mask, labels):
    batch 2, the second row padded from `pad_from`, the first `prompt` positions of row 0 carrying no
    loss. Needs transformers (callers skip without it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(64, seq))
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, pad_from:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :prompt] = -100
    return model, ids, attention, labels
