#!/usr/bin/env python
"""Where the routed MLP's GPU time would go, counted on the CPU: every aten op of one training call
(forward + backward) of the routed SwiGLU site, with the bytes of its tensor inputs and outputs and
its matmul FLOPs (spt_compile.testing.Census), against the dense SwiGLU's ops counted the same way.
A roofline model turns each op into time on an H200 (max(bytes / bandwidth, FLOPs / matmul rate) +
a launch), so the ops that move memory without doing arithmetic show up beside the GEMMs.

    python benchmarks/research/mlp_traffic.py --json benchmarks/research/results/mlp_traffic_cpu.json

Issue 19's H200 record (`benchmarks/results/ffn_llama7b_h200.json`): at the LLaMA-7B MLP shape,
8192 tokens, 50% of 4 blocks, the routed op took 11.7 ms against dense Inductor's 7.4. The counts
are made at two small token counts and extrapolated linearly to --at tokens (each op's bytes and
FLOPs are a + b T: weights' share fixed, activations' share proportional), since a bf16 8192-token
call takes minutes on this CPU. Bytes are an upper bound for indexed ops (index_select of a few rows
counts the whole source). The model's ceilings are what KINDS.md measured on an H200: 4.3 TB/s
copy bandwidth (read + written), 788 TFLOP/s bf16 matmul; 5 us per launch (host, overlapped with
nothing in this model).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import spt_compile  # noqa: E402,F401  (registers the backend)
from spt_compile.testing import Census  # noqa: E402
from spt_compile.testing.census import NO_KERNEL, _tensors, op_cost  # noqa: E402

BANDWIDTH, MATMUL, LAUNCH = 4.3e12, 788e12, 5e-6


class _DenseCount(TorchDispatchMode):
    """The same per-op bytes and FLOPs for eager code (the dense module runs outside our ops)."""

    def __init__(self):
        super().__init__()
        self.ops, self.traffic, self.flops = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in NO_KERNEL and not func.is_view:
            name = str(func.overloadpacket.__name__)
            moved, flops = op_cost(func, _tensors(args, kwargs), _tensors((out,), {}))
            self.ops[name] += 1
            self.traffic[name] += moved
            self.flops[name] += flops
        return out


def count(config: str, tokens: int, dtype, blocks: int) -> dict:
    from bench_ffn import SHAPES, SwiGLU

    torch.manual_seed(0)
    d, hidden = SHAPES["llama7b"]
    module = SwiGLU(d, hidden).to(dtype=dtype)
    x = torch.randn(1, tokens, d, dtype=dtype, requires_grad=True)
    dy = torch.randn(1, tokens, d, dtype=dtype)
    if config == "dense":
        counter = _DenseCount()
        with counter:
            module(x).backward(dy)
        return {"ops": counter.ops, "traffic": counter.traffic, "flops": counter.flops}
    fn = torch.compile(module, backend="spt", options=dict(
        ffn_blocks=blocks, ffn_active=blocks // 2, calibration_steps=1, compiler="eager", sparse_attention=False,
        ffn_impl=config.removeprefix("spt-"), ffn_loss_rows="off"))  # no loss in the graph: rank every row
    for _ in range(2):  # calibration (dense), then one routed call
        fn(x).backward(dy)
    with Census() as c:
        fn(x).backward(dy)
    return {"ops": c.ops, "traffic": c.traffic, "flops": c.flops}


def extrapolate(low: dict, high: dict, t_low: int, t_high: int, at: int) -> dict:
    rows = {}
    for name in set(low["ops"]) | set(high["ops"]):
        row = {}
        for key in ("ops", "traffic", "flops"):
            a, b = low[key].get(name, 0), high[key].get(name, 0)
            row[key] = max(0.0, a + (b - a) * (at - t_low) / (t_high - t_low))
        row["model_s"] = max(row["traffic"] / BANDWIDTH, row["flops"] / MATMUL) + row["ops"] * LAUNCH
        rows[name] = row
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["dense", "spt-torch", "spt-grouped"])
    p.add_argument("--tokens", type=int, nargs=2, default=[256, 512], help="the two counted token counts")
    p.add_argument("--at", type=int, default=8192, help="tokens to extrapolate to")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(2)
    out = {"command": " ".join(["python", *sys.argv]), "model": {"bandwidth": BANDWIDTH, "matmul": MATMUL,
                                                                "launch": LAUNCH}, "configs": {}}
    for config in args.configs:
        low, high = (count(config, t, dtype, args.blocks) for t in args.tokens)
        torch._dynamo.reset()
        rows = extrapolate(low, high, *args.tokens, args.at)
        total = {k: sum(r[k] for r in rows.values()) for k in ("ops", "traffic", "flops", "model_s")}
        matmul_s = sum(r["model_s"] for n, r in rows.items() if r["flops"])
        out["configs"][config] = {"total": total, "matmul_model_s": matmul_s, "ops": rows}
        print(f"{config}: {total['ops']:.0f} launches, {total['traffic'] / 1e9:.2f} GB moved, "
              f"{total['flops'] / 1e12:.2f} TFLOP; model {total['model_s'] * 1e3:.2f} ms "
              f"(matmuls {matmul_s * 1e3:.2f}, the rest {(total['model_s'] - matmul_s) * 1e3:.2f})", flush=True)
        for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["model_s"])[:args.top]:
            print(f"    {name:28} x{r['ops']:5.0f}  {r['traffic'] / 1e9:7.3f} GB  {r['flops'] / 1e12:6.3f} TFLOP  "
                  f"{r['model_s'] * 1e3:6.3f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
