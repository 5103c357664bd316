"""Routed two-layer MLP: each token runs only its chosen blocks of the hidden layer.

The hidden layer (size F) is cut into `n_blocks` contiguous blocks. A token's chosen blocks contribute
with weight 1 (hard routing), so with every block chosen this *is* the dense MLP:

    plain:  y = out( act(in(x)) )                 e.g. BERT / GPT-2 / OPT
    gated:  y = out( act(gate(x)) * in(x) )       e.g. LLaMA's SwiGLU: gate_proj, up_proj, down_proj

Each projection is `x W^T + b` (layout "oi", nn.Linear) or `x W + b` (layout "io", GPT-2's Conv1D),
optionally plus a LoRA delta `(dropout(x) A^T) B^T * scale`. Block b uses rows lo:hi of the in/gate
weights, biases and LoRA B, and columns lo:hi of the out weight and LoRA A; the out bias is added once.

Shapes: x [T, d_in], block_mask [T, n_blocks] bool, y [T, d_out].

The PyTorch path (forward.py, backward.py): tokens are grouped by block (one gather per block, one GEMM per
projection per block with the LoRA factors inside it, one scatter-add; see "LoRA inside the block
GEMMs" in blocks.py). Forward keeps only the routed blocks' pre-activations (gate and up, or the single
pre-activation) and the rank-r LoRA inputs: with half the blocks active that is about half of what
the dense MLP saves, and backward (routed_mlp_backward_saved, explicit formulas) recomputes no
projection. routed_mlp_backward recomputes everything from x instead (the least memory: x and the
[T, n_blocks] mask only).

Modules: spec.py (what a routed MLP is), blocks.py (per-block pieces shared by the paths), forward.py,
backward.py, exact.py (exact forward, sparse backward), grouped.py (the same computations with every
block of a projection in one torch._grouped_mm, offsets on the device: no host sync),
compensation.py, function.py (the differentiable op for direct use), triton.py (the Triton kernels),
reference.py (the plain per-token reference every path is tested against).
"""

from .backward import routed_mlp_backward, routed_mlp_backward_saved
from .blocks import route_tokens, unit_importance
from .compensation import compensation, compensation_input_grad
from .exact import IMPORTANCES, exact_mlp_forward, score_weights, unit_norms
from .forward import block_outputs, routed_mlp_forward
from .function import routed_mlp
from .spec import (
    ACTIVATIONS, FFN_IMPL_ENV, FFN_IMPLS, MlpSpec, MlpWeights, block_bounds, join_fused, out_features,
    permute_hidden, resolve_ffn_impl, split_fused, unpermute_grads,
)

__all__ = [
    "ACTIVATIONS", "FFN_IMPLS", "FFN_IMPL_ENV", "IMPORTANCES", "MlpSpec", "MlpWeights", "block_bounds", "block_outputs",
    "compensation", "compensation_input_grad", "exact_mlp_forward", "join_fused", "out_features", "permute_hidden",
    "resolve_ffn_impl", "route_tokens", "routed_mlp", "routed_mlp_backward", "routed_mlp_backward_saved",
    "routed_mlp_forward", "score_weights", "split_fused", "unit_importance", "unit_norms", "unpermute_grads",
]
