"""Facts about an attention mask, computed once per mask tensor and shared by every layer that reads it.

Every layer of a step gets the same mask tensor, in forward and in backward. What the attention site
needs from it (whether it is the causal triangle, which keys are real, each row's length, whether a
row packs several sequences) costs a host-device sync on a GPU: a compare, a `.cpu()`, a `bool()`.
Kept beside a weak reference to the mask, each fact costs its sync once per mask, i.e. once per step,
instead of once per layer and direction (issue 19: mask analysis at most one sync per step).

A mask changed in place (the version counter of the tensor the facts were computed from moved, while
that tensor lives) or freed (every alias of its storage gone) drops its facts. Inference tensors keep
no version counter: their facts are computed on every call. A change made through an alias that does
not share the mask's version counter (`.data`), or after the tensor that made the entry is gone
while an alias keeps the storage, is not seen; nothing in a traced graph does that (facts that
depend on a tensor whose version must be checked, such as trained weights, put it in their key).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

from torch import Tensor

# (data pointer, shape, strides, dtype, device) -> (the entry's storage, the tensor that made it, its
# version then, facts). Keyed by where the data is, not by the tensor object: the backward graph gets
# the same mask as a new alias (aot_autograd strips a view), made after the forward's tensor object is
# gone, and must find the forward's facts. The entry lives as long as the storage (any alias keeps it);
# while it lives its memory cannot be reused, so the same key means the same elements, unless the
# tensor that made the entry changed in place (its version moved).
_MEMO: dict[tuple, tuple[weakref.ref, weakref.ref, int, dict]] = {}


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
    valid = entry is not None and entry[0]() is not None
    if valid:
        maker = entry[1]()
        valid = (maker._version == entry[2]) if maker is not None else True
    if not valid:
        storage = weakref.ref(mask.untyped_storage(), lambda r, k=key: _forget(k, r))
        entry = _MEMO[key] = (storage, weakref.ref(mask), version, {})
    facts = entry[3]
    if fact not in facts:
        facts[fact] = compute()
    return facts[fact]
