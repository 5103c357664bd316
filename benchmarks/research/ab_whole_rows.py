#!/usr/bin/env python
"""A/B of three torch paths for an MLP call whose backward keeps every row whole (LM tuning: every
row carries a loss; evaluation; dense calls), in ONE process, alternating call by call:

  block    exact_mlp_forward + routed_mlp_backward_saved(whole=True) in the clustered block order: the
           weights gathered into block order with each LoRA factor beside its weight
           (_BlockOrderWeights), in forward and again in backward (the site's path before this probe);
  natural  the same in the units' own order: the build only puts each LoRA factor beside its weight,
           no permutation (the site's path for such calls since);
  whole    the copy-free variant below (not kept): each projection one GEMM on its base weight, its
           LoRA delta a rank-r GEMM added into the output.

SwiGLU with LoRA r=16 on gate/up/down, frozen base weights (d(x) and the LoRA gradients wanted, as in
PEFT fine-tuning), 4 blocks in a random clustered order, fp32. Prints and saves the median forward,
backward and total per path, and checks that the paths agree (without LoRA dropout, whose
draws follow each path's unit order).

    python benchmarks/research/ab_whole_rows.py --json benchmarks/research/results/ab_whole_rows_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "ops"), str(REPO / "tests"), str(REPO / "benchmarks")]

SHAPES = {"smollm2": (576, 1536), "llama7b": (4096, 11008)}

# --- the copy-free variant (measured here, not kept) ------------------------------------------------
# The dense passes on the weights where they are: each projection one GEMM on its base weight, its
# LoRA delta a rank-r GEMM added into the same output (addmm); the out projection's LoRA dropout drawn
# per block of the natural order. It matched plain autograd in float64 (outputs and every gradient, both
# layouts, gated and plain, LoRA dropout, a subset of rows) in a test dropped with it; main() checks it
# against the block path at each case.

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from typing import Optional  # noqa: E402

from spt_compile.sparse_ops.routed_mlp.backward import _Grads, _input_lora_backward  # noqa: E402
from spt_compile.sparse_ops.routed_mlp.blocks import (  # noqa: E402
    _activation_vjp, _input_projections, _lora_columns, _lora_inputs, _LoraColumns, _project,
)
from spt_compile.sparse_ops.routed_mlp.dropout import lora_input_scales, out_keep_layer  # noqa: E402
from spt_compile.sparse_ops.routed_mlp.spec import ACTIVATIONS, MlpSpec, MlpWeights  # noqa: E402


def _unit_major(W: Tensor, layout: str) -> Tensor:
    """An input projection's weight as [F, d_in] (a view for the "io" layout)."""
    return W if layout == "oi" else W.t()


def _out_unit_minor(W: Tensor, layout: str) -> Tensor:
    """The out projection's weight as [d_out, F] (a view for the "io" layout)."""
    return W if layout == "oi" else W.t()


def _pre_activation(x: Tensor, t: Optional[Tensor], w: MlpWeights, spec: MlpSpec, cols: _LoraColumns, proj: str,
                    out: Optional[Tensor]) -> Tensor:
    """One input projection over the whole hidden layer, [T, F] (written into `out` if given):
    x W^T + b + s t_proj B^T, the LoRA part added by the GEMM that computes it."""
    W = _unit_major(getattr(w, f"{proj}_w"), getattr(spec, f"{proj}_layout"))  # [F, d_in]
    bias = getattr(w, f"{proj}_b")
    if bias is None:
        z = x @ W.t() if out is None else torch.mm(x, W.t(), out=out)
    else:
        z = torch.addmm(bias, x, W.t()) if out is None else torch.addmm(bias, x, W.t(), out=out)
    if cols.of(proj) is not None:  # [T, r] @ [r, F]
        z.addmm_(t[:, cols.in_t(proj)], getattr(w, f"{proj}_bb").to(z.dtype).t(), alpha=getattr(spec, f"{proj}_scale"))
    return z


