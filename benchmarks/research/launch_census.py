#!/usr/bin/env python
"""Launches and host-device syncs per steady-state call of each spt op (issue 19), counted on the CPU
by spt_compile.testing.Census: forward + backward of one attention site for each mask form, and of one
routed SwiGLU MLP (ffn_impl "torch" and "grouped"; a call that keeps whole rows block by block, as on the CPU, and
in one pass, as off it), at several sequence lengths. A count that grows with N, or any sync, is host
overhead a GPU pays on every call.

    python benchmarks/research/launch_census.py --json benchmarks/research/results/launch_census_cpu.json

Each case compiles a module holding just the op (torch.compile(backend="spt"), one calibration call),
runs two more calls, then counts forward and backward of a training call (the defaults: exact forward,
sparse backward) with a new mask tensor (the first layer of a step analyses it) and again with the
same mask (every later layer), and a sparse forward without gradients (sparse_inference).
Shapes: SmolLM2's attention heads (9 query, 3 key/value heads of 64) and MLP (576 -> 1536), batch 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from unittest import mock
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import spt_compile  # noqa: E402
from spt_compile.testing import Census  # noqa: E402

MASKS = ("none", "causal", "hf_causal", "padded", "packed")


class Attention(nn.Module):
    def forward(self, q, k, v, mask, is_causal: bool):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


class SwiGLU(nn.Module):
    def __init__(self, d=576, f=1536):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def attention_inputs(form: str, B: int, N: int, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 9, N, 64, generator=g).requires_grad_(requires_grad)
    k = torch.randn(B, 3, N, 64, generator=g).requires_grad_(requires_grad)
    v = torch.randn(B, 3, N, 64, generator=g).requires_grad_(requires_grad)
    tri = torch.ones(N, N, dtype=torch.bool).tril()
    if form == "none":
        return q, k, v, None, False
    if form == "causal":
        return q, k, v, None, True
    if form == "hf_causal":
        return q, k, v, tri.expand(B, 1, N, N), False
    if form == "padded":  # the last row's last quarter is padding (HF's padded causal mask)
        real = torch.ones(B, N, dtype=torch.bool)
        real[-1, 3 * N // 4:] = False
        return q, k, v, (tri & real[:, None, None, :]).expand(B, 1, N, N), False
    # packed: each row holds two sequences (block-diagonal causal mask)
    seg = (torch.arange(N) >= N // 2).long()
    same = seg[:, None] == seg[None, :]
    return q, k, v, (tri & same).expand(B, 1, N, N), False


def count(fn) -> dict:
    with Census() as c:
        fn()
    return {"launches": c.launches, "syncs": c.syncs,
            "sync_sites": [f"{n} x {what} at {where}" for (what, where), n in c.sync_sites().most_common()]}


def attention_case(form: str, N: int, B: int, impl: str = "auto") -> dict:
    torch._dynamo.reset()
    model = Attention()
    compiled = torch.compile(model, backend="spt", options={
        "calibration_steps": 1, "attention_dense_below": 0, "attention_backward_dense_below": 0,
        "attention_min_keys": 0, "attention_impl": impl})
    for _ in range(3):
        q, k, v, mask, causal = attention_inputs(form, B, N, True)
        compiled(q, k, v, mask, causal).sum().backward()
    q, k, v, mask, causal = attention_inputs(form, B, N, True)

    def train():
        out = compiled(q, k, v, mask, causal)
        out.backward(torch.ones_like(out))

    def infer():
        with torch.no_grad(), spt_compile.enable(sparse_inference=True):
            compiled(q.detach(), k.detach(), v.detach(), mask, causal)

    with torch.no_grad(), spt_compile.enable(sparse_inference=True):  # compiles the eval graph: not counted
        compiled(q.detach(), k.detach(), v.detach(), attention_inputs(form, B, N, False)[3], causal)
    # The first call with a mask analyses it (once per step: mask_memo); every later layer of the step
    # gets the same mask tensor, as the second count here does.
    first = count(train)
    return {"op": "attention", "impl": impl, "mask": form, "N": N, "B": B, "train_new_mask": first, "train": count(train),
            "sparse_inference": count(infer)}


def _frozen_swiglu(**options):
    """A SwiGLU with frozen base weights (LoRA tuning), compiled through spt from a fresh Dynamo cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SwiGLU()
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.compile(model, backend="spt", options={"calibration_steps": 1, **options})


