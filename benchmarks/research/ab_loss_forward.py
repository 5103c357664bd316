#!/usr/bin/env python
"""A/B of the chunked loss's forward (spt::linear_cross_entropy with gradients in forward) between
the working tree and a git revision, in one process, alternating call by call.

    python benchmarks/research/ab_loss_forward.py REV --tokens 2048 --row-len 2048 --rounds 10
    python benchmarks/research/ab_loss_forward.py REV --tokens 4096 --row-len 512 --prompt-frac 0.5 --json F

REV's sparse_ops/linear_cross_entropy/chunked.py is loaded beside the working tree's under another
op namespace, and both forwards run on the same inputs: fp32, d = 576, V = 49152 (SmolLM2's head),
labels shifted as a causal LM's (each row's last token ignored), logits returned as Hugging Face
returns them, a frozen head. Prints each side's median and the ratio new / REV; checks that loss,
logits and d(h) agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def load_revision(rev: str):
    """REV's chunked.py as module ...chunked_rev, its ops renamed spt_rev:: (no clash with ours)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:sparse_ops/linear_cross_entropy/chunked.py"],
                         check=True, capture_output=True, text=True).stdout
    src = src.replace('custom_op("spt::', 'custom_op("spt_rev::')
    name = "spt_compile.sparse_ops.linear_cross_entropy.chunked_rev"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "spt_compile.sparse_ops.linear_cross_entropy"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:chunked.py", "exec"), mod.__dict__)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--row-len", type=int, default=2048)
    p.add_argument("--prompt-frac", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="append this run's result to a JSON list in this file")
    args = p.parse_args(argv)

    import torch

    import spt_compile.sparse_ops.linear_cross_entropy.chunked as new

    old = load_revision(args.rev)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    T, d, V = args.tokens, 576, 49152
    h = torch.randn(T, d, generator=gen)
    W = torch.randn(V, d, generator=gen) * d**-0.5
    y = torch.randint(0, V, (T,), generator=gen)
    pos = torch.arange(T) % args.row_len
    y[pos < int(args.prompt_frac * args.row_len)] = -100
    y[pos == args.row_len - 1] = -100

    def call(mod):
        t0 = time.perf_counter()
        out = mod.linear_cross_entropy_forward(h, W, None, y, -100, "mean", 0.0, args.chunk, True, torch.float32,
                                               True, [True, False, False], "torch")
        return time.perf_counter() - t0, out

    _, a = call(old)
    _, b = call(new)
    for name, x, z in (("loss", a[0], b[0]), ("logits", a[1], b[1]), ("d(h)", a[3], b[3])):
        torch.testing.assert_close(z, x, msg=lambda m: f"{name}: {m}")
    times = {"rev": [], "new": []}
    for _ in range(args.rounds):
        times["rev"].append(call(old)[0])
        times["new"].append(call(new)[0])
        times["new"].append(call(new)[0])
        times["rev"].append(call(old)[0])
    ro, rn = statistics.median(times["rev"]), statistics.median(times["new"])
    print(f"T={T} row {args.row_len} prompt {args.prompt_frac}: {args.rev} {ro:.3f} s, working tree {rn:.3f} s "
          f"(median of {2 * args.rounds}), ratio {rn / ro:.3f}")
    if args.json:
        import json

        results = json.loads(args.json.read_text()) if args.json.exists() else []
        results.append({"rev": args.rev, "rev_commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", args.rev], capture_output=True, text=True).stdout.strip(),
            "tokens": T, "row_len": args.row_len, "prompt_frac": args.prompt_frac, "chunk": args.chunk,
            "threads": args.threads, "rev_s": times["rev"], "new_s": times["new"], "rev_median_s": ro,
            "new_median_s": rn, "ratio": rn / ro, "torch": torch.__version__})
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
