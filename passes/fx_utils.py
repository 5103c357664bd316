"""Reading the torch-level graph Dynamo hands a backend.

The same operation appears in several spellings (`torch.matmul`, `operator.matmul`, `x.matmul`;
`F.softmax`, `torch.softmax`, `x.softmax`), so matchers ask for a canonical name with `op(node)`
and for arguments by name with `bind(node)`.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

_FUNCTIONS: dict[Any, str] = {
    torch._C._nn.linear: "linear", F.linear: "linear",
    torch.addmm: "addmm",
    torch.matmul: "matmul", operator.matmul: "matmul",
    torch.bmm: "bmm", torch.baddbmm: "baddbmm", torch.full: "full", torch.einsum: "einsum",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.transpose: "transpose", torch.permute: "permute",
    torch.reshape: "reshape", torch.repeat_interleave: "repeat_interleave",
    operator.getitem: "getitem",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", operator.itruediv: "div",
    operator.neg: "neg", torch.neg: "neg",
    operator.pow: "pow", torch.pow: "pow",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.erf: "erf", torch.exp: "exp", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.abs: "abs",
    torch.square: "square",
    F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", F.leaky_relu: "leaky_relu",
    F.softplus: "softplus", F.mish: "mish", F.hardswish: "hardswish", F.elu: "elu",
    torch.where: "where", torch.masked_fill: "masked_fill",
    F.multi_head_attention_forward: "mha",
    F.cross_entropy: "cross_entropy",
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm", F.rms_norm: "rms_norm", torch.rms_norm: "rms_norm",
}

# Element-wise ops an activation may be written with (GPT-2's tanh-GELU is mul/pow/tanh/add).
POINTWISE = {
    "add", "sub", "mul", "div", "neg", "pow", "tanh", "sigmoid", "erf", "exp", "sqrt", "rsqrt", "abs",
    "relu", "gelu", "silu", "leaky_relu", "softplus", "mish", "hardswish", "elu", "to", "float", "type",
    "contiguous", "clamp", "rsub", "square",
}

# Argument names per (canonical name, "function" | "method"); method lists include self.
_SIGNATURES: dict[tuple[str, str], tuple[str, ...]] = {
    ("linear", "function"): ("input", "weight", "bias"),
    ("addmm", "function"): ("input", "mat1", "mat2"),
    ("matmul", "function"): ("input", "other"),
    ("matmul", "method"): ("input", "other"),
    ("bmm", "function"): ("input", "mat2"),
    ("bmm", "method"): ("input", "mat2"),
    ("baddbmm", "function"): ("input", "batch1", "batch2"),
    ("baddbmm", "method"): ("input", "batch1", "batch2"),
    ("full", "function"): ("size", "fill_value"),
    ("expand_as", "method"): ("input", "other"),
    ("softmax", "function"): ("input", "dim", "_stacklevel", "dtype"),
    ("softmax", "method"): ("input", "dim", "dtype"),
    ("sdpa", "function"): ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    ("dropout", "function"): ("input", "p", "training", "inplace"),
    ("transpose", "function"): ("input", "dim0", "dim1"),
    ("transpose", "method"): ("input", "dim0", "dim1"),
    ("masked_fill", "function"): ("input", "mask", "value"),
    ("masked_fill", "method"): ("input", "mask", "value"),
    ("where", "function"): ("condition", "input", "other"),
    ("repeat_interleave", "function"): ("input", "repeats", "dim"),
    ("repeat_interleave", "method"): ("input", "repeats", "dim"),
    ("mul", "function"): ("input", "other"),
    ("mul", "method"): ("input", "other"),
    ("add", "function"): ("input", "other"),
    ("add", "method"): ("input", "other"),
    ("div", "function"): ("input", "other"),
    ("div", "method"): ("input", "other"),
    ("layer_norm", "function"): ("input", "normalized_shape", "weight", "bias", "eps"),
    ("rms_norm", "function"): ("input", "normalized_shape", "weight", "eps"),
    ("cross_entropy", "function"): ("input", "target", "weight", "size_average", "ignore_index", "reduce",
                                    "reduction", "label_smoothing"),
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sdpa": {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    "linear": {"bias": None},
    "dropout": {"p": 0.5, "training": True, "inplace": False},
    "softmax": {"dim": None, "dtype": None},
    "addmm": {"beta": 1, "alpha": 1},
    "baddbmm": {"beta": 1, "alpha": 1},
    "cross_entropy": {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                      "reduction": "mean", "label_smoothing": 0.0},
}
# In-place methods that the matchers read as their out-of-place forms: the pattern checks already
# require each intermediate to have no other user, so nothing else can see the mutation.
_INPLACE = {"__getitem__": "getitem", "add_": "add", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill"}
# torch.dropout(input, p, train) names its flag differently
_ALIASES = {"train": "training"}


def op(node: Any) -> Optional[str]:
    """Canonical operation name of a call node, or None."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
        if name is None and getattr(node.target, "__name__", None) == "tag_activation_checkpoint":
            return "checkpoint"
        return name
    if node.op == "call_method":
        return _INPLACE.get(node.target, node.target)
    return None


