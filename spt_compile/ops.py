"""Public building blocks. Importing this module registers every spt:: custom op."""

from spt_compile.triton_ops.linear_cross_entropy import linear_cross_entropy
from spt_compile.triton_ops.reference import (
    linear_cross_entropy_reference, routed_mlp_reference, sparse_attention_reference,
)
from spt_compile.triton_ops.routed_mlp import MlpSpec, MlpWeights, block_bounds, routed_mlp
from spt_compile.triton_ops.sparse_attention import sparse_attention

from . import attention_site, mlp_site, real_rows  # noqa: F401  (the ops the passes emit)

__all__ = [
    "sparse_attention", "sparse_attention_reference", "routed_mlp", "routed_mlp_reference", "block_bounds",
    "MlpSpec", "MlpWeights", "linear_cross_entropy", "linear_cross_entropy_reference",
]
