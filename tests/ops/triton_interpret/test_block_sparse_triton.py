"""Block-sparse Triton attention vs block_sparse_attention_reference: out, lse, dq, dk, dv.

Runs only under TRITON_INTERPRET=1 (tests/conftest.py skips this folder otherwise;
tests/ops/test_triton_interpret.py runs it in a subprocess with the variable set). The helpers follow
their inputs' device, so a GPU script can feed check_case CUDA tensors. The interpreter is
slow (a 257-row, 3-head case takes seconds), so the shapes are small and awkward rather than big, and
the cases below cover each axis without taking the full cartesian product.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from spt_compile.sparse_ops.attention.block_sparse_triton import (
    block_sparse_backward_triton,
    block_sparse_forward_triton,
)
from spt_compile.sparse_ops.attention.pq import MASK_FORBIDDEN_AT_OR_BELOW
from spt_compile.sparse_ops.attention.reference import block_sparse_attention_reference


@pytest.fixture(autouse=True)
def split_dkdv(monkeypatch):
    """The cases here are small, so by default each would run the dk/dv kernel's direct mode (one
    program per key block, DIRECT_UP_TO_HEAD_BLOCKS); these tests check the split mode (fp32 atomics
    across programs), the deterministic tests and test_short_columns_run_direct the direct one."""
    from spt_compile.sparse_ops.attention import block_sparse_triton

    monkeypatch.setattr(block_sparse_triton, "DIRECT_UP_TO_HEAD_BLOCKS", 0)


@dataclass(frozen=True)
class Case:
    N: int
    D: int
    Dv: int
    H: int
    Hkv: int
    causal: bool
    block_m: int
    block_n: int
    bias: Optional[str]  # None, "pad" ([B, 1, 1, Nk] key padding) or "mask" ([B, 1, N, Nk] additive)
    Lb: int

    def __str__(self) -> str:
        return (f"N{self.N}-D{self.D}-Dv{self.Dv}-H{self.H}:{self.Hkv}-{'causal' if self.causal else 'full'}"
                f"-bm{self.block_m}-bn{self.block_n}-{self.bias}-Lb{self.Lb}")


# Every N in {1, 17, 100, 257} appears causal and not; D 64/80, GQA 3:1 (and one 4:2), both block
# shapes, all bias kinds and Lb above the number of key blocks are spread across them.
CASES = [
    Case(1, 64, 64, 1, 1, False, 16, 16, None, 3),
    Case(1, 80, 80, 3, 1, True, 32, 16, "pad", 2),
    Case(17, 80, 80, 1, 1, False, 16, 16, "mask", 4),
    Case(17, 64, 64, 3, 1, True, 32, 16, None, 3),
    Case(17, 80, 64, 4, 2, False, 32, 16, "pad", 3),
    Case(100, 64, 64, 3, 1, False, 32, 16, "pad", 5),
    Case(100, 80, 80, 1, 1, True, 16, 16, "mask", 9),
    Case(100, 80, 64, 3, 1, True, 16, 16, "pad", 4),
    Case(257, 80, 80, 1, 1, False, 32, 16, "mask", 6),
    Case(257, 64, 64, 3, 1, True, 16, 16, "pad", 4),
    Case(257, 64, 80, 1, 1, True, 32, 16, None, 20),
    Case(257, 80, 80, 3, 1, False, 32, 16, "mask", 5),
    Case(100, 64, 64, 4, 2, True, 32, 16, "mask", 3),
    # Every key block listed by ~40 (head, query block) pairs: dk/dv work items split each list.
    Case(257, 64, 64, 3, 1, False, 16, 16, None, 17),
    # 16 query heads per kv head: one query block per dk/dv program; key blocks wider than query
    # blocks, so the causal start of each key block's query blocks is not a multiple of a piece.
    Case(100, 64, 64, 16, 1, True, 16, 32, "pad", 3),
]

B = 2


def random_block_idx(B: int, H: int, Mb: int, Nb: int, Lb: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [B, H, Mb, Lb]: distinct key blocks per row in random slots, about a quarter of the slots
    -1, some rows all -1, and -1 padding wherever Lb exceeds the Nb key blocks."""
    picked = torch.rand(B, H, Mb, Nb, generator=gen).argsort(-1)[..., :Lb]  # distinct per row
    idx = torch.full((B, H, Mb, Lb), -1, dtype=torch.int64)
    idx[..., : picked.shape[-1]] = picked
    idx[torch.rand(B, H, Mb, Lb, generator=gen) < 0.25] = -1
    idx[torch.rand(B, H, Mb, generator=gen) < 0.15] = -1  # whole rows with nothing listed
    slots = torch.rand(B, H, Mb, Lb, generator=gen).argsort(-1)  # move the -1s to random slots
    idx = torch.gather(idx, -1, slots)
    # Surely one empty row and two that list key block 0 (so N = 1 has both kinds too); the first
    # query block of (0, 0) meets make_bias's all-threshold row there.
    idx[0, 0, -1] = -1
    idx[-1, -1, 0] = -1
    idx[-1, -1, 0, -1] = 0
    if Mb > 1:
        idx[0, 0, 0] = torch.where(idx[0, 0, 0] == 0, -1, idx[0, 0, 0])
        idx[0, 0, 0, 0] = 0
    return idx.to(torch.int32)


