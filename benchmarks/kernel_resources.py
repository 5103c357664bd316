"""What the block-sparse attention kernels need of an H100/H200, without one: each kernel compiled for
sm_90 at the configuration its launcher picks (spt_compile.testing.compile_only), with registers per
thread, bytes spilled to local memory per thread, and shared memory. A kernel that spills loads and
stores its accumulators through local memory (L1/L2) inside its inner loop; one that needs more shared
memory than an SM has (227 KB) does not launch.

    python benchmarks/kernel_resources.py --json benchmarks/results/kernel_resources_sm90.json

The record is compiled with the device machine's Triton (3.6; registers and spills move between
versions), installed beside the project's without touching it:
    pip install --no-deps --target "$DIR" triton==3.6.0      # DIR: any empty folder
    PYTHONPATH="$DIR" python benchmarks/kernel_resources.py --json benchmarks/results/kernel_resources_sm90.json
(this machine's Triton 3.9: benchmarks/research/results/kernel_resources_sm90_triton39.json).

Rows: head shapes of SmolLM2 (9 / 3 heads, D 64), Phi-2 (32, D 80), a D 96 model and LLaMA-7B (32, D 128)
at N 8192, bf16, causal, 64 x 64 blocks, each with the launchers' defaults and with every switch of
block_sparse_triton that bench_attention.py's SWITCHED configs time on a GPU; then the Triton routed
MLP's kernels at LLaMA-7B's MLP and 8192 tokens with its CUDA tiles, 128 x 128 and 128 x 64. Compiling
takes a minute or two of CPU the first time (Triton caches the binaries); nothing runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402

from spt_compile.sparse_ops.attention import block_sparse_triton as bst  # noqa: E402
from spt_compile.testing.compile_only import available, compile_only, module_settings  # noqa: E402

SHAPES = {  # name: (query heads, kv heads, head size)
    "smollm2": (9, 3, 64),
    "phi2": (32, 32, 80),
    "d96": (32, 32, 96),
    "llama7b": (32, 32, 128),
}
VARIANTS = {  # name: block_sparse_triton switches (as bench_attention.py's SWITCHED)
    "default": {},
    "split-d": {"SPLIT_HEAD_TILES": True},
    "dkdv-8warps": {"DKDV_LAUNCH": bst.DKDV_UNSPILLED},
    "split-d+dkdv-8warps": {"SPLIT_HEAD_TILES": True, "DKDV_LAUNCH": bst.DKDV_UNSPILLED},
    "packed-dq": {"PACK_GQA_DQ": True},
}


def compile_call(shape: str, variant: str, N: int, lists: int) -> list[dict]:
    """Compile one attention forward + backward's kernels; one row per kernel."""
    H, Hkv, D = SHAPES[shape]
    q = torch.zeros(1, H, N, D, dtype=torch.bfloat16)
    k = v = torch.zeros(1, Hkv, N, D, dtype=torch.bfloat16)
    idx = torch.zeros(1, Hkv, N // 64, lists, dtype=torch.int32)  # GQA lists, as block selection makes
    with module_settings(bst, **VARIANTS[variant]), compile_only(bst) as built:  # CPU tensors: nothing runs
        out, lse = bst.block_sparse_forward_triton(q, k, v, idx, D**-0.5, True, None, 64, 64)
        bst.block_sparse_backward_triton(out, q, k, v, idx, out, lse, D**-0.5, True, None, 64, 64)
    return [{"shape": shape, "variant": variant, "N": N, "kernel": b.kernel, **b.resources()} for b in built]


def compile_routed_mlp(block_n: int, tokens: int) -> list[dict]:
    """The Triton routed MLP's kernels (ffn_impl="triton") at LLaMA-7B's MLP (4096 -> 11008 SwiGLU, LoRA
    r 16 on every projection, frozen base weights), bf16, 2 of 4 blocks per token, with the CUDA tiles
    at block_n output columns; one row per kernel specialisation (the largest spill of its launches)."""
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights
    from spt_compile.sparse_ops.routed_mlp import triton as mlp_triton

    d, F, r, T = 4096, 11008, 16, tokens

    def z(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16)

    w = MlpWeights(in_w=z(F, d), in_b=None, in_a=z(r, d), in_bb=z(F, r), gate_w=z(F, d), gate_b=None,
                   gate_a=z(r, d), gate_bb=z(F, r), out_w=z(d, F), out_b=None, out_a=z(r, F), out_bb=z(d, r))
    spec = MlpSpec("silu", True, F, 4)
    mask = torch.zeros(T, 4, dtype=torch.bool)
    rows = torch.arange(T)
    mask[rows, rows % 4] = True
    mask[rows, (rows + 1) % 4] = True
    needs = MlpWeights(*[name.endswith(("_a", "_bb")) for name in MlpWeights._fields])
    tiles = mlp_triton.Tiles(block_n=block_n)
    x = z(T, d)
    # its CUDA-only check passes CPU tensors: nothing runs
    with module_settings(mlp_triton, triton_runs_on=lambda device: True), compile_only(mlp_triton) as built:
        y, pre, counts = mlp_triton.routed_mlp_forward_triton(x, w, spec, mask, None, tiles)
        mlp_triton.routed_mlp_backward_triton(y, x, w, spec, mask, True, needs, pre, counts, None, tiles)
    rows_out: dict = {}
    for b in built:
        res = b.resources()
        key = (b.kernel, res["warps"], res["stages"], res["shared_bytes"])  # one row per specialisation
        if key not in rows_out or res["spill_bytes"] > rows_out[key]["spill_bytes"]:
            rows_out[key] = {"shape": "llama7b-mlp", "variant": f"tiles 128x{block_n}", "N": T, "kernel": b.kernel,
                             **res}
    return list(rows_out.values())


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':8} {'variant':20} {'kernel':22} {'regs':>5} {'spill B':>8} {'shared KB':>9} {'warps':>5}"]
    for r in rows:
        lines.append(f"{r['shape']:8} {r['variant']:20} {r['kernel']:22} {r['registers']:5} {r['spill_bytes']:8} "
                     f"{r['shared_bytes'] / 1024:9.1f} {r['warps']:5}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seq-len", type=int, default=8192, help="N (decides the dk/dv kernel's mode, as at run time)")
    p.add_argument("--lists", type=int, default=16, help="key blocks per query block's list (density 1/8 at 8192)")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="also the Triton routed MLP's kernels at LLaMA-7B's MLP, tiles 128 x 128 and 128 x 64")
    p.add_argument("--mlp-tokens", type=int, default=8192)
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    if not available():
        print("this Triton cannot compile for NVIDIA GPUs here (no NVIDIA backend or ptxas)", file=sys.stderr)
        return 2
    rows = []
    t0 = time.perf_counter()
    for shape in args.shapes:
        for variant in args.variants:
            if variant.startswith("split-d") and SHAPES[shape][2] in (64, 128):
                continue  # powers of two: nothing to split
            if variant == "packed-dq" and SHAPES[shape][0] == SHAPES[shape][1]:
                continue  # no GQA group to pack
            got = compile_call(shape, variant, args.seq_len, args.lists)
            rows += got
            for r in got:
                print(table([r]).splitlines()[1], flush=True)
    if args.mlp:
        for block_n in (128, 64):
            got = compile_routed_mlp(block_n, args.mlp_tokens)
            rows += got
            for r in got:
                print(table([r]).splitlines()[1], flush=True)
    print(table(rows))
    if args.json:
        from provenance import source_commit

        meta = {"argv": sys.argv[1:], "source": source_commit(), "target": "cuda sm_90 (compiled only, not run)",
                "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "dtype": "bf16", "blocks": "64 x 64", "causal": True, "compile_s": round(time.perf_counter() - t0, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
