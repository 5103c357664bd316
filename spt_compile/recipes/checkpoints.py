"""Checkpoints written so that a crash at any moment leaves the previous one whole."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomically(state: dict, path: Path) -> None:
    """Old checkpoint or new one, never half of one: write aside, sync to disk, rename over."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file either
    os.replace(tmp, path)
