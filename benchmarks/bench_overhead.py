"""Per-call overhead at tiny shapes, where a call's time is nearly all host work: the spt ops against the
dense op they replace, in the same run (issue 19).

On a GPU a call of a small op costs its host time (Python, dispatch, one launch per kernel, any wait
for the device); here, on the CPU, the arithmetic at these shapes is a few microseconds, so the time
per call is what the op's own code costs. Shapes: attention B=1, H=4 query heads (2 key/value heads),
N=256, D=64, causal; a SwiGLU MLP 128 -> 512 on 64 tokens (SmolLM2's 576 -> 1536 would be GEMM time
already: --d-model 576 --d-ff 1536), base weights frozen (as in LoRA tuning: x gets a gradient). Each spt config compiles a module holding just that op with
backend="spt" (the pass, the site op and its autograd are all timed; downstream compiler "eager" so
nothing else is compiled), calibrated and warmed up, then:

  train   forward + backward of a training call (the defaults: exact forward, sparse backward);
  infer   a forward without gradients under sparse_inference (the routed / selected path).

spt-graphed is the attention op made for CUDA graphs (options compiler="inductor",
mode="reduce-overhead"); on a GPU Inductor captures it, and the JSON records Inductor's count of
graphs it did not capture (cudagraph_skips; the reasons are in Inductor's cudagraphs log).

Configs of one op are timed in turns (one call each per round, --rounds rounds, medians): a slow
spell of a shared machine hits them alike. Ratios are to the dense op of the same kind.

    python benchmarks/bench_overhead.py --json benchmarks/results/overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from source (the GPU machine has no install)
    sys.path.insert(0, str(REPO))

import spt_compile  # noqa: E402


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def attention_configs(args) -> dict:
    """name -> (module, needs compile options or None)."""
    base = dict(calibration_steps=1, compiler="eager", sparse_ffn=False, attention_dense_below=0,
                attention_backward_dense_below=0, attention_min_keys=0,
                attention_block=args.block)
    return {"sdpa": None, "spt-block": dict(base),
            "spt-exact-short": dict(base, attention_dense_below=2048, attention_backward_dense_below=2048),
            # the op for CUDA graphs (spt::attention_graphed) under Inductor; on a GPU the graph is captured
            "spt-graphed": dict(base, compiler="inductor", mode="reduce-overhead")}


def mlp_configs(args) -> dict:
    # ffn_loss_rows="off": the loss is outside the graph, so the backward ranks every row (under the
    # default, a site that sees no loss rows keeps every real row's blocks: a dense backward)
    base = dict(calibration_steps=1, compiler="eager", sparse_attention=False, ffn_loss_rows="off")
    return {"dense": None, "spt-torch": dict(base, ffn_impl="torch"), "spt-grouped": dict(base, ffn_impl="grouped")}


def _build(op: str, options, args, device):
    torch.manual_seed(0)
    torch._dynamo.reset()
    if op == "attention":
        module = Attention()
        g = torch.Generator().manual_seed(0)
        shapes = [(1, args.heads, args.seq, args.head_dim), (1, args.kv_heads, args.seq, args.head_dim),
                  (1, args.kv_heads, args.seq, args.head_dim)]
        inputs = [torch.randn(*s, generator=g).to(device).requires_grad_() for s in shapes]
    else:
        module = SwiGLU(args.d_model, args.d_ff).to(device)
        for p in module.parameters():
            p.requires_grad_(False)
        inputs = [torch.randn(1, args.tokens, args.d_model, device=device, requires_grad=True)]
    fn = module if options is None else torch.compile(module, backend="spt", options=options)

    graphs = device.type == "cuda" and options is not None and options.get("mode") == "reduce-overhead"

    def train():
        if graphs:  # a new iteration for CUDA graph trees: the last call's outputs are done with
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None

    def infer():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), spt_compile.enable(sparse_inference=True):
            fn(*[t.detach() for t in inputs])

    for _ in range(3):  # calibration, the first routed / selected calls (probes), compiles of both graphs
        train()
        infer()
    return {"train": train, "infer": infer}


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_op(op: str, configs: dict, args, device) -> list[dict]:
    built = {name: _build(op, options, args, device) for name, options in configs.items()}
    rows = []
    for kind in ("train", "infer"):
        times = {name: [] for name in built}
        for _ in range(args.rounds):
            for name, calls in built.items():
                times[name].append(_time(calls[kind], device))
        dense = next(iter(built))
        base = statistics.median(times[dense])
        for name in built:
            med = statistics.median(times[name])
            rows.append({"op": op, "config": name, "kind": kind, "us_per_call": med * 1e6, "over_dense": med / base,
                         "options": configs[name]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'op':10} {'config':16} {'call':6} {'us/call':>9} {'/ dense':>8}"]
    for r in rows:
        lines.append(f"{r['op']:10} {r['config']:16} {r['kind']:6} {r['us_per_call']:9.0f} {r['over_dense']:7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=200, help="timed calls per config and kind")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64, help="attention_block (query and key block size)")
    p.add_argument("--tokens", type=int, default=64, help="MLP tokens per call")
    p.add_argument("--d-model", type=int, default=128, help="MLP width (small: the arithmetic stays negligible)")
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run_op("attention", attention_configs(args), args, device)
    print(table(rows), flush=True)
    mlp = run_op("mlp", mlp_configs(args), args, device)
    print(table(mlp), flush=True)
    rows += mlp
    if args.json:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from provenance import source_commit

        args.json.parent.mkdir(parents=True, exist_ok=True)
        from torch._dynamo.utils import counters

        args.json.write_text(json.dumps({
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if device.type == "cuda" else None,
            "command": "python benchmarks/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": source_commit(), "torch": torch.__version__, "device": args.device,
            "machine": platform.processor() or platform.machine(), "threads": args.threads,
            "shapes": {"attention": [1, args.heads, args.kv_heads, args.seq, args.head_dim], "mlp_tokens": args.tokens,
                       "mlp": [args.d_model, args.d_ff]}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
