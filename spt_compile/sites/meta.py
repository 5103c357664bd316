"""What a site op's forward tells its backward about how the call ran, as one small int64 tensor.

The tensor is an output of the forward op (saved for backward by autograd) and stays on the CPU
whatever the inputs' device, so backward reads it without a device sync. Each op has one dataclass
that writes and reads it; nothing else indexes the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from spt_compile.sparse_ops.attention.block_sparse import IMPLS as ATTENTION_IMPLS


@dataclass(frozen=True)
class AttentionMeta:
    """How spt::attention_site ran. mode: one of the MODES. shape: the selection's shape after its
    batch dim (block or token indices [B, *shape]); block_m, block_n: the block selection's tiles."""

    # DENSE_LSE: exact by the CPU flash kernel, its lse returned; CUDA_FLASH_LSE: the same by CUDA's flash kernel;
    # CUDA_EFFICIENT_LSE: the same by CUDA's memory-efficient kernel (a mask; attention.EFFICIENT_WITH_MASK)
    DENSE, TOKEN, BLOCK, DENSE_LSE, CUDA_FLASH_LSE, CUDA_EFFICIENT_LSE = 0, 1, 2, 3, 4, 5
    LEN = 8

    mode: int
    seed: int  # the dropout seed, replayed by backward
    shape: tuple[int, int, int] = (0, 0, 0)
    block_m: int = 0
    block_n: int = 0
    impl: str = "torch"  # block_sparse.IMPLS

    def tensor(self) -> Tensor:
        return torch.tensor([self.mode, self.seed, *self.shape, self.block_m, self.block_n,
                             ATTENTION_IMPLS.index(self.impl)], dtype=torch.int64)

    @classmethod
    def read(cls, meta: Tensor) -> "AttentionMeta":
        mode, seed, d0, d1, d2, block_m, block_n, impl = meta.tolist()
        return cls(mode, seed, (d0, d1, d2), block_m, block_n, ATTENTION_IMPLS[impl])

    @classmethod
    def fake(cls) -> Tensor:
        return torch.empty(cls.LEN, dtype=torch.int64, device="cpu")


@dataclass(frozen=True)
class MlpRun:
    """How a routed MLP's forward kernels ran: the implementation, the dtype the Triton GEMMs computed
    in when it is not x's (autocast; backward, usually outside the autocast region, uses the same), and
    the tokens per block (the Triton path's backward needs them without a host sync)."""

    impl: str = "torch"  # "torch" | "triton" | "reference"
    compute: Optional[torch.dtype] = None
    counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class MlpMeta:
    """How spt::mlp_site ran. mode: DENSE (every block, no routing), ROUTED (only the routed blocks
    ran), EXACT (exact_forward: every block ran forward; backward keeps the chosen pairs, replaying
    dropout drawn for every token). permuted: the clustering's unit order applies. whole:
    exact_mlp_forward kept every pair and saved the pre-activations as [T, F] per projection."""

    DENSE, ROUTED, EXACT = 0, 1, 2
    IMPLS = ("torch", "triton", "reference", "grouped")
    DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
    FIXED = 6  # then the tokens per block

    mode: int
    seed: int
    permuted: bool
    run: MlpRun
    whole: bool
    n_blocks: int

    def tensor(self) -> Tensor:
        counts = list(self.run.counts) or [-1] * self.n_blocks  # -1: not counted (backward counts)
        return torch.tensor([self.mode, self.seed, int(self.permuted), self.IMPLS.index(self.run.impl),
                             self.DTYPES.index(self.run.compute), int(self.whole), *counts], dtype=torch.int64)

    @classmethod
    def read(cls, meta: Tensor) -> "MlpMeta":
        mode, seed, permuted, impl, dtype, whole, *counts = meta.tolist()
        known = tuple(counts) if all(c >= 0 for c in counts) else ()
        return cls(mode, seed, bool(permuted), MlpRun(cls.IMPLS[impl], cls.DTYPES[dtype], known),
                   bool(whole), len(counts))

    @classmethod
    def fake(cls, n_blocks: int) -> Tensor:
        return torch.empty(cls.FIXED + n_blocks, dtype=torch.int64, device="cpu")
