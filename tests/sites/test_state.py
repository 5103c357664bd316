"""Sparse state: calibration, run-time options without recompiling, save / load, recompute replay."""

from __future__ import annotations

import copy

import pytest
import torch

import spt_compile
from spt_compile import compile_reports
from spt_compile.registry import REGISTRY, SptStateError, model_sites

from toy_models import SPARSE_AT_EVERY_LENGTH, NanoGPT


def compiled_gpt(seed=0, **options):
    torch.manual_seed(seed)
    model = NanoGPT(layers=2, block_size=64)
    torch._dynamo.reset()
    # exact_forward off: these tests compare the sparse forward's state (calibration, options, replay)
    opts = {"compiler": "aot_eager", "calibration_steps": 2, **SPARSE_AT_EVERY_LENGTH, "exact_forward": False,
            **options}
    return model, torch.compile(model, backend="spt", options=opts)


def step(compiled, seed):
    x = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(seed))
    out = compiled(x)
    out.float().pow(2).mean().backward()
    return out.detach()


def sites(model):
    return dict(model_sites(model))


def test_calibration_runs_dense_then_fits_state():
    model, compiled = compiled_gpt()
    dense_model = copy.deepcopy(model)
    for i in range(2):  # calibration: exactly dense
        out = step(compiled, i)
        torch.testing.assert_close(out, dense_model(torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(i))),
                                   atol=1e-5, rtol=1e-4)
    s = sites(model)
    assert len(s) == 4
    att = next(v for k, v in s.items() if "@attention" in k)
    mlp = next(v for k, v in s.items() if "@mlp" in k)
    assert att.codebooks is None and att.key_buffer is None  # block selection (default) needs no PQ
    step(compiled, 2)  # first sparse call
    assert att.codebooks is None
    with spt_compile.enable(attention_selection="token"):  # token selection fits them when first chosen
        step(compiled, 3)
    assert att.codebooks is not None and att.key_buffer is None
    assert att.codebooks.shape == (4, 2, 16, 8)  # [Hkv, S = 16 / 8, K, dsub]
    assert mlp.router is not None and mlp.router.shape == (65, 4)
    assert 0 < att.quality["recall"] <= 1 and 0 < att.quality["mass"] <= 1
    assert "captured" in mlp.quality
    assert att.calls == 4 and att.train_calls == 4


