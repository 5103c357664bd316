#!/usr/bin/env bash
# The GPU check, for the offline GPU machine (its own torch/triton/Python; nothing is installed): runs
# the package from this source tree on random tensors, checks the Triton kernels against the
# references on CUDA, and prints the attention, FFN, per-call overhead and loss tables. All five steps
# took about 4.5 minutes on an H200 (2026-12-04, before the sparse-forward configs and the FFN profile).
#   bash benchmarks/gpu_check.sh        # JSON to $OUT (the device tool's folder) or benchmarks/results/
#   bash benchmarks/gpu_check.sh 1 4    # only steps 1 and 4 (a lease too short for all five)
# Step 5 compares Liger-Kernel when its wheel travels in the working tree: before the run,
#   pip download --no-deps liger-kernel==0.8.5 -d .whl/     # .whl/ is git-ignored: carry it to the device
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PYTHONPATH, $out, $gpu
steps=" ${*:-1 2 3 4 5} "
want() { [[ "$steps" == *" $1 "* ]]; }
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# 1. Kernels vs references (--check) and SmolLM2's head shape (9 heads, 3 kv heads, D 64), bf16, causal;
#    also the Triton path under torch.use_deterministic_algorithms (one dk/dv program per key block), and
#    with the sparse forward (exact_forward off: the block-sparse kernels' own speed), and with dq packing a GQA
#    group's heads into one tile (PACK_GQA_DQ), and with the dk/dv kernel on 8 warps (DKDV_LAUNCH, where 4
#    spill when compiled for sm_90: benchmarks/kernel_resources.py); each on by default only if faster here.
if want 1; then
timeout 270 python benchmarks/bench_attention.py --device cuda --dtype bf16 --check --seq-lens 4096 8192 \
    --configs sdpa sdpa-inductor spt-block-triton spt-block-torch spt-block-triton-deterministic \
    spt-block-triton-sparse-forward spt-block-triton-packed-dq spt-block-triton-dkdv-8warps --repeats 10 \
    --warmup 3 --host-profile \
    --json "$out/attention_smollm2_${gpu}.json"
# ... and at 1024 / 2048 keys with the backend's length rules (spt-block-triton-defaults: exact below 1024
# keys, at least 256 keys a query above, i.e. a quarter / an eighth; CPU-measured, docs/quality.md): against SDPA
timeout 90 python benchmarks/bench_attention.py --device cuda --dtype bf16 --seq-lens 1024 2048 \
    --configs sdpa spt-block-triton-defaults --repeats 10 --warmup 3 \
    --json "$out/attention_smollm2_short_${gpu}.json"
# ... and a padded batch (HF's padded causal mask, 8 rows, the last a quarter padding) at 512 / 1024 keys:
# SDPA against the exact call as it runs there today (SDPA, then SDPA again in backward) and with the
# memory-efficient kernel's lse kept (EFFICIENT_WITH_MASK: on by default only if its checks pass and it is faster)
timeout 90 python benchmarks/bench_attention.py --device cuda --dtype bf16 --check --seq-lens 512 1024 --batch 8 \
    --pad 0.25 --configs sdpa spt-block-triton-defaults spt-block-triton-defaults-efficient --repeats 10 --warmup 3 \
    --json "$out/attention_smollm2_padded_${gpu}.json"
fi
# 2. A LLaMA-7B attention shape (32 heads, D 128), N 8192, bf16, causal; default and deterministic dk/dv.
#    Then Phi-2's (32 heads, D 80): one head tile padded to 128 (the default) against a 64 + 16 split
#    (SPLIT_HEAD_TILES: on by default only if this shows it faster; --check compares the two).
if want 2; then
timeout 130 python benchmarks/bench_attention.py --device cuda --dtype bf16 --seq-lens 8192 --heads 32 \
    --kv-heads 32 --head-dim 128 --configs sdpa spt-block-triton spt-block-triton-deterministic \
    spt-block-triton-sparse-forward spt-block-triton-dkdv-8warps --repeats 10 \
    --warmup 3 \
    --json "$out/attention_llama7b_${gpu}.json"
