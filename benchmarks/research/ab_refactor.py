#!/usr/bin/env python
"""A/B of the redesign (issue 17): this tree against an older revision, in alternating fresh processes.

Each process imports spt_compile from one tree (PYTHONPATH), compiles two modules with
backend="spt" at options both revisions have, and prints the median forward + backward time of each:
  * mlp:       a SwiGLU MLP with LoRA r=16 (SmolLM2's 576 -> 1536), 2048 tokens, 2 of 4 blocks, the
               routed forward (exact_forward=False where the option exists: the older revision has
               only that path);
  * attention: causal SDPA at SmolLM2's heads (9 query, 3 kv heads of 64), 2048 tokens, density 1/8
               (block selection, the block-sparse kernels' torch path; the sparse forward too).
Options not named here take each revision's defaults, so against a revision whose defaults differ
(579457e predates issue 16's ffn_compensate, clustering and loss-row changes) the MLP ratio mixes
the redesign with those; against the revision before the redesign it isolates it.
Rounds alternate A, B, A, B, ...; the ratio B / A of the medians over rounds decides.

    git worktree add ../spt-579457e 579457e
    python benchmarks/research/ab_refactor.py ../spt-579457e . --rounds 5 --json benchmarks/research/results/ab_refactor_cpu.json
    python benchmarks/research/ab_refactor.py ../spt-579457e . --step --rounds 5 --json ...   # whole steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import statistics, time, torch, torch.nn as nn, torch.nn.functional as F
import spt_compile
from spt_compile.options import Options
torch.manual_seed(0)
torch.set_num_threads(THREADS)
has_exact = "exact_forward" in Options.__dataclass_fields__

class Lora(nn.Module):
    def __init__(s, i, o):
        super().__init__(); s.base = nn.Linear(i, o, bias=False); s.base.weight.requires_grad_(False)
        s.a = nn.Linear(i, 16, bias=False); s.b = nn.Linear(16, o, bias=False)
    def forward(s, x): return s.base(x) + s.b(s.a(x)) * 2.0

class Mlp(nn.Module):
    def __init__(s):
        super().__init__(); s.gate, s.up, s.down = Lora(576, 1536), Lora(576, 1536), Lora(1536, 576)
    def forward(s, x): return s.down(F.silu(s.gate(x)) * s.up(x))

class Att(nn.Module):
    def forward(s, q, k, v): return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

def timed(fn, make, n=12, warm=4):
    out = []
    for i in range(warm + n):
        args = make()
        t0 = time.perf_counter(); fn(*args).float().pow(2).mean().backward(); dt = time.perf_counter() - t0
        if i >= warm: out.append(dt)
    return statistics.median(out)

mlp_opts = {"ffn_blocks": 4, "ffn_active": 2, "calibration_steps": 2, "compiler": "aot_eager"}
if has_exact: mlp_opts["exact_forward"] = False
mlp = torch.compile(Mlp(), backend="spt", options=mlp_opts)
x = torch.randn(2048, 576)
mlp_s = timed(mlp, lambda: (x.clone().requires_grad_(),))
att_opts = {"density": 0.125, "attention_dense_below": 0, "calibration_steps": 2, "compiler": "aot_eager"}
if has_exact: att_opts["exact_forward"] = False
att = torch.compile(Att(), backend="spt", options=att_opts)
q, k, v = torch.randn(1, 9, 2048, 64), torch.randn(1, 3, 2048, 64), torch.randn(1, 3, 2048, 64)
att_s = timed(att, lambda: tuple(t.clone().requires_grad_() for t in (q, k, v)))
print("RESULT", mlp_s, att_s, has_exact)
'''


STEP = r'''
import statistics, time, torch
import spt_compile
from spt_compile.options import Options
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
torch.set_num_threads(THREADS)
has_exact = "exact_forward" in Options.__dataclass_fields__
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
opts = {"ffn_active": 2, "attention_dense_below": 0}
if has_exact: opts.update(exact_forward=False, ffn_loss_rows="off")  # the older revision's only path
compiled = torch.compile(model, backend="spt", options=opts)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (1, 2048), generator=torch.Generator().manual_seed(1))
times = []
for i in range(4 + 4):  # 4 calibration steps, then 4 timed sparse steps
    t0 = time.perf_counter()
    compiled(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    if i >= 4: times.append(time.perf_counter() - t0)
print("RESULT", statistics.median(times), 0.0, has_exact)
'''


def run(tree: Path, threads: int, child: str = CHILD) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    out = subprocess.run([sys.executable, "-c", child.replace("THREADS", str(threads))], capture_output=True,
                         text=True, env=env, cwd=str(tree), timeout=900)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    if not line:
        raise SystemExit(f"{tree}: no result\n{out.stderr[-3000:]}")
    _, first, second, _ = line[0].split()
    return float(first), float(second)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="tree A (the older revision)")
    p.add_argument("b", type=Path, help="tree B (this one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step", action="store_true",
                   help="instead: whole LoRA steps of a random SmolLM2-shaped model (4 layers, 2048 tokens, "
                        "2 of 4 blocks, sparse forward, chunked loss, AdamW)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = {"a": [], "b": []}
    names = ("step",) if args.step else ("mlp", "attention")
    for r in range(args.rounds):
        for side, tree in (("a", args.a), ("b", args.b)):
            rows[side].append(run(tree, args.threads, STEP if args.step else CHILD))
            print(f"round {r + 1} {side}: " + ", ".join(f"{n} {rows[side][-1][i] * 1e3:.1f} ms" for i, n in enumerate(names)),
                  flush=True)
    result = {}
    for i, name in enumerate(names):
        a = statistics.median(x[i] for x in rows["a"])
        b = statistics.median(x[i] for x in rows["b"])
        result[name] = {"a_ms": a * 1e3, "b_ms": b * 1e3, "b_over_a": b / a}
        print(f"{name:10} A {a * 1e3:8.1f} ms  B {b * 1e3:8.1f} ms  B/A {b / a:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rounds": rows, "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