def make_bias(kind: Optional[str], N: int, Nk: int, dtype: torch.dtype, gen: torch.Generator) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    neg = torch.finfo(dtype).min
    if kind == "pad":  # the second sequence is padded: its last third of keys are forbidden
        bias = torch.zeros(B, 1, 1, Nk)
        bias[1, ..., Nk - Nk // 3 :] = neg
        return bias.to(dtype)
    # An explicit additive mask: mostly small finite values, with finfo.min, -inf and exactly the
    # forbidding threshold (-1e4, forbidden) sprinkled in.
    bias = 0.5 * torch.randn(B, 1, N, Nk, generator=gen)
    u = torch.rand(B, 1, N, Nk, generator=gen)
    bias[u < 0.10] = neg
    bias[(u >= 0.10) & (u < 0.15)] = float("-inf")
    bias[(u >= 0.15) & (u < 0.18)] = MASK_FORBIDDEN_AT_OR_BELOW
    bias[0, 0, 0] = MASK_FORBIDDEN_AT_OR_BELOW  # a row with only threshold values must come out empty
    return bias.to(dtype)


def reference_lse(q, k, block_idx, scale, causal, bias, block_m, block_n, softcap=0.0) -> torch.Tensor:
    """Natural-log log-sum-exp [B, H, N] of the reference's allowed scores (same masking rules)."""
    Bq, H, N, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    n_kb = -(-Nk // block_n)
    dev = q.device
    block_idx = block_idx.repeat_interleave(H // block_idx.shape[1], dim=1)  # grouped lists: per head
    listed = torch.zeros(Bq, H, block_idx.shape[2], n_kb + 1, dtype=torch.bool, device=dev)
    listed.scatter_(-1, torch.where(block_idx < 0, n_kb, block_idx).long(), True)
    allowed = listed[:, :, torch.arange(N, device=dev) // block_m][..., torch.arange(Nk, device=dev) // block_n]
    if causal:
        allowed &= torch.arange(Nk, device=dev).view(1, -1) <= torch.arange(N, device=dev).view(-1, 1)
    s = q.double() @ k.repeat_interleave(H // Hkv, dim=1).double().transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.double()
        allowed &= bias > MASK_FORBIDDEN_AT_OR_BELOW
    return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1).float()


def make_inputs(c: Case, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, c.H, c.N, c.D, generator=gen).to(dtype)
    k = torch.randn(B, c.Hkv, c.N, c.D, generator=gen).to(dtype)
    v = torch.randn(B, c.Hkv, c.N, c.Dv, generator=gen).to(dtype)
    Mb, Nb = -(-c.N // c.block_m), -(-c.N // c.block_n)
    block_idx = random_block_idx(B, c.H, Mb, Nb, c.Lb, gen)
    bias = make_bias(c.bias, c.N, c.N, dtype, gen)
    dout = torch.randn(B, c.H, c.N, c.Dv, generator=gen).to(dtype)
    return q, k, v, block_idx, bias, dout


def reference_grads(q, k, v, block_idx, scale, causal, bias, block_m, block_n, dout, softcap=0.0):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention_reference(q, k, v, block_idx, scale, causal, bias, block_m, block_n, softcap)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), dq, dk, dv


def check_case(c: Case, q, k, v, block_idx, bias, dout, atol: float, rtol: float, softcap: float = 0.0) -> None:
    scale = c.D**-0.5
    out, lse = block_sparse_forward_triton(q, k, v, block_idx, scale, c.causal, bias, c.block_m, c.block_n,
                                           softcap=softcap)
    assert out.dtype == q.dtype and out.shape == (B, c.H, c.N, c.Dv)
    assert lse.dtype == torch.float32 and lse.shape == (B, c.H, c.N)
    ref_out, ref_dq, ref_dk, ref_dv = reference_grads(q, k, v, block_idx, scale, c.causal, bias, c.block_m, c.block_n,
                                                      dout, softcap)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)

    ref_lse = reference_lse(q, k, block_idx, scale, c.causal, bias, c.block_m, c.block_n, softcap)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly for the rows with no allowed key"
    assert torch.all(out[empty] == 0)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=atol, rtol=rtol)

    dq, dk, dv = block_sparse_backward_triton(dout, q, k, v, block_idx, out, lse, scale, c.causal, bias, c.block_m,
                                              c.block_n, softcap=softcap)
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)
    for name, got, want in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_matches_reference_fp32(c: Case):
    q, k, v, block_idx, bias, dout = make_inputs(c, torch.float32, seed=zlib.crc32(str(c).encode()))
    # The masks must actually bite: some rows empty, some not.
    lse_ref = reference_lse(q, k, block_idx, c.D**-0.5, c.causal, bias, c.block_m, c.block_n)
    assert torch.isneginf(lse_ref).any() and torch.isfinite(lse_ref).any()
    check_case(c, q, k, v, block_idx, bias, dout, atol=1e-4, rtol=1e-4)


SOFTCAP_CASES = [  # (case, dk/dv kernel mode, packed GQA dq)
    (Case(100, 80, 80, 3, 1, True, 16, 16, "mask", 4), "split", False),
    (Case(100, 64, 64, 4, 2, False, 32, 16, "pad", 3), "direct", True),
    (Case(17, 64, 64, 3, 1, True, 32, 16, None, 3), "direct", False),
]


@pytest.mark.parametrize("c, mode, packed", SOFTCAP_CASES, ids=str)
def test_soft_capped_scores_match_reference(c: Case, mode: str, packed: bool, monkeypatch):
    """Gemma-2's cap * tanh(scores / cap) before the bias: forward, lse and every gradient (through the
    cap's slope) as the reference's, in each dk/dv mode and in the packed GQA dq kernel. The scores
    are scaled up so that the cap bites (most |scores| beyond the cap's linear range)."""
    from spt_compile.sparse_ops.attention import block_sparse_triton

    if mode == "direct":
        monkeypatch.setattr(block_sparse_triton, "DIRECT_UP_TO_HEAD_BLOCKS", 10**6)
    monkeypatch.setattr(block_sparse_triton, "PACK_GQA_DQ", packed)
    q, k, v, block_idx, bias, dout = make_inputs(c, torch.float32, seed=11)
    q = q * 6.0
    raw = reference_lse(q, k, block_idx, c.D**-0.5, c.causal, None, c.block_m, c.block_n)
    capped = reference_lse(q, k, block_idx, c.D**-0.5, c.causal, None, c.block_m, c.block_n, softcap=2.0)
    assert (raw - capped)[torch.isfinite(raw)].abs().max() > 1.0, "the cap must change the scores"
    check_case(c, q, k, v, block_idx, bias, dout, atol=1e-4, rtol=1e-4, softcap=2.0)


HALF_CASES = [
    (torch.bfloat16, Case(100, 80, 80, 3, 1, True, 32, 16, "mask", 5)),
    (torch.float16, Case(33, 64, 64, 2, 1, False, 16, 16, "pad", 3)),
    # bf16 rounds the threshold -1e4 to -9984: a bias of -9984 must still forbid (as in the reference).
    (torch.bfloat16, Case(130, 80, 80, 3, 1, True, 64, 64, "mask", 3)),
]


@pytest.mark.parametrize("dtype, c", HALF_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference_half(dtype: torch.dtype, c: Case):
    q, k, v, block_idx, bias, dout = make_inputs(c, dtype, seed=7)
    # p and ds are rounded to the input dtype before each tl.dot (as on tensor cores): allow that error.
    check_case(c, q, k, v, block_idx, bias, dout, atol=3e-2, rtol=3e-2)


def test_strided_views():
    """Inputs as the callers may pass them: transposed [B, N, H, D] storage, a broadcast bias view and
    a non-contiguous block_idx; results match those of contiguous copies exactly."""
    c = Case(40, 80, 80, 3, 1, True, 16, 16, "pad", 3)
    q, k, v, block_idx, bias, dout = make_inputs(c, torch.float32, seed=3)
    tq, tk, tv, tdo = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, dout))
    tidx = block_idx.transpose(-1, -2).contiguous().transpose(-1, -2)
    tbias = bias.expand(B, c.H, c.N, c.N)  # strides (.., 0, 0, ..) on the broadcast dims
    assert not tq.is_contiguous() and not tidx.is_contiguous()
    scale = c.D**-0.5
    out, lse = block_sparse_forward_triton(q, k, v, block_idx, scale, True, bias, 16, 16)
    tout, tlse = block_sparse_forward_triton(tq, tk, tv, tidx, scale, True, tbias, 16, 16)
    torch.testing.assert_close(tout, out, atol=0, rtol=0)
    torch.testing.assert_close(tlse, lse, atol=0, rtol=0)
    grads = block_sparse_backward_triton(dout, q, k, v, block_idx, out, lse, scale, True, bias, 16, 16)
    tgrads = block_sparse_backward_triton(tdo, tq, tk, tv, tidx, tout.transpose(1, 2).contiguous().transpose(1, 2),
                                          tlse, scale, True, tbias, 16, 16)
    for g, tg in zip(grads, tgrads):
        torch.testing.assert_close(tg, g, atol=0, rtol=0)
    _, ref_dq, _, _ = reference_grads(q, k, v, block_idx, scale, True, bias, 16, 16, dout)
    torch.testing.assert_close(tgrads[0], ref_dq, atol=1e-4, rtol=1e-4)


