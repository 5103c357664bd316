"""The MLP sites draw their router samples (calibration, probes) from real tokens only: each receives
spt::real_rows of the attention mask before it as an operand (keys no query may attend are padding)."""

from __future__ import annotations

import torch
from torch import nn

from spt_compile.real_rows import real_rows, rows_of
from spt_compile.registry import model_sites
from toy_models import MLP_TEST_OPTIONS, GatedMLP, GQAAttention


def padded_causal_mask(B: int, N: int, lengths: list[int]) -> torch.Tensor:
    """[B, 1, N, N] bool: causal, and keys at or past each row's length padding (as HF builds it)."""
    mask = torch.ones(B, 1, N, N, dtype=torch.bool).tril()
    for b, n in enumerate(lengths):
        mask[b, :, :, n:] = False
    return mask


def test_real_rows_op_reads_padding_from_the_mask():
    mask = padded_causal_mask(2, 6, [6, 4])
    want = torch.tensor([True] * 6 + [True] * 4 + [False] * 2)
    assert torch.equal(real_rows(mask, 2, 6), want)
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
                                                   [:, None, None, :], float("-inf"))
    assert torch.equal(real_rows(additive, 2, 6), want)  # an encoder's [B, 1, 1, N] additive mask
    assert real_rows(mask, 2, 5).numel() == 0  # another length: not this mask's tokens
    assert real_rows(padded_causal_mask(2, 6, [6, 6]), 2, 6).numel() == 0  # nothing padded
    assert rows_of(real_rows(mask, 2, 6), 12) is not None and rows_of(real_rows(mask, 2, 6), 10) is None


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


def test_the_real_rows_are_an_operand_of_the_mlp_site_in_the_graph():
    """The dependency is an edge: spt::real_rows reads the attention site's mask and feeds the MLP site."""
    from spt_compile.options import make_options
    from spt_compile.passes import rewrite_graph

    graphs = []

    def backend(gm, example_inputs):
        rewrite_graph(gm, example_inputs, make_options({**MLP_TEST_OPTIONS, "compiler": "eager"}))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    torch.compile(model, backend=backend)(torch.randn(2, 16, 64), padded_causal_mask(2, 16, [16, 9]))
    (g,) = graphs
    (attn,) = [n for n in g.graph.nodes if n.target is torch.ops.spt.attention_site.default]
    (rows,) = [n for n in g.graph.nodes if n.target is torch.ops.spt.real_rows.default]
    (mlp,) = [n for n in g.graph.nodes if n.target is torch.ops.spt.mlp_site.default]
    assert rows.args[0] is attn.args[3] and rows in mlp.args