@torch.no_grad()
def whole_rows_forward(
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    seed: int = 0,
    saved: Optional[list] = None,
    rows: Optional[Tensor] = None,
    n_rows: Optional[int] = None,
) -> Tensor:
    """y [T, d_out], the exact MLP (LoRA and its dropout included) for every row. `saved` receives what
    whole_rows_backward_saved needs for the rows in `rows` ([T] bool; None: every row), of which there
    are n_rows (the caller's count: no sync)."""
    T, d_in = x.shape
    n = T if rows is None else n_rows
    projections = _input_projections(spec)
    cols = _lora_columns(d_in, w, spec)
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    t = _lora_inputs(x, w, spec, cols, *lora_input_scales(x, spec, seed))  # [T, K - d_in] or None
    F_ = spec.hidden
    n_pre, n_t = len(projections) * n * F_, T * (cols.K - d_in)
    flat = None if saved is None else x.new_empty(n_pre + n_t + T * r_out)
    every = n == T
    # every row kept: the GEMMs write straight into what backward reads
    pre = [_pre_activation(x, t, w, spec, cols, proj,
                           flat[i * T * F_ : (i + 1) * T * F_].view(T, F_) if (flat is not None and every) else None)
           for i, proj in enumerate(projections)]  # each [T, F]
    act = ACTIVATIONS[spec.activation](pre[0])
    h = act * pre[1] if spec.gated else act  # [T, F]
    y = _project(h, w.out_w, spec.out_layout)  # [T, d_out]
    t_out = None
    if r_out:
        keep = out_keep_layer(T, spec, seed, x)
        t_out = F.linear(h if keep is None else h * keep, w.out_a)  # [T, r]
        y.addmm_(t_out, w.out_bb.to(y.dtype).t(), alpha=spec.out_scale)
    if w.out_b is not None:
        y += w.out_b
    if flat is not None:
        if not every:  # the kept rows only
            tok = torch.nonzero_static(rows, size=n).squeeze(1)
            for i, p in enumerate(pre):
                torch.index_select(p, 0, tok, out=flat[i * n * F_ : (i + 1) * n * F_].view(n, F_))
        if t is not None:
            flat[n_pre : n_pre + n_t] = t.reshape(-1)
        if r_out:
            flat[n_pre + n_t :] = t_out.reshape(-1)
        saved.append(flat)
    return y


