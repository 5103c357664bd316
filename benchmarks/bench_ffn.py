"""The MLP alone: forward + backward time and bytes saved for backward, dense vs routed.

A SwiGLU MLP with LoRA (r=16) on gate/up/down and frozen base weights, as in LoRA fine-tuning. Dense
baselines: eager and `torch.compile` (Inductor). Routed: the same module compiled with
`backend="spt"` at 50% and 25% of the blocks active (the real path: pass, site op, its autograd).
Ratios are to the best dense configuration of the same shape and token count in the same run.
Saved bytes count activations only (parameters that backward holds by reference are left out).

    python benchmarks/bench_ffn.py --json benchmarks/results/ffn_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import spt_compile  # noqa: E402,F401  (registers the backend when run from source)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SavedBytes, sync  # noqa: E402

SHAPES = {"smollm2": (576, 1536), "llama7b": (4096, 11008)}
CONFIGS = ("dense-eager", "dense-inductor", "spt-50%", "spt-25%")


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable LoRA delta, written as PEFT's modules trace."""

    def __init__(self, d_in: int, d_out: int, r: int = 16, alpha: int = 32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.randn(d_out, r) * 0.01)
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = LoraLinear(d, hidden), LoraLinear(d, hidden), LoraLinear(hidden, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_fn(config: str, module: nn.Module, args):
    if config == "dense-eager":
        return module
    if config == "dense-inductor":
        return torch.compile(module, backend="inductor")
    active = {"spt-50%": args.blocks // 2, "spt-25%": args.blocks // 4}[config]
    return torch.compile(module, backend="spt", options=dict(
        ffn_blocks=args.blocks, ffn_active=active, calibration_steps=1, compiler="eager", sparse_attention=False))


def run(config: str, shape: str, T: int, args, device, dtype) -> dict:
    torch.manual_seed(0)
    d, hidden = SHAPES[shape]
    module = SwiGLU(d, hidden).to(device=device, dtype=dtype)
    x = torch.randn(1, T, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(1, T, d, device=device, dtype=dtype)
    fn = make_fn(config, module, args)

    def step():
        fn(x).backward(dy)
        for p in [x, *module.parameters()]:
            p.grad = None

    t0 = time.perf_counter()
    step()  # compile; spt: the calibration call (dense) that fits router and clustering
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    saved = SavedBytes(exclude=list(module.parameters()))  # activations only: parameters are shared
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        y = fn(x)
    y.backward(dy)
    del y
    times = []
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"config": config, "shape": shape, "tokens": T, "time_s": statistics.median(times), "times": times,
            "saved_bytes": saved.total, "first_call_s": first}


def table(results: list[dict]) -> str:
    lines = [f"{'config':15} {'shape':8} {'tokens':>6} {'ms':>9} {'saved MiB':>9} {'time/best':>9} {'saved/best':>10}"]
    for key in sorted({(r["shape"], r["tokens"]) for r in results}):
        rows = [r for r in results if (r["shape"], r["tokens"]) == key and "error" not in r]
        dense = [r for r in rows if r["config"].startswith("dense")]
        if not dense:
            continue
        bt, bs = min(r["time_s"] for r in dense), min(r["saved_bytes"] for r in dense)
        for r in rows:
            r["time_ratio"], r["saved_ratio"] = r["time_s"] / bt, r["saved_bytes"] / bs
            lines.append(f"{r['config']:15} {key[0]:8} {key[1]:6} {r['time_s'] * 1e3:9.1f} "
                         f"{r['saved_bytes'] / 2**20:9.1f} {r['time_ratio']:8.2f}x {r['saved_ratio']:9.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["smollm2"])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--blocks", type=int, default=4, help="ffn_blocks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(f"device {device}, {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"SwiGLU + LoRA r=16 on gate/up/down, {args.blocks} blocks", flush=True)
    results = []
    for shape in args.shapes:
        for T in args.tokens:
            for config in args.configs:
                try:
                    r = run(config, shape, T, args, device, dtype)
                except Exception as e:  # keep the other configurations' numbers
                    r = {"config": config, "shape": shape, "tokens": T, "error": f"{type(e).__name__}: {e}"[:300]}
                results.append(r)
                print(f"  {config:15} {shape:8} T={T:5} " + (
                    f"{r['time_s'] * 1e3:9.1f} ms  saved {r['saved_bytes'] / 2**20:8.1f} MiB" if "error" not in r
                    else r["error"]), flush=True)
                torch._dynamo.reset()
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "device": str(device), "dtype": str(dtype),
                                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
