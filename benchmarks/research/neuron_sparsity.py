#!/usr/bin/env python
"""Would a sparse forward at the granularity of single MLP units meet issue 16's sparse-inference
target (+5%) on SmolLM2, where block routing cannot? Held-out quality of untuned SmolLM2-135M with
every MLP's hidden units thinned per token, against the exact forward of the same model.

Rules (s = the share of hidden units each token skips; a unit is one column of gate/up, one row of
W_down):
* ``gate-threshold``: one threshold per layer on |act(gate(x))|, the s-quantile over calibration
  tokens (CATS, arXiv:2404.08763): the gate runs dense, up and down only on the kept units, so a
  kernel's MLP FLOPs are 1/3 + 2/3 (1 - s).
* ``gate-topk``: the same score, a fixed count per token (the top 1 - s of each token's units).
* ``oracle``: per token the top 1 - s of |h_j| ||W_down[:, j]|| with h the true hidden activation.
  It needs gate and up dense to choose, so as a skip of whole units it bounds what any per-unit rule
  can reach; as a rule of its own it thins the down projection only (MLP FLOPs 2/3 + 1/3 (1 - s)).
* ``teal``: magnitude thresholds on each projection's input (TEAL, arXiv:2408.14690): one per layer
  on |x| for gate and up, one on |h| for down, each the s-quantile over calibration tokens; every
  projection reads only its kept input channels (MLP FLOPs 1 - s).

The backend's block routing is docs/ffn.md's and docs/quality.md's tables (3 of 4 clustered blocks:
WikiText-2 at 2048 +66%). Attention runs exact throughout. Plain PyTorch with the MLP's forward
swapped, no spt compile: this probes the method, not a kernel.

    python benchmarks/research/neuron_sparsity.py --json benchmarks/research/results/neuron_sparsity_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import quality as q  # noqa: E402

RULES = ("gate-threshold", "gate-topk", "oracle", "teal")


def mlps(model):
    """Every LLaMA MLP of the (PEFT-wrapped) model: modules with gate_proj, up_proj and down_proj."""
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))]


def down_weight(mlp):
    """W_down [d, F] of a plain or PEFT-wrapped down projection."""
    return mlp.down_proj.weight if hasattr(mlp.down_proj, "weight") else mlp.down_proj.base_layer.weight


def thinned_forward(rule: str, skip: float, threshold, down_norms):
    """An MLP forward that zeroes each token's skipped hidden units (numerically the same as never
    computing up/down for them)."""
    import torch

    def forward(self, x):                                    # x: [B, N, d]
        g = self.act_fn(self.gate_proj(x))                   # [B, N, F]
        if rule == "teal":
            x_cut, h_cut = threshold                         # |x| and |h| quantiles of this layer
            xs = x * (x.abs() > x_cut)
            h = self.act_fn(self.gate_proj(xs)) * self.up_proj(xs)
            return self.down_proj(h * (h.abs() > h_cut))
        if rule == "gate-threshold":
            keep = g.abs() > threshold
            h = g * self.up_proj(x) * keep
        elif rule == "gate-topk":
            k = max(1, round(g.shape[-1] * (1 - skip)))
            idx = g.abs().topk(k, dim=-1).indices
            h = g * self.up_proj(x)
            h = torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))
        else:  # oracle
            h = g * self.up_proj(x)
            k = max(1, round(h.shape[-1] * (1 - skip)))
            idx = (h.abs() * down_norms).topk(k, dim=-1).indices
            h = torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))
        return self.down_proj(h)

    return forward


def input_quantiles(model, batches, shares) -> list[dict]:
    """Per MLP and share s, the s-quantiles of |act(gate(x))|, |x| and |h| over the calibration
    batches' tokens (at most 2^22 sampled values each: torch.quantile's input limit)."""
    import torch

    samples = [{"gate": [], "x": [], "h": []} for _ in mlps(model)]
    hooks = []
    for i, m in enumerate(mlps(model)):
        def grab(mod, args, i=i):
            x = args[0]
            g = mod.act_fn(mod.gate_proj(x))
            for key, v in (("gate", g), ("x", x), ("h", g * mod.up_proj(x))):
                v = v.abs().flatten()
                samples[i][key].append(v[torch.randperm(v.numel())[: 1 << 20]])
        hooks.append(m.register_forward_pre_hook(grab))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    out = []
    for layer in samples:
        values = {key: torch.cat(v)[: 1 << 22].float() for key, v in layer.items()}
        out.append({share: {key: float(v.quantile(share)) for key, v in values.items()} for share in shares})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                   help="shares of hidden units each token skips (default: 0.3 0.5 0.7)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--tasks", nargs="+", default=["wikitext2_long", "gsm8k"], choices=["wikitext2_long", "gsm8k"])
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of 2048 tokens")
    p.add_argument("--problems", type=int, default=32, help="GSM8K held-out problems")
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not all(0 < s < 1 for s in args.skip):
        p.error(f"--skip takes shares strictly between 0 and 1, got {args.skip}")

    import torch

    from provenance import source_commit

    torch.set_num_threads(args.threads)
    record = {"commit": source_commit(), "torch": torch.__version__, "threads": args.threads,
              "what": __doc__.split("\n\n")[0], "command": "python benchmarks/research/neuron_sparsity.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "tasks": {}}
    for name in args.tasks:
        qargs = q.parse_args(["--tasks", name, "--eval", f"{name}={args.windows if name == 'wikitext2_long' else args.problems}",
                              "--threads", str(args.threads)] + (["--data", args.data] if args.data else []))
        task = getattr(q, f"{name}_task")(qargs, q.read_data(name, q.data_root(qargs.data)))
        torch.manual_seed(0)
        model = task.build().eval()
        draws = q.Batches(task.train_examples, task.draw, 2)
        calib = [task.collate(draws.next()) for _ in range(args.calibration_batches)]
        metric = "wikitext2_ppl" if name == "wikitext2_long" else "answer_loss"
        t0 = time.perf_counter()
        with torch.no_grad():
            exact = task.evaluate(model)[metric]
        print(f"{name}: exact {metric} {exact:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        quantiles = input_quantiles(model, calib, args.skip)
        layers = mlps(model)
        originals = [m.forward for m in layers]
        rows = []
        for rule in args.rules:
            for skip in args.skip:
                for m, cut in zip(layers, (per_share[skip] for per_share in quantiles)):
                    threshold = (cut["x"], cut["h"]) if rule == "teal" else cut["gate"]
                    m.forward = types.MethodType(thinned_forward(rule, skip, threshold, down_weight(m).norm(dim=0)), m)
                t0 = time.perf_counter()
                with torch.no_grad():
                    value = task.evaluate(model)[metric]
                for m, f in zip(layers, originals):
                    m.forward = f
                ratio = value / exact - 1
                rows.append({"rule": rule, "skip": skip, metric: value, "vs_exact": ratio,
                             "mlp_flops": {"oracle": 2 / 3 + (1 - skip) / 3, "teal": 1 - skip}.get(rule, 1 / 3 + 2 / 3 * (1 - skip)),
                             "seconds": time.perf_counter() - t0})
                print(f"  {rule:15s} skip {skip:.2f}: {metric} {value:.4f} ({ratio:+.1%})", flush=True)
        record["tasks"][name] = {"metric": metric, "exact": exact, "rows": rows, "config": task.config,
                                 "calibration_batches": args.calibration_batches}
        if args.json:
            q.write_json(args.json, record)  # atomic, machine paths scrubbed
    return 0


if __name__ == "__main__":
    sys.exit(main())
