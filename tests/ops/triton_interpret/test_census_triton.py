"""The GPU path's host overhead (Triton kernels, run by the interpreter): launches per call do not
grow with the sequence, and no call syncs. Runs only under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_census import _census, _compiled, _inputs  # noqa: E402


def _steady_launches(N: int, block: int) -> int:
    """Launches of a causal training call of the Triton path at length N after two warm calls; no sync."""
    compiled = _compiled("triton", block=block)
    for _ in range(2):
        q, k, v, mask, causal = _inputs("causal", 1, N)
        compiled(q, k, v, mask, causal).sum().backward()
    q, k, v, mask, causal = _inputs("causal", 1, N)
    c = _census(compiled, q, k, v, mask, causal, training=True)
    assert c.syncs == 0, c.summary()
    return c.launches


def test_triton_attention_launches_do_not_grow_with_the_sequence():
    """The GPU path (Triton kernels): forward + backward of a causal training call launch the same
    number of kernels at every length, and sync nothing."""
    launches = {N: _steady_launches(N, 32) for N in (128, 256)}
    assert launches[128] == launches[256], launches
    assert launches[128] <= 16, launches


def test_long_rows_stay_on_triton_without_sync(monkeypatch):
    """Past the key blocks one selection program holds (256, lowered to 16 here so the interpreter
    can run it), the selection stays on Triton (_long_score_kernel + one top-k): still no sync, and
    the same launches at two lengths that are both past the limit."""
    from spt_compile.sparse_ops.attention import select_triton

    monkeypatch.setattr(select_triton, "MAX_KEY_BLOCKS", 16)
    ran = []
    long_kernel = select_triton._select_long
    monkeypatch.setattr(select_triton, "_select_long", lambda *a: ran.append(1) or long_kernel(*a))
    launches = {N: _steady_launches(N, 16) for N in (288, 416)}  # 18 and 26 key blocks of 16
    assert ran, "the long-row selection ran"
    assert launches[288] == launches[416], launches
