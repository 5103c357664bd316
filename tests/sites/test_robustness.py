"""Bad inputs and impossible settings: a clear error naming the problem and the fix, or a documented
fallback, never silently wrong numbers or a poisoned sparse state.

Policy (README, "Robustness"): NaN/inf in a site's inputs pass through to the outputs they touch, as
in the dense model, and are kept out of the sparse state (codebooks, router, quality figures); the
`check_finite` option raises at the first site that sees them instead. Empty sequences and fully
padded rows run; devices and options that cannot work raise SptOptionError naming the option."""

from __future__ import annotations

import copy

import pytest
import torch

import spt_compile
from spt_compile import compile_reports
from spt_compile.registry import model_sites

from toy_models import SPARSE_AT_EVERY_LENGTH, GatedMLP, GQAAttention, NanoGPT

SPARSE = {"compiler": "aot_eager", "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH, "attention_block": 16,
          "density": 0.5, "exact_forward": False, "sparse_inference": True}  # the sparse forward's robustness
EVERY = {**SPARSE, "density": 1.0, "ffn_active": 4}


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="spt", options={**SPARSE, **options})


def state_is_finite(model) -> bool:
    sites = model_sites(model)
    assert sites
    for _, site in sites:
        for key, value in site.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                return False
    return True


def with_bad_row(x, value, row=(0, 5)):
    x = x.clone()
    x[row] = value
    return x


@pytest.mark.parametrize("selection", ["token", "block"])
def test_nan_during_calibration_stays_out_of_the_state(selection):
    torch.manual_seed(0)
    att, mlp = GQAAttention(d=64, heads=4, kv_heads=2), GatedMLP(d=32, hidden=80)
    c_att, c_mlp = compiled(att, attention_selection=selection), compiled(mlp)
    x = torch.randn(2, 64, 64)
    bad_att, bad_mlp = c_att(with_bad_row(x, float("nan"))), c_mlp(with_bad_row(x[..., :32], float("nan")))
    # The NaN shows in the outputs (as it would dense)...
    assert torch.isnan(bad_att[0]).any() and torch.isnan(bad_mlp[0, 5]).all()
    assert torch.isfinite(bad_mlp[1]).all()  # ...only where it reaches
    for _ in range(2):  # ...and never in the codebooks, router or quality figures fitted from that call
        assert torch.isfinite(c_att(torch.randn(2, 64, 64))).all()
        assert torch.isfinite(c_mlp(torch.randn(2, 64, 32))).all()
    assert state_is_finite(att) and state_is_finite(mlp)
    assert all(site.quality for _, site in model_sites(mlp)), "the router must have been fitted and probed"


def test_inf_in_a_sparse_training_call_propagates_and_spares_the_state():
    torch.manual_seed(0)
    model = NanoGPT(layers=1, block_size=64)
    c = compiled(model, attention_selection="token")
    tokens = torch.randint(0, 97, (2, 48))
    c(tokens)  # calibration
    model.wte.weight.data[tokens[0, 3]] = float("inf")  # e.g. a diverged embedding
    out = c(tokens)
    assert not torch.isfinite(out[0]).all()
    assert state_is_finite(model)


def test_check_finite_names_the_site_and_the_input():
    torch.manual_seed(0)
    att, mlp = GQAAttention(d=64, heads=4, kv_heads=2), GatedMLP(d=32, hidden=80)
    c_att, c_mlp = compiled(att, check_finite=True), compiled(mlp)
    with pytest.raises(FloatingPointError, match=r"non-finite values \(NaN or inf\) in 'q' of the attention site"):
        c_att(with_bad_row(torch.randn(2, 64, 64), float("inf")))
    c_mlp(torch.randn(2, 64, 32))
    n = len(compile_reports(mlp))
    with spt_compile.enable(check_finite=True):  # a run-time option: no recompile
        with pytest.raises(FloatingPointError, match=r"in 'x' of the mlp site .*lower|learning rate"):
            c_mlp(with_bad_row(torch.randn(2, 64, 32), float("nan")))
    assert len(compile_reports(mlp)) == n


