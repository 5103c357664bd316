"""The LM head and its cross-entropy in chunks (chunked.py), and its dense reference (reference.py)."""

from .chunked import REDUCTIONS, can_precompute, check_inputs, linear_cross_entropy

__all__ = ["REDUCTIONS", "can_precompute", "check_inputs", "linear_cross_entropy"]
