"""The dropout pass and spt::dropout: which dropouts are rewritten (and only their nodes), which stay
F.dropout, and that the op's output and gradient are the plain computation for its seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import spt_compile
from graph_check import GraphCapture
from spt_compile.sparse_ops.dropout import _dropout_op, drop_share, dropout, dropout_reference, keep_scale, scale_of


class Net(nn.Module):
    """Dropouts in the ways models write them: nn.Dropout, F.dropout, torch.dropout, an in-place one,
    one in eval mode, one inside a checkpointed block."""

    def __init__(self, checkpointed=False):
        super().__init__()
        self.a, self.b = nn.Linear(12, 12), nn.Linear(12, 12)
        self.drop = nn.Dropout(0.1)
        self.checkpointed = checkpointed

    def block(self, h):
        return F.dropout(torch.tanh(self.b(h)), 0.2, training=True)

    def forward(self, x):
        h = self.drop(self.a(x))  # rewritten
        h = F.dropout(h, 0.3, training=True) + torch.dropout(h, 0.25, True)  # both rewritten
        h = F.dropout(h, 0.5, training=False)  # eval: identity, left alone
        h = F.dropout(h.clone(), 0.1, training=True, inplace=True)  # in place: left alone
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)  # rewritten in the body
        return h.sum()


def capture(model, *args, options=None) -> GraphCapture:
    torch._dynamo.reset()
    cap = GraphCapture(options or {})
    torch.compile(model, backend=cap)(*args)
    assert cap.checked >= 1
    return cap


@pytest.mark.parametrize("checkpointed", [False, True])
def test_training_dropouts_are_rewritten_and_nothing_else(checkpointed):
    """GraphCapture proves the rest of the graph unchanged (checkpoint body included); the
    training-mode, out-of-place dropouts become spt::dropout."""
    cap = capture(Net(checkpointed), torch.randn(3, 5, 12))
    (report,) = cap.reports
    n = 4 if checkpointed else 3
    assert len(report.dropouts) == n
    assert f"{n} dropouts with 16-bit masks" in report.summary()


@pytest.mark.parametrize("options", [{"fast_dropout": False}, {"compiler": "inductor"}], ids=["off", "inductor"])
def test_option_off_or_inductor_leaves_every_dropout(options):
    """Off by option, and under Inductor, which generates its own masks fused into its kernels."""
    cap = capture(Net(), torch.randn(3, 5, 12), options=options)
    assert cap.reports[0].dropouts == []


def test_default_compiler_leaves_them_unless_spt_compiler_names_another(monkeypatch):
    """The default compiler ('auto') is Inductor unless $SPT_COMPILER says otherwise (the suite sets aot_eager)."""
    monkeypatch.delenv("SPT_COMPILER", raising=False)
    assert "dropout (16-bit masks)" not in str(spt_compile.explain(Net(), torch.randn(3, 5, 12)))
    monkeypatch.setenv("SPT_COMPILER", "aot_eager")
    assert "3 dropout (16-bit masks)" in str(spt_compile.explain(Net(), torch.randn(3, 5, 12)))


def test_explain_counts_them():
    text = str(spt_compile.explain(Net(checkpointed=True), torch.randn(3, 5, 12)))
    assert "4 dropout (16-bit masks)" in text


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (64, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_op_is_the_reference_for_its_seed_forward_and_backward(shape, dtype, p):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out, seed = _dropout_op(x, p)
    assert seed.device.type == "cpu" and seed.dtype == torch.int64
    x_ref = x.detach().clone().requires_grad_()
    want = dropout_reference(x_ref, p, int(seed))
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    g = torch.randn(shape, dtype=dtype)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    kept = want != 0
    if kept.any():  # each kept element scaled by 1 / (1 - share)
        ratio = (want[kept].double() / x.detach()[kept].double())
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / (1 - drop_share(p))),
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.25, 0.1, 0.3])
def test_kept_elements_are_scaled_as_f_dropout_scales_them(dtype, p):
    """One rounding convention for both ops that use the masks (spt::dropout, the routed MLP's
    keep_scale) and F.dropout on a CPU: the factor is 1 / (1 - p) rounded to x's dtype first. For a
    p on the 2^-16 grid (0.25) the kept values of a row of x equal F.dropout's bit for bit."""
    x = torch.randn(4096, dtype=torch.float64).to(dtype)
    factor = scale_of(p, dtype)
    out = _dropout_op(x, p)[0]
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * torch.tensor(factor, dtype=dtype), atol=0, rtol=0)
    assert factor == torch.tensor(1 / (1 - drop_share(p)), dtype=dtype).item()
    if drop_share(p) == p:
        eager = F.dropout(x, p, training=True)
        assert torch.equal(eager[eager != 0], x[eager != 0] * torch.tensor(factor, dtype=dtype))
    assert torch.equal(keep_scale(torch.tensor([True, False]), p, dtype), torch.tensor([factor, 0.0], dtype=dtype))