def test_nan_loss_backward_gives_nan_grads_as_dense_and_keeps_the_state():
    torch.manual_seed(0)
    model = NanoGPT(layers=1, block_size=64)
    reference = copy.deepcopy(model)
    c = compiled(model)
    tokens = torch.randint(0, 97, (2, 48))
    for _ in range(2):
        c(tokens).float().pow(2).mean().backward()
    before = spt_compile.state_dict(model)
    model.zero_grad()
    (c(tokens).sum() * float("nan")).backward()
    (reference(tokens).sum() * float("nan")).backward()
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.isnan(p.grad).any() == torch.isnan(r.grad).any(), name
    after = spt_compile.state_dict(model)
    for key in before:  # backward never updates the state; the forward before it was finite
        if before[key].is_floating_point():
            assert torch.isfinite(after[key]).all(), key


def test_empty_sequences_and_fully_padded_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt = NanoGPT(layers=1, block_size=64)
    c = compiled(gpt)
    for T in (0, 48, 48, 0):  # zero tokens: before calibration and after it
        out = c(torch.randint(0, 97, (2, T)))
        assert out.shape == (2, T, 97) and torch.isfinite(out).all()

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    lm = LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(lm)
    ids = torch.randint(0, 128, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1] = 0  # a sequence with no token at all
    c = compiled(lm, **EVERY)
    for _ in range(3):  # calibration, then the (degenerate) sparse path
        got = c(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], reference(input_ids=ids, attention_mask=mask).logits[0], atol=2e-5, rtol=1e-4)


