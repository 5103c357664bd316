"""Options: validation with named errors, enable()/disable() semantics, run-time changes."""

from __future__ import annotations

import pytest
import torch

import spt_compile
from spt_compile.context import resolve
from spt_compile.options import Options, SptOptionError, make_options

from toy_models import GatedMLP


@pytest.mark.parametrize("name,value", [
    ("density", 0.0), ("density", 1.5), ("density", float("nan")), ("density", True),
    ("top_l", 0), ("top_l", 2.5), ("ffn_blocks", 0), ("ffn_active", 5), ("ffn_active", 0),
    ("pq_subspace_dim", 0), ("pq_codewords", 300), ("calibration_steps", -1), ("compiler", "tvm"),
    ("sparse_attention", "yes"), ("attention_selection", "tokens"), ("attention_block", 48),
    ("attention_block", 8), ("attention_impl", "cuda"), ("pq_proxy", "cosine"), ("ffn_cluster", 1),
    ("ffn_impl", "cuda"), ("ffn_impl", None), ("ffn_balance", -0.5), ("ffn_balance", 2.0),
    ("chunked_loss", "yes"), ("loss_chunk", 0), ("loss_chunk", 2.0), ("ffn_skip_min", -0.1),
    ("ffn_skip_min", 1.5), ("ffn_skip_min", float("nan")), ("ffn_skip_min", True),
])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(SptOptionError, match=f"'{name}'"):
        make_options({name: value})


def test_default_compiler_is_inductor_unless_spt_compiler_says_otherwise(monkeypatch):
    """compiler='auto' (the default) resolves at compile time: $SPT_COMPILER if set, else Inductor;
    a named compiler ignores the variable, and a bad value names the variable."""
    from spt_compile.options import COMPILER_ENV

    monkeypatch.delenv(COMPILER_ENV, raising=False)
    assert Options().compiler == "auto" and Options().downstream_compiler == "inductor"
    monkeypatch.setenv(COMPILER_ENV, "eager")
    assert Options().downstream_compiler == "eager"
    assert Options(compiler="aot_eager").downstream_compiler == "aot_eager"
    monkeypatch.setenv(COMPILER_ENV, "tvm")
    with pytest.raises(SptOptionError, match="SPT_COMPILER='tvm'.*inductor, aot_eager, eager"):
        Options().downstream_compiler
    assert Options(compiler="inductor").downstream_compiler == "inductor"


@pytest.mark.parametrize("env,given,expected", [
    (None, {}, "inductor"), ("aot_eager", {}, "aot_eager"), ("aot_eager", {"compiler": "eager"}, "eager")])
def test_backend_hands_the_graph_to_the_resolved_compiler(monkeypatch, env, given, expected):
    """What spt_backend passes to the downstream compiler (recorded, then run as aot_eager would)."""
    import spt_compile.backend as backend

    if env is None:
        monkeypatch.delenv("SPT_COMPILER", raising=False)
    else:
        monkeypatch.setenv("SPT_COMPILER", env)
    seen, real = [], backend.downstream
    monkeypatch.setattr(backend, "downstream",
                        lambda gm, inputs, compiler, mode: seen.append(compiler) or real(gm, inputs, "eager", mode))
    torch._dynamo.reset()
    x, mlp = torch.randn(2, 5, 32), GatedMLP()
    torch.compile(mlp, backend="spt", options={"calibration_steps": 0, **given})(x)
    assert seen == [expected]
    report = spt_compile.compile_reports(mlp)[-1]
    assert report.compiler == expected and report.summary().endswith(f"; downstream: {expected}")
    with spt_compile.enable(**given):
        assert f"traced; downstream: {expected}" in str(spt_compile.explain(GatedMLP(), x))


def test_unknown_option_suggests_the_close_name():
    with pytest.raises(SptOptionError, match="did you mean 'density'"):
        make_options({"densty": 0.5})


def test_defaults():
    o = Options()
    assert (o.density, o.top_l, o.ffn_blocks, o.active_blocks, o.pq_subspace_dim, o.pq_codewords) == (
        0.125, None, 4, 3, 8, 16)
    assert Options(ffn_blocks=8).active_blocks == 6  # 3/4 by default (docs/quality.md)
    assert Options(ffn_blocks=1).active_blocks == 1


def test_enable_validates_eagerly():
    with pytest.raises(SptOptionError, match="'density'"):
        with spt_compile.enable(density=2.0):
            pass
    with pytest.raises(SptOptionError, match="'ffn_active'"):
        with spt_compile.enable(ffn_active=6, ffn_blocks=4):
            pass


def test_enable_overrides_nest_and_disable_forces_dense():
    base = Options(density=0.5)
    assert resolve(base) == (base, False)
    with spt_compile.enable(density=0.25, ffn_active=1):
        o, dense = resolve(base)
        assert (o.density, o.active_blocks, dense) == (0.25, 1, False)
        with spt_compile.enable(top_l=3):
            o, _ = resolve(base)
            assert (o.density, o.top_l) == (0.25, 3)
        with spt_compile.disable():
            assert resolve(base)[1] is True
    assert resolve(base) == (base, False)


def test_enable_and_disable_are_context_local():
    """A thread sees only the blocks it entered itself: another thread's enable() or disable() does not
    leak into it, and a thread started inside a block starts with none (contextvars)."""
    import threading

    base = Options(density=0.5)
    inside, entered, release = {}, threading.Event(), threading.Event()

    def other():
        with spt_compile.disable(), spt_compile.enable(density=0.125):
            entered.set()
            release.wait(5)
            inside["other"] = resolve(base)

    with spt_compile.enable(density=0.25):
        t = threading.Thread(target=other)
        t.start()
        entered.wait(5)
        inside["main"] = resolve(base)  # while the other thread is inside its own blocks
        release.set()
        t.join()
        fresh = threading.Thread(target=lambda: inside.update(fresh=resolve(base)))
        fresh.start()
        fresh.join()
    assert (inside["main"][0].density, inside["main"][1]) == (0.25, False)
    assert (inside["other"][0].density, inside["other"][1]) == (0.125, True)
    assert inside["fresh"] == (base, False)
    assert resolve(base) == (base, False)


def test_enable_ffn_active_beyond_a_sites_blocks_is_named_at_run_time():
    with spt_compile.enable(ffn_active=6):
        with pytest.raises(SptOptionError, match="ffn_active"):
            resolve(Options(ffn_blocks=4))


def test_enable_makes_spt_the_default_backend_only_inside():
    from spt_compile import compile_reports

    torch._dynamo.reset()
    mlp = GatedMLP()
    x = torch.randn(2, 5, 32)
    before = len(compile_reports(mlp))
    with spt_compile.enable(compiler="eager", calibration_steps=0):
        torch.compile(mlp)(x)
        named = torch.compile(GatedMLP(), backend="eager")  # an explicitly named backend is left alone
        named(x)
    assert len(compile_reports(mlp)) == before + 1
    assert compile_reports(mlp)[-1].rewritten("mlp")
    if hasattr(torch.compiler, "get_default_backend"):  # newer torch: enable() sets the default backend
        assert torch.compiler.get_default_backend() == "inductor"
    # older torch (2.11, the GPU machine's): enable() wraps torch.compile inside the block only
    assert not hasattr(torch.compile, "__wrapped__"), "enable() left torch.compile wrapped"


def test_compile_rejects_bad_options_by_name():
    torch._dynamo.reset()
    compiled = torch.compile(GatedMLP(), backend="spt", options={"ffn_blocks": 0})
    with pytest.raises(Exception, match="ffn_blocks"):
        compiled(torch.randn(2, 3, 32))