def test_no_slots_gives_zeros():
    """Lb = 0: every row is empty: out 0, lse -inf, all gradients 0 (no kernel sees an empty tensor)."""
    q, k, v = torch.randn(1, 2, 20, 64), torch.randn(1, 1, 20, 64), torch.randn(1, 1, 20, 64)
    block_idx = torch.zeros(1, 2, 2, 0, dtype=torch.int32)
    out, lse = block_sparse_forward_triton(q, k, v, block_idx, 0.125, False, None, 16, 16)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    grads = block_sparse_backward_triton(torch.randn_like(out), q, k, v, block_idx, out, lse, 0.125, False, None, 16, 16)
    assert all(torch.all(g == 0) and g.shape == t.shape for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("block_m, block_n", [(8, 16), (16, 24), (48, 16)])
def test_rejects_bad_block_sizes(block_m: int, block_n: int):
    q = torch.randn(1, 1, 8, 64)
    block_idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_forward_triton(q, q, q, block_idx, 0.125, False, None, block_m, block_n)


GROUPED_CASES = [
    Case(100, 64, 64, 3, 1, True, 16, 16, "pad", 4),
    Case(257, 80, 80, 4, 2, False, 32, 16, "mask", 5),
    Case(257, 64, 64, 3, 1, False, 16, 16, None, 17),  # long lists: work items split each pair's heads
]


@pytest.mark.parametrize("c", GROUPED_CASES, ids=str)
def test_grouped_lists(c: Case):
    """One list per GQA group ([B, Hkv, Mb, Lb], what block selection returns): the kernels read it
    for each query head of the group, with the results of the per-head expansion and the reference."""
    q, k, v, _, bias, dout = make_inputs(c, torch.float32, seed=11)
    gen = torch.Generator().manual_seed(12)
    grouped = random_block_idx(B, c.Hkv, -(-c.N // c.block_m), -(-c.N // c.block_n), c.Lb, gen)
    per_head = grouped.repeat_interleave(c.H // c.Hkv, dim=1)
    check_case(c, q, k, v, grouped, bias, dout, atol=1e-4, rtol=1e-4)  # against the reference (per-head lists)
    scale = c.D**-0.5
    out, lse = block_sparse_forward_triton(q, k, v, grouped, scale, c.causal, bias, c.block_m, c.block_n)
    out_h, lse_h = block_sparse_forward_triton(q, k, v, per_head, scale, c.causal, bias, c.block_m, c.block_n)
    torch.testing.assert_close(out, out_h, atol=0, rtol=0)
    g = block_sparse_backward_triton(dout, q, k, v, grouped, out, lse, scale, c.causal, bias, c.block_m, c.block_n)
    g_h = block_sparse_backward_triton(dout, q, k, v, per_head, out, lse, scale, c.causal, bias, c.block_m, c.block_n)
    for a, b_ in zip(g, g_h):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)  # dk/dv: atomics sum in another order


def test_rejects_lists_that_span_kv_heads():
    q, k = torch.randn(1, 4, 16, 64), torch.randn(1, 2, 16, 64)
    with pytest.raises(ValueError, match="block_idx must be"):
        block_sparse_forward_triton(q, k, k, torch.zeros(1, 1, 1, 1, dtype=torch.int32), 0.125, False, None, 16, 16)


class _GridSpy:
    """Stands in for a Triton kernel: records each launch's grid, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


DETERMINISTIC_CASES = [  # (case, dtype): the interpreter is slow, so each case runs in one dtype
    (Case(100, 80, 64, 3, 1, True, 16, 16, "pad", 4), torch.bfloat16),
    (Case(257, 64, 64, 3, 1, False, 16, 16, None, 17), torch.float32),  # every key block listed by ~40 pairs
    (Case(100, 64, 64, 16, 1, True, 16, 32, "mask", 3), torch.float32),
]


@pytest.mark.parametrize("c, dtype", DETERMINISTIC_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_deterministic_mode_gives_each_key_block_one_program(c: Case, dtype: torch.dtype, deterministic, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the dk/dv kernel runs one program per key block
    (the grid's second axis is 1: nothing is summed across programs with atomics) and stores dk, dv in
    the inputs' dtype, with the reference's values; the default split's grid differs in these cases
    (long lists, GQA 3:1, 16 heads per kv head), so the mode is what changed the grid."""
    from spt_compile.sparse_ops.attention import block_sparse_triton

    spy = _GridSpy(block_sparse_triton._bwd_dkdv_kernel)
    monkeypatch.setattr(block_sparse_triton, "_bwd_dkdv_kernel", spy)
    q, k, v, block_idx, bias, dout = make_inputs(c, dtype, seed=21)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    check_case(c, q, k, v, block_idx, bias, dout, atol=tol, rtol=tol)
    Nb, Mb = -(-c.N // c.block_n), -(-c.N // c.block_m)
    assert spy.grids and all(g == (B * c.Hkv * Nb, 1) for g in spy.grids), spy.grids
    assert Mb > block_sparse_triton.HEAD_BLOCKS_PER_PROGRAM // (c.H // c.Hkv)  # the default would split
    scale = c.D**-0.5
    out, lse = block_sparse_forward_triton(q, k, v, block_idx, scale, c.causal, bias, c.block_m, c.block_n)
    _, dk, dv = block_sparse_backward_triton(dout, q, k, v, block_idx, out, lse, scale, c.causal, bias, c.block_m,
                                             c.block_n)
    assert dk.dtype == k.dtype and dv.dtype == v.dtype


@pytest.mark.parametrize("threshold, direct", [(None, True), (17 * 3 - 1, False)])
def test_short_columns_run_direct(threshold, direct, monkeypatch):
    """Without deterministic algorithms the dk/dv kernel still runs one program per key block when a
    key block's column (query blocks x query heads per kv head) is at most DIRECT_UP_TO_HEAD_BLOCKS
    head tiles, and splits it over programs with fp32 atomics above that; both match the reference."""
    from spt_compile.sparse_ops.attention import block_sparse_triton

    monkeypatch.undo()  # the module's own threshold (the autouse fixture set 0)
    if threshold is not None:
        monkeypatch.setattr(block_sparse_triton, "DIRECT_UP_TO_HEAD_BLOCKS", threshold)
    spy = _GridSpy(block_sparse_triton._bwd_dkdv_kernel)
    monkeypatch.setattr(block_sparse_triton, "_bwd_dkdv_kernel", spy)
    c = Case(257, 64, 64, 3, 1, True, 16, 16, "pad", 5)  # 17 query blocks x 3 heads per kv head = 51
    q, k, v, block_idx, bias, dout = make_inputs(c, torch.bfloat16, seed=5)
    check_case(c, q, k, v, block_idx, bias, dout, atol=3e-2, rtol=3e-2)
    Nb = -(-c.N // c.block_n)
    pieces = 1 if direct else -(-17 // (block_sparse_triton.HEAD_BLOCKS_PER_PROGRAM // 3))
    assert spy.grids == [(B * c.Hkv * Nb, pieces)], spy.grids


PACKED_CASES = [  # (case, dtype): GQA groups of 3 (4 rows of heads, one masked), 2 and 4, lists per group
    (Case(100, 64, 64, 3, 1, True, 16, 16, "pad", 4), torch.float32),
    (Case(257, 80, 80, 4, 2, False, 32, 16, "mask", 5), torch.float32),
    (Case(17, 64, 64, 6, 3, True, 32, 16, None, 3), torch.float32),
    (Case(100, 80, 64, 3, 1, True, 32, 16, "mask", 4), torch.bfloat16),
]


@pytest.mark.parametrize("c, dtype", PACKED_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_packed_gqa_dq_matches_the_per_head_kernel(c: Case, dtype: torch.dtype, monkeypatch):
    """PACK_GQA_DQ: the heads of a list in one dq tile. dq (and delta, which dk/dv reads) as the
    per-head kernel's, and every gradient as the reference's; the packed kernel is what launched."""
    from spt_compile.sparse_ops.attention import block_sparse_triton

    q, k, v, _, bias, dout = make_inputs(c, dtype, seed=21)
    gen = torch.Generator().manual_seed(22)
    grouped = random_block_idx(B, c.Hkv, -(-c.N // c.block_m), -(-c.N // c.block_n), c.Lb, gen)
    scale = c.D**-0.5
    out, lse = block_sparse_forward_triton(q, k, v, grouped, scale, c.causal, bias, c.block_m, c.block_n)
    per_head = block_sparse_backward_triton(dout, q, k, v, grouped, out, lse, scale, c.causal, bias, c.block_m, c.block_n)
    spy = _GridSpy(block_sparse_triton._bwd_dq_packed_kernel)
    monkeypatch.setattr(block_sparse_triton, "_bwd_dq_packed_kernel", spy)
    monkeypatch.setattr(block_sparse_triton, "PACK_GQA_DQ", True)
    packed = block_sparse_backward_triton(dout, q, k, v, grouped, out, lse, scale, c.causal, bias, c.block_m, c.block_n)
    heads, sub_m = block_sparse_triton._dq_packing(c.H // c.Hkv, c.block_m)
    assert spy.grids == [(B * c.Hkv * -(-c.N // c.block_m) * (c.block_m // sub_m),)]
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for a, b_ in zip(packed, per_head):
        torch.testing.assert_close(a, b_, **tol)
    if dtype == torch.float32:
        check_case(c, q, k, v, grouped, bias, dout, atol=1e-4, rtol=1e-4)  # the whole path, packed, vs the reference


def test_packing_needs_lists_shared_by_heads(monkeypatch):
    from spt_compile.sparse_ops.attention import block_sparse_triton

    monkeypatch.setattr(block_sparse_triton, "PACK_GQA_DQ", True)
    assert block_sparse_triton._dq_packing(1, 64) is None  # a list per head: nothing to pack
    assert block_sparse_triton._dq_packing(3, 64) == (4, 32)  # 4 x 32 = 128 rows
    assert block_sparse_triton._dq_packing(16, 64) == (16, 16)  # tl.dot's 16 rows at least
    monkeypatch.setattr(block_sparse_triton, "PACK_GQA_DQ", False)
    assert block_sparse_triton._dq_packing(3, 64) is None


def test_head_tiles_split_only_where_fewer_columns():
    from spt_compile.sparse_ops.attention import block_sparse_triton as bst

    widths = {d: bst._head_tiles(d) for d in (8, 16, 24, 40, 48, 64, 72, 80, 96, 112, 128, 160)}
    assert widths == {d: (bst._tile_d(d), 0) for d in widths}  # off: one padded tile
    bst.SPLIT_HEAD_TILES = True
    try:
        widths = {d: bst._head_tiles(d) for d in widths}
    finally:
        bst.SPLIT_HEAD_TILES = False
    assert widths == {8: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 48: (32, 16), 64: (64, 0),
                      72: (64, 16), 80: (64, 16), 96: (64, 32), 112: (128, 0), 128: (128, 0), 160: (128, 32)}


class _TileSpy:
    """Stands in for a Triton kernel: records each launch's head-tile constexprs, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.tiles = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tiles.append(tuple(kwargs[k] for k in ("BLOCK_D", "BLOCK_D2", "BLOCK_DV", "BLOCK_DV2")))
            return self.kernel[grid](*args, **kwargs)
        return launch


SPLIT_CASES = [  # (case, dtype, dk/dv mode): head sizes 80, 96 and 72 for q/k and v, each kernel variant
    (Case(100, 80, 80, 3, 1, True, 32, 16, "mask", 5), torch.float32, "atomic"),
    (Case(57, 96, 72, 4, 2, False, 16, 16, "pad", 4), torch.float32, "direct"),
    (Case(40, 80, 64, 3, 1, True, 16, 16, None, 3), torch.bfloat16, "direct"),
    (Case(33, 64, 96, 2, 1, True, 16, 16, "pad", 3), torch.bfloat16, "atomic"),
    (Case(100, 80, 96, 3, 1, True, 32, 16, "mask", 4), torch.float32, "packed-dq"),
]


@pytest.mark.parametrize("c, dtype, mode", SPLIT_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_split_head_tiles_match_the_reference(c: Case, dtype: torch.dtype, mode: str, monkeypatch):
    """SPLIT_HEAD_TILES: head sizes between powers of two in a lead tile and a tail tile. Out, lse and
    every gradient as the reference's, in each dk/dv mode and with the packed dq kernel; the kernels
    launched with the split widths."""
    from spt_compile.sparse_ops.attention import block_sparse_triton as bst

    monkeypatch.setattr(bst, "SPLIT_HEAD_TILES", True)
    if mode == "direct":
        monkeypatch.setattr(bst, "DIRECT_UP_TO_HEAD_BLOCKS", 10**6)
    names = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_packed_kernel" if mode == "packed-dq" else "_bwd_dq_kernel")
    spies = {n: _TileSpy(getattr(bst, n)) for n in names}
    for n, spy in spies.items():
        monkeypatch.setattr(bst, n, spy)
    q, k, v, block_idx, bias, dout = make_inputs(c, dtype, seed=31)
    if mode == "packed-dq":
        monkeypatch.setattr(bst, "PACK_GQA_DQ", True)
        block_idx = random_block_idx(B, c.Hkv, -(-c.N // c.block_m), -(-c.N // c.block_n), c.Lb,
                                     torch.Generator().manual_seed(32))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    check_case(c, q, k, v, block_idx, bias, dout, atol=tol, rtol=tol)
    want = (*bst._head_tiles(c.D), *bst._head_tiles(c.Dv))
    assert want[1] or want[3], "the case must split at least one head size"
    for n, spy in spies.items():
        assert spy.tiles and set(spy.tiles) == {want}, (n, spy.tiles)
