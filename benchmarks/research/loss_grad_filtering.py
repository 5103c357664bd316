#!/usr/bin/env python
"""Would skipping the small entries of d(logits) in the LM head's backward (the gradient filtering
of Cut Cross-Entropy, arXiv:2411.09009) pay in `spt::linear_cross_entropy`? The d(h) GEMM,
d(h) = (softmax - onehot) W, is half the head's matmuls: 9% of a SmolLM2 LoRA step at 512 x 8 by
`spt_compile/recipes/flops.py`. A batched kernel can only skip a (token chunk, vocab block) tile
whose every probability is below eps, so what decides it is the share of tiles that stay active.

Untuned SmolLM2, float32, tokens from WikiText-2 (test) and GSM8K (training problems). The vocabulary
is sorted by mean probability on the first tokens (CCE sorts it likewise so that the tail forms
whole blocks); the rest are measured. Per (eps, vocab block, token chunk): the share of active
tiles (the d(h) GEMM FLOPs a tiled kernel keeps) and the mean relative error of each token's
d(h). Per eps also the element-wise filter (what a per-entry sparse product would keep).

    python benchmarks/research/loss_grad_filtering.py --json benchmarks/research/results/loss_grad_filtering.json
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


def token_ids(source: str, tokenizer, root: Path) -> list[int]:
    if source == "wikitext2":
        return tokenizer((root / "wikitext2" / "test.txt").read_text()[:400_000])["input_ids"]
    rows = [json.loads(line) for line in (root / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]]
    return tokenizer("\n\n".join(r["question"] + "\n" + r["answer"] for r in rows))["input_ids"]


def probabilities(model, ids, rows: int, seq: int):
    """softmax of the logits [rows * seq, V] (fp32) and the next-token labels [rows * seq]."""
    import torch

    x = torch.tensor(ids[: rows * seq + 1])
    inputs, labels = x[:-1].view(rows, seq), x[1:]
    with torch.no_grad():
        h = model.model(input_ids=inputs).last_hidden_state.reshape(rows * seq, -1)  # [T, d]
        return torch.softmax(h @ model.lm_head.weight.T, dim=-1), labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", default=["wikitext2", "gsm8k"], choices=["wikitext2", "gsm8k"])
    p.add_argument("--eps", type=float, nargs="+", default=[2.0 ** -12, 2.0 ** -16, 2.0 ** -20])
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 512], help="vocab entries per tile")
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 512], help="tokens per tile")
    p.add_argument("--rows", type=int, default=8, help="measured rows of 512 tokens (default 8: 4096 tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $SPT_DATA_DIR)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from provenance import source_commit
    from spt_compile.recipes.models import load_model

    torch.set_num_threads(args.threads)
    root = q.data_root(args.data)
    model, tokenizer = load_model()
    model.eval()
    W = model.lm_head.weight.detach()  # [V, d]
    record = {"commit": source_commit(), "torch": torch.__version__, "threads": args.threads,
              "what": __doc__.split("\n\n")[0], "command": "python benchmarks/research/loss_grad_filtering.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "sources": {}}
    for source in args.sources:
        t0 = time.perf_counter()
        ids = token_ids(source, tokenizer, root)
        seq = 512
        if len(ids) < (args.rows + 4) * seq + 1:
            raise SystemExit(f"{source}: {len(ids)} tokens, fewer than {(args.rows + 4) * seq + 1}")
        fit, _ = probabilities(model, ids, 4, seq)
        order = fit.mean(0).argsort(descending=True)  # vocab by mean probability
        del fit
        prob, labels = probabilities(model, ids[4 * seq:], args.rows, seq)  # [T, V], [T]
        T, V = prob.shape
        grad = prob.clone()
        grad[torch.arange(T), labels] -= 1  # d(logits) of the summed loss
        dh = grad @ W  # [T, d]
        dh_norm = dh.norm(dim=1)
        prob, grad, Ws = prob[:, order], grad[:, order], W[order]
        label_cols = order.argsort()[labels]  # [T]: each label's column in the sorted vocabulary
        rows = []
        for eps in args.eps:
            for blk in args.blocks:
                nb = -(-V // blk)
                padded = F.pad(prob, (0, nb * blk - V))  # [T, nb * blk]
                for chunk in args.chunks:
                    active = padded.view(T // chunk, chunk, nb, blk).amax(dim=(1, 3)) > eps  # [T/chunk, nb]
                    keep = active.repeat_interleave(chunk, 0).repeat_interleave(blk, 1)[:, :V]
                    # the label's entry (softmax - 1) is always kept: a kernel adds -W[label] apart
                    keep[torch.arange(T), label_cols] = True
                    err = (((grad * keep) @ Ws - dh).norm(dim=1) / dh_norm).mean()
                    rows.append({"eps": eps, "vocab_block": blk, "token_chunk": chunk,
                                 "active_tiles": float(active.float().mean()), "dh_rel_error": float(err)})
                    print(f"{source} eps 2^{-torch.tensor(eps).log2().item():.0f} block {blk} chunk {chunk}: "
                          f"active {rows[-1]['active_tiles']:.3f}, d(h) error {float(err):.2e}", flush=True)
            keep = prob > eps
            keep[torch.arange(T), label_cols] = True
            err = (((grad * keep) @ Ws - dh).norm(dim=1) / dh_norm).mean()
            rows.append({"eps": eps, "vocab_block": 1, "token_chunk": 1,
                         "active_tiles": float(keep.float().mean()), "dh_rel_error": float(err)})
            print(f"{source} eps 2^{-torch.tensor(eps).log2().item():.0f} element-wise: "
                  f"kept {rows[-1]['active_tiles']:.4f}, d(h) error {float(err):.2e}", flush=True)
        record["sources"][source] = {"tokens": T, "rows": rows, "seconds": time.perf_counter() - t0}
        if args.json:
            q.write_json(args.json, record)  # atomic, machine paths scrubbed
    return 0


if __name__ == "__main__":
    sys.exit(main())
