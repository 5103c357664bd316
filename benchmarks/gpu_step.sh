#!/usr/bin/env bash
# Whole LoRA fine-tuning steps on the offline GPU machine (issue 5's GPU sweep): random-initialised
# LLaMA-7B-shaped layers (hidden 4096, 32 heads, FFN 11008), pure bf16, dense (eager SDPA =
# FlashAttention, Inductor) vs backend="spt" at its defaults and at 25% of the FFN blocks, each
# configuration in a fresh process. Runs the package from this source tree; installs nothing.
#   bash benchmarks/gpu_step.sh [SEQ ...]      # default 8192; JSON and plots to $OUT or benchmarks/results/
# About 1-1.5 minutes per (configuration, length) on an H100/H200, most of it Inductor compiling.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PYTHONPATH, $out, $gpu
seqs=("${@:-8192}")
layers="${SPT_STEP_LAYERS:-4}"
python benchmarks/bench_finetune.py --device cuda --dtype bf16 --model llama7b-random --layers "$layers" \
    --seq-lens "${seqs[@]}" --configs eager-sdpa inductor spt spt-25% --steps 5 --warmup 2 \
    --json "$out/finetune_step_llama7b_${layers}layers_${gpu}.json"
