"""spt_compile: a torch.compile backend that sparsifies attention and MLPs for fine-tuning.

    compiled = torch.compile(model, backend="spt")            # or options={...}
    with spt_compile.enable(density=1/8, ffn_active=2): ...   # torch.compile(model) uses spt here
    with spt_compile.disable(): ...                           # spt-compiled models run dense here
    print(spt_compile.explain(model, **batch))                # what was rewritten, what was not, why
    spt_compile.compile_reports(model), spt_compile.report(model)  # what compiling did; how calls ran
    torch.save(spt_compile.state_dict(model), path)           # sparse state beside the checkpoint
    dcp.save({..., "spt": spt_compile.SptState(model)}, ...)  # or in torch.distributed.checkpoint
"""

import os as _os

# In a source checkout passes/ and sparse_ops/ sit beside this folder (the layout the project asked
# for); an installed wheel puts them inside it. Let spt_compile.passes / .sparse_ops resolve in both.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "passes")) and _os.path.isfile(
    _os.path.join(_root, "passes", "__init__.py")
):
    __path__.append(_root)

from . import ops  # noqa: E402  (registers the spt:: custom ops)
from .backend import spt_backend  # noqa: E402
from .compile_reports import compile_reports  # noqa: E402
from .context import disable, enable  # noqa: E402
from .distributed.checkpoint import SptState  # noqa: E402
from .explain import explain  # noqa: E402
from .options import Options, SptOptionError, options_help  # noqa: E402
from .registry import SptStateError, load_state_dict, report, state_dict  # noqa: E402



def _register_for_source_runs() -> None:
    """`backend="spt"` is found through the package's entry point once installed. Run from a source
    checkout (PYTHONPATH, as on the offline GPU machine) there is none: register the name here."""
    from torch._dynamo.backends import registry

    if "spt" not in registry.list_backends(exclude_tags=()):
        registry.register_backend(spt_backend, name="spt")


_register_for_source_runs()

__version__ = "0.1.0"

__all__ = [
    "Options", "SptOptionError", "SptState", "SptStateError", "compile_reports", "disable", "enable", "explain", "load_state_dict",
    "ops", "options_help", "report", "spt_backend", "state_dict",
]
