#!/usr/bin/env python
"""Can a cheap predictor stand in for the MLP blocks a token skips? Research measurement on real
SmolLM2 activations (GSM8K text), before any change to the routed op.

Setup as benchmarks/research/routing_analysis.py: MLP inputs of sampled layers on GSM8K training problems, the
first half of the tokens fits everything (unit clustering, the ridge router, the predictors), the
second half measures ||y - y_dense|| / ||y_dense||, where y is the routed output (the router's
blocks) plus, for each block the token skips, a prediction of that block's output from x:

  none       nothing added (the routed op as it is)
  mean       the block's mean output (over fitting tokens where the router skips it)
  rank r     ridge regression from [x, 1] to the block's output vector, reduced to rank r
             (reduced-rank regression: the full ridge solution projected on the top r right singular
             vectors of its fitted values), fitted on the tokens where the router skips the block
  full       the same without the rank limit (d_in x d_out per block: an upper bound for a linear
             predictor, not a candidate)
  *_all      the same predictor fitted on every fitting token, skipped or not (what the predictor
             would be if it did not depend on the router and ffn_active)

    python benchmarks/research/ffn_compensation.py --json benchmarks/research/results/ffn_compensation_cpu.json

--loss: instead, fit everything on all the captured tokens of every layer and measure the held-out
GSM8K answer loss (test problems, seq 256, as benchmarks/research/routing_quality.py) with every MLP replaced,
through a forward hook, by the routed output plus each method's compensation:

    python benchmarks/research/ffn_compensation.py --loss --examples 8 --methods none mean rank16 rank64 \
        --json benchmarks/research/results/ffn_compensation_loss_cpu.json

--cost: what the integrated option (ffn_compensate) costs at SmolLM2's MLP shape on random inputs:
the routed MLP's forward + backward (torch path) with and without the compensation term, and one fit
of the predictors (mlp_site.fit_compensation on ROUTER_BUFFER tokens, with the block outputs it needs):

    python benchmarks/research/ffn_compensation.py --cost --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LAYERS = [0, 5, 10, 15, 20, 25, 29]
SETTINGS = ["4/2", "16/8"]
RIDGE = 1e-3  # as mlp_site.RIDGE: relative to the mean feature energy


def fit_linear(X, Y, rank=None, ridge=RIDGE):
    """Ridge from [X, 1] to Y (fp64): returns (W [d, d_out], b [d_out]) with W of rank <= rank."""
    import torch

    Xd = torch.cat([X.double(), torch.ones(X.shape[0], 1, dtype=torch.float64)], 1)
    G = Xd.T @ Xd
    d = X.shape[1]
    G[:d, :d] += ridge * G.diagonal()[:d].mean().clamp(min=1e-12) * torch.eye(d, dtype=torch.float64)
    W = torch.linalg.solve(G, Xd.T @ Y.double())  # [d + 1, d_out]
    if rank is not None and rank < min(W.shape):
        fitted = Xd @ W
        _, _, Vh = torch.linalg.svd(fitted - fitted.mean(0), full_matrices=False)
        P = Vh[:rank].T @ Vh[:rank]  # [d_out, d_out] projector on the top-r output directions
        # The bias keeps the fitted mean (free at any rank): b + mean(x) W (I - P).
        b = W[d] + X.double().mean(0) @ (W[:d] - W[:d] @ P)
        W = torch.cat([W[:d] @ P, b[None]])
    return W[:d].float(), W[d].float()


def fit_layer(X, w, n_blocks: int, active: int, methods: list[str], ridge: float = RIDGE):
    """Clustering, router and every method's per-block predictors, fitted on the MLP inputs X of one
    layer. Returns (spec, permuted weights, router, {method: [per block: None or (W, b)]})."""
    import torch

    from spt_compile.fitting.router import choose_blocks, fit_router, router_scores
    from spt_compile.fitting.clustering import cluster_neurons
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, block_outputs, permute_hidden, unit_importance

    spec = MlpSpec("silu", True, w.in_w.shape[0], n_blocks)
    perm = cluster_neurons(unit_importance(X, w, spec), n_blocks, generator=torch.Generator().manual_seed(0))
    wp = permute_hidden(w, spec, perm)
    outs = block_outputs(X, wp, spec).float()  # [n, nb, d]
    router = fit_router(X, outs.norm(dim=-1))
    mask = choose_blocks(router_scores(X, router), active)
    fits = {}
    for m in methods:
        fits[m] = [None] * n_blocks
        if m == "none":
            continue
        for b in range(n_blocks):
            rows = torch.arange(X.shape[0]) if m.endswith("_all") else (~mask[:, b]).nonzero().squeeze(1)
            if rows.numel() == 0:  # the router never skips this block: nothing to stand in for
                continue
            Yb = outs[rows, b]
            if m.startswith("mean"):
                fits[m][b] = (torch.zeros(X.shape[1], Yb.shape[1]), Yb.mean(0))
            else:
                fits[m][b] = fit_linear(X[rows], Yb, None if m == "full" else int(m.split("_")[0][4:]), ridge)
    return spec, wp, router, fits


def routed_plus(x, spec, wp, router, fit, active: int):
    """Routed output (no out bias: SmolLM2 has none) plus the predictions of the skipped blocks."""
    from spt_compile.fitting.router import choose_blocks, router_scores
    from spt_compile.sparse_ops.routed_mlp import routed_mlp_forward

    mask = choose_blocks(router_scores(x, router), active)
    y = routed_mlp_forward(x, wp, spec, mask)
    for b, f in enumerate(fit):
        if f is not None:
            skip = ~mask[:, b]
            y[skip] += x[skip] @ f[0] + f[1]
    return y


def _median_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def cost(args) -> int:
    import torch

    from spt_compile.fitting.compensation import fit_compensation
    from spt_compile.fitting.router import choose_blocks
    from spt_compile.sites.mlp import ROUTER_BUFFER
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights, block_outputs, compensation, routed_mlp

    gen = torch.Generator().manual_seed(0)
    d, F, T = 576, 1536, args.tokens  # SmolLM2-135M
    w = MlpWeights(in_w=torch.randn(F, d, generator=gen) / d**0.5, gate_w=torch.randn(F, d, generator=gen) / d**0.5,
                   out_w=torch.randn(d, F, generator=gen) / F**0.5)
    x = torch.randn(T, d, generator=gen) + 0.3
    dy = torch.randn(T, d, generator=gen)
    rows = []
    for n_blocks, active in [tuple(int(v) for v in s.split("/")) for s in args.settings]:
        spec = MlpSpec("silu", True, F, n_blocks)
        mask = choose_blocks(torch.randn(T, n_blocks, generator=gen), active)

        def step(U=None, V=None, M=None):
            xi = x.clone().requires_grad_()
            y = routed_mlp(xi, w, spec, mask)
            if U is not None:
                y = y + compensation(xi, ~mask, U, V, M)
            y.backward(dy)

        bx = x[:ROUTER_BUFFER]
        for rank in args.ranks:
            U = torch.randn(d, n_blocks * rank, generator=gen) / d**0.5
            V = torch.randn(n_blocks * rank, d, generator=gen) / rank**0.5
            M = torch.zeros(n_blocks, d)
            # interleaved rounds: on a shared machine the load changes between two separate series
            rounds = [(_median_ms(step, 1, 0), _median_ms(lambda: step(U, V, M), 1, 0)) for _ in range(6)][1:]
            base = sorted(b for b, _ in rounds)[len(rounds) // 2]
            with_comp = sorted(c for _, c in rounds)[len(rounds) // 2]
            ratio = sorted(c / b for b, c in rounds)[len(rounds) // 2]  # per round: robust to load changes
            with torch.no_grad():
                fit = _median_ms(lambda: fit_compensation(bx, block_outputs(bx, w, spec).float(),
                                                          ~mask[: bx.shape[0]], rank), repeats=3)
            row = {"n_blocks": n_blocks, "active": active, "rank": rank, "tokens": T, "routed_ms": base,
                   "routed_plus_compensation_ms": with_comp, "ratio": ratio, "fit_ms": fit}
            rows.append(row)
            print(f"{n_blocks:2d}/{active} rank {rank:3d}: routed fwd+bwd {base:7.1f} ms, with compensation "
                  f"{with_comp:7.1f} ms (median ratio per round {ratio:.2f}x); one fit {fit:7.1f} ms", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $SPT_DATA_DIR)")
    p.add_argument("--problems", type=int, default=40, help="GSM8K train problems (question + answer)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--methods", nargs="+", default=None, help="default: none, mean(_all), rank<r>(_all), full")
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="blocks/active, e.g. 4/2 16/8")
    p.add_argument("--loss", action="store_true", help="held-out loss with every MLP compensated (all layers)")
    p.add_argument("--examples", type=int, default=8, help="--loss: held-out GSM8K test problems")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fit-tokens", type=int, default=None,
                   help="fit on only the first N tokens of the fitting half (the site's buffer holds 2048)")
    p.add_argument("--ridge", type=float, default=RIDGE, help="ridge strength of the predictors (relative)")
    p.add_argument("--cost", action="store_true", help="time the compensation term and its fit instead")
    p.add_argument("--tokens", type=int, default=2048, help="--cost: tokens per call")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cost:
        return cost(args)

    import torch

    from spt_compile.recipes.data import collate, encode, find_gsm8k
    from spt_compile.recipes.evaluate import answer_loss
    from spt_compile.recipes.models import load_model
    from spt_compile.sparse_ops.routed_mlp import MlpWeights

    methods = args.methods or (["none", "mean", "mean_all"] + [f"rank{r}" for r in args.ranks]
                               + [f"rank{r}_all" for r in args.ranks] + ["full"])
    settings = [tuple(int(v) for v in s.split("/")) for s in args.settings]
    splits, source = find_gsm8k(args.data)
    print(source, file=sys.stderr)
    model, tokenizer = load_model(seq_len=args.seq_len)
    model.eval()
    layers = list(model.model.layers)
    which = range(len(layers)) if args.loss else LAYERS
    inputs: dict[int, list] = {}
    hooks = [layers[i].mlp.register_forward_pre_hook(
        lambda mod, a, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i in which]
    with torch.no_grad():
        for row in splits["train"][: args.problems]:
            model(**tokenizer(row["question"] + "\n" + row["answer"], return_tensors="pt"))
    for h in hooks:
        h.remove()
    inputs = {i: torch.cat(v) for i, v in inputs.items()}

    def weights(i):
        mlp = layers[i].mlp
        return MlpWeights(in_w=mlp.up_proj.weight, gate_w=mlp.gate_proj.weight, out_w=mlp.down_proj.weight)

    results = []
    t0 = time.time()
    if args.loss:
        held = [e for e in (encode(tokenizer, r, args.seq_len) for r in splits["test"][: args.examples]) if e]
        batches = [collate(held[i : i + 4], args.seq_len, tokenizer.pad_token_id) for i in range(0, len(held), 4)]
        with torch.no_grad():
            dense = answer_loss(model, batches)
        results.append({"config": "dense", "loss": dense})
        print(f"dense loss {dense:.4f}", flush=True)
        for n_blocks, active in settings:
            with torch.no_grad():
                fitted = [fit_layer(inputs[i][: args.fit_tokens], weights(i), n_blocks, active, methods, args.ridge)
                          for i in which]
            print(f"  fitted {n_blocks}/{active}  [{time.time() - t0:.0f} s]", flush=True)
            for m in methods:
                hooks = [layers[i].mlp.register_forward_hook(
                    lambda mod, a, out, f=fitted[i], m=m: routed_plus(
                        a[0].reshape(-1, a[0].shape[-1]), f[0], f[1], f[2], f[3][m], active).view(out.shape))
                    for i in which]
                try:
                    with torch.no_grad():
                        loss = answer_loss(model, batches)
                finally:
                    for h in hooks:
                        h.remove()
                results.append({"n_blocks": n_blocks, "active": active, "method": m, "loss": loss})
                print(f"{n_blocks:2d} blocks, {active} active, {m:10}: loss {loss:.4f}  [{time.time() - t0:.0f} s]",
                      flush=True)
    else:
        for n_blocks, active in settings:
            errs: dict[str, list] = {m: [] for m in methods}
            for i in LAYERS:
                X = inputs[i]
                n = X.shape[0]
                train, test = X[: n // 2][: args.fit_tokens], X[n // 2 :]
                with torch.no_grad():
                    spec, wp, router, fits = fit_layer(train, weights(i), n_blocks, active, methods, args.ridge)
                    from spt_compile.sparse_ops.routed_mlp import block_outputs

                    dense = block_outputs(test, wp, spec).float().sum(1)
                    for m in methods:
                        y = routed_plus(test, spec, wp, router, fits[m], active)
                        errs[m].append(((y - dense).norm() / dense.norm()).item())
                print(f"  layer {i:2d} {n_blocks}/{active}: " + " ".join(f"{m} {errs[m][-1]:.3f}" for m in methods)
                      + f"  [{time.time() - t0:.0f} s]", flush=True)
            row = {"n_blocks": n_blocks, "active": active, **{m: sum(v) / len(v) for m, v in errs.items()},
                   "per_layer": errs}
            results.append(row)
            print(f"{n_blocks:2d} blocks, {active} active: " + ", ".join(f"{m} {row[m]:.3f}" for m in methods),
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"layers": list(which), "problems": args.problems, "loss": args.loss,
                                         "examples": args.examples if args.loss else None,
                                         "fit_tokens": args.fit_tokens, "ridge": args.ridge,
                                         "tokens_per_layer": inputs[which[0]].shape[0], "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
