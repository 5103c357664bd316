"""The MLP sites draw their router samples (calibration, probes) from real tokens only: the attention
call before them records its mask, and keys no query may attend are padding (REGISTRY.real_rows)."""

from __future__ import annotations

import gc

import torch
from torch import nn

from spt_compile.registry import REGISTRY, model_sites
from toy_models import MLP_TEST_OPTIONS, GatedMLP, GQAAttention


def padded_causal_mask(B: int, N: int, lengths: list[int]) -> torch.Tensor:
    """[B, 1, N, N] bool: causal, and keys at or past each row's length padding (as HF builds it)."""
    mask = torch.ones(B, 1, N, N, dtype=torch.bool).tril()
    for b, n in enumerate(lengths):
        mask[b, :, :, n:] = False
    return mask


def test_real_rows_reads_the_latest_attention_mask():
    mask = padded_causal_mask(2, 6, [6, 4])
    REGISTRY.note_attention_mask(mask)
    want = torch.tensor([True] * 6 + [True] * 4 + [False] * 2)
    assert torch.equal(REGISTRY.real_rows((2, 6)), want)
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
                                                   [:, None, None, :], float("-inf"))
    REGISTRY.note_attention_mask(additive)  # an encoder's [B, 1, 1, N] additive mask
    assert torch.equal(REGISTRY.real_rows((2, 6)), want)
    assert REGISTRY.real_rows((2, 5)) is None  # another length: not this mask's tokens
    assert REGISTRY.real_rows((12,)) is None  # no [B, N] to map rows to
    REGISTRY.note_attention_mask(padded_causal_mask(2, 6, [6, 6]))
    assert REGISTRY.real_rows((2, 6)) is None  # nothing padded
    REGISTRY.note_attention_mask(None)
    assert REGISTRY.real_rows((2, 6)) is None
    kept = padded_causal_mask(2, 6, [6, 4])
    REGISTRY.note_attention_mask(kept)
    del kept
    gc.collect()
    assert REGISTRY.real_rows((2, 6)) is None  # a weak reference: a freed mask says nothing


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.attn = GQAAttention(d=d, heads=4, kv_heads=2)
        self.mlp = GatedMLP(d=d, hidden=96)

    def forward(self, x, mask):
        h = x + self.attn(x, mask)
        return h + self.mlp(h)


def test_padding_rows_never_enter_the_router_samples():
    """Padding rows are made unmistakable (inputs of 1e3); after calibration on a right-padded batch the
    MLP site's buffered samples hold real rows only, and probes on training calls keep it so."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    B, N, lengths = 4, 40, [40, 25, 10, 33]
    x = torch.randn(B, N, 64)
    mask = padded_causal_mask(B, N, lengths)
    for b, n in enumerate(lengths):
        x[b, n:] = 1e3
    options = {**MLP_TEST_OPTIONS, "attention_dense_below": 4096}  # attention exact: the MLP is under test
    compiled = torch.compile(model, backend="spt", options=options)
    for _ in range(MLP_TEST_OPTIONS["calibration_steps"] + 2):  # calibration, then routed training calls
        compiled(x, mask).sum().backward()
    (site,) = [s for _, s in model_sites(model) if s.kind == "mlp"]
    # each calibration call offers 512 samples: every real row then, and no padding row
    assert site.router is not None and site.buffer_x.shape[0] >= MLP_TEST_OPTIONS["calibration_steps"] * sum(lengths)
    assert site.buffer_x.abs().max() < 100
