"""Attention alone: forward + backward time and bytes saved for backward, dense vs spt.

Dense baselines: eager `F.scaled_dot_product_attention` (FlashAttention on CUDA, the flash CPU kernel
here) and the same call under `torch.compile` (Inductor). spt variants run the real path, a module
holding one SDPA call compiled with `backend="spt"` (so the pass, the site op and its autograd are all
in the timing), at `density` 1/8, for each selection (block / token) and implementation (torch /
triton / reference). Ratios are to the best dense configuration of the same N in the same run.

    python benchmarks/bench_attention.py                      # CPU, N 512 .. 8192, SmolLM2 heads
    python benchmarks/bench_attention.py --device cuda --dtype bf16 --json benchmarks/results/attention_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from source (the GPU machine has no install)
    sys.path.insert(0, str(REPO))

import spt_compile  # noqa: E402
from spt_compile.registry import REGISTRY  # noqa: E402

CONFIGS = ("sdpa", "sdpa-inductor", "spt-block-torch", "spt-block-triton", "spt-token-torch", "spt-block-reference",
           "spt-block-triton-deterministic", "spt-block-triton-sparse-forward", "spt-block-triton-packed-dq",
           "spt-block-triton-split-d", "spt-block-triton-dkdv-8warps", "spt-block-torch-defaults",
           "spt-block-triton-defaults", "spt-block-triton-defaults-efficient")
# *-deterministic: the config run under torch.use_deterministic_algorithms(True, warn_only=True), where the
# Triton dk/dv kernel gives each key block one program (no atomics; block_sparse_triton.py).
# *-sparse-forward: exact_forward off, the forward too over the selected blocks only (the kernels'
# own speed; training calls run the exact forward by default, sparse inference the sparse one).
# Configs that run spt-block-triton with block_sparse_triton switches on, each off by default until
# timed here: *-packed-dq, dq with the query heads of a GQA group in one tile (PACK_GQA_DQ); *-split-d,
# head sizes between powers of two (80, 96) in two tiles instead of one padded to 128 (SPLIT_HEAD_TILES);
# *-dkdv-8warps, the dk/dv kernel on 8 warps and 1 stage, where 4 warps spill its accumulators
# (DKDV_LAUNCH = DKDV_UNSPILLED).
SWITCHED = {"spt-block-triton-packed-dq": {"PACK_GQA_DQ": True}, "spt-block-triton-split-d": {"SPLIT_HEAD_TILES": True},
            "spt-block-triton-dkdv-8warps": {"DKDV_LAUNCH": {"num_warps": 8, "num_stages": 1}}}  # DKDV_UNSPILLED
# *-defaults-efficient: the site's switch for exact calls with a mask (--pad) on CUDA, off by default until
# timed here: SDPA's memory-efficient kernel run by the site with its lse kept, so backward needs no second
# forward (sites/attention.py, EFFICIENT_WITH_MASK)
SITE_SWITCHED = {"spt-block-triton-defaults-efficient": {"EFFICIENT_WITH_MASK": True}}


def switches(config: str):
    """The module switches a config turns on, set inside and restored after: block_sparse_triton's for
    SWITCHED configs, sites/attention.py's for SITE_SWITCHED ones; none for the others."""
    from spt_compile.sites import attention as attention_site
    from spt_compile.sparse_ops.attention import block_sparse_triton
    from spt_compile.testing.compile_only import module_settings

    if config in SITE_SWITCHED:
        return module_settings(attention_site, **SITE_SWITCHED[config])
    return module_settings(block_sparse_triton, **SWITCHED.get(config, {}))


def padded_mask(B: int, N: int, pad: float, device) -> Optional[torch.Tensor]:
    """Hugging Face's padded causal mask [B, 1, N, N] bool (query i sees real keys up to i), the last
    row's last `pad` of positions padding; None when pad is 0 (is_causal, no mask)."""
    if not pad:
        return None
    real = torch.ones(B, N, dtype=torch.bool, device=device)
    real[-1, N - int(N * pad):] = False
    return torch.ones(N, N, dtype=torch.bool, device=device).tril()[None, None] & real[:, None, None, :]


