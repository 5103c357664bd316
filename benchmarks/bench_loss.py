#!/usr/bin/env python
"""The LM head + cross-entropy alone: dense (HF's form) vs the chunked op, forward + backward.

Bytes saved for backward (unique storages; W, held by reference, left out), the allocation peak
from the profiler's memory events, and the median time. `--return-logits` also returns the logits,
as a Hugging Face model does: their T x V stays alive (the model's return value), nothing T x V is
saved for backward. The head's weight is frozen (LoRA fine-tuning), h requires grad.

Each chunk size runs with the implementations `--impls` names ('torch': the chunk's loss and d(logits)
in torch ops; 'triton': one kernel per chunk, the CUDA default). `--liger` adds Liger-Kernel's fused
linear cross-entropy where it can be imported (on the offline GPU machine: from a wheel carried in the
working tree, .whl/, which gpu_check.sh unpacks). `--check` compares every run's loss and d(h) with
the dense one and exits 1 on a mismatch.

    python benchmarks/bench_loss.py --tokens 2048 --return-logits both --json benchmarks/results/loss_cpu.json
    python benchmarks/bench_loss.py --tokens 4096 --chunks 512 1024 --return-logits yes --inductor
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --tokens 8192 --impls torch triton --liger --check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from source (the GPU machine has no install)
    sys.path.insert(0, str(REPO))

from spt_compile.sparse_ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from spt_compile.sparse_ops.linear_cross_entropy.chunked import resolve_loss_impl  # noqa: E402
from spt_compile.sparse_ops.linear_cross_entropy.reference import linear_cross_entropy_reference  # noqa: E402
from spt_compile.recipes.memory import allocation_peak  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--hidden", type=int, default=576, help="d (SmolLM2: 576, LLaMA-7B: 4096)")
    p.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152, LLaMA: 32000)")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024], help="loss_chunk values to run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--return-logits", default="no", choices=["no", "yes", "both"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--impls", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                   help="per-chunk implementations to run (auto: triton on CUDA, torch elsewhere)")
    p.add_argument("--liger", action="store_true", help="also run Liger-Kernel's fused linear cross-entropy")
    p.add_argument("--inductor", action="store_true",
                   help="also run the dense form compiled by torch.compile (Inductor), the best dense baseline of "
                        "a compiled model's step; compiled before it is measured")
    p.add_argument("--check", action="store_true", help="compare loss and d(h) with dense; exit 1 on a mismatch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--row-len", type=int, default=512, metavar="N",
                   help="tokens per row (sequence) for --prompt-frac and --shifted (default 512)")
    p.add_argument("--prompt-frac", type=float, default=0.0, metavar="F",
                   help="the first F of every row has no label (ignore_index), as a prompt "
                        "in instruction tuning (default 0: every row carries a loss)")
    p.add_argument("--shifted", action="store_true",
                   help="the last token of every row has no label, as in a causal LM's loss, whose labels "
                        "are shifted by one (Hugging Face pads the shift with ignore_index)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.prompt_frac < 1.0:
        p.error(f"--prompt-frac must be in [0, 1), got {args.prompt_frac}")
    if args.row_len < 2:
        p.error(f"--row-len must be >= 2, got {args.row_len}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def liger_loss():
    """Liger-Kernel's fused linear cross-entropy in this script's calling convention, or the reason it
    cannot run here (a string)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # not installed, or its import fails on this machine
        return f"liger_kernel not importable: {type(e).__name__}: {e}"
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def fn(h, W, b, y, return_logits=False):
        if return_logits:
            raise ValueError("Liger's fused loss returns no logits")
        return loss_fn(W, h, y, b), None

    return fn


def inductor_loss():
    """The dense form compiled by Inductor (one graph per return_logits value, made on first call)."""
    compiled = torch.compile(linear_cross_entropy_reference, dynamic=False)

    def fn(h, W, b, y, return_logits=False):
        return compiled(h, W, b, y, return_logits=return_logits)

    return fn


