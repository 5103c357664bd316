"""The GPU path's host overhead (Triton kernels, run by the interpreter): launches per call do not
grow with the sequence, and no call syncs. Runs only under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_census import _census, _compiled, _inputs  # noqa: E402


def test_triton_attention_launches_do_not_grow_with_the_sequence():
    """The GPU path (Triton kernels): forward + backward of a causal training call launch the same
    number of kernels at every length, and sync nothing."""
    launches = {}
    for N in (128, 256):
        compiled = _compiled("triton", block=32)
        for _ in range(2):
            q, k, v, mask, causal = _inputs("causal", 1, N)
            compiled(q, k, v, mask, causal).sum().backward()
        q, k, v, mask, causal = _inputs("causal", 1, N)
        c = _census(compiled, q, k, v, mask, causal, training=True)
        assert c.syncs == 0, c.summary()
        launches[N] = c.launches
    assert launches[128] == launches[256], launches
    assert launches[128] <= 16, launches
