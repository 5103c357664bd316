#!/usr/bin/env python
"""What a sparse forward costs in quality, per part: held-out perplexity of untuned SmolLM2 on
WikiText-2 test windows of 2048 tokens (quality.py's wikitext2_long task) evaluated through one
spt-compiled model under several run-time settings of `sparse_inference`, each against the exact
forward of the same model. For issue 16's sparse-inference target (+5%): which parts of the sparse
forward can run at inference within it, and at what density.

    python benchmarks/research/sparse_inference_curve.py --windows 4 \\
        --json benchmarks/research/results/sparse_inference_curve.json

Untuned, because the forward's error, not the adapter, is what the setting changes (quality_cpu.json:
the sparse forward's ppl ratio is +122% untuned and +108% tuned on this task). A setting is
NAME:OPTION=VALUE,... (--variant, as in quality_probe.py) of run-time options applied with sparse_inference=True.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import quality as q  # noqa: E402
from quality_probe import parse_variant as parse_setting  # NAME:OPTION=VALUE,...  # noqa: E402

SETTINGS = [
    "mlp_3of4_attention_exact:sparse_attention=false",
    "attention_1/8_mlp_exact:sparse_ffn=false,density=0.125",
    "attention_1/4_mlp_exact:sparse_ffn=false,density=0.25",
    "attention_1/2_mlp_exact:sparse_ffn=false,density=0.5",
    "attention_3/4_mlp_exact:sparse_ffn=false,density=0.75",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--variant", action="append", type=parse_setting, help="NAME:OPTION=VALUE,... as in quality_probe.py (repeatable; "
                   "default: MLP alone, then attention alone at densities 1/8 .. 3/4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    settings = args.variant or [parse_setting(s) for s in SETTINGS]

    import torch

    import spt_compile

    torch.set_num_threads(args.threads)
    qargs = q.parse_args(["--tasks", "wikitext2_long", "--seq-len", f"wikitext2_long={args.seq_len}",
                          "--eval", f"wikitext2_long={args.windows}", "--threads", str(args.threads)]
                         + (["--data", args.data] if args.data else []))
    data = q.read_data("wikitext2_long", q.data_root(qargs.data))
    task = q.wikitext2_long_task(qargs, data)
    torch.manual_seed(0)
    model = task.build()
    compiled = torch.compile(model, backend="spt")
    draws = q.Batches(task.train_examples, task.draw, 2)
    from spt_compile.options import make_options
    n = make_options({}).calibration_steps
    q.calibrate(compiled, [q.to_device(task.collate(draws.next()), "cpu") for _ in range(n)])
    from provenance import source_commit

    record = {"commit": source_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "what": __doc__.split("\n\n")[0], "command": "python benchmarks/research/sparse_inference_curve.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "windows": args.windows,
              "seq_len": args.seq_len, "rows": []}
    with torch.no_grad():
        t0 = time.perf_counter()
        exact = task.evaluate(compiled)["wikitext2_ppl"]  # calls without gradients run exact by default
        record["exact_ppl"] = exact
        print(f"exact forward: ppl {exact:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for name, opts in settings:
            t0 = time.perf_counter()
            with spt_compile.enable(sparse_inference=True, **opts):
                ppl = task.evaluate(compiled)["wikitext2_ppl"]
            row = {"setting": name, "options": opts, "ppl": ppl, "vs_exact": ppl / exact - 1,
                   "seconds": time.perf_counter() - t0}
            record["rows"].append(row)
            print(f"{name:32s} ppl {ppl:8.3f}  {row['vs_exact']:+.1%}  ({row['seconds']:.0f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