@torch.no_grad()  # no state updates between the calls compared (a call with grad is a training call)
@pytest.mark.parametrize("selection", ["block", "token"])
def test_padding_and_batch_companions_do_not_change_a_sequence(selection):
    """Sparse (density 1/2, half the FFN blocks), after calibration: a sequence gives the same result
    alone and unpadded, right-padded, or beside another sequence. (Token selection: keys with the
    same PQ codes tie exactly in the proxy; the earliest positions win, whatever the key count.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    lm = LlamaForCausalLM(config).eval()
    c = compiled(lm, attention_selection=selection)
    c(input_ids=torch.randint(0, 128, (2, 64)))  # calibration
    a, b = torch.randint(0, 128, (40,)), torch.randint(0, 128, (64,))
    alone = c(input_ids=a[None]).logits[0]
    ids = torch.stack([torch.cat([a, torch.zeros(24, dtype=torch.long)]), b])
    mask = torch.stack([(torch.arange(64) < 40).long(), torch.ones(64, dtype=torch.long)])
    padded = c(input_ids=ids, attention_mask=mask).logits[0, :40]
    torch.testing.assert_close(padded, alone, atol=2e-5, rtol=1e-4)
    with spt_compile.disable():
        dense = c(input_ids=a[None]).logits[0]
    assert (alone - dense).abs().max() > 1e-3, "the comparison must run sparse"


def _packed(seqs: list[torch.Tensor]) -> dict:
    """Sequences packed into one row the way HF's DataCollatorWithFlattening writes them: no attention
    mask, position_ids restarting at 0 per sequence (HF builds a block-diagonal causal mask from them)."""
    return {"input_ids": torch.cat(seqs)[None], "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}


@torch.no_grad()
@pytest.mark.parametrize("sparse", [False, True, "token"])
def test_packed_sequences_give_the_unpadded_results(sparse):
    """Packed (variable-length, one row) batches: each sequence's logits equal running it alone.
    Sparse (density 1/2, half the FFN blocks): block selection when every sequence starts at a
    multiple of attention_block, so that query and key blocks fall as they do alone; token selection
    (each query budgeted by its own sequence's length) and every key and block kept (degenerate): any
    lengths. Token selection runs every FFN block: the routing is per token (block selection tests it
    packed), and its top-k can flip on a near-tie when the attention output differs in the last bits,
    as the packed row's GEMMs round differently from a lone sequence's (on an AMD EPYC host one block
    flipped for one token: 0.04 in its logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    lm = LlamaForCausalLM(config).eval()
    c = compiled(lm, **({"attention_selection": "token", "ffn_active": 4} if sparse == "token" else {} if sparse
                        else {"density": 1.0, "ffn_active": 4}))
    c(input_ids=torch.randint(0, 128, (1, 64)))  # calibration
    lengths = (32, 16, 48) if sparse is True else (13, 40, 7)
    seqs = [torch.randint(0, 128, (n,)) for n in lengths]
    packed = c(**_packed(seqs)).logits[0].split(list(lengths))
    for seq, got in zip(seqs, packed):
        torch.testing.assert_close(got, c(input_ids=seq[None]).logits[0], atol=2e-5, rtol=1e-4)
    if sparse:
        with spt_compile.disable():
            dense = c(input_ids=seqs[2][None]).logits[0]
        assert (packed[2] - dense).abs().max() > 1e-3, "the comparison must run sparse"


def test_devices_and_options_that_cannot_work_are_named():
    torch.manual_seed(0)
    c = compiled(GQAAttention(d=64, heads=4, kv_heads=2), attention_impl="triton")
    c(torch.randn(2, 64, 64))  # calibration runs exact attention
    with pytest.raises(spt_compile.SptOptionError, match="attention_impl='triton' needs CUDA tensors.*'auto' or 'torch'"):
        c(torch.randn(2, 64, 64))

    mlp = GatedMLP(d=32, hidden=80)
    c = compiled(mlp, ffn_blocks=100)  # more blocks than hidden units: left dense, said why
    c(torch.randn(2, 8, 32))
    assert [s.reason for s in compile_reports(mlp)[-1].dense()] == ["hidden size 80 is smaller than ffn_blocks=100"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_run_and_match_dense_with_every_key_and_block(dtype):
    torch.manual_seed(0)
    model = NanoGPT(layers=1, block_size=64).to(dtype)
    reference = copy.deepcopy(model)
    c = compiled(model, **EVERY)
    tokens = torch.randint(0, 97, (2, 48))
    for _ in range(2):
        got = c(tokens)
    assert got.dtype == dtype
    tol = {"atol": 1e-8, "rtol": 1e-7} if dtype == torch.float64 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got, reference(tokens), **tol)


class _ResidualAddedInPlace(torch.nn.Module):
    """Falcon's parallel block writes `mlp_output += attention_output`: the MLP site's output changed in place."""

    def __init__(self):
        super().__init__()
        self.mlp = GatedMLP()

    def forward(self, x, other):
        y = self.mlp(x)
        y += other
        return y


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("how,options", [
    ("dense", dict(ffn_active=4)),  # every block: outputs and gradients are dense's
    ("exact_forward", dict(ffn_active=2, exact_forward=True, ffn_loss_rows="off")),  # dense's outputs
    ("routed", dict(ffn_active=2, exact_forward=False)),
])
def test_an_mlp_output_changed_in_place_downstream(compiler, how, options):
    """Run eagerly, autograd refuses in-place changes to a custom Function's outputs that are views;
    the site's output is not one (it was, [T, d] viewed as x's shape)."""
    torch.manual_seed(0)
    model = _ResidualAddedInPlace()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 19, 32, requires_grad=True)
    other = torch.randn(2, 19, 32)
    fast = compiled(model, compiler=compiler, sparse_attention=False, sparse_inference=False, **options)
    for _ in range(2):  # calibration, then a call that runs `how`
        x.grad = None
        got = fast(x, other)
        got.square().sum().backward()
    assert spt_compile.report(model)[0]["runs"].get(how) == 1
    got_dx = x.grad.clone()
    x.grad = None
    want = reference(x, other)
    want.square().sum().backward()
    if how != "routed":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if how == "dense":
        torch.testing.assert_close(got_dx, x.grad, atol=1e-5, rtol=1e-4)