timeout 150 python benchmarks/bench_attention.py --device cuda --dtype bf16 --check --seq-lens 8192 --heads 32 \
    --kv-heads 32 --head-dim 80 --configs sdpa spt-block-triton spt-block-triton-split-d --repeats 10 \
    --warmup 3 \
    --json "$out/attention_phi2_${gpu}.json"
fi
# 3. The routed FFN: --check (Triton kernels vs the per-token reference at odd sizes, vs the torch path at
#    this shape, and through torch.compile; exits 1 on a mismatch), then dense (eager, Inductor) and
#    routed at 50% / 25% of 4 blocks: at the training default (exact forward, routed backward: the torch
#    path and its grouped GEMMs, which are all that serve those calls), and with the routed forward too
#    (-sparse-forward: the Triton kernels, torch and grouped; issue 19 keeps the fastest as the CUDA
#    default), and the Triton kernels with 128 x 64 tiles (-n64: 128 x 128 spill when compiled for
#    sm_90); LLaMA-7B MLP shape, 8192 tokens, bf16; then one step of each under the profiler
#    (--host-profile: where the routed op's time goes). Each row records the implementation that ran.
if want 3; then
timeout 270 python benchmarks/bench_ffn.py --device cuda --dtype bf16 --shapes llama7b --tokens 8192 --check \
    --configs dense-eager dense-inductor spt-50%-torch spt-50%-grouped spt-25%-torch spt-25%-grouped \
    spt-50%-triton-sparse-forward spt-50%-torch-sparse-forward spt-50%-grouped-sparse-forward \
    spt-25%-triton-sparse-forward spt-25%-torch-sparse-forward spt-50%-triton-sparse-forward-n64 \
    --repeats 5 --warmup 2 --host-profile --json "$out/ffn_llama7b_${gpu}.json"
# ... and LM tuning's MLP, every row keeping every block (its backward in one pass off the CPU), against
# dense; then that backward in one pass against block by block (the CPU's way), at both MLP shapes
timeout 90 python benchmarks/bench_ffn.py --device cuda --dtype bf16 --shapes llama7b smollm2 --tokens 8192 \
    --configs dense-eager dense-inductor spt-whole-rows --repeats 5 --warmup 2 --json "$out/ffn_whole_rows_${gpu}.json"
timeout 60 python benchmarks/research/ab_one_pass.py --device cuda --dtype bf16 --cases smollm2:8192 llama7b:8192 \
    --rounds 10 --json "$out/ab_one_pass_${gpu}.json"
fi
# 4. Per-call host overhead at tiny shapes (attention B=1 H=4 N=256; a 64-token MLP): the spt ops against
#    SDPA and a dense MLP, and the attention op made for CUDA graphs (mode="reduce-overhead", captured
#    here; the JSON records Inductor's cudagraph_skips, 0 when everything it could capture was).
if want 4; then
timeout 60 python benchmarks/bench_overhead.py --device cuda --rounds 50 --json "$out/overhead_${gpu}.json"
fi
# 5. The LM head + cross-entropy: dense (HF's form), the chunked op's torch path and its Triton kernel (the
#    CUDA default), and Liger-Kernel's fused linear cross-entropy if .whl/ holds its wheel; --check compares
#    loss and d(h) with dense (exits 1 on a mismatch). bf16, 8192 tokens; SmolLM2's head, then LLaMA-7B's.
if want 5; then
liger_dir=$(mktemp -d)
for w in .whl/liger_kernel-*.whl; do [ -f "$w" ] && python -m zipfile -e "$w" "$liger_dir"; done
PYTHONPATH="$PYTHONPATH:$liger_dir" timeout 60 python benchmarks/bench_loss.py --device cuda --dtype bfloat16 \
    --tokens 8192 --chunks 512 2048 --impls torch triton --liger --check --steps 5 --json "$out/loss_smollm2_${gpu}.json"
PYTHONPATH="$PYTHONPATH:$liger_dir" timeout 60 python benchmarks/bench_loss.py --device cuda --dtype bfloat16 \
    --tokens 8192 --hidden 4096 --vocab 32000 --chunks 512 2048 --impls torch triton --liger --check --steps 5 \
    --json "$out/loss_llama7b_${gpu}.json"
fi