def mlp_case(N: int, B: int, impl: str = "torch") -> dict:
    compiled = _frozen_swiglu(ffn_impl=impl, ffn_loss_rows="off")  # no loss in the graph: rank every row
    x = torch.randn(B, N, 576, requires_grad=True)
    for _ in range(3):
        compiled(x).sum().backward()
    with torch.no_grad(), spt_compile.enable(sparse_inference=True):
        compiled(x.detach())

    def train():
        compiled(x).sum().backward()

    def infer():
        with torch.no_grad(), spt_compile.enable(sparse_inference=True):
            compiled(x.detach())

    row = {"op": "routed_mlp", "impl": impl, "N": N, "B": B, "train": count(train), "sparse_inference": count(infer)}
    # the default ffn_loss_rows="dense" with no loss rows in the graph: every row keeps every block (as in
    # LM tuning, where every row carries a loss), so the call runs in the units' own order, uncounted
    whole = _frozen_swiglu(ffn_impl=impl)
    for _ in range(3):
        whole(x).sum().backward()
    row["train_whole_rows"] = count(lambda: whole(x).sum().backward())
    # the same call with its backward in one pass, as off the CPU (backward.whole_in_one_pass)
    from spt_compile.sparse_ops.routed_mlp import backward

    with mock.patch.object(backward, "whole_in_one_pass", lambda x: True):
        row["train_whole_rows_one_pass"] = count(lambda: whole(x).sum().backward())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--no-mlp", action="store_true")
    p.add_argument("--attention-impl", default="auto", choices=["auto", "torch", "triton"],
                   help="triton on a CPU needs TRITON_INTERPRET=1 (slow: use short --seq-lens)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for N in args.seq_lens:
        for form in args.masks:
            rows.append(attention_case(form, N, args.batch, args.attention_impl))
            r = rows[-1]
            print(f"attention {args.attention_impl} {form:9s} N={N:5d}: train {r['train']['launches']:4d} launches "
                  f"{r['train']['syncs']:3d} syncs (a new mask: {r['train_new_mask']['launches']} / "
                  f"{r['train_new_mask']['syncs']}); sparse inference {r['sparse_inference']['launches']:4d} / "
                  f"{r['sparse_inference']['syncs']:3d}", flush=True)
            for s in r["train"]["sync_sites"] + r["sparse_inference"]["sync_sites"]:
                print("    same mask:", s)
            for s in r["train_new_mask"]["sync_sites"]:
                print("    new mask:", s)
        for impl in [] if args.no_mlp else ["torch", "grouped"]:
            rows.append(mlp_case(N, args.batch, impl))
            r = rows[-1]
            print(f"routed MLP {impl:8s} N={N:5d}: train {r['train']['launches']:4d} launches "
                  f"{r['train']['syncs']:3d} syncs; sparse inference {r['sparse_inference']['launches']:4d} / "
                  f"{r['sparse_inference']['syncs']:3d}; whole rows {r['train_whole_rows']['launches']:4d} / "
                  f"{r['train_whole_rows']['syncs']:3d} (in one pass, off the CPU: "
                  f"{r['train_whole_rows_one_pass']['launches']} / {r['train_whole_rows_one_pass']['syncs']})", flush=True)
            for s in r["train"]["sync_sites"] + r["sparse_inference"]["sync_sites"] + r["train_whole_rows"]["sync_sites"]:
                print("    ", s)
    if args.json:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from provenance import source_commit

        args.json.write_text(json.dumps({"commit": source_commit(), "command": "python benchmarks/research/launch_census.py "
                                         + " ".join(sys.argv[1:] if argv is None else argv),
                                         "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
