#!/usr/bin/env python
"""A/B of the routed MLP's torch path: triton_ops/routed_mlp.py at a git revision (A) against the
working tree (B). Revisions before the split into sparse_ops/routed_mlp/ (one module) only: it loads that file, both loaded into one process and timed in alternating rounds.

On this shared 2-core machine the same configuration's median moves by 5-10% between runs of
bench_ffn.py; alternating A and B in one process lets both see the same slow spells, so per-round
ratios B/A decide changes of a few percent. One call is routed_mlp_forward (saving for backward) +
routed_mlp_backward_saved at SmolLM2's MLP shape (SwiGLU 576 -> 1536), LoRA r=16 on gate/up/down with
frozen base weights (d(x) and the LoRA grads), a unit permutation (clustering) and ffn_compensate's
predictors of rank 32 (both on by default), 4 blocks. Outputs and gradients of A and B are compared
first (relative error).

    python benchmarks/research/ab_routed_mlp.py 3395bd7 --json benchmarks/research/results/ab_routed_mlp_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = "triton_ops/routed_mlp.py"
LORA_SLOTS = ("in_a", "in_bb", "gate_a", "gate_bb", "out_a", "out_bb")


def load(name: str, path: Path):
    """routed_mlp.py imports nothing of the package, so a copy loads as a module of its own."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def inputs(T: int, active: int, d: int = 576, F: int = 1536, r: int = 16, nb: int = 4, rank: int = 32):
    import torch

    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    slots = dict(in_w=rn(F, d) / d**0.5, in_b=None, in_a=rn(r, d) / d**0.5, in_bb=rn(F, r) * 0.01,
                 gate_w=rn(F, d) / d**0.5, gate_b=None, gate_a=rn(r, d) / d**0.5, gate_bb=rn(F, r) * 0.01,
                 out_w=rn(d, F) / F**0.5, out_b=None, out_a=rn(r, F) / F**0.5, out_bb=rn(d, r) * 0.01)
    mask = torch.zeros(T, nb, dtype=torch.bool)
    mask.scatter_(1, rn(T, nb).topk(active, 1).indices, True)
    comp = (rn(d, nb * rank) / d**0.5, rn(nb * rank, d) / 10, rn(nb, d) / 10)
    spec = dict(activation="silu", gated=True, hidden=F, n_blocks=nb, in_scale=2.0, gate_scale=2.0, out_scale=2.0)
    return dict(x=rn(T, d), dy=rn(T, d), slots=slots, mask=mask, perm=torch.randperm(F, generator=g), comp=comp,
                spec=spec)


def call(m, a: dict):
    w = m.MlpWeights(**a["slots"])
    spec = m.MlpSpec(**a["spec"])
    needs = m.MlpWeights(*[s in LORA_SLOTS for s in m.MlpWeights._fields])
    saved: list = []
    y = m.routed_mlp_forward(a["x"], w, spec, a["mask"], 0, saved=saved, perm=a["perm"], comp=a["comp"])
    dx, grads = m.routed_mlp_backward_saved(a["dy"], a["x"], w, spec, a["mask"], 0, True, needs, saved[0],
                                            perm=a["perm"], comp=a["comp"][:2])
    return y, dx, grads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the git revision whose routed_mlp.py is A")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--active", type=int, nargs="+", default=[2, 1], help="blocks active of 4")
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        old = subprocess.run(["git", "show", f"{args.rev}:{MODULE}"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"git show {args.rev}:{MODULE} failed: {e.stderr.strip()}") from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "routed_mlp_a.py").write_text(old)
        A = load("routed_mlp_a", Path(tmp) / "routed_mlp_a.py")
    B = load("routed_mlp_b", REPO / MODULE)
    rows = []
    for active in args.active:
        a = inputs(args.tokens, active)
        (ya, dxa, ga), (yb, dxb, gb) = call(A, a), call(B, a)
        err = lambda u, v: float((u - v).norm() / v.norm())  # noqa: E731
        errors = {"y": err(yb, ya), "dx": err(dxb, dxa),
                  **{s: err(getattr(gb, s), getattr(ga, s)) for s in LORA_SLOTS}}
        for _ in range(3):
            call(A, a)
            call(B, a)
        ta, tb = [], []
        for _ in range(args.rounds):
            for m, times in ((A, ta), (B, tb)):
                t0 = time.perf_counter()
                call(m, a)
                times.append(time.perf_counter() - t0)
        ratios = sorted(b / a_ for a_, b in zip(ta, tb))
        row = {"tokens": args.tokens, "active": active, "blocks": 4, "a_ms": statistics.median(ta) * 1e3,
               "b_ms": statistics.median(tb) * 1e3, "b_over_a_median": statistics.median(ratios),
               "b_over_a_quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]],
               "max_rel_error": max(errors.values()), "rel_errors": errors}
        rows.append(row)
        print(f"T={args.tokens} {active} of 4 blocks: A ({args.rev}) {row['a_ms']:.1f} ms, B (working tree) "
              f"{row['b_ms']:.1f} ms, B/A median {row['b_over_a_median']:.3f} (quartiles "
              f"{row['b_over_a_quartiles'][0]:.3f}-{row['b_over_a_quartiles'][1]:.3f}); outputs and grads agree to "
              f"{row['max_rel_error']:.1e}", flush=True)
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from provenance import source_commit

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python benchmarks/research/ab_routed_mlp.py " + " ".join(argv or sys.argv[1:]),
                                         "a": args.rev, "b": source_commit(), "torch": torch.__version__,
                                         "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