class OneAttention(torch.nn.Module):
    """What the pass sees in a decoder layer, reduced to the attention call itself."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])


def make_fn(config: str, args):
    module = OneAttention(not args.bidirectional)
    if config == "sdpa":
        return module
    if config == "sdpa-inductor":
        return torch.compile(module, backend="inductor")
    _, selection, impl = config.split("-")[:3]
    options = dict(attention_selection=selection, attention_impl=impl, attention_block=args.block,
                   calibration_steps=1, compiler="eager", sparse_ffn=False,
                   exact_forward=not config.endswith("-sparse-forward"))
    if "-defaults" not in config:
        # no length threshold and no floor of keys: time the sparse path at every N at --density ("-defaults":
        # the backend's density and length rules, e.g. exact below 1024 keys and at least 256 keys a query)
        options.update(density=args.density, attention_dense_below=0, attention_backward_dense_below=0,
                       attention_min_keys=0)
    return torch.compile(module, backend="spt", options=options)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active, leaving out the
    given parameters (saved by reference: they cost no memory beyond the model's own)."""

    def __init__(self, exclude=()):
        self.storages: dict[int, int] = {}
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True, warn_only=True) inside (warn, not fail, on other ops
    that have no deterministic form), the previous setting restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def run_config(config: str, N: int, args, device, dtype) -> dict:
    determinism = deterministic_algorithms() if config.endswith("-deterministic") else contextlib.nullcontext()
    with switches(config), determinism:
        return _run_config(config, N, args, device, dtype)