def bind(node: Node) -> dict[str, Any]:
    """Arguments of a call node by name, with the defaults filled in."""
    name = op(node)
    kind = "method" if node.op == "call_method" else "function"
    params = _SIGNATURES.get((name, kind))
    if params is None:
        raise KeyError(f"no signature for {name} ({kind})")
    if node.target is torch.dropout:
        params = ("input", "p", "train")
    bound = dict(_DEFAULTS.get(name, {}))
    bound.update(zip(params, node.args))
    bound.update(node.kwargs)
    return {_ALIASES.get(k, k): v for k, v in bound.items()}


def val(node: Any) -> Any:
    """The example (fake) value Dynamo recorded for a node."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: Any) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same(a: Any, b: Any) -> bool:
    """Sizes provably equal (also when symbolic under dynamic=True)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def static_int(x: Any) -> Optional[int]:
    if isinstance(x, int):
        return x
    try:
        return int(x) if not isinstance(x, torch.SymInt) or x.node.is_constant() else None
    except Exception:
        return None


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def constant(x: Any) -> Optional[float]:
    """A Python number, or the value of a 0-d tensor made in the graph from one: `torch.full((), c)`
    (old HF GPT-2 and DistilBERT divide by and fill with such tensors) or `torch.tensor(c)` (GPT-Neo's
    mask value); else None."""
    return float(x) if is_number(x) else _graph_scalar_value(x)


def graph_scalar(x: Any) -> bool:
    """x is a 0-d tensor the graph makes from a number: `torch.full((), c)` or `torch.tensor(c)`."""
    return _graph_scalar_value(x) is not None


def _graph_scalar_value(x: Any, depth: int = 0) -> Optional[float]:
    name = op(x)
    if name == "full":
        a = bind(x)
        if tuple(a["size"]) == () and is_number(a["fill_value"]):
            return float(a["fill_value"])
    elif (isinstance(x, Node) and x.op == "call_function" and x.target is torch.tensor and len(x.args) == 1
          and is_number(x.args[0])):
        return float(x.args[0])
    elif (name in _SCALAR_ARITHMETIC and depth < 8 and x.op in ("call_function", "call_method")
          and set(x.kwargs) <= ({"dtype"} if name == "to" else set())):
        # arithmetic on such a scalar, all in the graph: DeBERTa's sqrt(torch.tensor(d) * factor).to(dtype)
        v = val(x)
        if not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point):
            return None
        args = [a if is_number(a) else _graph_scalar_value(a, depth + 1)
                for a in x.args if not isinstance(a, torch.dtype)]
        if not args or any(a is None for a in args):
            return None
        try:
            value = _SCALAR_ARITHMETIC[name](*(float(a) for a in args))
        except (ArithmeticError, TypeError, ValueError):
            return None
        return float(torch.tensor(value, dtype=torch.float64).to(v.dtype))  # as the graph rounds it
    return None


_SCALAR_ARITHMETIC = {  # op name -> its value on Python floats (casts: the value, rounded by the caller)
    "sqrt": math.sqrt, "mul": operator.mul, "div": operator.truediv, "add": operator.add, "sub": operator.sub,
    "to": lambda a: a, "float": lambda a: a,
}


def requires_grad(node: Any) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.requires_grad


def module_path(node: Node) -> str:
    """The innermost module a node was traced in, spelt as in named_modules()."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # The root is L['self'], or L['args'][0] when the model's forward is wrapped (Hugging Face's
    # decorators): either way it is the model itself, not a path component.
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", path)
    path = re.sub(r"\.?__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def common_path(nodes: Iterable[Node]) -> str:
    parts = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not parts:
        return ""
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def users_outside(nodes: set[Node], keep: Iterable[Node] = ()) -> list[Node]:
    """Nodes of `nodes` (except `keep`) that something outside `nodes` uses."""
    keep = set(keep)
    return [n for n in nodes if n not in keep and any(u not in nodes for u in n.users)]


def erase_unused(graph, nodes: Iterable[Node]) -> list[Node]:
    """Erase those of `nodes` nothing uses any more, last first; returns what was erased."""
    erased = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
        if n.graph is graph and not n.users and n.op in ("call_function", "call_method"):
            graph.erase_node(n)
            erased.append(n)
    return erased
