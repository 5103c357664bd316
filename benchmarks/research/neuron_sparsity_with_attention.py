#!/usr/bin/env python
"""A whole sparse forward within issue 16's +5%? neuron_sparsity.py's per-unit MLP rules together
with spt's sparse attention, on untuned SmolLM2 and WikiText-2 test windows of 2048 tokens.

For each rule and skip share: a fresh model with its MLPs' forward swapped (as in neuron_sparsity.py),
compiled with backend="spt", calibrated on training windows, then evaluated three ways: the exact
forward, attention sparse at --density (sparse_inference=True, sparse_ffn=False,
attention_dense_below=0), and the rule alone for reference. The MLPs must stay out of spt's rewrite
(a swapped forward is not the pattern of a two-layer MLP); the script stops if any MLP site was
rewritten, since sparse_ffn=False would then run the site's own dense MLP instead of the rule.

    python benchmarks/research/neuron_sparsity_with_attention.py \\
        --json benchmarks/research/results/neuron_sparsity_with_attention_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import quality as q  # noqa: E402
from neuron_sparsity import RULES, down_weight, input_quantiles, mlps, thinned_forward  # noqa: E402


def parse_setting(text: str) -> tuple[str, float]:
    rule, _, skip = text.partition(":")
    if rule not in RULES or not skip:
        raise argparse.ArgumentTypeError(f"expected RULE:SKIP with RULE one of {', '.join(RULES)}, got {text!r}")
    return rule, float(skip)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", type=parse_setting, action="append",
                   help="RULE:SKIP (repeatable; default teal:0.3 and oracle:0.5, the two within +5%% alone)")
    p.add_argument("--density", type=float, default=0.5, help="keys kept per query (default 0.5: +0.8%% alone)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    settings = args.setting or [("teal", 0.3), ("oracle", 0.5)]

    import torch

    import spt_compile
    from provenance import source_commit

    torch.set_num_threads(args.threads)
    name = "wikitext2_long"
    qargs = q.parse_args(["--tasks", name, "--eval", f"{name}={args.windows}", "--threads", str(args.threads)]
                         + (["--data", args.data] if args.data else []))
    task = q.wikitext2_long_task(qargs, q.read_data(name, q.data_root(qargs.data)))
    record = {"commit": source_commit(), "torch": torch.__version__, "threads": args.threads,
              "what": __doc__.split("\n\n")[0], "command": "python benchmarks/research/neuron_sparsity_with_attention.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "density": args.density, "rows": [],
              "config": task.config}
    for rule, skip in settings:
        torch.manual_seed(0)
        model = task.build().eval()
        draws = q.Batches(task.train_examples, task.draw, 2)
        calib = [task.collate(draws.next()) for _ in range(args.calibration_batches)]
        with torch.no_grad():
            exact = task.evaluate(model)["wikitext2_ppl"]
        cuts = input_quantiles(model, calib, [skip])
        for m, cut in zip(mlps(model), cuts):
            threshold = (cut[skip]["x"], cut[skip]["h"]) if rule == "teal" else cut[skip]["gate"]
            m.forward = types.MethodType(thinned_forward(rule, skip, threshold, down_weight(m).norm(dim=0)), m)
        t0 = time.perf_counter()
        with torch.no_grad():
            alone = task.evaluate(model)["wikitext2_ppl"]
        compiled = torch.compile(model, backend="spt")
        q.calibrate(compiled, [q.to_device(task.collate(draws.next()), "cpu") for _ in range(4)])
        sites = [s for r in spt_compile.compile_reports(model) for s in r.rewritten()]
        if any(s.kind == "mlp" for s in sites):
            raise SystemExit(f"{rule}: spt rewrote an MLP site; the rule would not run")
        with torch.no_grad(), spt_compile.enable(sparse_inference=True, sparse_ffn=False, density=args.density,
                                                 attention_dense_below=0):
            both = task.evaluate(compiled)["wikitext2_ppl"]
        row = {"rule": rule, "skip": skip, "exact_ppl": exact, "rule_alone_ppl": alone, "with_attention_ppl": both,
               "rule_alone_vs_exact": alone / exact - 1, "with_attention_vs_exact": both / exact - 1,
               "attention_sites": sum(s.kind == "attention" for s in sites), "seconds": time.perf_counter() - t0}
        record["rows"].append(row)
        print(f"{rule} skip {skip:.2f}: exact {exact:.3f}, rule alone {alone:.3f} ({row['rule_alone_vs_exact']:+.1%}), "
              f"with attention {args.density:g}: {both:.3f} ({row['with_attention_vs_exact']:+.1%})", flush=True)
        if args.json:
            q.write_json(args.json, record)  # atomic, machine paths scrubbed
    return 0


if __name__ == "__main__":
    sys.exit(main())
