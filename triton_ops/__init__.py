"""Kernels of the two sparse ops, their plain references and CPU paths.

Installed as spt_compile.triton_ops. Every fast op has a reference with the same signature in
reference.py. (This first version holds the plain PyTorch paths; Triton kernels join them here.)
"""
