"""Runs the Triton kernel tests (tests/ops/triton_interpret) on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and this process may already have
imported it (or must not, for the other tests), so each file of the folder runs in a fresh interpreter.
tests/conftest.py keeps it out of this process's collection unless the variable is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


INTERPRETED = sorted(p.name for p in (REPO / "tests" / "ops" / "triton_interpret").glob("test_*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("test_file", INTERPRETED)
def test_triton_kernels_under_interpreter(test_file):
    # One subprocess a file: under pytest-xdist (the README's test command) the files spread over the
    # workers instead of one worker running all of them (18 minutes on this CPU) alone.
    env = dict(os.environ, TRITON_INTERPRET="1")
    path = f"tests/ops/triton_interpret/{test_file}"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"{path} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert " passed" in proc.stdout, proc.stdout  # it ran tests, rather than collecting none


def test_every_interpreted_file_is_run():
    assert len(INTERPRETED) >= 6, INTERPRETED  # the glob found the folder (it holds six files today)
