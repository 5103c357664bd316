#!/usr/bin/env python
"""Two suspects for the routed FFN's quality gap, each checked untuned, right after calibration:

  padding    SmolLM2 on GSM8K (batches padded to the sequence length, about a quarter of the
             positions padding): does it matter that the MLP sites draw their router samples from
             every position, padding included? Held-out answer loss at the defaults (2 of 4 blocks),
             ffn_compensate off and at its default, with the sites' samples drawn from every
             position (as the backend did before it read the attention mask for this; here by
             switching REGISTRY.real_rows off) and from real tokens only (the backend's sampler since),
             over --seeds. (benchmarks/research/results/routing_suspects_cpu.json ran at 88823ce, before the
             backend did it, with the sampler swapped by this script instead.)
  positions  MiniLM on SST-2 (length-bucketed batches; quality.py's four calibration batches are 8 to
             32 tokens wide while dev sentences run to 64): the routed MLP's relative output error on
             dev tokens by position, calibrated on quality.py's calibration batches and on batches of
             widths 16/32/48/64.

    python benchmarks/research/routing_suspects.py --json benchmarks/research/results/routing_suspects_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

POSITION_BUCKETS = ((0, 8), (8, 16), (16, 32), (32, 64))


def padding_check(data: Path, seeds: list[int], examples: int) -> list[dict]:
    import torch

    import spt_compile
    from spt_compile.options import make_options
    from spt_compile.registry import REGISTRY, model_sites

    from spt_compile.recipes.data import collate, encode, find_gsm8k
    from spt_compile.recipes.evaluate import answer_loss
    from spt_compile.recipes.models import load_model

    model, tokenizer = load_model(seq_len=256)
    model.eval()
    pad = tokenizer.pad_token_id
    splits, _ = find_gsm8k(data)
    held = [e for e in (encode(tokenizer, r, 256) for r in splits["test"][:examples]) if e]
    train = [e for e in (encode(tokenizer, r, 256) for r in splits["train"][:64]) if e]
    held_batches = [collate(held[i : i + 4], 256, pad) for i in range(0, len(held), 4)]
    steps = make_options({}).calibration_steps
    calibration = [collate(train[i * 4 : (i + 1) * 4], 256, pad) for i in range(steps)]
    real_share = float(torch.cat([b["attention_mask"].reshape(-1) for b in calibration]).float().mean())
    with torch.no_grad():
        rows = [{"check": "padding", "config": "dense", "loss": answer_loss(model, held_batches),
                 "real_share_of_calibration_positions": real_share}]
    print(f"padding: dense {rows[0]['loss']:.4f}; real tokens {real_share:.0%} of the calibration positions", flush=True)

    real_rows = REGISTRY.real_rows  # the bound method: which rows the attention mask marks real

    try:
        for seed in seeds:
            for samples in ("every position", "real tokens only"):
                torch.manual_seed(seed)
                torch._dynamo.reset()
                REGISTRY.real_rows = (lambda lead: None) if samples == "every position" else real_rows
                # a fresh model: the sites are keyed by its weights, and calibrated ones keep their state
                model, _ = load_model(seq_len=256)
                model.eval()
                compiled = torch.compile(model, backend="spt", options={"sparse_attention": False})
                with torch.no_grad():
                    for batch in calibration:
                        compiled(**batch)
                for _, site in model_sites(model):
                    site.apply_staged()
                for rank in (0, make_options({}).ffn_compensate):
                    with spt_compile.enable(ffn_compensate=rank):
                        loss = answer_loss(compiled, held_batches)
                    rows.append({"check": "padding", "seed": seed, "samples": samples, "ffn_compensate": rank,
                                 "loss": loss})
                    print(f"padding: seed {seed} samples from {samples:16} ffn_compensate {rank:2d}: loss {loss:.4f}",
                          flush=True)
    finally:
        REGISTRY.real_rows = real_rows
    return rows


def positions_check(args) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    import quality as q
    from spt_compile.options import make_options
    from spt_compile.registry import model_sites
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights, block_outputs, compensation, permute_hidden
    from spt_compile.recipes.data import Batches
    from spt_compile.recipes.models import minilm_dir

    qargs = q.parse_args(["--tasks", "sst2", "--seed", str(args.seeds[0])] + (["--data", str(args.data)] if args.data else []))
    task = q.BUILDERS["sst2"](qargs, q.read_data("sst2", q.data_root(qargs.data)))
    draws = Batches(task.train_examples, task.draw, qargs.seed + 2)  # quality.py's calibration draws
    n_cal = make_options({}).calibration_steps
    as_quality = [task.collate(draws.next()) for _ in range(n_cal)]
    by_width = {}
    for b in task.train_examples:
        by_width.setdefault(b["attention_mask"].shape[1], b)
    every_width = [by_width[w] for w in (16, 32, 48, 64) if w in by_width]
    dev = task.held_out  # the dev batches quality.py evaluates

    def load():
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2,
                                                                  dtype=torch.float32).eval()

    # the MLP inputs of the dense model on the dev sentences, and each row's position / realness
    model = load()
    layers = list(model.bert.encoder.layer)
    inputs: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = [layer.intermediate.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].flatten(0, 1)))
             for i, layer in enumerate(layers)]
    pos, real = [], []
    with torch.no_grad():
        for batch in dev:
            model(**batch)
            B, N = batch["input_ids"].shape
            pos.append(torch.arange(N).expand(B, N).reshape(-1))
            real.append(batch["attention_mask"].reshape(-1).bool())
    for h in hooks:
        h.remove()
    pos, real = torch.cat(pos), torch.cat(real)
    X = {i: torch.cat(v) for i, v in inputs.items()}
    rows = []
    options = make_options({})
    for name, calibration in (("quality.py's calibration batches", as_quality), ("widths 16/32/48/64", every_width)):
        torch._dynamo.reset()
        model = load()  # fresh sites
        layers = list(model.bert.encoder.layer)
        compiled = torch.compile(model, backend="spt", options={"sparse_attention": False})
        with torch.no_grad():
            for batch in calibration:
                compiled(**batch)
        sites = {int(n.split("layer.")[1].split(".")[0]): s for n, s in model_sites(model) if s.kind == "mlp"}
        for s in sites.values():
            s.apply_staged()
        err2 = torch.zeros(len(POSITION_BUCKETS))
        ref2 = torch.zeros(len(POSITION_BUCKETS))
        with torch.no_grad():
            for i, layer in enumerate(layers):
                w = MlpWeights(in_w=layer.intermediate.dense.weight, in_b=layer.intermediate.dense.bias,
                               out_w=layer.output.dense.weight)
                spec = MlpSpec(activation="gelu", gated=False, hidden=w.in_w.shape[0], n_blocks=options.ffn_blocks)
                wp = permute_hidden(w, spec, sites[i].perm)
                outs = block_outputs(X[i], wp, spec).float()  # [T, nb, d]
                mask = sites[i].route(X[i], options)
                dense = outs.sum(1)
                routed = (outs * mask[:, :, None]).sum(1)
                terms = sites[i].compensation_terms(options, lambda: wp, spec)
                if terms is not None:
                    routed = routed + compensation(X[i].float(), ~mask, *terms)
                e, d = (routed - dense).pow(2).sum(-1), dense.pow(2).sum(-1)
                for k, (lo, hi) in enumerate(POSITION_BUCKETS):
                    sel = real & (pos >= lo) & (pos < hi)
                    err2[k] += e[sel].sum()
                    ref2[k] += d[sel].sum()
        widths = sorted({b["attention_mask"].shape[1] for b in calibration})
        row = {"check": "positions", "calibrated_on": name, "calibration_widths": widths,
               "rel_error_by_position": {f"{lo}-{hi - 1}": float((err2[k] / ref2[k]).sqrt())
                                         for k, (lo, hi) in enumerate(POSITION_BUCKETS)},
               "dev_tokens_by_position": {f"{lo}-{hi - 1}": int((real & (pos >= lo) & (pos < hi)).sum())
                                          for lo, hi in POSITION_BUCKETS}}
        rows.append(row)
        print(f"positions: calibrated on {name} (widths {widths}): relative error by position "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["rel_error_by_position"].items()), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", nargs="+", choices=("padding", "positions"), default=["padding", "positions"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="torch seeds of the padding check's runs")
    p.add_argument("--examples", type=int, default=16, help="held-out GSM8K problems")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $SPT_DATA_DIR)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    data = args.data or (Path(os.environ["SPT_DATA_DIR"]) if os.environ.get("SPT_DATA_DIR") else None)
    if data is None:
        raise SystemExit("pass --data or set SPT_DATA_DIR (the folder holding gsm8k/ and sst2/)")
    args.data = data
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    if "padding" in args.checks:
        rows += padding_check(data, args.seeds, args.examples)
    if "positions" in args.checks:
        rows += positions_check(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python benchmarks/research/routing_suspects.py " + " ".join(argv or sys.argv[1:]),
                                         "torch": torch.__version__, "threads": args.threads,
                                         "wall_s": time.time() - t0, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
