"""DDP: every site is rewritten whatever the gradient-bucket size, and communication still overlaps
with backward.

Under DistributedDataParallel, Dynamo's DDPOptimizer splits each traced graph at gradient-bucket
boundaries and hands the backend one piece at a time, so that each bucket's all-reduce can start
while backward still runs on the pieces before it. An attention or MLP whose nodes fall into two
pieces could not be matched by either. So, when the backend is spt, the order is swapped: the
passes rewrite the whole graph first (each site becomes one spt:: node, which no split can cut),
then DDPOptimizer splits that graph exactly as it would have split the original (the sites carry
the same parameters as inputs) and the downstream compiler compiles each piece. Other backends are
untouched.

This wraps DDPOptimizer.compile_fn, a private API of torch._dynamo; `install()` returns False where
it is missing, and the backend then warns that sites cut by a bucket boundary stay dense (the
alternative, torch._dynamo.config.optimize_ddp = False, rewrites everything but all-reduces only
after the whole backward).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Optional

log = logging.getLogger("spt_compile")


def _spt_call(fn: Callable) -> Optional[Callable]:
    """If `fn` (DDPOptimizer's backend) is spt, a function (gm, inputs, lower) that calls it with its
    options and `lower`; else None."""
    from spt_compile.backend import spt_backend
    from spt_compile.context import _DefaultSpt

    core, kwargs = getattr(fn, "compiler_fn", fn), dict(getattr(fn, "kwargs", {}) or {})  # torch.compile's wrapper
    if core is spt_backend or isinstance(core, _DefaultSpt):
        return lambda gm, inputs, lower: core(gm, inputs, lower=lower, **kwargs)
    return None


def install() -> bool:
    """Wrap DDPOptimizer.compile_fn (once per process). False where torch has no DDPOptimizer."""
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:
        return False
    original = getattr(DDPOptimizer, "compile_fn", None)
    if original is None:
        return False
    if getattr(original, "_spt_rewrites_first", False):
        return True

    @functools.wraps(original)
    def compile_fn(self, gm, example_inputs, **compiler_configs: Any):
        spt = _spt_call(self.backend_compile_fn)
        if spt is None:
            return original(self, gm, example_inputs, **compiler_configs)

        def split_then_lower(rewritten, inputs, lower: Callable):
            pieces = copy.copy(self)  # the same bucket sizes; each piece goes to the downstream compiler
            pieces.backend_compile_fn = lambda g, i, **_: lower(g, i)
            return original(pieces, rewritten, inputs, **compiler_configs)

        return spt(gm, example_inputs, split_then_lower)

    compile_fn._spt_rewrites_first = True
    DDPOptimizer.compile_fn = compile_fn
    return True


def splitting_without_spt() -> bool:
    """True when this compile is a piece DDPOptimizer cut before spt saw the graph (install() had no
    effect): sites cut by a bucket boundary stay dense."""
    try:
        import torch._dynamo.utils as dynamo_utils
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return False
    return (dynamo_utils.get_optimize_ddp_mode() == "ddp_optimizer"
            and DistributedDataParallel._get_active_ddp_module() is not None)
