"""LoRA dropout in the routed MLP (sparse_ops/routed_mlp/dropout.py): masks drop at the rate asked,
keep the expected value, and are the same whenever their (seed, stream) is drawn again."""

from __future__ import annotations

import pytest
import torch

from spt_compile.sparse_ops import dropout
from spt_compile.sparse_ops.routed_mlp.dropout import _keep_scale


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.999])
def test_masks_drop_at_the_rate_asked_and_keep_the_mean(p):
    """The share dropped is p to within sampling noise (and drop_share(p) is within 2^-17 of p); the
    scale keeps the expected value exactly: mean(scale) -> 1."""
    n = 1 << 21
    assert abs(dropout.drop_share(p) - p) <= 2**-17
    scale = _keep_scale((n,), p, 11, 1, "cpu", torch.float64)
    dropped = (scale == 0).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma + 2**-17, (dropped, p)
    kept = scale[scale != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - dropout.drop_share(p))))
    assert abs(scale.mean().item() - 1.0) < 5 * (p / (1 - p) / n) ** 0.5 + 1e-9
    # the four 16-bit fields of each 64-bit draw are alike: none of them drops more than the others
    fields = (scale == 0).view(-1, 4).double().mean(0)
    assert ((fields - p).abs() < 5 * (p * (1 - p) / (n / 4)) ** 0.5 + 2**-17).all(), fields


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 13)])
def test_drawn_again_is_the_same_mask(dtype, shape):
    """Backward draws the forward's masks again from (seed, stream): the same values in every dtype,
    whatever the shape's divisibility by the four fields of a draw; other streams differ."""
    a = _keep_scale(shape, 0.3, 9, 2, "cpu", dtype)
    assert a.shape == shape and a.dtype == dtype
    assert torch.equal(_keep_scale(shape, 0.3, 9, 2, "cpu", dtype), a)
    big = (64, 64)
    assert not torch.equal(_keep_scale(big, 0.3, 9, 2, "cpu", dtype), _keep_scale(big, 0.3, 9, 3, "cpu", dtype))
    assert not torch.equal(_keep_scale(big, 0.3, 9, 2, "cpu", dtype), _keep_scale(big, 0.3, 10, 2, "cpu", dtype))


def test_everything_dropped_and_nothing_dropped():
    assert torch.equal(_keep_scale((5, 3), 1.0, 0, 1, "cpu", torch.float32), torch.zeros(5, 3))
    assert _keep_scale((5, 3), 0.0, 0, 1, "cpu", torch.float32) is None
    tiny = _keep_scale((5, 3), 1e-9, 0, 1, "cpu", torch.float32)  # rounds to no drop at all
    assert torch.equal(tiny, torch.ones(5, 3))