def measure(fn, h, W, y, ret, steps, **kw) -> dict:
    saved = {}
    loss, _ = fn(h, W, None, y, return_logits=ret, **kw)  # a compiled run compiles here, not in the profile
    loss.backward()
    h.grad = None

    def pack(t):
        if t.untyped_storage().data_ptr() != W.untyped_storage().data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    from torch.profiler import ProfilerActivity, profile

    dev = h.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, logits = fn(h, W, None, y, return_logits=ret, **kw)
        loss.backward()
        _sync(dev)
        del logits, loss
    h.grad = None
    times = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        loss, logits = fn(h, W, None, y, return_logits=ret, **kw)
        loss.backward()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        h.grad = None
    return {"saved_bytes": sum(saved.values()), "time_s": statistics.median(times),
            "alloc_peak_bytes": allocation_peak(prof, "CUDA" if dev.type == "cuda" else "CPU")}


def loss_and_dh(fn, h, W, y, **kw):
    loss, _ = fn(h, W, None, y, **kw)
    loss.backward()
    dh, h.grad = h.grad.float(), None
    return loss.detach().float(), dh


def agrees(got, want, dtype) -> tuple[bool, float, float]:
    """(within tolerance, |loss error|, max |d(h) error| / max |d(h)|). bf16 logits put the loss near
    1e-2 of fp32; d(h) near 1e-2 relative."""
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    loss_err = abs(got[0] - want[0]).item()
    dh_err = ((got[1] - want[1]).abs().max() / want[1].abs().max().clamp_min(1e-30)).item()
    return loss_err <= tol * max(1.0, abs(want[0].item())) and dh_err <= tol, loss_err, dh_err


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    impls = list(dict.fromkeys(resolve_loss_impl(i, device) for i in args.impls))
    liger = liger_loss() if args.liger else None
    skipped = {"liger": liger} if isinstance(liger, str) else {}
    rows, mismatches = [], []
    for T in args.tokens:
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(T, args.hidden, generator=gen).to(device, dtype).requires_grad_()
        W = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).to(device, dtype)
        y = torch.randint(0, args.vocab, (T,), generator=gen)
        pos = torch.arange(T) % args.row_len  # each token's position in its row
        y[pos < int(args.prompt_frac * args.row_len)] = -100  # the prompts
        if args.shifted:
            y[pos == args.row_len - 1] = -100  # each row's last token: no next token to predict
        y = y.to(device)
        runs = [("dense", linear_cross_entropy_reference, {})] + [
            (f"chunked-{c}-{i}", linear_cross_entropy, {"chunk": c, "impl": i}) for c in args.chunks for i in impls]
        if args.inductor:
            runs.insert(1, ("dense-inductor", inductor_loss(), {}))
        if callable(liger):
            runs.append(("liger", liger, {}))
        if args.check:
            want = loss_and_dh(linear_cross_entropy_reference, h, W, y)
            for name, fn, kw in runs[1:]:
                ok, loss_err, dh_err = agrees(loss_and_dh(fn, h, W, y, **kw), want, dtype)
                print(f"check {name:22} T={T}: loss error {loss_err:.2e}, d(h) error {dh_err:.2e} "
                      f"(of max |d(h)|){'' if ok else '  MISMATCH'}")
                if not ok:
                    mismatches.append(name)
        for ret in {"no": [False], "yes": [True], "both": [False, True]}[args.return_logits]:
            for name, fn, kw in runs:
                if name == "liger" and ret:
                    continue  # it returns no logits
                r = measure(fn, h, W, y, ret, args.steps, **kw)
                rows.append({"config": name, "tokens": T, "return_logits": ret, **r})
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")
    print(f"{'config':22} {'tokens':>6} {'logits out':>10} {'saved MB':>9} {'alloc peak MB':>13} {'time s':>8}")
    for r in rows:
        print(f"{r['config']:22} {r['tokens']:6d} {str(r['return_logits']):>10} {r['saved_bytes'] / 2**20:9.0f} "
              f"{r['alloc_peak_bytes'] / 2**20:13.0f} {r['time_s']:8.4f}")
    if args.json:
        from provenance import cpu_model, source_commit  # benchmarks/, on sys.path when run as a script

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "commit": source_commit(), "cpu": cpu_model() if device.type == "cpu" else None,
            "results": rows, "skipped": skipped, "mismatches": mismatches, "argv": sys.argv[1:],
            "prompt_frac": args.prompt_frac, "row_len": args.row_len, "shifted": args.shifted,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, indent=1))
    if mismatches:
        print(f"MISMATCH against dense: {', '.join(mismatches)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
