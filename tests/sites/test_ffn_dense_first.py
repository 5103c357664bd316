"""ffn_dense_first: the first positions of each sequence run every MLP block (exactly the dense MLP
there), the rest are routed; a run-time option; bad values name the option."""

from __future__ import annotations

import pytest
import torch

import spt_compile
from spt_compile.options import SptOptionError, make_options

from toy_models import compiled_gated_mlp


def test_first_positions_of_each_sequence_run_every_block():
    model, compiled = compiled_gated_mlp(24, 72, ffn_compensate=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # calibration (dense)
        compiled(torch.randn(3, 32, 24, generator=gen))
    x = torch.randn(3, 32, 24, generator=gen)
    dense = model(x)
    close = {}  # ffn_dense_first -> [3, 32] bool: the routed output equals the dense one there
    for first in (0, 1, 2):
        with spt_compile.enable(ffn_dense_first=first):
            y = compiled(x)
        close[first] = ((y - dense).abs().amax(-1) < 1e-5)
    assert close[1][:, 0].all() and close[2][:, :2].all()
    assert not close[0][:, 0].all(), "without it the first tokens are routed like any other"
    assert not close[2][:, 2:].any(), "the other positions stay routed"
    torch.testing.assert_close(close[1][:, 1:], close[0][:, 1:])  # nothing else changes


@pytest.mark.parametrize("value", [-1, 0.5, True, "1"])
def test_bad_values_name_the_option(value):
    with pytest.raises(SptOptionError, match=r"'ffn_dense_first' must be an int >= 0"):
        make_options({"ffn_dense_first": value})
    assert "ffn_dense_first" in make_options().runtime_dict()
