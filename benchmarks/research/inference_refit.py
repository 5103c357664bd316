#!/usr/bin/env python
"""Does the sparse-inference loss come partly from *what the router was fitted on*? After tuning, an
MLP site's router sample buffer holds mostly tokens from calibration (the untuned model, their block
norms measured with the untuned weights) and probe tokens from training calls (dropout active). An
evaluation runs neither. This probe tunes like `benchmarks/quality.py` (same task, seed, steps and
defaults), evaluates sparse as it does, then refills every MLP site's buffer with eval-mode tokens
of the tuned model (dense no-grad calls on training batches, as calibration does, the block norms
measured with the tuned weights), refits routing and compensation on them, and evaluates sparse again.

    python benchmarks/research/inference_refit.py --tasks sst2 --seeds 1 4 --json benchmarks/research/results/inference_refit_sst2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import quality as q  # noqa: E402


def refit_for_inference(compiled, model, batches: list) -> int:
    """Empties every MLP site's router buffer, runs `batches` through `compiled` in eval mode with the
    sites in calibration (dense calls that sample tokens and their block norms), and refits each
    site's routing on the last batch. Returns the number of sites refitted. Research only: it reaches
    into the sites (MlpSite.calibrating / _calibrate)."""
    import torch

    from spt_compile.registry import model_sites
    from spt_compile.sites.mlp import MlpSite

    sites = [s for _, s in model_sites(model) if isinstance(s, MlpSite)]
    calibrating, calibrate = MlpSite.calibrating, MlpSite._calibrate

    def refit_calibrating(self, plan):
        return getattr(self, "_refit_left", 0) > 0 or calibrating(self, plan)

    def refit_calibrate(self, x2, norms, weights, spec, plan, seed, real=None):
        if getattr(self, "_refit_left", 0) <= 0:
            return calibrate(self, x2, norms, weights, spec, plan, seed, real)
        rows = self._sample_rows(x2.shape[0], 512, seed, x2.device, real)
        self._add_samples(x2[rows], norms[rows])
        self._refit_left -= 1
        if self._refit_left == 0:
            fitted = self._fit_routing(weights, spec, plan.options, seed)
            if fitted is not None:
                self.stage(lambda: self._set_routing(*fitted))

    for s in sites:
        s.buffer_x, s.buffer_y = s.buffer_x[:0], s.buffer_y[:0]
        s._refit_left = len(batches)
    MlpSite.calibrating, MlpSite._calibrate = refit_calibrating, refit_calibrate
    try:
        was = model.training
        compiled.eval()
        with torch.no_grad():
            for b in batches:
                compiled(**b)
        compiled.train(was)
    finally:
        MlpSite.calibrating, MlpSite._calibrate = calibrating, calibrate
    return sum(getattr(s, "_refit_left", 1) == 0 for s in sites)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2"], choices=sorted(q.BUILDERS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batches", type=int, default=8, help="training batches for the refit, spread over the training set (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from provenance import source_commit

    torch.set_num_threads(args.threads)
    root = q.data_root(None)
    record = {"commit": source_commit(), "torch": torch.__version__, "threads": args.threads, "batches": args.batches,
              "what": __doc__.split("\n\n")[0], "command": "python benchmarks/research/inference_refit.py "
              + " ".join(sys.argv[1:] if argv is None else argv), "rows": []}
    for task_name in args.tasks:
        data = q.read_data(task_name, root)
        for seed in args.seeds:
            qargs = q.parse_args(["--tasks", task_name, "--seed", str(seed), "--generate", "0",
                                  "--threads", str(args.threads)])
            task = q.BUILDERS[task_name](qargs, data)
            original = q.evaluate_sparse
            calls = []

            def evaluate_sparse(secs, task, compiled, model):
                out = original(secs, task, compiled, model)
                calls.append(1)
                if len(calls) == 2:  # after tuning: refit on eval-mode tokens, evaluate again
                    # spread over the training examples (SST-2's batches are sorted by length)
                    n_ex = len(task.train_examples) - task.draw
                    starts = [round(j * n_ex / max(1, args.batches - 1)) for j in range(args.batches)]
                    batches = [q.to_device(task.collate(task.train_examples[i:i + task.draw]), qargs.device)
                               for i in starts]
                    t0 = time.perf_counter()
                    n = refit_for_inference(compiled, model, batches)
                    out["refit"] = {**original(secs, task, compiled, model), "sites": n,
                                    "seconds": time.perf_counter() - t0}
                return out

            q.evaluate_sparse = evaluate_sparse
            try:
                part = q.run(task, "spt", qargs, lambda part: None)
            finally:
                q.evaluate_sparse = original
            row = {"task": task_name, "seed": seed, "tuned_dense": part["tuned_dense"],
                   "tuned_sparse": {k: v for k, v in part["tuned_sparse"].items() if k != "refit"},
                   "tuned_sparse_refit": part["tuned_sparse"]["refit"]}
            record["rows"].append(row)
            print(row, flush=True)
            if args.json:
                q.write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
