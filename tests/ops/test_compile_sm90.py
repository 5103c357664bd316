"""Every Triton kernel of the package compiles for an H100/H200 (sm_90), checked on this CPU host:
block-sparse attention (default, split head tiles, packed dq, 8-warp dk/dv), block selection, the
chunked loss and the routed MLP.

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
from spt_compile.testing.compile_only import available, compile_only, module_settings

pytestmark = pytest.mark.skipif(not available(), reason="this Triton has no NVIDIA backend to compile with")

SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may ask for on an H100/H200


def compile_attention(H: int, Hkv: int, D: int, N: int, dtype=torch.bfloat16, causal=True, **switches) -> dict:
    """{kernel name: resources} of one forward + backward at these shapes, with block_sparse_triton's
    switches set."""
    q = torch.zeros(1, H, N, D, dtype=dtype)
    k = v = torch.zeros(1, Hkv, N, D, dtype=dtype)
    idx = torch.zeros(1, Hkv, -(-N // 64), 4, dtype=torch.int32)
    with module_settings(bst, **switches), compile_only(bst) as built:
        out, lse = bst.block_sparse_forward_triton(q, k, v, idx, D**-0.5, causal, None, 64, 64)
        bst.block_sparse_backward_triton(out, q, k, v, idx, out, lse, D**-0.5, causal, None, 64, 64)
    return {b.kernel: b.resources() for b in built}


@pytest.mark.parametrize("D, switches", [
    (64, {}),
    (80, {}),
    (80, {"SPLIT_HEAD_TILES": True}),
    (96, {"SPLIT_HEAD_TILES": True, "DKDV_LAUNCH": bst.DKDV_UNSPILLED}),
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
    if "DKDV_LAUNCH" in switches:
        assert got["_bwd_dkdv_kernel"]["warps"] == switches["DKDV_LAUNCH"]["num_warps"]
        assert got["_bwd_dkdv_kernel"]["stages"] == switches["DKDV_LAUNCH"]["num_stages"]


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


def test_selection_and_loss_kernels_compile_for_sm90():
    from spt_compile.sparse_ops.attention import select_triton
    from spt_compile.sparse_ops.linear_cross_entropy import triton as loss_triton

    q, k = torch.zeros(1, 9, 512, 64, dtype=torch.bfloat16), torch.zeros(1, 3, 512, 64, dtype=torch.bfloat16)
    C, V = 64, 49152  # SmolLM2's vocabulary
    z, y = torch.zeros(C, V, dtype=torch.bfloat16), torch.zeros(C, dtype=torch.int64)
    with compile_only(select_triton, loss_triton) as built:
        select_triton.select_key_blocks_triton(q, k, 0.125, torch.tensor([3]), True, None, None, 64, 64)
        loss_triton.chunk_cross_entropy_triton(z, y, -100, 0.0, torch.ones(C), torch.empty(C), torch.empty(C), z)
    assert {b.kernel for b in built} == {"_pool_kernel", "_select_kernel", "_ce_rows_kernel"}
    for b in built:
        assert b.resources()["shared_bytes"] <= SM90_SHARED_BYTES, (b.kernel, b.resources())


def compile_routed_mlp(tiles, permuted: bool = False) -> dict:
    """{kernel: the most spilled bytes of its launches} of the Triton routed MLP's forward and backward
    with these tiles: SmolLM2's SwiGLU MLP with LoRA on every projection, bf16, 4 blocks of which 2 per
    token (permuted: its units in a clustering's order, read in place); every launch's shared memory
    checked."""
    from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights
    from spt_compile.sparse_ops.routed_mlp import triton as mlp_triton

    T, d, F, r = 256, 576, 1536, 8
    z = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)  # noqa: E731
    w = MlpWeights(in_w=z(F, d), in_b=None, in_a=z(r, d), in_bb=z(F, r), gate_w=z(F, d), gate_b=None,
                   gate_a=z(r, d), gate_bb=z(F, r), out_w=z(d, F), out_b=None, out_a=z(r, F), out_bb=z(d, r))
    spec = MlpSpec("silu", True, F, 4)
    mask = torch.zeros(T, 4, dtype=torch.bool)
    mask[torch.arange(T), torch.arange(T) % 4] = mask[torch.arange(T), (torch.arange(T) + 1) % 4] = True
    x = z(T, d)
    needs = MlpWeights(*[name.endswith(("_a", "_bb")) for name in MlpWeights._fields])
    with compile_only(mlp_triton) as built:
        perm = torch.arange(F).flip(0) if permuted else None
        y, pre, counts = mlp_triton.routed_mlp_forward_triton(x, w, spec, mask, None, tiles, perm=perm)
        mlp_triton.routed_mlp_backward_triton(y, x, w, spec, mask, True, needs, pre, counts, None, tiles, perm=perm)
    spills: dict = {}
    for b in built:
        r = b.resources()
        assert r["shared_bytes"] <= SM90_SHARED_BYTES, (b.kernel, r)
        spills[b.kernel] = max(spills.get(b.kernel, 0), r["spill_bytes"])
    return spills


def test_routed_mlp_kernels_compile_for_sm90(monkeypatch):
    """The opt-in Triton routed MLP (ffn_impl="triton") at its bf16 CUDA tiles, 128 x 128 (the default)
    and 128 x 64 (CUDA_BLOCK_N = 64): all four kernels compile, and the narrower tiles spill less in
    the dh kernel, whose epilogue holds five tiles of the block's width."""
    from spt_compile.sparse_ops.routed_mlp import triton as mlp_triton

    monkeypatch.setattr(mlp_triton, "triton_runs_on", lambda device: True)  # its CUDA-only check: nothing runs
    wide = compile_routed_mlp(mlp_triton.Tiles(block_n=128))
    narrow = compile_routed_mlp(mlp_triton.Tiles(block_n=64))
    assert set(wide) == set(narrow) == {"_up_kernel", "_scatter_kernel", "_dh_kernel", "_wgrad_kernel"}, wide
    assert narrow["_dh_kernel"] < wide["_dh_kernel"], (narrow, wide)
    permuted = compile_routed_mlp(mlp_triton.Tiles(block_n=64), permuted=True)  # the site's calls, clustered
    assert set(permuted) == set(narrow), permuted
