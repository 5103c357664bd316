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


def _machine_paths() -> list[tuple[str, str]]:
    """(path, placeholder) pairs, longest first: where this machine keeps the data, the packages, the
    checkout and temporary files. Records name these by placeholder, never by path."""
    import os
    import site
    import sys
    import tempfile

    pairs = []
    data = os.environ.get("SPT_DATA_DIR")
    for root in filter(None, [data, str(REPO.parent / "shared" / "data")]):
        pairs.append((str(Path(root).resolve()), "<data>"))
        pairs.append((root.rstrip("/"), "<data>"))
    for packages in site.getsitepackages() + [site.getusersitepackages()]:
        pairs.append((packages, "<site-packages>"))
    pairs += [(sys.prefix, "<python>"), (str(REPO), "<repo>"), (tempfile.gettempdir(), "<tmp>"),
              (str(Path.home()), "~")]
    return sorted({p: r for p, r in pairs if p and p != "/"}.items(), key=lambda pr: -len(pr[0]))


def scrub_paths(obj):
    """obj (JSON-like: dicts, lists, strings) with every machine path replaced by its placeholder."""
    pairs = _machine_paths()

    def scrub(v):
        if isinstance(v, str):
            for path, placeholder in pairs:
                v = v.replace(path, placeholder)
            return v
        if isinstance(v, dict):
            return {scrub(k): scrub(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [scrub(x) for x in v]
        return v

    return scrub(obj)


def cpu_model() -> Optional[str]:
    """The CPU's model name and its widest vector/matrix extensions, e.g. "Intel(R) Xeon(R) Processor
    (avx512f, amx_bf16)": this machine's CPU differs between sessions, and fp32 GEMM speed with it, so
    ratios of spt to dense move with it too; a record names what it ran on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(wide)})" if name else None
