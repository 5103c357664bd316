"""The `spt` Dynamo backend: rewrite attention and MLPs, then hand the graph to a downstream compiler.

Found by name through the `torch_dynamo_backends` entry point, so
`torch.compile(model, backend="spt", options={...})` works after `pip install` with no import.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

from torch.fx import GraphModule

from .compile_reports import record
from .distributed import ddp
from .context import compile_overrides
from .options import Options, make_options

from spt_compile.passes import rewrite_graph
from spt_compile.passes.loss import LOGITS_FROM_OUTSIDE
from spt_compile.passes.float_inputs import FloatGuard, copy_graph_module, float_inputs
from spt_compile.passes.returned_logits import LogitsGradient, detach_returned_logits

log = logging.getLogger("spt_compile")
_warned: set[str] = set()  # warnings given once per process

def compile_options(options: Optional[dict[str, Any]]) -> Options:
    """enable()'s options, then torch.compile(options=...) on top, validated."""
    return make_options({**compile_overrides(), **(options or {})}, where="torch.compile(backend='spt', options=...)")


def allow_run_time_sizes(example_inputs) -> None:
    """The attention op decides at run time how many keys each query keeps (and the MLP op how many
    tokens each block serves), so their selection / saved outputs have unbacked sizes. Dynamo builds its ShapeEnv with capture_dynamic_output_shape_ops off by default;
    allow such sizes for the graph being compiled (this ShapeEnv only, no global config change)."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    env = getattr(fake_mode, "shape_env", None)
    if env is not None and not env.allow_dynamic_output_shape_ops:
        env.settings = dataclasses.replace(env.settings, allow_dynamic_output_shape_ops=True)


def downstream(gm: GraphModule, example_inputs, compiler: str, mode: Optional[str]):
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else {}
    if mode == "reduce-overhead":
        # CUDA graphs around what can be captured: the ops tagged cudagraph_unsafe (the sites that keep
        # per-call state: routed MLP, the regular attention op, the chunked loss) run between captured parts
        patches = {**patches, "graph_partition": True}
    return compile_fx(gm, example_inputs, config_patches=patches)


def spt_backend(gm: GraphModule, example_inputs, options: Optional[dict[str, Any]] = None,
                mode: Optional[str] = None, lower: Optional[Callable] = None, **_: Any):
    """Dynamo backend: gm is the torch-level graph of one traced region.

    torch.compile refuses `mode=` together with `options=`, so an Inductor mode can also be given
    as options={"compiler": "inductor", "mode": "max-autotune"}.

    `lower(gm, example_inputs, compile)` hands the rewritten graph to the downstream compiler
    `compile(gm, example_inputs)`; by default at once. Under DDP, distributed/ddp.py passes one that
    splits the rewritten graph at gradient-bucket boundaries first."""
    options = dict(options or {})
    if lower is None and ddp.splitting_without_spt():
        log.warning("spt: DDP split this graph into gradient buckets before spt saw it (DDPOptimizer is not "
                    "wrapped in this torch version): a site cut by a bucket boundary stays dense. Set "
                    "torch._dynamo.config.optimize_ddp = False to rewrite every site (all-reduce then waits "
                    "for the whole backward)")
    lower = lower or (lambda g, inputs, compile: compile(g, inputs))
    if "mode" in options:
        mode = options.pop("mode")
    opts = compile_options(options)
    compiler = opts.downstream_compiler
    if mode and compiler != "inductor":
        log.warning("spt: torch.compile mode=%r only applies to compiler='inductor'; ignored for %r (use "
                    "options={'compiler': 'inductor', 'mode': %r})", mode, compiler, mode)
    # The graph as traced, kept when module floats get read as constants: it runs instead whenever one
    # of them changes (passes/float_inputs.py).
    as_traced = copy_graph_module(gm) if float_inputs(gm, example_inputs) else None
    # mode="reduce-overhead" captures CUDA graphs: attention gets the op made for them
    graphed = mode == "reduce-overhead" and compiler == "inductor"
    report = rewrite_graph(gm, example_inputs, opts, graphed=graphed)
    report.compiler = compiler
    record(report, example_inputs, gm)  # spt_compile.compile_reports(model)
    if report.rewritten("attention") or report.rewritten("mlp"):
        allow_run_time_sizes(example_inputs)
    log.info("spt: %s", report.summary())
    for site in report.dense():
        log.info("spt: left dense: %s %s: %s", site.kind, site.path or "<top>", site.reason)
        if site.kind == "loss" and site.reason == LOGITS_FROM_OUTSIDE and site.reason not in _warned:
            _warned.add(site.reason)  # once per process: every recompile of the same model would repeat it
            log.warning("spt: the loss is not chunked and gives the MLP sites no loss rows: %s", site.reason)
    def compile(g, inputs):
        return downstream(g, inputs, compiler, mode)

    if as_traced is not None and not report.rewritten():  # nothing needed the constants: the graph as traced, no guard
        return lower(as_traced, example_inputs, compile)
    # Returned logits leave the graph outside autograd, which then hands it no zero-filled [T, V] gradient
    returned, n_outputs = detach_returned_logits(gm) if report.rewritten("loss") else ([], 0)
    compiled = lower(gm, example_inputs, compile)
    if returned:
        compiled = LogitsGradient(compiled, returned, n_outputs)
    return compiled if as_traced is None else FloatGuard(compiled, as_traced.forward, report.floats)
