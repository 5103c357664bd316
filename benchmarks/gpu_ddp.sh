#!/usr/bin/env bash
# DDP LoRA fine-tuning steps on every GPU of this machine (NCCL): random-initialised LLaMA-7B-shaped
# layers, bf16, dense (eager SDPA = FlashAttention, Inductor) vs backend="spt", median step time and
# peak memory per rank (benchmarks/bench_ddp.py). Runs the package from this source tree; installs
# nothing. With one GPU it runs world size 1 (what the lent device allows).
#   bash benchmarks/gpu_ddp.sh [SEQ]     # default 8192; JSON to $OUT or benchmarks/results/
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PYTHONPATH, $out, $gpu
seq="${1:-8192}"
layers="${SPT_STEP_LAYERS:-4}"
ngpu=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
python -m torch.distributed.run --nproc_per_node "$ngpu" --master_port 29517 benchmarks/bench_ddp.py \
    --device cuda --dtype bf16 --shape llama7b --layers "$layers" --seq-len "$seq" --steps 5 --warmup 2 \
    --json "$out/ddp_step_llama7b_${layers}layers_${ngpu}x${gpu}.json"
