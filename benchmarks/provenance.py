"""Which source a benchmark ran: recorded in every JSON of record, so a number can be traced to code."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def source_commit() -> Optional[str]:
    """The checkout's short commit, with "-dirty" when tracked files differ from it; None outside git
    (e.g. the GPU machine's copy of the working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True,
                               timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")
