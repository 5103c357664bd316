# Shared setup of the GPU scripts (sourced, not run): the repository root as working directory and on
# PYTHONPATH (the offline GPU machine runs the package from source), the Triton interpreter off, the
# output folder ($OUT, the device tool's, else benchmarks/results/) and the card's short name in $gpu.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else 'nocuda')")
