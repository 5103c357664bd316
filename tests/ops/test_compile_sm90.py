"""The block-sparse attention kernels compile for an H100/H200 (sm_90), checked on this CPU host.

The interpreter tests (tests/ops/triton_interpret) check what the kernels compute, but the interpreter
runs Python: a kernel can pass there and fail to compile for a GPU (a type that does not unify across
a branch, a name bound in only one constexpr branch, a shape tl.dot rejects). Here Triton's NVIDIA
backend compiles each kernel the launchers would launch, with the specialisation a real launch makes
(spt_compile.testing.compile_only); nothing runs. benchmarks/kernel_resources.py prints what each
binary needs.
"""

from __future__ import annotations

import pytest
import torch

from spt_compile.sparse_ops.attention import block_sparse_triton as bst
from spt_compile.testing.compile_only import available, compile_only

pytestmark = pytest.mark.skipif(not available(), reason="this Triton has no NVIDIA backend to compile with")

SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may ask for on an H100/H200


def compile_attention(H: int, Hkv: int, D: int, N: int, dtype=torch.bfloat16, causal=True, **switches) -> dict:
    """{kernel name: resources} of one forward + backward at these shapes, with block_sparse_triton's
    switches set."""
    before = {name: getattr(bst, name) for name in switches}
    try:
        for name, value in switches.items():
            setattr(bst, name, value)
        q = torch.zeros(1, H, N, D, dtype=dtype)
        k = v = torch.zeros(1, Hkv, N, D, dtype=dtype)
        idx = torch.zeros(1, Hkv, -(-N // 64), 4, dtype=torch.int32)
        with compile_only(bst) as built:
            out, lse = bst.block_sparse_forward_triton(q, k, v, idx, D**-0.5, causal, None, 64, 64)
            bst.block_sparse_backward_triton(out, q, k, v, idx, out, lse, D**-0.5, causal, None, 64, 64)
    finally:
        for name, value in before.items():
            setattr(bst, name, value)
    return {b.kernel: b.resources() for b in built}


@pytest.mark.parametrize("D, switches", [
    (64, {}),
    (80, {}),
    (80, {"SPLIT_HEAD_TILES": True}),
    (96, {"SPLIT_HEAD_TILES": True, "DKDV_WARPS": 8}),
    (64, {"PACK_GQA_DQ": True}),
], ids=lambda x: str(x))
def test_attention_kernels_compile_for_sm90(D: int, switches: dict):
    got = compile_attention(9, 3, D, 256, **switches)
    dq = "_bwd_dq_packed_kernel" if switches.get("PACK_GQA_DQ") else "_bwd_dq_kernel"
    assert set(got) == {"_fwd_kernel", dq, "_bwd_dkdv_kernel"}, got
    for name, r in got.items():
        assert 0 < r["shared_bytes"] <= SM90_SHARED_BYTES, (name, r)
        assert r["registers"] <= 255, (name, r)
    assert got["_fwd_kernel"]["spill_bytes"] == 0, got["_fwd_kernel"]  # the forward's accumulators fit
    if "DKDV_WARPS" in switches:
        assert got["_bwd_dkdv_kernel"]["warps"] == switches["DKDV_WARPS"]


def test_split_head_tiles_need_less_of_the_sm_at_d80():
    """At D 80 the split tiles (64 + 16) hold fewer columns than one padded to 128: less shared memory
    and fewer registers in every kernel."""
    padded = compile_attention(9, 3, 80, 256)
    split = compile_attention(9, 3, 80, 256, SPLIT_HEAD_TILES=True)
    for name in padded:
        assert split[name]["shared_bytes"] < padded[name]["shared_bytes"], (name, split[name], padded[name])
    assert split["_fwd_kernel"]["registers"] < padded["_fwd_kernel"]["registers"]
    assert split["_bwd_dq_kernel"]["registers"] < padded["_bwd_dq_kernel"]["registers"]


def test_compile_only_restores_the_module():
    kernel = bst._fwd_kernel
    compile_attention(1, 1, 64, 64)
    assert bst._fwd_kernel is kernel and not kernel.device_caches  # launches compile no more after it
