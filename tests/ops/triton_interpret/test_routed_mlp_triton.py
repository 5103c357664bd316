"""Triton routed MLP vs the per-token reference loop: output, saved pre-activations and every gradient.

Runs only under TRITON_INTERPRET=1 (tests/conftest.py skips this folder otherwise;
tests/ops/test_triton_interpret.py runs it in a subprocess with the variable set). check_case follows its
inputs' device, so benchmarks/bench_ffn.py --check can feed it CUDA tensors. The interpreter is slow,
so each case is small and awkward (hidden 123, intermediate 431, blocks of 107-108 units, 32-wide
tiles with partial edges) and the cases cover each axis without taking the full product.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spt_compile
from spt_compile.sparse_ops.routed_mlp.reference import routed_mlp_reference
from spt_compile.sparse_ops.routed_mlp import MlpSpec, MlpWeights, block_bounds, routed_mlp_forward
from spt_compile.sparse_ops.routed_mlp.triton import (
    routed_mlp_backward_triton,
    routed_mlp_forward_triton,
    routing,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for toy_models
SLOTS = MlpWeights._fields


def make_weights(d_in, hidden, d_out, *, gated, layout, bias, lora, ranks=(3, 5, 4), dtype=torch.float32,
                 gen=None, device="cpu") -> MlpWeights:
    """Random weights in `layout`; LoRA on the projections named in `lora` ("in", "gate", "out"), with
    ranks (in, gate, out) so that a kernel mixing them up fails."""
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dtype)

    def w(o, i):
        t = rnd(o, i, s=i**-0.5)
        return t if layout == "oi" else t.t().contiguous()

    slots = {}
    for proj, i, o, r in (("in", d_in, hidden, ranks[0]), ("gate", d_in, hidden, ranks[1]),
                          ("out", hidden, d_out, ranks[2])):
        if proj == "gate" and not gated:
            continue
        slots[f"{proj}_w"] = w(o, i)
        slots[f"{proj}_b"] = rnd(o, s=0.1) if bias else None
        if proj in lora:
            slots[f"{proj}_a"], slots[f"{proj}_bb"] = rnd(r, i, s=i**-0.5), rnd(o, r, s=0.3)
    return MlpWeights(**slots)


def random_mask(T, n_blocks, active, gen, device="cpu"):
    top = torch.rand(T, n_blocks, generator=gen).topk(active, dim=-1).indices
    return torch.zeros(T, n_blocks, dtype=torch.bool).scatter_(-1, top, True).to(device)


def reference_grads(x, w, spec, mask, dy, needs_x, needs):
    """y and the wanted grads of routed_mlp_reference, in float64 (so the reference's own rounding is
    out of the comparison)."""
    x64 = x.double().requires_grad_(needs_x)
    w64 = MlpWeights(*[None if t is None else t.double().requires_grad_(bool(n)) for t, n in zip(w, needs)])
    y = routed_mlp_reference(x64, w64, spec, mask)
    leaves = [t for t in [x64, *w64] if t is not None and t.requires_grad]
    gs = iter(torch.autograd.grad(y, leaves, dy.double(), allow_unused=True) if leaves else [])
    dx = next(gs) if needs_x else None
    grads = {s: (next(gs) if (t is not None and t.requires_grad) else None) for s, t in zip(SLOTS, w64)}
    return y, dx, grads


def max_err(got, want):
    """(max abs error, max abs of want)."""
    return (got.double() - want.double()).abs().max().item(), want.double().abs().max().item()


def check_case(x, w, spec, mask, *, needs_x=True, needs=None, rtol=2e-4, tiles=None, cdtype=None, report=None):
    """Triton forward and backward against the reference: y, every wanted gradient (and None for the
    unwanted ones), and the saved pre-activations against the torch path's. Errors are measured
    relative to the largest magnitude of each reference tensor (a scaled max-norm check).
    report: a dict that receives name -> (max error, scale) for each compared tensor."""
    needs = needs or MlpWeights(*[t is not None for t in w])
    gen = torch.Generator().manual_seed(123)
    y, pre, counts = routed_mlp_forward_triton(x, w, spec, mask, cdtype, tiles)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], _d_out(w, spec))
    dy = torch.randn(y.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    y_ref, dx_ref, g_ref = reference_grads(x, w, spec, mask, dy, needs_x, needs)
    results = {"y": (y, y_ref)}
    saved: list = []
    routed_mlp_forward(x.double(), MlpWeights(*[None if t is None else t.double() for t in w]), spec, mask,
                       saved=saved)
    # the torch path saves the pre-activations in the same layout, then its LoRA inputs t
    pre_ref = saved[0][: pre.numel()]
    assert pre.dim() == 1 and pre.dtype == x.dtype
    assert pre.numel() == (2 if spec.gated else 1) * sum(c * (hi - lo) for c, (lo, hi) in
                                                        zip(counts, block_bounds(spec.hidden, spec.n_blocks)))
    if pre.numel():
        results["pre"] = (pre, pre_ref)
    assert counts == mask.sum(0).tolist()
    dx, grads = routed_mlp_backward_triton(dy, x, w, spec, mask, needs_x, needs, pre, counts, cdtype, tiles)
    if needs_x:
        assert dx.dtype == x.dtype
        results["dx"] = (dx, dx_ref)
    else:
        assert dx is None
    for s, g, t in zip(SLOTS, grads, w):
        if g_ref[s] is None:
            assert g is None, f"{s}: a gradient nobody asked for"
            continue
        assert g is not None and g.dtype == t.dtype and g.shape == t.shape, s
        results[s] = (g, g_ref[s])
    bad = []
    for name, (got, want) in results.items():
        err, scale = max_err(got, want)
        if report is not None:
            report[name] = (err, scale)
        if err > rtol * max(scale, 1e-3):
            bad.append(f"{name}: max error {err:.3g} vs scale {scale:.3g}")
    assert not bad, "; ".join(bad)


def _d_out(w, spec):
    return w.out_w.shape[1] if spec.out_layout == "io" else w.out_w.shape[0]


@dataclass(frozen=True)
class Case:
    T: int
    gated: bool
    act: str
    layout: str
    bias: bool
    lora: tuple
    n_blocks: int = 4
    active: int = 2
    mask: str = "random"  # random | empty-block | one-block | all
    frozen: bool = False  # LoRA fine-tuning: base weights and biases get no gradient
    dtype: str = "fp32"

    def __str__(self):
        return (f"T{self.T}-{'gated' if self.gated else 'plain'}-{self.act}-{self.layout}-"
                f"{'bias' if self.bias else 'nobias'}-lora{''.join(p[0] for p in self.lora) or '0'}-"
                f"{self.active}of{self.n_blocks}-{self.mask}{'-frozen' if self.frozen else ''}-{self.dtype}")


ALL = ("in", "gate", "out")
# d_in 123, F 431 (blocks of 108/108/107/108 units), d_out 123 or 100. Every activation appears; each
# layout gated and plain; LoRA on all, none and on one projection; T from 1 to 150 (150 tokens at 2 of 4
# blocks make 2-3 token tiles per block and two weight-grad chunks).
CASES = [
    Case(37, True, "silu", "oi", True, ALL),
    Case(37, True, "silu", "io", False, ALL, frozen=True),
    Case(29, False, "gelu", "io", True, ALL),
    Case(29, False, "relu", "oi", False, ()),
    Case(23, False, "gelu_tanh", "oi", True, ("out",)),
    Case(23, False, "quick_gelu", "io", True, ("in",), n_blocks=3, active=1),
    Case(27, False, "relu2", "io", True, ("in", "out")),
    Case(21, True, "gelu", "oi", True, ("gate", "out")),
    Case(1, True, "silu", "oi", True, ALL),
    Case(1, False, "gelu", "io", True, ALL, n_blocks=4, active=1),
    Case(19, True, "silu", "oi", True, ALL, mask="empty-block"),
    Case(19, False, "relu", "io", True, ALL, mask="one-block"),
    Case(150, True, "silu", "oi", False, ALL, frozen=True),
    Case(17, True, "silu", "io", True, ALL, mask="all"),
    Case(17, False, "gelu", "oi", True, ALL, mask="all"),
    Case(33, True, "silu", "oi", True, ALL, frozen=True, dtype="bf16"),
]


def build(case: Case, device="cpu"):
    gen = torch.Generator().manual_seed(zlib_seed(str(case)))
    d_out = 100 if case.act in ("gelu", "quick_gelu") else 123
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    w = make_weights(123, 431, d_out, gated=case.gated, layout=case.layout, bias=case.bias, lora=case.lora,
                     dtype=dtype, gen=gen, device=device)
    L = case.layout
    spec = MlpSpec(case.act, case.gated, 431, case.n_blocks, in_layout=L, gate_layout=L, out_layout=L,
                   in_scale=0.5, gate_scale=2.0, out_scale=1.5)
    x = torch.randn(case.T, 123, generator=gen).to(device=device, dtype=dtype)
    mask = random_mask(case.T, case.n_blocks, case.active, gen, device)
    if case.mask == "empty-block":
        mask[:, 2] = False
        mask[:, 0] = True
    elif case.mask == "one-block":
        mask[:] = False
        mask[:, 1] = True
    elif case.mask == "all":
        mask[:] = True
    needs = MlpWeights(*[t is not None and not (case.frozen and s.split("_")[1] in ("w", "b"))
                         for s, t in zip(SLOTS, w)])
    return x, w, spec, mask, needs


def zlib_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    x, w, spec, mask, needs = build(case)
    # bf16: inputs are exact in both; the kernels round the saved pre-activations, h and dz to bf16
    # (as the torch path does), so compare at bf16's resolution.
    rtol = 2e-2 if case.dtype == "bf16" else 2e-4
    check_case(x, w, spec, mask, needs=needs, rtol=rtol)


def test_no_dx_and_only_some_grads():
    x, w, spec, mask, _ = build(CASES[0])
    needs = MlpWeights(*[s in ("gate_bb", "out_a") for s in SLOTS])
    check_case(x, w, spec, mask, needs_x=False, needs=needs)


def test_every_block_is_the_dense_mlp():
    """With every block chosen, the Triton path is the dense MLP written with F.linear."""
    case = Case(17, True, "silu", "oi", True, ALL, mask="all")
    x, w, spec, mask, _ = build(case)
    y, _, _ = routed_mlp_forward_triton(x, w, spec, mask)

    def proj(v, W, b, A, B, s):
        return F.linear(v, W, b) + F.linear(F.linear(v, A), B) * s

    h = F.silu(proj(x, w.gate_w, w.gate_b, w.gate_a, w.gate_bb, 2.0)) * proj(x, w.in_w, w.in_b, w.in_a, w.in_bb, 0.5)
    dense = proj(h, w.out_w, w.out_b, w.out_a, w.out_bb, 1.5)
    torch.testing.assert_close(y, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[12], CASES[14]], ids=str)
def test_permuted_units_are_read_in_place(case):
    """With the clustering's permutation the kernels read each unit's weights where they are and write
    its gradients there: the same numbers as running on permute_hidden's copy and un-permuting the
    gradients (forward, saved pre-activations, dx, every gradient; bias and LoRA cases, both layouts,
    frozen base, every block, bf16), with no weight copied into block order."""
    from spt_compile.sparse_ops.routed_mlp import permute_hidden, unpermute_grads

    x, w, spec, mask, needs = build(case)
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(spec.hidden, generator=gen)
    wp = permute_hidden(w, spec, perm)
    y, pre, counts = routed_mlp_forward_triton(x, w, spec, mask, perm=perm)
    y_copy, pre_copy, _ = routed_mlp_forward_triton(x, wp, spec, mask)
    assert torch.equal(y, y_copy) and torch.equal(pre, pre_copy)
    dy = torch.randn(y.shape, generator=gen).to(x.dtype)
    dx, grads = routed_mlp_backward_triton(dy, x, w, spec, mask, True, needs, pre, counts, perm=perm)
    dx_copy, grads_copy = routed_mlp_backward_triton(dy, x, wp, spec, mask, True, needs, pre_copy, counts)
    grads_copy = unpermute_grads(grads_copy, spec, perm)
    assert torch.equal(dx, dx_copy)
    for s, g, want in zip(SLOTS, grads, grads_copy):
        assert (g is None) == (want is None), s
        if g is not None:  # the same sums; the bias's per-block sums land by index_add_ instead of a slice
            torch.testing.assert_close(g, want, atol=0, rtol=0, msg=s)
    if case.mask == "all":  # every block: the dense MLP whatever the unit order
        y_dense, _, _ = routed_mlp_forward_triton(x, w, spec, mask)
        torch.testing.assert_close(y, y_dense, atol=1e-4, rtol=1e-4)


def test_routing_metadata():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(50, 4, 2, gen)
    mask[:, 3] = False
    spec = MlpSpec("silu", True, 431, 4)
    rt = routing(mask, spec, block_m=16, chunk=32)
    assert rt.counts == mask.sum(0).tolist() and rt.counts[3] == 0
    want = torch.cat([mask[:, b].nonzero().squeeze(1) for b in range(4)])  # by block, then token
    assert torch.equal(rt.tok.long(), want)
    # token tiles never straddle two blocks, and cover each block's rows once
    starts, ends = rt.info[0].tolist(), rt.info[1].tolist()
    for b, r0 in zip(rt.tile_block.tolist(), rt.tile_row0.tolist()):
        assert starts[b] <= r0 < ends[b] and (r0 - starts[b]) % 16 == 0
    assert rt.tile_block.numel() == sum(-(-n // 16) for n in rt.counts)
    assert rt.pre_numel == 2 * sum(n * (hi - lo) for n, (lo, hi) in zip(rt.counts, rt.bounds))


def test_lora_dropout_is_refused():
    x, w, spec, mask, _ = build(CASES[0])
    with pytest.raises(ValueError, match="dropout"):
        routed_mlp_forward_triton(x, w, MlpSpec(**{**spec.__dict__, "in_dropout": 0.1}), mask)


def spy_triton_calls(monkeypatch) -> dict:
    """Records the compute dtype of every Triton routed-MLP forward and backward call."""
    import spt_compile.sparse_ops.routed_mlp.triton as rmt

    seen = {"fwd": [], "bwd": []}
    fwd, bwd = rmt.routed_mlp_forward_triton, rmt.routed_mlp_backward_triton

    def spy_fwd(x, w, spec, mask, cdtype=None, *a, **k):
        seen["fwd"].append(cdtype)
        return fwd(x, w, spec, mask, cdtype, *a, **k)

    def spy_bwd(*a, **k):
        seen["bwd"].append(a[9] if len(a) > 9 else k.get("cdtype"))  # cdtype is the tenth parameter
        return bwd(*a, **k)

    monkeypatch.setattr(rmt, "routed_mlp_forward_triton", spy_fwd)
    monkeypatch.setattr(rmt, "routed_mlp_backward_triton", spy_bwd)
    return seen


def compiled_gated_mlp(**options):
    """A GatedMLP(40 -> 100) and its spt compilation: 2 of 4 blocks after one calibration call."""
    from toy_models import GatedMLP

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = GatedMLP(d=40, hidden=100)
    return model, torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1,
                                                               "ffn_blocks": 4, "ffn_active": 2,
                                                               "exact_forward": False, **options})  # the kernels' path


@pytest.mark.parametrize("compensate", [0, 4])
def test_site_triton_and_torch_impls_agree(monkeypatch, compensate):
    """Through torch.compile(backend="spt"): the same routed call under ffn_impl="triton" and "torch"
    gives the same output and gradients, and backward runs the implementation forward recorded; with
    ffn_compensate too (a dense term the site adds beside either implementation)."""
    seen = spy_triton_calls(monkeypatch)
    model, compiled = compiled_gated_mlp(ffn_compensate=compensate)
    x = torch.randn(2, 13, 40)
    for _ in range(2):  # calibration (dense, torch path), then the first routed call (probes, refits)
        compiled(x).sum().backward()
    results = {}
    for impl in ("triton", "torch"):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with spt_compile.enable(ffn_impl=impl):
            y = compiled(xi)
            y.pow(2).sum().backward()
        results[impl] = (y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()])
    assert seen["fwd"] and seen["bwd"]
    site = next(s for _, s in spt_compile.registry.model_sites(model))
    assert (site.comp is not None) == bool(compensate)
    (yt, dxt, gt), (yc, dxc, gc) = results["triton"], results["torch"]
    torch.testing.assert_close(yt, yc, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dxt, dxc, atol=1e-5, rtol=1e-4)
    for a, b in zip(gt, gc):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_site_triton_puts_no_weight_in_block_order(monkeypatch):
    """Through the site, with the clustering's permutation: the torch path gathers each weight into block
    order every call (forward and backward), the Triton kernels read them in place, with the same
    output and gradients."""
    from spt_compile.testing.census import Census

    seen = spy_triton_calls(monkeypatch)
    model, compiled = compiled_gated_mlp(ffn_compensate=0)
    x = torch.randn(2, 13, 40)
    for _ in range(2):  # calibration (dense; fits the clustering), then the first routed call
        compiled(x).sum().backward()
    site = next(s for _, s in spt_compile.registry.model_sites(model))
    assert site.perm is not None and not torch.equal(site.perm, torch.arange(100))
    gathers, results = {}, {}
    for impl in ("torch", "triton"):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with spt_compile.enable(ffn_impl=impl), Census() as census:  # aten ops inside the site's op calls
            y = compiled(xi)
            y.pow(2).sum().backward()
        gathers[impl] = census.ops["index_select"]
        results[impl] = [y.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()]
    assert seen["fwd"] and seen["bwd"]
    # torch: the three weights in block order, forward and backward, and its token gathers; the kernels
    # gather tokens and weight rows as they load them (before, permute_hidden and unpermute_grads ran
    # around them: index_select of every sliced slot, forward and backward)
    assert gathers["torch"] >= 6 and gathers["triton"] == 0, gathers
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_autocast_dtype_reaches_the_kernels(monkeypatch):
    """Under torch.autocast the traced projections compute in bf16, but autocast is not active inside
    the custom op at run time: the pass records the dtype in the spec, and the Triton GEMMs (forward
    and backward) run in it. The output matches the fp32 torch path to bf16 precision."""
    seen = spy_triton_calls(monkeypatch)
    _, compiled = compiled_gated_mlp(ffn_compensate=0)
    x = torch.randn(2, 13, 40)
    for _ in range(2):  # calibration (dense), then the first routed call (probes, refits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(x)
        y.float().sum().backward()
    results = {}
    for impl in ("torch", "triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16), spt_compile.enable(ffn_impl=impl):
            y = compiled(x)
        y.float().pow(2).sum().backward()
        results[impl] = y.detach().float()
    assert seen["fwd"] and all(d == torch.bfloat16 for d in seen["fwd"]), seen
    assert seen["bwd"] and all(d == torch.bfloat16 for d in seen["bwd"]), seen
    torch.testing.assert_close(results["triton"], results["torch"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("block_n", [128, 64])
def test_cuda_tiles_match_reference(block_n):
    """The bf16 CUDA tiles (128 rows, routed_mlp.triton.CUDA_BLOCK_N columns, 64-deep steps), every
    edge partial at these sizes: the same values as the reference."""
    from spt_compile.sparse_ops.routed_mlp import triton as mlp_triton

    case = Case(150, True, "silu", "oi", True, ALL, dtype="bf16")
    x, w, spec, mask, needs = build(case)
    check_case(x, w, spec, mask, needs=needs, rtol=2e-2, tiles=mlp_triton.Tiles(128, block_n, 64, 1024, 8, 3))
