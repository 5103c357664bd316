"""What the backend did to each graph it compiled, kept per model: `compile_reports(model)`.

The backend never sees the model, only the graph and its example inputs, among which are the model's
parameters (Dynamo passes them as graph inputs). So each graph's report is filed under those tensors,
weakly: a model that is freed takes its reports with it, and nothing process-wide grows. A graph that
reads no parameter (a compiled function) keeps its report only in a short list of recent ones.
"""

from __future__ import annotations

import itertools
from collections import deque

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from spt_compile.passes import GraphReport

_BY_TENSOR: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> [GraphReport], compile order
_UNOWNED: deque = deque(maxlen=16)  # reports of graphs without parameters, newest last
_ORDER = itertools.count()


def record(report: GraphReport, example_inputs, gm: nn.Module | None = None) -> None:
    """Files `report` under every parameter among the graph's inputs, and under those the graph module
    holds as attributes (Dynamo keeps parameters there instead when it does not inline nn.Modules)."""
    report.order = next(_ORDER)
    params = [t for t in example_inputs if isinstance(t, nn.Parameter)]
    if gm is not None:
        params += list(gm.parameters())
    if not params:
        _UNOWNED.append(report)
    for p in params:
        _BY_TENSOR.setdefault(p, []).append(report)


def compile_reports(model: nn.Module | None = None) -> list[GraphReport]:
    """The reports of the graphs compiled for `model` (any graph that reads one of its parameters),
    oldest first; without a model, the recent graphs that read no parameter. A model that runs a graph
    compiled for another instance of its class (Dynamo reuses it) has no report of its own."""
    if model is None:
        return list(_UNOWNED)
    from .registry import _named_tensors  # the parameters as the graphs saw them (FSDP2: unsharded)

    found: dict[int, GraphReport] = {}
    for p in list(model.parameters()) + list(_named_tensors(model).values()):
        for r in _BY_TENSOR.get(p, ()):
            found[id(r)] = r
    return sorted(found.values(), key=lambda r: r.order)


def tensors_with_reports() -> int:
    """How many tensors hold reports (tests: freed models leave none behind)."""
    return len(_BY_TENSOR)


__all__ = ["compile_reports", "record"]
