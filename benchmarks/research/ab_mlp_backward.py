#!/usr/bin/env python
"""A/B of routed_mlp_backward_saved (the MLP site's backward on the torch path) between a git revision
and the working tree, in ONE process, alternating call by call (ABBA): SmolLM2's MLP shape (SwiGLU
576 -> 1536, LoRA r=16 on gate/up/down, 4 blocks, clustered unit order), every pair kept (LM tuning:
every row carries a loss, so exact_forward saves the whole pre-activations), d(x) and the LoRA
factors' gradients wanted, as in PEFT fine-tuning.

    python benchmarks/research/ab_mlp_backward.py f79f245 --tokens 2048 --rounds 40 \\
        --json benchmarks/research/results/ab_mlp_backward_cpu_2048.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "ops"), str(REPO / "tests"), str(REPO / "benchmarks")]


def module_at(rev: str, path: str, name: str, package: str) -> types.ModuleType:
    """The module at `path` as of git revision `rev`, its relative imports resolved in the tree's package."""
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"cannot read {path} at revision {rev!r}: {shown.stderr.strip()}")
    module = types.ModuleType(name)
    module.__package__ = package
    exec(compile(shown.stdout, f"{path}@{rev}", "exec"), module.__dict__)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="git revision whose sparse_ops/routed_mlp/backward.py is the baseline")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    import spt_compile.sparse_ops.routed_mlp.backward as tree
    from provenance import cpu_model, source_commit
    from spt_compile.sparse_ops.routed_mlp import MlpWeights, exact_mlp_forward
    from test_routed_mlp_op import make_weights, spec_for

    torch.set_num_threads(args.threads)
    base = module_at(args.rev, "sparse_ops/routed_mlp/backward.py", "backward_at_rev", "spt_compile.sparse_ops.routed_mlp")
    gen = torch.Generator().manual_seed(0)
    w = make_weights(576, 1536, 576, gated=True, bias=False, lora=("in", "gate", "out"), r=16, gen=gen)
    w = MlpWeights(*[None if t is None else t.detach() for t in w])
    spec = spec_for(w, "silu", True, 4)
    perm = torch.randperm(1536, generator=gen)
    T = args.tokens
    x, dy = torch.randn(T, 576, generator=gen), torch.randn(T, 576, generator=gen)
    every = torch.ones(T, 4, dtype=torch.bool)
    saved: list = []
    _, mask, _, whole, counts = exact_mlp_forward(x, w, spec, lambda scores: every, 0, saved, perm, None)
    assert whole
    needs = MlpWeights(*[n.endswith(("_a", "_bb")) and t is not None for n, t in zip(MlpWeights._fields, w)])
    call = (dy, x, w, spec, mask, 0, True, needs, saved[0])
    kw = dict(perm=perm, exact_forward=True, whole=True, counts=counts)

    names = (args.rev, "tree")
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    outs = {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            module = base if name == args.rev else tree
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            outs[name] = module.routed_mlp_backward_saved(*call, **kw)
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    (dx_a, g_a), (dx_b, g_b) = outs[args.rev], outs["tree"]
    rel = {"x": float((dx_a - dx_b).norm() / dx_a.norm())}
    rel.update({n: float((a - b).norm() / a.norm()) for n, a, b in zip(MlpWeights._fields, g_a, g_b) if a is not None})
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.rev}: {1000 * med[args.rev]:.1f} ms, tree: {1000 * med['tree']:.1f} ms "
          f"({med['tree'] / med[args.rev]:.3f}x), median of {args.rounds}, {T} tokens; minor page faults a call "
          f"{statistics.median(faults[args.rev]):.0f} / {statistics.median(faults['tree']):.0f}; "
          f"largest relative gradient difference {max(rel.values()):.1e}")
    if args.json:
        args.json.write_text(json.dumps({"rev": args.rev, "tree": source_commit(), "cpu": cpu_model(),
                                         "tokens": T, "threads": args.threads, "times_s": times, "median_s": med,
                                         "minor_faults": faults, "relative_difference": rel,
                                         "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
