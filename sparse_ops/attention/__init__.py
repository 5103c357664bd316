"""Sparse attention kernels.

    select.py, select_triton.py              which key blocks each query block reads (block selection)
    block_sparse.py, block_sparse_triton.py  exact attention over the selected key blocks (torch path and
                                             implementation choice; Triton kernels)
    pq.py, token_sparse.py                   PQ-guided selection of single keys, and attention over them
    exact_dropout.py                         exact attention with dropout, masks drawn from a seed (CPU)
    softcap.py                               soft-capped scores (Gemma-2): cap * tanh(s / cap) and its slope
    reference.py                             the plain references every path is tested against
"""