def _run_config(config: str, N: int, args, device, dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    q, k, v = (torch.randn(B, h, N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
               for h in (H, Hkv, Hkv))
    dout = torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype)
    mask = padded_mask(B, N, args.pad, device)
    sites_before = {id(s) for s in REGISTRY.sites}  # then the ones this config adds (the module has no weights to find them by)
    fn = make_fn(config, args)

    def step():
        out = fn(q, k, v, mask)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    t0 = time.perf_counter()
    step()  # compiles; for spt the site's one calibration call (dense)
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = fn(q, k, v, mask)
    out.backward(dout)
    q.grad = k.grad = v.grad = None
    del out
    times = []
    peak = None
    for i in range(args.repeats):
        if device.type == "cuda" and i == 0:
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        if device.type == "cuda" and i == 0:
            peak = torch.cuda.max_memory_allocated() - base
    record = {"config": config, "N": N, "time_s": statistics.median(times), "times": times,
              "saved_bytes": saved.total, "peak_bytes": peak, "first_call_s": first}
    if config.startswith("spt"):  # which kernels served the exact forward: "flash" is the fast one
        record["exact_forward_kernels"] = [s.describe().get("exact_forward_kernels", {})
                                           for s in REGISTRY.sites if s.kind == "attention" and id(s) not in sites_before]
    return record


def check_kernels(args, device, dtype) -> list[str]:
    """The sparse implementations against the dense reference on a small awkward shape."""
    from spt_compile.sparse_ops.attention.select import blocks_per_query, select_key_blocks
    from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward, block_sparse_forward
    from spt_compile.sparse_ops.attention.reference import block_sparse_attention_reference

    lines = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    impls = ["torch"] + (["triton"] if device.type == "cuda" or interpreted else [])
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for N, causal in ((257, True), (200, False)):
        gen = torch.Generator(device="cpu").manual_seed(1)
        B, H, Hkv, D = 2, args.heads, args.kv_heads, args.head_dim
        q, k, v = (torch.randn(B, h, N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                   for h in (H, Hkv, Hkv))
        real = torch.ones(B, N, dtype=torch.bool, device=device)
        lb = blocks_per_query(torch.full((B,), N), 0.3, None, 64, -(-N // 64))
        idx = select_key_blocks(q.detach(), k.detach(), D**-0.5, lb, causal, None, real, 64, 64)
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, D**-0.5, causal, None, 64, 64)
        dout = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        for impl in impls:
            out, lse = block_sparse_forward(q.detach(), k.detach(), v.detach(), idx, D**-0.5, causal, None, 64, 64,
                                            impl=impl, diag_first=True)
            grads = block_sparse_backward(dout.to(dtype), q.detach(), k.detach(), v.detach(), idx, out, lse, D**-0.5,
                                          causal, None, 64, 64, impl=impl, diag_first=True)
            errs = [(out.float() - ref).abs().max().item()] + [(g.float() - r.float()).abs().max().item()
                                                                for g, r in zip(grads, ref_grads)]
            ok = all(e <= tol * max(1.0, r.abs().max().item()) for e, r in zip(errs, (ref, *ref_grads)))
            lines.append(f"check {impl:7} N={N} causal={causal}: max |err| out/dq/dk/dv = "
                         + " / ".join(f"{e:.2e}" for e in errs) + ("  ok" if ok else "  FAILED"))
            if impl == "triton":  # deterministic mode: one dk/dv program per key block, no atomics
                lines.append(_check_deterministic(dout.to(dtype), q, k, v, idx, out, lse, causal, grads, tol, N))
                for config in SWITCHED:
                    lines.append(_check_switched(config, dout.to(dtype), q, k, v, idx, out, lse, causal, grads, tol, N))
        if "triton" in impls:  # the Triton selection lists the same blocks as the PyTorch one
            from spt_compile.sparse_ops.attention.select import select_blocks

            got = select_blocks(q.detach(), k.detach(), D**-0.5, lb, causal, None, real, 64, 64, "triton")
            # bf16 scores on tensor cores may swap near-tied blocks: compare the lists as sets per row.
            agree = (got.sort(-1).values == idx.sort(-1).values).all(-1).float().mean().item()
            need = 1.0 if dtype == torch.float32 else 0.9
            lines.append(f"check select  N={N} causal={causal}: triton lists the same key blocks as torch on "
                         f"{agree:.1%} of query blocks" + ("  ok" if agree >= need else "  FAILED"))
        lines.append(_check_exact_short(q, k, v, dout, causal, tol, N))
        if causal:  # a padded batch (HF's padded causal mask): SDPA recomputed in backward, or the
            # memory-efficient kernel with its lse kept (EFFICIENT_WITH_MASK)
            mask = padded_mask(B, N, 0.25, device)
            lines.append(_check_exact_short(q, k, v, dout, causal, tol, N, mask))
            for config in SITE_SWITCHED:
                with switches(config):
                    lines.append(_check_exact_short(q, k, v, dout, causal, tol, N, mask, config.split("-")[-1]))
    return lines


def _check_exact_short(q, k, v, dout, causal, tol, N, mask=None, name="") -> str:
    """A training call below attention_dense_below through backend="spt" (exact both ways; on CUDA the
    flash kernel's forward with its lse kept and its backward run from them, no second forward; with a
    mask, SDPA and SDPA again in backward, or the memory-efficient kernel under EFFICIENT_WITH_MASK):
    output and gradients against SDPA under autograd, and which kernel served it."""
    from spt_compile.sites.meta import AttentionMeta

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    want = OneAttention(causal)(q, k, v, mask)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    torch._dynamo.reset()
    fn = torch.compile(OneAttention(causal), backend="spt", options=dict(
        compiler="eager", sparse_ffn=False, calibration_steps=0, attention_dense_below=1 << 20,
        attention_backward_dense_below=1 << 20))
    modes = []  # how each call ran, as its backward reads it
    original, read = AttentionMeta.__dict__["read"], AttentionMeta.read
    AttentionMeta.read = classmethod(lambda cls, meta: modes.append(int(meta[0])) or read(meta))
    try:
        got = fn(q, k, v, mask)
        got_grads = torch.autograd.grad(got, (q, k, v), dout)
    finally:
        AttentionMeta.read = original
    errs = [(a.float() - b.float()).abs().max().item() for a, b in zip((got, *got_grads), (want, *want_grads))]
    ok = all(e <= tol * max(1.0, w.abs().max().item()) for e, w in zip(errs, (want, *want_grads)))
    names = {AttentionMeta.DENSE: "recomputed", AttentionMeta.DENSE_LSE: "cpu-flash",
             AttentionMeta.CUDA_FLASH_LSE: "cuda-flash", AttentionMeta.CUDA_EFFICIENT_LSE: "cuda-efficient"}
    what = "" if mask is None else f" padded{'-' + name if name else ''}"
    return (f"check exact-short{what} N={N} causal={causal} ({', '.join(names.get(m, str(m)) for m in modes)}): max |err| "
            "out/dq/dk/dv = " + " / ".join(f"{e:.2e}" for e in errs) + ("  ok" if ok else "  FAILED"))


def _check_deterministic(dout, q, k, v, idx, out, lse, causal, grads, tol, N) -> str:
    """The Triton backward under torch.use_deterministic_algorithms(True): the same bits on two runs,
    and within tol of the default (atomic) backward's gradients."""
    from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward

    D = q.shape[-1]
    with deterministic_algorithms():
        runs = [block_sparse_backward(dout, q.detach(), k.detach(), v.detach(), idx, out, lse, D**-0.5, causal, None,
                                      64, 64, impl="triton", diag_first=True) for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(runs[0], grads)]
    ok = same and all(e <= tol * max(1.0, g.abs().max().item()) for e, g in zip(errs, grads))
    return (f"check deterministic N={N} causal={causal}: two runs bit-identical {same}, max |diff| vs default "
            f"dq/dk/dv = " + " / ".join(f"{e:.2e}" for e in errs) + ("  ok" if ok else "  FAILED"))


def _check_switched(config: str, dout, q, k, v, idx, out, lse, causal, grads, tol, N) -> str:
    """The Triton forward and backward with a SWITCHED config's switches on: within tol of the
    default's out and gradients."""
    from spt_compile.sparse_ops.attention.block_sparse import block_sparse_backward, block_sparse_forward

    D = q.shape[-1]
    with switches(config):
        out2, lse2 = block_sparse_forward(q.detach(), k.detach(), v.detach(), idx, D**-0.5, causal, None, 64, 64,
                                          impl="triton", diag_first=True)
        grads2 = block_sparse_backward(dout, q.detach(), k.detach(), v.detach(), idx, out2, lse2, D**-0.5, causal,
                                       None, 64, 64, impl="triton", diag_first=True)
    errs = [(a.float() - b.float()).abs().max().item() for a, b in zip((out2, *grads2), (out, *grads))]
    ok = all(e <= tol * max(1.0, g.abs().max().item()) for e, g in zip(errs, (out, *grads)))
    name = config.removeprefix("spt-block-triton-")
    return (f"check {name} N={N} causal={causal}: max |diff| vs default out/dq/dk/dv = "
            + " / ".join(f"{e:.2e}" for e in errs) + ("  ok" if ok else "  FAILED"))


def host_profile(config: str, N: int, args, device, dtype) -> dict:
    """One forward+backward under the profiler (gpu_profile.profile_step): wall time, GPU kernels and
    their time, host syncs."""
    from gpu_profile import profile_step

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(args.batch, h, N, args.head_dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
               for h in (args.heads, args.kv_heads, args.kv_heads))
    mask = padded_mask(args.batch, N, args.pad, device)
    fn = make_fn(config, args)
    with switches(config):
        for _ in range(3):
            fn(q, k, v, mask).sum().backward()
        return {"config": config, "N": N, **profile_step(lambda: fn(q, k, v, mask).sum().backward())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--configs", nargs="+", choices=CONFIGS,
                   help="default: every config that runs on the device (triton on CUDA only; token-level "
                        "and reference only up to --token-max-n)")
    p.add_argument("--token-max-n", type=int, default=2048, help="largest N for spt-token-* and *-reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (SmolLM2: 3)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--density", type=float, default=1 / 8)
    p.add_argument("--block", type=int, default=64, help="attention_block for block selection")
    p.add_argument("--bidirectional", action="store_true", help="non-causal attention")
    p.add_argument("--pad", type=float, default=0.0,
                   help="a padded batch: the last row's last PAD of positions are padding, and every config gets "
                        "Hugging Face's padded causal mask instead of is_causal (default 0: no mask)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check", action="store_true", help="first compare the sparse kernels with the reference")
    p.add_argument("--host-profile", action="store_true",
                   help="CUDA: also profile one step of each spt config at the largest N (kernels launched, "
                        "GPU time, host syncs)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    configs = args.configs or [c for c in CONFIGS if (device.type == "cuda" or "triton" not in c)
                               and "-defaults" not in c]  # "-defaults": named only (short N's rules)
    if not 0 <= args.pad < 1 or (args.pad and args.bidirectional):
        raise SystemExit(f"--pad {args.pad}: a fraction in [0, 1) of a causal row (not with --bidirectional)")
    if "TRITON_INTERPRET" in os.environ and device.type == "cuda":
        raise SystemExit("TRITON_INTERPRET is set: unset it to time the Triton kernels on the GPU")
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"{dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.batch} H={args.heads} "
          f"Hkv={args.kv_heads} D={args.head_dim}, density {args.density:g}, causal {not args.bidirectional}"
          + (f", padded mask (last row {args.pad:.0%} padding)" if args.pad else ""), flush=True)
    checks = check_kernels(args, device, dtype) if args.check else []
    for line in checks:
        print(line, flush=True)
    results = []
    for N in args.seq_lens:
        for config in configs:
            if ("token" in config or "reference" in config) and N > args.token_max_n:
                continue
            try:
                r = run_config(config, N, args, device, dtype)
            except Exception as e:  # one failing config must not lose the others' numbers
                r = {"config": config, "N": N, "error": f"{type(e).__name__}: {e}"[:300]}
            results.append(r)
            print(f"  {config:30} N={N:5} " + (f"{r['time_s'] * 1e3:9.2f} ms  saved {r['saved_bytes'] / 2**20:8.1f} MiB"
                                             if "error" not in r else r["error"]), flush=True)
            torch._dynamo.reset()
    print(table(results))
    profiles = []
    if args.host_profile and device.type == "cuda":
        for config in [c for c in configs if c.startswith("spt") and not c.endswith("-deterministic") and c not in SWITCHED]:
            try:
                prof = host_profile(config, max(args.seq_lens), args, device, dtype)
            except Exception as e:
                prof = {"config": config, "error": f"{type(e).__name__}: {e}"[:300]}
            profiles.append(prof)
            print("host profile", json.dumps(prof), flush=True)
            torch._dynamo.reset()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"argv": sys.argv[1:], "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                "threads": torch.get_num_threads(), "checks": checks}
        args.json.write_text(json.dumps({"meta": meta, "results": results, "host_profiles": profiles}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any("FAILED" in c for c in checks) else 0


def table(results: list[dict]) -> str:
    lines = [f"{'config':30} {'N':>5} {'ms':>9} {'saved MiB':>9} {'peak MiB':>9} {'time/best':>9} {'saved/best':>10}"]
    for N in sorted({r["N"] for r in results}):
        rows = [r for r in results if r["N"] == N and "error" not in r]
        dense = [r for r in rows if r["config"].startswith("sdpa")]
        if not dense:
            continue
        best_t = min(r["time_s"] for r in dense)
        best_s = min(r["saved_bytes"] for r in dense)
        for r in rows:
            peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r.get("peak_bytes") is not None else f"{'-':>9}"
            r["time_ratio"], r["saved_ratio"] = r["time_s"] / best_t, r["saved_bytes"] / best_s
            lines.append(f"{r['config']:30} {N:5} {r['time_s'] * 1e3:9.2f} {r['saved_bytes'] / 2**20:9.1f} {peak} "
                         f"{r['time_ratio']:8.2f}x {r['saved_ratio']:9.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
