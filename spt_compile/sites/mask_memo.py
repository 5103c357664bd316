"""Facts about an attention mask, computed once per mask tensor and shared by every layer that reads it.

Every layer of a step gets the same mask tensor, in forward and in backward. What the attention site
needs from it (whether it is the causal triangle, which keys are real, each row's length, whether a
row packs several sequences) costs a host-device sync on a GPU: a compare, a `.cpu()`, a `bool()`.
Kept beside a weak reference to the mask, each fact costs its sync once per mask, i.e. once per step,
instead of once per layer and direction (issue 19: mask analysis at most one sync per step).

A mask changed in place (its version counter moved) or freed drops its facts. Inference tensors keep
no version counter: their facts are computed on every call. A change made through an alias that does
not share the mask's version counter (`.data`) is not seen; nothing in a traced graph does that.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

from torch import Tensor

# (data pointer, shape, strides, dtype, device) -> (the mask that made the entry, its version, facts).
# Keyed by where the data is, not by the tensor object: the backward graph gets the same mask as a new
# alias (aot_autograd strips a view), which must find the forward's facts. While the entry's mask is
# alive its storage cannot be reused, so the same key means the same elements.
_MEMO: dict[tuple, tuple[weakref.ref, int, dict]] = {}


def _forget(key: tuple, ref: weakref.ref) -> None:
    entry = _MEMO.get(key)
    if entry is not None and entry[0] is ref:
        del _MEMO[key]


def memo(mask: Tensor, fact: Hashable, compute: Callable[[], Any]) -> Any:
    """compute() once per (mask data, version, fact); later calls return the kept value."""
    try:
        version = mask._version
    except RuntimeError:  # an inference tensor: no version counter, no memo
        return compute()
    key = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype, mask.device)
    entry = _MEMO.get(key)
    owner = None if entry is None else entry[0]()
    if owner is None or owner._version != entry[1] or version != entry[1]:
        ref = weakref.ref(mask, lambda r, k=key: _forget(k, r))
        entry = _MEMO[key] = (ref, version, {})
    facts = entry[2]
    if fact not in facts:
        facts[fact] = compute()
    return facts[fact]