def test_run_time_options_change_without_recompiling():
    model, compiled = compiled_gpt(calibration_steps=0)
    step(compiled, 0)
    n = len(compile_reports(model))
    with spt_compile.enable(density=1.0, ffn_active=4):
        every = step(compiled, 1)
    with spt_compile.enable(top_l=2, ffn_active=1):
        sparse = step(compiled, 1)
    with spt_compile.disable():
        dense = step(compiled, 1)
    assert len(compile_reports(model)) == n, "run-time options must not recompile"
    torch.testing.assert_close(every, dense, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_disable_leaves_state_untouched():
    model, compiled = compiled_gpt(calibration_steps=0)
    step(compiled, 0)
    before = spt_compile.state_dict(model)
    with spt_compile.disable():
        step(compiled, 1)
    after = spt_compile.state_dict(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_state_roundtrip_into_a_fresh_model_before_compiling(tmp_path):
    """Save after some steps; a fresh process-like copy loads the state before its first call and
    continues exactly as the original does."""
    model, compiled = compiled_gpt(seed=1)
    for i in range(4):
        step(compiled, i)
    path = tmp_path / "spt_state.pt"
    torch.save({"model": model.state_dict(), "spt": spt_compile.state_dict(model)}, path)
    assert any(k.endswith("/router") for k in spt_compile.state_dict(model))

    saved = torch.load(path)
    clone = NanoGPT(layers=2, block_size=64)
    clone.load_state_dict(saved["model"])
    spt_compile.load_state_dict(clone, saved["spt"])  # sites do not exist yet: kept pending
    assert spt_compile.state_dict(clone).keys() == saved["spt"].keys()
    torch._dynamo.reset()
    compiled_clone = torch.compile(clone, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 2,
                                                                  **SPARSE_AT_EVERY_LENGTH, "exact_forward": False})
    for i in range(4, 7):
        a, b = step(compiled, i), step(compiled_clone, i)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for k, v in spt_compile.state_dict(model).items():
        torch.testing.assert_close(spt_compile.state_dict(clone)[k], v, msg=k)


def test_state_that_does_not_fit_is_refused(tmp_path):
    model, compiled = compiled_gpt(calibration_steps=0)
    step(compiled, 0)
    state = spt_compile.state_dict(model)
    other = NanoGPT(layers=2, block_size=64)
    with pytest.raises(SptStateError, match="do not match this model"):
        spt_compile.load_state_dict(other, {"nonsense.weight@mlp0/router": torch.zeros(1)})
    torch._dynamo.reset()
    compiled_other = torch.compile(other, backend="spt", options={"compiler": "aot_eager", "ffn_blocks": 8,
                                                                  "calibration_steps": 0, **SPARSE_AT_EVERY_LENGTH})
    step(compiled_other, 0)
    with pytest.raises(SptStateError, match="ffn_blocks"):
        spt_compile.load_state_dict(other, state)


def test_checkpointed_recompute_replays_the_forward():
    """Under activation checkpointing the forward runs again inside backward; it must select the same
    keys and blocks, so gradients equal those of an uncheckpointed run with the same state."""
    class Ckpt(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            x = self.inner.wte(idx) + self.inner.wpe(torch.arange(idx.shape[1]))
            for block in self.inner.h:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return self.inner.lm_head(self.inner.ln_f(x))

    torch.manual_seed(3)
    base = NanoGPT(layers=2, block_size=64)
    plain = copy.deepcopy(base)
    opts = {"compiler": "aot_eager", "calibration_steps": 0, "density": 0.3, "ffn_active": 2,
            **SPARSE_AT_EVERY_LENGTH}
    torch._dynamo.reset()
    c_ckpt = torch.compile(Ckpt(base), backend="spt", options=opts)
    c_plain = torch.compile(plain, backend="spt", options=opts)
    x = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    c_ckpt(x).sum().backward()  # first call fits codebooks / router from this batch
    c_plain(x).sum().backward()
    for p in list(base.parameters()) + list(plain.parameters()):
        p.grad = None
    # identical state in both (same weights, same first batch, same seeds): compare a second step
    spt_compile.load_state_dict(plain, spt_compile.state_dict(base))
    a = c_ckpt(x)
    b = c_plain(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(base.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def test_registry_finds_the_same_site_after_recompiling_for_eval():
    model, compiled = compiled_gpt(calibration_steps=0)
    step(compiled, 0)
    n_sites = len(REGISTRY.sites)
    with torch.no_grad():
        compiled(torch.randint(0, 97, (2, 48)))  # a new graph (no grad): same sites
    assert len(REGISTRY.sites) == n_sites


def test_models_sharing_one_compiled_graph_keep_their_own_sites():
    """Dynamo reuses one graph for every instance of a module class (parameters are inputs, not
    guarded); each instance must still get its own sites, found by its weights at run time."""
    torch._dynamo.reset()
    a, b = NanoGPT(layers=2, block_size=64), NanoGPT(layers=2, block_size=64)
    opts = {"compiler": "aot_eager", "calibration_steps": 1, **SPARSE_AT_EVERY_LENGTH}
    ca, cb = (torch.compile(m, backend="spt", options=opts) for m in (a, b))
    for i in range(2):
        step(ca, i)
    step(cb, 5)
    assert len(compile_reports(a)) == 1 and not compile_reports(b), "b runs a's graph"
    sa, sb = sites(a), sites(b)
    assert len(sa) == len(sb) == 4 and not set(map(id, sa.values())) & set(map(id, sb.values()))
    assert [s.calls for s in sa.values()] == [2] * 4 and [s.calls for s in sb.values()] == [1] * 4


@pytest.mark.slow
def test_inductor_runs_calibration_sparse_and_disabled_calls():
    """Inductor checks every fallback output's layout against the fake kernel: exercise the dense
    (calibration), sparse and disabled paths of both ops under it."""
    model, compiled = compiled_gpt(compiler="inductor", calibration_steps=1)
    reference = copy.deepcopy(model)
    x = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step(compiled, 0), reference(x).detach(), atol=1e-5, rtol=1e-4)  # calibration: dense
    sparse = step(compiled, 0)
    with spt_compile.disable():
        dense = step(compiled, 0)
    torch.testing.assert_close(dense, reference(x).detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_recompiling_with_other_clustering_starts_fresh_sites():
    """ffn_cluster decides what calibration builds, so a recompile that changes it must not reuse a
    site calibrated the other way (it would never cluster, or keep a stale permutation)."""
    model, compiled = compiled_gpt(calibration_steps=1, ffn_cluster=False)
    for i in range(2):
        step(compiled, i)
    before = {n: s for n, s in model_sites(model) if s.kind == "mlp"}
    assert all(s.perm is None for s in before.values())
    torch._dynamo.reset()
    recompiled = torch.compile(model, backend="spt", options={"compiler": "aot_eager", "calibration_steps": 1,
                                                              "ffn_cluster": True, **SPARSE_AT_EVERY_LENGTH})
    for i in range(2):
        step(recompiled, i)
    after = {n: s for n, s in model_sites(model) if s.kind == "mlp"}
    assert after.keys() == before.keys()
    assert all(after[n] is not before[n] and after[n].perm is not None for n in after)


def test_a_freed_model_leaves_no_sites_behind():
    """Sparse state belongs to its model: once the model is freed, its sites go too (the registry
    forgets them when it next builds one), so a process that builds many models does not grow."""
    import gc
    import weakref

    model, compiled = compiled_gpt()
    step(compiled, 0)
    refs = [weakref.ref(site) for site in sites(model).values()]
    assert len(refs) == 4
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    other, compiled = compiled_gpt(seed=1)
    step(compiled, 0)
    gc.collect()
    assert all(r() is None for r in refs)
