"""Host counts of an MLP site's row masks (real tokens, rows that carry a loss), once per step."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import mask_memo


class RowCounts(NamedTuple):
    """How many rows of an MLP input [T, d] are real tokens, carry a loss, and both (host ints)."""

    real: int
    loss: int
    loss_real: int


def row_counts(T: int, real: Optional[Tensor], loss_rows: Optional[Tensor]) -> RowCounts:
    """The counts of an MLP site's [T] row masks (None: every row real / no row carries a loss, as the
    site sees them after rows_of), read in one device-to-host transfer once per step: every layer
    gets the same mask tensors, and mask_memo keeps the counts beside the loss-row mask (else the
    real-row one). They size the grouped MLP's pairs without a sync per layer."""
    if real is None and loss_rows is None:
        return RowCounts(T, 0, 0)

    def count() -> RowCounts:
        loss = loss_rows if loss_rows is not None else torch.zeros(T, dtype=torch.bool, device=real.device)
        both = loss if real is None else loss & real
        n_real = torch.full((), T, device=loss.device) if real is None else real.sum()
        return RowCounts(*torch.stack([n_real, loss.sum(), both.sum()]).tolist())  # the one sync

    anchor = real if loss_rows is None else loss_rows
    other = None if (real is None or anchor is real) else (real.data_ptr(), real.shape, real._version)
    return mask_memo.memo(anchor, ("row_counts", T, other), count)