def _mm_into(dst: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """dst (=, or += with accumulate) a @ b, dst possibly wider than a and b's dtype (fp32 sums of
    half-precision products)."""
    if dst.dtype == a.dtype:
        dst.addmm_(a, b) if accumulate else torch.mm(a, b, out=dst) if dst.is_contiguous() else dst.copy_(a @ b)
    else:
        dst.add_(a @ b) if accumulate else dst.copy_(a @ b)


@torch.no_grad()
def whole_rows_backward_saved(
    dy: Tensor,
    x: Tensor,
    w: MlpWeights,
    spec: MlpSpec,
    block_mask: Tensor,
    seed: int,
    needs_x: bool,
    needs: MlpWeights,
    saved: Tensor,
    n_rows: int,
) -> tuple[Optional[Tensor], MlpWeights]:
    """Gradients of whole_rows_forward from what it saved: the dense MLP's backward on the rows whose
    block_mask row is set (n_rows of them, each with every block; the others get no gradient: the
    backward's choice, as in routed_mlp_backward_saved). (dx, grads per slot), as
    routed_mlp_backward_saved returns them."""
    out = _Grads(x, w, spec, needs_x, needs, zero_dx=False)
    wanted = {s for s, g in out.grads.items() if g is not None}
    T, d_in = x.shape
    n, F_ = n_rows, spec.hidden
    every = n == T
    tok = None if every else torch.nonzero_static(block_mask[:, 0], size=n).squeeze(1)

    def kept(v: Optional[Tensor]) -> Optional[Tensor]:
        return v if (v is None or every) else v.index_select(0, tok)

    projections = _input_projections(spec)
    cols = _lora_columns(d_in, w, spec)
    n_pre, n_t = len(projections) * n * F_, T * (cols.K - d_in)
    pre = [saved[i * n * F_ : (i + 1) * n * F_].view(n, F_) for i in range(len(projections))]  # [n, F] each
    t = saved[n_pre : n_pre + n_t].view(T, cols.K - d_in) if cols.K > d_in else None  # [T, K - d_in]
    r_out = 0 if w.out_a is None else w.out_a.shape[0]
    t_out = saved[n_pre + n_t :].view(T, r_out) if r_out else None  # [T, r]
    dyk = kept(dy)  # [n, d_out]
    grads: dict[str, Tensor] = {}
    # hidden -> output
    a, act_vjp = _activation_vjp(spec.activation, pre[0])
    h = a * pre[1] if spec.gated else a  # [n, F]
    W_out = _out_unit_minor(w.out_w, spec.out_layout)  # [d_out, F]
    dh = dyk @ W_out  # [n, F]
    if "out_w" in wanted:
        grads["out_w"] = dyk.t() @ h if spec.out_layout == "oi" else h.t() @ dyk
    if r_out:
        keep = kept(out_keep_layer(T, spec, seed, x))  # [n, F] or None
        dt_out = (dyk @ w.out_bb.to(dyk.dtype)) * spec.out_scale  # [n, r]: d(t_out)
        A_out = w.out_a.to(dh.dtype)  # [r, F]
        if keep is None:
            dh.addmm_(dt_out, A_out)
        else:
            dh += (dt_out @ A_out) * keep
        if "out_a" in wanted:
            grads["out_a"] = dt_out.t() @ (h if keep is None else h * keep)  # [r, F]
    # through the activation to the input projections
    if spec.gated and dh.dtype == h.dtype:  # into the buffers of h and a, which nothing reads after
        dz = {"gate": act_vjp(torch.mul(dh, pre[1], out=h))}
        dz["in"] = a.mul_(dh)  # after the gate's: act_vjp may read a (relu)
    else:
        dz = {"gate": act_vjp(dh * pre[1]), "in": dh * a} if spec.gated else {"in": act_vjp(dh)}
    wants_dX = needs_x or bool({"in_a", "gate_a"} & wanted)
    dXk = torch.empty(n, cols.K, dtype=out.acc, device=x.device) if wants_dX else None  # d(X) of the kept rows
    tk = kept(t)  # [n, K - d_in]
    xk = kept(x) if {"in_w", "gate_w"} & wanted else None
    for i, proj in enumerate(projections):
        g = dz[proj]  # [n, F]
        if dXk is not None:
            _mm_into(dXk[:, cols.x_cols], g, _unit_major(getattr(w, f"{proj}_w"), getattr(spec, f"{proj}_layout")),
                     accumulate=i > 0)
            if cols.of(proj) is not None:  # d(t_proj) = s g B  [n, r]
                dXk[:, cols.of(proj)] = (g @ getattr(w, f"{proj}_bb").to(g.dtype)) * getattr(spec, f"{proj}_scale")
        if f"{proj}_w" in wanted:
            grads[f"{proj}_w"] = g.t() @ xk if getattr(spec, f"{proj}_layout") == "oi" else xk.t() @ g
        if f"{proj}_b" in wanted:
            grads[f"{proj}_b"] = g.sum(0)
        if f"{proj}_bb" in wanted:
            grads[f"{proj}_bb"] = (g.t() @ tk[:, cols.in_t(proj)]) * getattr(spec, f"{proj}_scale")
    out.add_block(None, tok, True, grads, 0, F_)
    if dXk is not None:
        dX = dXk if every else dXk.new_zeros(T, cols.K).index_copy_(0, tok, dXk)  # [T, K]
        _input_lora_backward(dX, x, w, spec, cols, *lora_input_scales(x, spec, seed), out, wanted)
    if "out_bb" in wanted:
        out.add("out_bb", (dy.to(out.acc).t() @ t_out.to(out.acc)) * spec.out_scale)
    return out.finish(dy)



def case_arguments(p: argparse.ArgumentParser, cases: list[str]) -> None:
    """The probes' shared options (this one's and ab_one_pass.py's)."""
    p.add_argument("--cases", nargs="+", default=cases, help="shape:tokens, shape one of " + ", ".join(SHAPES))
    p.add_argument("--rounds", type=int, default=10, help="ABBA rounds (each path runs 2 calls a round)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="on every projection's LoRA input")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)


def lora_swiglu_case(case: str, lora_dropout: float, gen: torch.Generator, device="cpu", dtype=torch.float32):
    """A 'shape:tokens' case: (weights, spec, x, dy, needs) of a SwiGLU in 4 blocks with LoRA r=16 on
    gate/up/down, frozen base weights (needs: d(x)'s inputs, the LoRA gradients)."""
    from spt_compile.sparse_ops.routed_mlp import MlpWeights
    from test_routed_mlp_op import make_weights, spec_for

    shape, tokens = case.split(":")
    d, hidden = SHAPES[shape]
    w = make_weights(d, hidden, d, gated=True, bias=False, lora=("in", "gate", "out"), r=16, gen=gen)
    w = MlpWeights(*[None if t is None else t.detach().to(device, dtype) for t in w])
    q = lora_dropout
    spec = spec_for(w, "silu", True, 4, **(dict(in_dropout=q, gate_dropout=q, out_dropout=q) if q else {}))
    x, dy = (torch.randn(int(tokens), d, generator=gen).to(device, dtype) for _ in range(2))
    needs = MlpWeights(**{n: t is not None and n.endswith(("_a", "_bb")) for n, t in w._asdict().items()})
    return w, spec, x, dy, needs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    case_arguments(p, ["smollm2:2048", "smollm2:4096", "llama7b:512", "llama7b:2048"])
    args = p.parse_args(argv)

    from provenance import cpu_model, source_commit
    from spt_compile.sparse_ops.routed_mlp import exact_mlp_forward, routed_mlp_backward_saved

    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        gen = torch.Generator().manual_seed(0)
        w, spec, x, dy, needs = lora_swiglu_case(case, args.lora_dropout, gen)
        shape, (T, nb), hidden = case.split(":")[0], (x.shape[0], spec.n_blocks), spec.hidden
        shuffled = torch.randperm(hidden, generator=gen)
        Fb = hidden // nb
        perm = torch.cat([shuffled[i * Fb:(i + 1) * Fb].sort().values for i in range(nb)])  # ascending in a block
        every = torch.ones(T, nb, dtype=torch.bool)

        def block_path(order):  # order: the clustering's permutation (block), or None (natural)
            def run():
                saved = []
                t0 = time.perf_counter()
                y, mask, _, whole, counts = exact_mlp_forward(x, w, spec, lambda s: every, 1, saved, order, None)
                t1 = time.perf_counter()
                g = routed_mlp_backward_saved(dy, x, w, spec, mask, 1, True, needs, saved[0], perm=order,
                                              exact_forward=True, whole=whole, counts=counts)
                return y, g, t1 - t0, time.perf_counter() - t1
            return run

        def whole():
            saved = []
            t0 = time.perf_counter()
            y = whole_rows_forward(x, w, spec, 1, saved)
            t1 = time.perf_counter()
            g = whole_rows_backward_saved(dy, x, w, spec, every, 1, True, needs, saved[0], T)
            return y, g, t1 - t0, time.perf_counter() - t1

        paths = {"block": block_path(perm), "natural": block_path(None), "whole": whole}
        results = {name: f() for name, f in paths.items()}  # warm-up, and the agreement check
        yb, (dxb, gb), *_ = results["block"]
        yw, (dxw, gw), *_ = results["whole"]
        err = {"y": ((yw - yb).norm() / yb.norm()).item(), "dx": ((dxw - dxb).norm() / dxb.norm()).item()}
        for name, a in gb._asdict().items():
            if a is not None:
                err[name] = ((getattr(gw, name) - a).norm() / a.norm()).item()
        # only the dropout draws of the out projection's LoRA differ (per block of each path's order)
        if not args.lora_dropout:
            assert max(err.values()) < 1e-4, err
        times = {name: {"forward": [], "backward": []} for name in paths}
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            for name in order + order[::-1]:
                _, _, f, b = paths[name]()
                times[name]["forward"].append(f)
                times[name]["backward"].append(b)
        row = {"shape": shape, "tokens": T, "relative_difference": err}
        for name in paths:
            fw, bw = (statistics.median(times[name][k]) * 1e3 for k in ("forward", "backward"))
            total = statistics.median([a + b for a, b in zip(times[name]["forward"], times[name]["backward"])]) * 1e3
            row[name] = {"forward_ms": round(fw, 2), "backward_ms": round(bw, 2), "total_ms": round(total, 2)}
        for name in ("natural", "whole"):
            row[f"{name}_over_block"] = {k: round(row[name][f"{k}_ms"] / row["block"][f"{k}_ms"], 3)
                                         for k in ("forward", "backward", "total")}
        rows.append(row)
        print(f"{shape:8s} T={T:5d}  block {row['block']['total_ms']:9.1f} ms ({row['block']['forward_ms']:.1f} + "
              f"{row['block']['backward_ms']:.1f})  whole {row['whole']['total_ms']:9.1f} ms "
              f"({row['whole']['forward_ms']:.1f} + {row['whole']['backward_ms']:.1f})  "
              f"natural/block {row['natural_over_block']['total']}  whole/block {row['whole_over_block']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "argv": sys.argv, "commit": source_commit(), "cpu": cpu_model(), "torch": torch.__version__,
            "threads": args.threads, "rounds": args.rounds, "lora_dropout": args.lora_dropout, "rows": rows},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
