#!/usr/bin/env python
"""How much of SmolLM2's MLP output block routing keeps, on real activations (GSM8K text).

For sampled layers: relative error ||y_routed - y_dense|| / ||y_dense|| on held-out tokens for
  * router   the backend's ridge-regression router (fitted on the other half of the tokens),
  * oracle   the blocks with the largest true output norm per token (the best any block router can do),
  * neurons  the same fraction of individual hidden units, largest |h_i| * ||W_down[:, i]|| per token
             (what block routing could approach if blocks matched co-active neurons).
Each for contiguous blocks and for clustered blocks (ffn_cluster: co-active units grouped on the
fitting half of the tokens, triton_ops/clustering.py).

    python benchmarks/research/routing_analysis.py --json benchmarks/research/results/routing_analysis_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LAYERS = [0, 5, 10, 15, 20, 25, 29]
SETTINGS = [(4, 2), (4, 3), (8, 4), (16, 8), (4, 1), (8, 2), (16, 4)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $SPT_DATA_DIR)")
    p.add_argument("--problems", type=int, default=40, help="GSM8K train problems (question + answer)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from spt_compile.recipes.data import find_gsm8k
    from spt_compile.recipes.models import load_model
    from spt_compile.fitting.router import choose_blocks, fit_router, router_scores
    from spt_compile.fitting.clustering import cluster_neurons
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights, block_outputs, permute_hidden, unit_importance

    splits, source = find_gsm8k(args.data)
    print(source, file=sys.stderr)
    model, tokenizer = load_model(seq_len=256)
    inputs: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda mod, a, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for row in splits["train"][: args.problems]:
            model(**tokenizer(row["question"] + "\n" + row["answer"], return_tensors="pt"))
    for h in hooks:
        h.remove()

    results = []
    for n_blocks, active in SETTINGS:
        errs = {"router": [], "oracle": [], "router_clustered": [], "oracle_clustered": [], "neurons": []}
        for i in LAYERS:
            X = torch.cat(inputs[i])
            n = X.shape[0]
            train, test = slice(0, n // 2), slice(n // 2, n)
            mlp = model.model.layers[i].mlp
            w = MlpWeights(in_w=mlp.up_proj.weight, gate_w=mlp.gate_proj.weight, out_w=mlp.down_proj.weight)
            spec = MlpSpec("silu", True, mlp.up_proj.weight.shape[0], n_blocks)
            with torch.no_grad():
                perm = cluster_neurons(unit_importance(X[train], w, spec), n_blocks,
                                       generator=torch.Generator().manual_seed(0))
                for suffix, wv in (("", w), ("_clustered", permute_hidden(w, spec, perm))):
                    outs = block_outputs(X, wv, spec)  # [n, nb, d]
                    norms = outs.norm(dim=-1)
                    dense = outs[test].sum(1)
                    router = fit_router(X[train], norms[train])
                    for name, scores in (("router", router_scores(X[test], router)), ("oracle", norms[test])):
                        routed = (outs[test] * choose_blocks(scores, active)[:, :, None]).sum(1)
                        errs[name + suffix].append(((routed - dense).norm() / dense.norm()).item())
                h = F.silu(mlp.gate_proj(X[test])) * mlp.up_proj(X[test])  # [n, F]
                keep = (h.abs() * mlp.down_proj.weight.norm(dim=0)).topk(h.shape[1] * active // n_blocks, dim=-1).indices
                kept = torch.zeros_like(h).scatter(-1, keep, h.gather(-1, keep))
                errs["neurons"].append(((mlp.down_proj(kept) - mlp.down_proj(h)).norm() / mlp.down_proj(h).norm()).item())
        row = {"n_blocks": n_blocks, "active": active, **{k: sum(v) / len(v) for k, v in errs.items()}}
        results.append(row)
        print(f"{n_blocks:2d} blocks, {active} active: relative error router {row['router']:.3f} "
              f"(clustered {row['router_clustered']:.3f}), oracle {row['oracle']:.3f} "
              f"(clustered {row['oracle_clustered']:.3f}), per-neuron {row['neurons']:.3f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"layers": LAYERS, "problems": args.problems, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
