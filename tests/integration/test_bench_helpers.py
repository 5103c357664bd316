"""The step benchmark's measurement conventions (spt_compile.recipes): the FLOP model, the op
attribution and the allocation peak."""

from __future__ import annotations

import torch

from spt_compile.recipes.flops import Dims, flop_limit, step_flops
from spt_compile.recipes.memory import allocation_peak
from spt_compile.recipes.step_breakdown import Sizes, classify
from toy_models import SPARSE_AT_EVERY_LENGTH

SMOLLM2 = Dims(d=576, H=9, Hkv=3, D=64, F=1536, V=49152, layers=30)


def test_flop_limit_is_one_when_nothing_is_dropped():
    exact = {"density": 1.0, "ffn_active": 4, **SPARSE_AT_EVERY_LENGTH}
    assert abs(flop_limit(SMOLLM2, 2048, 1, exact)[0] - 1.0) < 1e-9


def test_flop_limit_follows_density_and_blocks():
    sparse_forward = {"exact_forward": False, "ffn_active": 2, "ffn_loss_rows": "off"}  # the old defaults
    at_2048 = flop_limit(SMOLLM2, 2048, 1, sparse_forward)[0]
    at_25 = flop_limit(SMOLLM2, 2048, 1, {**sparse_forward, "ffn_active": 1})[0]
    short = flop_limit(SMOLLM2, 512, 1, {})  # attention runs exact below 2048 tokens by default
    assert 0.4 < at_25 < at_2048 < 0.8
    # exact_forward: the forward whole; loss rows (here every row, as in LM tuning) keep the MLP backward whole
    exact_half = flop_limit(SMOLLM2, 2048, 1, {"ffn_active": 2, "ffn_loss_rows": "off"}, loss_frac=1.0)[0]
    lm = flop_limit(SMOLLM2, 2048, 1, {"ffn_active": 2}, loss_frac=1.0)[0]
    assert at_2048 < exact_half < lm < 1.0
    assert abs(exact_half - 0.753) < 0.01  # docs/quality.md's table
    # half of each row a prompt: the MLP's backward runs half its rows whole, the head's d(h) half its rows
    prompt = flop_limit(SMOLLM2, 2048, 1, {"ffn_active": 2}, loss_frac=0.5)
    assert prompt[1]["lm_head_loss"] == 0.75 * prompt[2]["lm_head_loss"]
    unchunked = flop_limit(SMOLLM2, 2048, 1, {"ffn_active": 2, "chunked_loss": False}, loss_frac=0.5)
    assert unchunked[1]["lm_head_loss"] == unchunked[2]["lm_head_loss"] and unchunked[0] > prompt[0]
    assert short[1]["attention"] == short[2]["attention"]
    dense = step_flops(SMOLLM2, 2048)
    half = step_flops(SMOLLM2, 2048, ffn_frac=0.5)
    assert 0.5 * dense["ffn"] < half["ffn"] < 0.6 * dense["ffn"]  # LoRA factors on the token side stay


def test_ops_are_attributed_by_name_and_shape():
    sizes = Sizes(vocab=49152, intermediate=1536, heads=(9, 3))
    assert classify("spt::mlp_site_backward", [], sizes) == "ffn"
    assert classify("spt::linear_cross_entropy", [], sizes) == "lm_head_loss"
    assert classify("aten::_scaled_dot_product_flash_attention_for_cpu", [], sizes) == "attention"
    assert classify("Optimizer.step#AdamW.step", [], sizes) == "optimizer"
    assert classify("aten::mm", [[2048, 576], [576, 49152]], sizes) == "lm_head_loss"
    assert classify("aten::mm", [[2048, 1536], [1536, 576]], sizes) == "ffn"
    assert classify("aten::matmul", [[1, 9, 2048, 64], [1, 9, 64, 2048]], sizes) == "attention"
    assert classify("aten::mm", [[2048, 576], [576, 192]], sizes) == "qkvo"
    assert classify("aten::add", [[1, 2048, 576], [1, 2048, 576]], sizes) is None  # -> other


def test_allocation_peak_counts_what_is_alive_at_once():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a, b
        c = torch.empty(1 << 20, dtype=torch.uint8)
        del c
    peak = allocation_peak(prof)
    assert 3 << 20 <= peak < (3 << 20) + 4096


def test_profile_step_reports_its_fields_without_cuda():
    """benchmarks/gpu_profile.profile_step (--host-profile of bench_attention / bench_ffn) runs the
    step twice and returns its fields; on a CPU it counts no kernels and no syncs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gpu_profile import profile_step

    calls = []
    x = torch.randn(8, 8, requires_grad=True)
    got = profile_step(lambda: calls.append((x @ x).sum().backward()))
    assert len(calls) == 2
    assert set(got) == {"top_kernels_ms", "top_kernels_launches", "wall_ms_profiled", "gpu_kernels", "gpu_kernel_ms",
                        "host_syncs", "sync_sites"}
    if not torch.cuda.is_available():
        assert got["gpu_kernels"] == 0 and got["host_syncs"] == 0 and got["wall_ms_profiled"] > 0


def test_bench_ffn_times_what_its_configs_name():
    """bench_ffn's routed configs run the share they name (the loss is outside the benchmark's graph, so
    every row is ranked: under the default a site that sees no loss rows keeps every real row whole),
    record the implementation that ran, and refuse a configuration whose implementation serves no
    call (the Triton kernels serve routed calls only, not the exact forward's)."""
    import argparse
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_ffn

    assert bench_ffn.spt_config("spt-50%-triton-sparse-forward-n64") == ("50%", "triton", True, True)
    assert bench_ffn.spt_config("spt-25%") == ("25%", "", False, False)
    args = argparse.Namespace(blocks=4, impl="auto", warmup=1)
    torch._dynamo.reset()
    cpu = torch.device("cpu")
    rows = {c: bench_ffn.prepare(c, "smollm2", 16, args, cpu, torch.float32)["row"]
            for c in ("spt-50%", "spt-25%", "spt-50%-grouped")}
    assert rows["spt-25%"]["saved_bytes"] < rows["spt-50%"]["saved_bytes"]  # ranked: the shares differ
    assert rows["spt-50%"]["impl_calls"] == {"torch": 2}  # the calibration call and one warm-up
    assert rows["spt-50%-grouped"]["impl_calls"]["grouped"] >= 1
    with pytest.raises(RuntimeError, match="ffn_impl='reference' served no call.*routed calls"):
        bench_ffn.prepare("spt-50%-reference", "smollm2", 16, args, cpu, torch.float32)
