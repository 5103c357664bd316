"""The MLP alone: forward + backward time and bytes saved for backward, dense vs routed.

A SwiGLU MLP with LoRA (r=16) on gate/up/down and frozen base weights, as in LoRA fine-tuning. Dense
baselines: eager and `torch.compile` (Inductor). Routed: the same module compiled with
`backend="spt"` at 50% and 25% of the blocks active (the real path: pass, site op, its autograd).
Ratios are to the best dense configuration of the same shape and token count in the same run; the
configurations of one shape and token count are timed in turns (one step each per round, --repeats
rounds), so a slow spell of a shared machine hits them alike.
Saved bytes count activations only (parameters that backward holds by reference are left out).
Routed configs run the training default (exact forward, routed backward), or with -sparse-forward
the routed forward too. The implementation: `--impl` for the plain spt-* configs (default auto: the
torch path), or name it in the config (spt-50%-torch, spt-50%-grouped, spt-50%-triton-sparse-forward:
the Triton kernels serve routed calls only). spt-whole-rows is LM tuning's MLP, every row keeping
every block (the backward whole, in the units' own order). Each row records the calls per implementation that ran
(`impl_calls`), and a configuration whose implementation served no call is an error, not a row.

    python benchmarks/bench_ffn.py --json benchmarks/results/ffn_cpu.json
    python benchmarks/bench_ffn.py --device cuda --check --shapes llama7b --tokens 8192 \
        --configs dense-eager spt-50%-triton-sparse-forward spt-50%-torch-sparse-forward spt-50%-torch

--check first compares the Triton routed MLP with the per-token reference (float64) on small awkward
shapes, with the torch path at the benchmark's shape, and through torch.compile(backend="spt") with
the torch implementation: output and every gradient; it prints the max errors and the script exits
with status 1 if any is out of tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import spt_compile  # noqa: E402,F401  (registers the backend when run from source)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import SavedBytes, sync  # noqa: E402
from spt_compile.sparse_ops.routed_mlp import resolve_ffn_impl  # noqa: E402
from provenance import cpu_model, source_commit  # noqa: E402

SHAPES = {"smollm2": (576, 1536), "llama7b": (4096, 11008)}
CONFIGS = ("dense-eager", "dense-inductor", "spt-50%", "spt-25%",
           "spt-50%-torch", "spt-25%-torch", "spt-50%-grouped", "spt-25%-grouped",
           "spt-50%-sparse-forward", "spt-25%-sparse-forward",
           "spt-50%-triton-sparse-forward", "spt-25%-triton-sparse-forward",
           "spt-50%-torch-sparse-forward", "spt-25%-torch-sparse-forward",
           "spt-50%-grouped-sparse-forward", "spt-25%-grouped-sparse-forward",
           "spt-50%-triton-sparse-forward-n64", "spt-whole-rows")
# spt-* configs run the training default, the exact forward with a routed backward; *-sparse-forward run
# the routed forward too (exact_forward=False). The Triton kernels serve only routed calls, so they have
# sparse-forward configs only (an exact-forward "triton" config would time the torch path: prepare()
# checks which implementation ran). *-n64: the Triton kernels with 128 x 64 tiles
# (routed_mlp.triton.CUDA_BLOCK_N = 64), where 128 x 128 spill registers when compiled for sm_90; the
# default only if faster here. spt-whole-rows: LM tuning's MLP, every row carrying a loss and so keeping
# every block (ffn_loss_rows="dense"): the dense passes with the weights read in place (whole_rows.py).
IMPLS = ("auto", "triton", "torch", "grouped")


def spt_config(config: str) -> tuple[str, str, bool, bool]:
    """"spt-50%-triton-sparse-forward-n64" -> (share "50%", impl "triton" or "" for --impl, sparse forward,
    128 x 64 tiles)."""
    if config == "spt-whole-rows":
        return "50%", "", False, False
    rest = config.removeprefix("spt-")
    n64 = rest.endswith("-n64")
    rest = rest.removesuffix("-n64")
    sparse_forward = rest.endswith("-sparse-forward")
    share, _, impl = rest.removesuffix("-sparse-forward").partition("-")
    return share, impl, sparse_forward, n64


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable LoRA delta, written as PEFT's modules trace."""

    def __init__(self, d_in: int, d_out: int, r: int = 16, alpha: int = 32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.randn(d_out, r) * 0.01)
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = LoraLinear(d, hidden), LoraLinear(d, hidden), LoraLinear(hidden, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_fn(config: str, module: nn.Module, args):
    if config == "dense-eager":
        return module
    if config == "dense-inductor":
        return torch.compile(module, backend="inductor")
    share, impl, sparse_forward, _ = spt_config(config)
    active = {"50%": args.blocks // 2, "25%": args.blocks // 4}[share]
    return torch.compile(module, backend="spt", options=dict(
        ffn_blocks=args.blocks, ffn_active=active, calibration_steps=1, compiler="eager", sparse_attention=False,
        ffn_impl=impl or args.impl, exact_forward=not sparse_forward,
        # the loss is outside the graph: "off" ranks every row; "dense" keeps each row whole
        ffn_loss_rows="dense" if config == "spt-whole-rows" else "off"))


def triton_block_n(n: int):
    """The routed MLP's Triton kernels with n output columns per program on CUDA inside."""
    from spt_compile.sparse_ops.routed_mlp import triton as mlp_triton
    from spt_compile.testing.compile_only import module_settings

    return module_settings(mlp_triton, CUDA_BLOCK_N=n)


def prepare(config: str, shape: str, T: int, args, device, dtype) -> dict:
    """Build, compile (first call timed), warm up and measure the saved bytes of one configuration;
    returns what timed_step needs."""
    torch.manual_seed(0)
    d, hidden = SHAPES[shape]
    module = SwiGLU(d, hidden).to(device=device, dtype=dtype)
    x = torch.randn(1, T, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(1, T, d, device=device, dtype=dtype)
    fn = make_fn(config, module, args)

    def step():
        with triton_block_n(64) if config.endswith("-n64") else contextlib.nullcontext():
            fn(x).backward(dy)
        for p in [x, *module.parameters()]:
            p.grad = None

    t0 = time.perf_counter()
    step()  # compile; spt: the calibration call (dense) that fits router and clustering
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    if config.startswith("spt-"):
        import spt_compile

        sites = [site for site in spt_compile.report(module) if site["kind"] == "mlp"]
        if not sites:
            raise RuntimeError(f"{config}: no MLP site ran through spt (Dynamo fell back to eager?), so its time "
                               "would be the dense module's")
        _, impl, _, _ = spt_config(config)
        asked = resolve_ffn_impl(impl or args.impl, device)
        ran = sites[0].get("impl", {})
        if asked not in ran:  # the warm-up calls (past the calibration call) ran another implementation
            raise RuntimeError(f"{config}: ffn_impl={asked!r} served no call (ran {ran}): "
                               f"{sites[0].get('impl_why', sites[0].get('grouped_off', 'see report()'))}")
        impl_ran = dict(ran)
    else:
        impl_ran = None
    saved = SavedBytes(exclude=list(module.parameters()))  # activations only: parameters are shared
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        y = fn(x)
    y.backward(dy)
    del y
    return {"step": step, "row": {"config": config, "shape": shape, "tokens": T, "saved_bytes": saved.total,
                                  "first_call_s": first, "impl_calls": impl_ran}, "times": []}


def timed_step(state: dict, device) -> None:
    sync(device)
    t = time.perf_counter()
    state["step"]()
    sync(device)
    state["times"].append(time.perf_counter() - t)


def run_round_robin(configs: list[str], shape: str, T: int, args, device, dtype) -> list[dict]:
    """Every configuration of one shape and token count, timed in turns (one step of each per round,
    args.repeats rounds): a slow spell of a shared machine then hits every configuration alike
    instead of whichever ran during it. Median step time per configuration."""
    states, results = {}, []
    for config in configs:
        try:
            states[config] = prepare(config, shape, T, args, device, dtype)
        except Exception as e:  # keep the other configurations' numbers
            results.append({"config": config, "shape": shape, "tokens": T, "error": f"{type(e).__name__}: {e}"[:300]})
    failed = set()
    for _ in range(args.repeats):
        for config, state in states.items():
            if config in failed:
                continue
            try:
                timed_step(state, device)
            except Exception as e:
                failed.add(config)
                results.append({**state["row"], "error": f"{type(e).__name__}: {e}"[:300]})
    for config, state in states.items():
        if config not in failed:
            row = {**state["row"], "time_s": statistics.median(state["times"]), "times": state["times"]}
            if getattr(args, "host_profile", False) and device.type == "cuda":
                from gpu_profile import profile_step

                row["host_profile"] = profile_step(state["step"])
                print(f"host profile {config}: {json.dumps(row['host_profile'])}", flush=True)
            results.append(row)
    order = {c: i for i, c in enumerate(configs)}
    return sorted(results, key=lambda r: order[r["config"]])


# --- --check ------------------------------------------------------------------------------------


def _weights(d, F, d_out, gated, layout, lora, r, dtype, device, gen, bias=True):
    from spt_compile.sparse_ops.routed_mlp import MlpWeights

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dtype)

    def w(o, i):
        t = rnd(o, i, s=i**-0.5)
        return t if layout == "oi" else t.t().contiguous()

    slots = {}
    for proj, i, o in (("in", d, F), ("gate", d, F), ("out", F, d_out)):
        if proj == "gate" and not gated:
            continue
        slots[f"{proj}_w"], slots[f"{proj}_b"] = w(o, i), (rnd(o, s=0.1) if bias else None)
        if lora:
            slots[f"{proj}_a"], slots[f"{proj}_bb"] = rnd(r, i, s=i**-0.5), rnd(o, r, s=0.3)
    return MlpWeights(**slots)


def _mask(T, nb, active, gen, device, kind="random"):
    top = torch.rand(T, nb, generator=gen).topk(active, dim=-1).indices
    m = torch.zeros(T, nb, dtype=torch.bool).scatter_(-1, top, True)
    if kind == "empty-block":
        m[:, 2], m[:, 0] = False, True
    elif kind == "all":
        m[:] = True
    return m.to(device)


def _errors(got: dict, want: dict) -> dict:
    """name -> (max |got - want|, max |want|)."""
    return {k: ((got[k].double() - want[k].double()).abs().max().item(), want[k].double().abs().max().item())
            for k in want if got.get(k) is not None}


def _line(label: str, errs: dict, tol: float, against: dict = None) -> str:
    """ok when every error is within tol of its tensor's scale, or (against: the torch path's errors in
    the same dtype) within twice the torch path's own error."""
    bad = [k for k, (e, s) in errs.items()
           if e > tol * max(s, 1e-6) and not (against and k in against and e <= 2 * against[k][0])]
    return (f"check {label}: max |err| / scale " + ", ".join(f"{k} {e:.1e}/{s:.1e}" for k, (e, s) in errs.items())
            + ("  ok" if not bad else f"  FAILED ({', '.join(bad)})"))


def _triton_grads(x, w, spec, mask, dy, needs):
    from spt_compile.sparse_ops.routed_mlp.triton import routed_mlp_backward_triton, routed_mlp_forward_triton

    y, pre, counts = routed_mlp_forward_triton(x, w, spec, mask)
    dx, grads = routed_mlp_backward_triton(dy, x, w, spec, mask, True, needs, pre, counts)
    return {"y": y, "dx": dx, **{k: g for k, g in grads._asdict().items() if g is not None}}


def _torch_grads(x, w, spec, mask, dy, needs):
    from spt_compile.sparse_ops.routed_mlp import routed_mlp_backward_saved, routed_mlp_forward

    saved: list = []
    y = routed_mlp_forward(x, w, spec, mask, saved=saved)
    dx, grads = routed_mlp_backward_saved(dy, x, w, spec, mask, 0, True, needs, torch.cat(saved))
    return {"y": y, "dx": dx, **{k: g for k, g in grads._asdict().items() if g is not None}}


def check_kernels(args, device, dtype) -> list[str]:
    """The Triton routed MLP (1) against the per-token reference in float64 on small awkward shapes,
    fp32 and the benchmark's dtype; (2) at the benchmark's shape against the torch path in fp32, next to
    the torch path in the benchmark's dtype; (3) through torch.compile(backend="spt"), ffn_impl triton
    against torch on the same routing."""
    from spt_compile.sparse_ops.routed_mlp.reference import routed_mlp_reference
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights

    lines = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare exact products
    try:
        # (1) odd sizes: d_in 123, F 431 (blocks of 107-108), T 1 / 37 / 150
        cases = [  # T, gated, act, layout, lora, frozen, mask kind, n_blocks, active
            (37, True, "silu", "oi", True, False, "random", 4, 2),
            (29, False, "gelu", "io", True, False, "random", 4, 2),
            (150, True, "silu", "oi", True, True, "random", 4, 2),
            (23, False, "gelu_tanh", "oi", False, False, "empty-block", 4, 1),
            (1, True, "silu", "io", True, False, "random", 4, 2),
            (17, True, "silu", "oi", True, False, "all", 4, 4),
        ]
        # fp32 (exact products: a wrong index or formula shows far above rounding) on the first two,
        # the benchmark's dtype on the rest; few cases, since every new specialization is a compile.
        for i, (T, gated, act, layout, lora, frozen, kind, nb, active) in enumerate(cases):
            for dt in ([torch.float32] if i < 2 else [dtype]):
                gen = torch.Generator().manual_seed(T)
                w = _weights(123, 431, 123, gated, layout, lora, 5, dt, device, gen)
                spec = MlpSpec(act, gated, 431, nb, in_layout=layout, gate_layout=layout, out_layout=layout,
                               in_scale=0.5, gate_scale=2.0, out_scale=1.5)
                x = torch.randn(T, 123, generator=gen).to(device=device, dtype=dt)
                mask = _mask(T, nb, active, gen, device, kind)
                dy = torch.randn(T, 123, generator=gen).to(device=device, dtype=dt)
                needs = MlpWeights(*[t is not None and not (frozen and s.split("_")[1] in ("w", "b"))
                                     for s, t in zip(MlpWeights._fields, w)])
                got = _triton_grads(x, w, spec, mask, dy, needs)
                x64 = x.double().requires_grad_()
                w64 = MlpWeights(*[None if t is None else t.double().requires_grad_(bool(n)) for t, n in zip(w, needs)])
                y = routed_mlp_reference(x64, w64, spec, mask)
                names = ["dx"] + [s for s, t in zip(MlpWeights._fields, w64) if t is not None and t.requires_grad]
                leaves = [x64] + [t for t in w64 if t is not None and t.requires_grad]
                want = {"y": y, **dict(zip(names, torch.autograd.grad(y, leaves, dy.double())))}
                label = f"triton vs reference {str(dt).split('.')[1]} T={T} {'gated' if gated else 'plain'}-{act} " \
                        f"{layout} {active}/{nb} {kind}{' frozen' if frozen else ''}"
                lines.append(_line(label, _errors(got, want), 2e-4 if dt == torch.float32 else 3e-2))
                print(lines[-1], flush=True)
        # (2) the benchmark's shape: LoRA r=16 on every projection, frozen base weights
        d, F = SHAPES[args.shapes[0]]
        T = min(args.tokens[0], 2048)
        gen = torch.Generator().manual_seed(0)
        w32 = _weights(d, F, d, True, "oi", True, 16, torch.float32, device, gen, bias=False)
        spec = MlpSpec("silu", True, F, args.blocks, in_scale=2.0, gate_scale=2.0, out_scale=2.0)
        x32 = torch.randn(T, d, generator=gen).to(device)
        dy32 = torch.randn(T, d, generator=gen).to(device) * 0.01
        mask = _mask(T, args.blocks, max(1, args.blocks // 2), gen, device)
        needs = MlpWeights(*[t is not None and s.split("_")[1] in ("a", "bb") for s, t in zip(MlpWeights._fields, w32)])
        want = _torch_grads(x32, w32, spec, mask, dy32, needs)
        low = MlpWeights(*[None if t is None else t.to(dtype) for t in w32])
        args_low = (x32.to(dtype), low, spec, mask, dy32.to(dtype), needs)
        torch_err = _errors(_torch_grads(*args_low), want)
        lines.append(_line(f"torch  vs torch-fp32 {args.shapes[0]} T={T}", torch_err, 1.0))
        lines.append(_line(f"triton vs torch-fp32 {args.shapes[0]} T={T}", _errors(_triton_grads(*args_low), want),
                           1e-3 if dtype == torch.float32 else 2e-2, against=torch_err))
        with triton_block_n(64):  # the -n64 configs' tiles
            lines.append(_line(f"triton-n64 vs torch-fp32 {args.shapes[0]} T={T}",
                               _errors(_triton_grads(*args_low), want), 1e-3 if dtype == torch.float32 else 2e-2,
                               against=torch_err))
        print("\n".join(lines[-3:]), flush=True)
        # (3) the site op through torch.compile: triton and grouped vs torch on the same routing
        site = _check_site(device, dtype)
        lines += site
        print("\n".join(site), flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return lines


def _check_site(device, dtype) -> list[str]:
    """The site op through torch.compile, triton and grouped against torch on the same routing: routed
    training calls (exact_forward off: the implementation runs forward and backward) and, for grouped,
    the default exact-forward calls (the Triton kernels serve no part of those)."""
    from spt_compile.sparse_ops.routed_mlp import grouped

    torch.manual_seed(0)
    torch._dynamo.reset()
    module = SwiGLU(512, 1376).to(device=device, dtype=dtype)  # 4 blocks of 344 units: aligned for grouped
    compiled = torch.compile(module, backend="spt", options=dict(
        ffn_blocks=4, ffn_active=2, calibration_steps=1, compiler="eager", sparse_attention=False, ffn_impl="torch",
        ffn_loss_rows="off"))  # the loss is outside the graph: rank every row (else the backward is whole)
    x = torch.randn(2, 500, 512, device=device, dtype=dtype)
    for _ in range(2):  # calibration, then the first routed call (it probes and refits the router)
        compiled(x).float().pow(2).mean().backward()
    dy = torch.randn(x.shape, device=device, dtype=dtype)  # O(1) gradients, so relative errors mean something
    gmm, grouped_calls = grouped._gmm, []
    grouped._gmm = lambda *a: grouped_calls.append(1) or gmm(*a)  # that it ran, not the torch path it falls back to
    lines = []
    try:
        for exact, impls in ((False, ("torch", "triton", "grouped")), (True, ("torch", "grouped"))):
            out = {}
            for impl in impls:
                module.zero_grad()
                xi = x.clone().requires_grad_()
                grouped_calls.clear()
                with spt_compile.enable(ffn_impl=impl, exact_forward=exact):
                    y = compiled(xi)
                    y.backward(dy)
                if impl != "grouped" or grouped_calls:
                    out[impl] = {"y": y.detach(), "dx": xi.grad,
                                 **{n: p.grad for n, p in module.named_parameters() if p.grad is not None}}
            calls = "exact-forward" if exact else "routed"
            lines += [_line(f"site {impl} vs torch {str(dtype).split('.')[1]} ({calls} calls, torch.compile, 512->1376, "
                            "2/4 blocks)", _errors(out[impl], out["torch"]), 2e-4 if dtype == torch.float32 else 3e-2)
                      if impl in out else f"site {impl} ({calls}): FAILED, it did not run (the torch path served it)"
                      for impl in impls[1:]]
    finally:
        grouped._gmm = gmm
    return lines


def table(results: list[dict]) -> str:
    lines = [f"{'config':34} {'shape':8} {'tokens':>6} {'ms':>9} {'saved MiB':>9} {'time/best':>9} {'saved/best':>10}"]
    for key in sorted({(r["shape"], r["tokens"]) for r in results}):
        rows = [r for r in results if (r["shape"], r["tokens"]) == key and "error" not in r]
        dense = [r for r in rows if r["config"].startswith("dense")]
        if not dense:
            continue
        bt, bs = min(r["time_s"] for r in dense), min(r["saved_bytes"] for r in dense)
        for r in rows:
            r["time_ratio"], r["saved_ratio"] = r["time_s"] / bt, r["saved_bytes"] / bs
            lines.append(f"{r['config']:34} {key[0]:8} {key[1]:6} {r['time_s'] * 1e3:9.1f} "
                         f"{r['saved_bytes'] / 2**20:9.1f} {r['time_ratio']:8.2f}x {r['saved_ratio']:9.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["smollm2"])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS[:4]))
    p.add_argument("--impl", choices=IMPLS, default="auto", help="ffn_impl of the plain spt-* configs")
    p.add_argument("--check", action="store_true", help="first check the Triton routed MLP (see above)")
    p.add_argument("--blocks", type=int, default=4, help="ffn_blocks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--host-profile", action="store_true",
                   help="CUDA: one more step of each configuration under the profiler (kernels, GPU time, syncs)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cuda":
        raise SystemExit("TRITON_INTERPRET is set: unset it to run the Triton kernels on the GPU")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    print(f"device {device} {gpu or ''}, {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"SwiGLU + LoRA r=16 on gate/up/down, {args.blocks} blocks", flush=True)
    checks = []
    if args.check:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--check runs the Triton kernels: use a CUDA device (or TRITON_INTERPRET=1, slowly)")
        try:
            checks = check_kernels(args, device, dtype)
        except Exception as e:  # report, and still time the configurations
            checks = [f"check crashed: FAILED {type(e).__name__}: {e}"[:500]]
            print(checks[-1], flush=True)
    # Every configuration holds its compiled module alive in the round robin, each one an entry in the
    # cache of SwiGLU.forward: past Dynamo's limit (8) a configuration would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.configs))
    results = []
    for shape in args.shapes:
        for T in args.tokens:
            for r in run_round_robin(args.configs, shape, T, args, device, dtype):
                results.append(r)
                print(f"  {r['config']:34} {shape:8} T={T:5} " + (
                    f"{r['time_s'] * 1e3:9.1f} ms  saved {r['saved_bytes'] / 2**20:8.1f} MiB" if "error" not in r
                    else r["error"]), flush=True)
            torch._dynamo.reset()
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "commit": source_commit(), "cpu": cpu_model(), "device": str(device), "gpu": gpu, "dtype": str(dtype),
                                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "checks": checks, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any("FAILED" in c for c in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
