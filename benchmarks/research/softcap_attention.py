"""Gemma-2's soft-capped attention, forward + backward: what the spt op costs against the dense forms.

Gemma-2 caps its scores, cap * tanh(scores / cap), before the mask; SDPA has no cap, so Hugging Face
runs it as eager attention (scores materialised [B, H, N, N]). The spt op carries the cap; its exact
calls (short sequences, calibration, evaluation) run the block kernels over every key block, its sparse
ones over the selected blocks (docs/attention.md). Configs, on Gemma-2-2B's heads (8 query heads, 4 kv
heads, head size 256, scale 256^-0.5, cap 50), causal, batch 1, fp32:

    eager            HF's eager form (repeat_kv, matmul, scale, cap, additive causal mask, fp32 softmax, matmul)
    eager-inductor   the same under torch.compile (Inductor)
    spt-defaults     compiled with backend="spt" at the default options (exact below 1024 keys, at least
                     256 keys a query above: the exact forward, a block-sparse backward)
    spt-exact        spt with density 1.0: every key block, both ways (the exact calls' kernels)
    spt-1/8          spt at density 1/8 at every length (exact forward, sparse backward)

Prints the median time of --repeats steps and the bytes autograd saves for backward, with ratios to
eager's of the same N (measured in the same run).

    python benchmarks/research/softcap_attention.py --json benchmarks/research/results/softcap_attention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import spt_compile  # noqa: E402,F401  (registers backend="spt")
from bench_attention import SavedBytes  # noqa: E402
from provenance import cpu_model, source_commit  # noqa: E402

CONFIGS = ("eager", "eager-inductor", "spt-defaults", "spt-exact", "spt-1/8")


class CappedAttention(torch.nn.Module):
    """Gemma-2's eager attention on q [B, H, N, D], k, v [B, Hkv, N, D] with an additive causal mask."""

    def __init__(self, cap: float, scale: float):
        super().__init__()
        self.cap, self.scale = cap, scale

    def forward(self, q, k, v, mask):
        rep = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(k.shape[0], k.shape[1], rep, *k.shape[2:]).reshape(q.shape[0], q.shape[1], -1, k.shape[-1])
        v = v[:, :, None].expand(v.shape[0], v.shape[1], rep, *v.shape[2:]).reshape(q.shape[0], q.shape[1], -1, v.shape[-1])
        w = torch.matmul(q, k.transpose(2, 3)) * self.scale
        w = torch.tanh(w / self.cap) * self.cap
        w = torch.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


def make_fn(config: str, args):
    module = CappedAttention(args.cap, args.head_dim**-0.5)
    if config == "eager":
        return module
    if config == "eager-inductor":
        return torch.compile(module, backend="inductor")
    options = dict(calibration_steps=1, sparse_ffn=False)
    if config == "spt-exact":
        options.update(density=1.0, attention_dense_below=0, attention_backward_dense_below=0, attention_min_keys=0)
    elif config == "spt-1/8":
        options.update(density=0.125, attention_dense_below=0, attention_backward_dense_below=0, attention_min_keys=0)
    return torch.compile(module, backend="spt", options=options)


def run_config(config: str, N: int, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 1, args.heads, args.kv_heads, args.head_dim
    # scores of a trained model's spread (the q scale), so that the cap bites on some of them
    q = (4.0 * torch.randn(B, H, N, D, generator=gen)).requires_grad_()
    k, v = (torch.randn(B, Hkv, N, D, generator=gen).requires_grad_() for _ in range(2))
    mask = torch.full((N, N), torch.finfo(torch.float32).min).triu(1)[None, None]
    dout = torch.randn(B, H, N, D, generator=gen)
    torch._dynamo.reset()
    fn = make_fn(config, args)

    def step():
        out = fn(q, k, v, mask)
        out.backward(dout)
        q.grad = k.grad = v.grad = None
        return out.detach()

    out = step()  # compiles; spt's calibration call
    for _ in range(args.warmup):
        step()
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        o = fn(q, k, v, mask)
    o.backward(dout)
    q.grad = k.grad = v.grad = None
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t)
    return {"config": config, "N": N, "time_s": statistics.median(times), "times": times, "saved_bytes": saved.total,
            "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--cap", type=float, default=50.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for N in args.seqs:
        base = None
        for config in args.configs:
            r = run_config(config, N, args)
            out = r.pop("out")
            if config == "eager":
                base, base_out = r, out
            err = None if base is None else float((out - base_out).abs().max())
            r["max_abs_diff_vs_eager"] = err
            if base is not None:
                r["time_vs_eager"] = r["time_s"] / base["time_s"]
                r["saved_vs_eager"] = r["saved_bytes"] / base["saved_bytes"]
            rows.append(r)
            ratio = f"  {r['time_vs_eager']:.2f}x time, {r['saved_vs_eager']:.2f}x saved" if base is not None else ""
            print(f"N={N:5d} {config:15s} {r['time_s'] * 1e3:8.1f} ms  saved {r['saved_bytes'] / 2**20:7.1f} MiB"
                  f"{ratio}  max |out - eager| {err if err is not None else 0:.2e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"commit": source_commit(), "cpu": cpu_model(), "command": " ".join(sys.argv),
                                         "torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
