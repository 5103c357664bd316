"""Runs the Triton kernel tests (tests/ops/triton_interpret) on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and this process may already have
imported it (or must not, for the other tests), so the folder runs in a fresh interpreter.
tests/conftest.py keeps it out of this process's collection unless the variable is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/triton_interpret"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"tests/ops/triton_interpret failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert " passed" in proc.stdout, proc.stdout  # it ran tests, rather than collecting none
