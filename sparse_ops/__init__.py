"""The sparse ops' kernels, one folder per op: Triton kernels, the PyTorch paths that serve where
Triton does not (the CPU, LoRA dropout), and a plain reference per op with the same signature that
every path is tested against. Installed as spt_compile.sparse_ops.

    attention/             block selection, block-sparse attention (SDDMM -> softmax -> SpMM), PQ token selection
    routed_mlp/            the routed two-layer MLP: spec, forward, backward, exact forward, compensation
    linear_cross_entropy/  the LM head and its loss in chunks

Kernels hold no state: what is fitted (routers, codebooks, clusters) lives in spt_compile/fitting/,
and what persists in the sites (spt_compile/sites/).
"""

import os


def triton_runs_on(device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: CUDA, or any device under
    TRITON_INTERPRET=1 (the interpreter the CPU tests use)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
