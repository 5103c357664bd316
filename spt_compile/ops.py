"""Public building blocks. Importing this module registers every spt:: custom op."""

from spt_compile.sparse_ops.attention.reference import sparse_attention_reference
from spt_compile.sparse_ops.attention.token_sparse import sparse_attention
from spt_compile.sparse_ops.linear_cross_entropy import linear_cross_entropy
from spt_compile.sparse_ops.linear_cross_entropy.reference import linear_cross_entropy_reference
from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights, block_bounds, routed_mlp
from spt_compile.sparse_ops.routed_mlp.reference import routed_mlp_reference

from . import real_rows, sites  # noqa: F401  (the ops the passes emit)

__all__ = [
    "sparse_attention", "sparse_attention_reference", "routed_mlp", "routed_mlp_reference", "block_bounds",
    "MlpSpec", "MlpWeights", "linear_cross_entropy", "linear_cross_entropy_reference",
]