def test_everything_dropped_keeps_nans_as_f_dropout_does():
    x = torch.tensor([1.0, float("nan"), -2.0])
    out = dropout(x, 1.0)
    assert torch.equal(out[[0, 2]], torch.zeros(2)) and out[1].isnan()
    assert F.dropout(x, 1.0, training=True)[1].isnan()


def test_seeded_by_torch_manual_seed_and_saves_no_mask():
    x = torch.randn(256, 64, requires_grad=True)
    torch.manual_seed(5)
    a = dropout(x, 0.3)
    torch.manual_seed(5)
    b = dropout(x, 0.3)
    c = dropout(x, 0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)
    share = (a == 0).double().mean().item()
    assert abs(share - 0.3) < 5 * (0.3 * 0.7 / a.numel()) ** 0.5
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout(x, 0.3).sum().backward()
    assert [t.numel() for t in saved] == [1]  # the seed, no [shape] mask


def test_bad_p_is_named():
    with pytest.raises(ValueError, match="p must be in"):
        dropout(torch.ones(3), 1.5)


def test_compiled_training_repeats_under_manual_seed_and_gradients_flow():
    """Through torch.compile(backend="spt"): the same seed gives the same loss and gradients, every
    parameter gets one, and a dropout of everything (p on the grid) still gives finite values."""
    torch.manual_seed(0)
    model = Net(checkpointed=True)
    fn = torch.compile(model, backend="spt")
    x = torch.randn(3, 5, 12)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    for g0, g1 in zip(runs[0][1], runs[1][1]):
        assert torch.equal(g0, g1) and torch.isfinite(g0).all()
    assert all(g.abs().sum() > 0 for g in runs[0][1])


def test_checkpointed_run_is_the_plain_run():
    """A dropout inside an activation-checkpointed block: the recomputation in backward draws the same
    mask (AOTAutograd restores the CPU RNG state around the nondeterministic_seeded op), so losses
    and gradients equal the run without checkpointing, bit for bit."""
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Net(checkpointed=True)
        model.checkpointed = checkpointed
        if not checkpointed:
            model.forward = _plain_forward.__get__(model)
        torch._dynamo.reset()
        fn = torch.compile(model, backend="spt")
        x = torch.randn(4, 5, 12)
        out = []
        for step in range(2):
            torch.manual_seed(10 + step)
            model.zero_grad()
            loss = fn(x)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        runs.append(out)
    for (l0, g0), (l1, g1) in zip(*runs):
        assert torch.equal(l0, l1)
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def _plain_forward(self, x):
    """Net.forward with the block called directly instead of through checkpoint."""
    h = self.drop(self.a(x))
    h = F.dropout(h, 0.3, training=True) + torch.dropout(h, 0.25, True)
    h = F.dropout(h, 0.5, training=False)
    h = F.dropout(h.clone(), 0.1, training=True, inplace=True)
    return self.block(h).sum()


class ThreeAdapters(nn.Module):
    """Three dropouts of the same tensor with the same p, as PEFT's q, k and v LoRA adapters."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, 16, bias=False) for _ in range(3))
        self.drops = nn.ModuleList(nn.Dropout(0.5) for _ in range(3))

    def forward(self, x):
        return [lin(drop(x)) for lin, drop in zip((self.q, self.k, self.v), self.drops)]


def test_dropouts_of_one_tensor_keep_masks_of_their_own():
    """AOTAutograd's CSE must not merge them (the op's call number keeps their arguments apart):
    through torch.compile(backend="spt") the three masks differ, as PEFT's do."""
    model = ThreeAdapters()
    for lin in (model.q, model.k, model.v):
        nn.init.eye_(lin.weight)
    torch._dynamo.reset()
    outs = torch.compile(model, backend="spt")(torch.ones(64, 16, requires_grad=True))
    masks = [o != 0 for o in outs]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_explain_counts_what_compiling_rewrites_with_lora_dropout():
    """PEFT's dropouts before the MLP adapters are the MLP sites' own (not spt::dropout); explain
    must not count them either: its count is the compiled graphs' (4 per layer: q, k, v, o)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from toy_models import tiny_llama_batch

    model, ids, attention, labels = tiny_llama_batch(seq=32, pad_from=32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    explained = spt_compile.explain(model, input_ids=ids, labels=labels)
    torch._dynamo.reset()
    torch.compile(model, backend="spt")(input_ids=ids, labels=labels)
    compiled = sum(len(r.dropouts) for r in spt_compile.compile_reports(model))
    assert compiled == 8 and explained.dropouts == compiled
