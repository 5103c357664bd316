"""Count what one op call would cost a GPU's host: kernel launches and host-device syncs, on any device.

A GPU op is slow at small shapes when its host does too much per call: every aten kernel is a launch
(about 5-10 us of CPU time each), and every read of device data on the host (`.item()`, `.tolist()`,
`.cpu()`, `bool(t)`, `torch.equal`, `nonzero`, ...) stalls the host until the device has finished
everything queued before it. Neither needs a GPU to count: the same Python runs the same aten ops
on CPU tensors. `Census` is a dispatch mode (every aten op that runs a kernel is a launch) and a
function mode (host reads that never reach the dispatcher: `.cpu()`, `.tolist()`, `.numpy()`,
`.to("cpu")`), and records where in our code each sync happened. A copy of host data to the device
from pageable memory (`.to(device)` of a host tensor, `torch.tensor(data, device=...)`) is a launch
and a sync: CUDA performs a stream sync before it starts such a copy (CUDA runtime API,
"API synchronization behavior"); a pinned source (`.pin_memory()`) is a launch only.

On a CPU every tensor is on the same device, so the census tells host data from device data the way a
GPU run would place it: a tensor made by a factory call without a `device=` argument (`torch.full((B,),
n)`), by `torch.tensor(...)`, by `.cpu()` / `.to("cpu")`, or by ops on such tensors only, is host data;
everything else (the op's inputs, tensors made with `device=x.device`, and what is computed from them)
is device data. Ops on host data are not launches and reading host data is not a sync. The small
`meta` tensors a site op hands its backward (sites/meta.py) are read by functions listed in
HOST_READERS; work done under a function of ours named `_host_*` is host work by contract (each such
function checks that its tensors are on the CPU). Neither is counted as a sync.

    with Census() as c:
        out = op(...); out.sum().backward()
    c.launches, c.syncs, c.sync_sites()
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops whose result the host must read before it can go on (on CUDA: a stream sync).
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    # inside an op's kernel the mode sees .item() / int(t) / float(t) before they decompose
    aten.item.default,
    aten.equal.default,  # torch.equal returns a Python bool
    aten.is_nonzero.default,
    aten.nonzero.default,  # output size depends on the data
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,  # without output_size: sized by the data
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,  # its length is the largest value
    aten.allclose.default,
}

# No kernel: allocation without a fill, or views/metadata. Everything else dispatched is a launch.
NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.empty_like.default, aten.detach.default, aten.lift_fresh.default,
    aten._local_scalar_dense.default,  # counted as a sync, not as a launch
    aten.equal.default, aten.is_nonzero.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.is_same_size.default, aten.set_.source_Storage_storage_offset,
    aten.record_stream.default, aten.detach_.default, aten.promote_types.default, aten._fused_sdp_choice.default,
    aten._unsafe_view.default,  # a view of a fresh tensor: metadata only
}

# Host reads the dispatcher never sees.
_HOST_READ_METHODS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}

# Factory functions: host data unless given device=.
_FACTORIES = {torch.full, torch.zeros, torch.ones, torch.empty, torch.arange, torch.randperm, torch.tensor,
              torch.as_tensor, torch.randn, torch.rand, torch.randint, torch.linspace}
# Factories that copy their data argument: with device= a host-to-device copy.
_COPY_FACTORIES = {torch.tensor, torch.as_tensor}
_HOST_ATTR = "_spt_census_host"


def _to_cpu_name(device) -> bool:
    return isinstance(device, str) and device.startswith("cpu")


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST_ATTR, False)


def _mark_host(out) -> None:
    for t in (out if isinstance(out, (tuple, list)) else (out,)):
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _HOST_ATTR, True)
            except (AttributeError, RuntimeError):
                pass


def _tensors(args, kwargs) -> list:
    flat = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (tuple, list)):
            flat.extend(x for x in a if isinstance(x, torch.Tensor))
    return flat

# Our code: the package, and the op and pass folders beside it in a checkout (inside it when installed).
_PKG = Path(__file__).resolve().parents[1]
_OURS = tuple(str(p) + "/" for p in (_PKG, _PKG.parent / "passes", _PKG.parent / "sparse_ops"))
_SELF = str(Path(__file__).resolve().parent) + "/"

# Functions that read host-side tensors by construction (not device data): (file suffix, function),
# and every function whose name starts with "_host_" (each checks that its tensor is on the CPU).
HOST_READERS = {("spt_compile/sites/meta.py", "read")}


@dataclass
class Census:
    """Launches and syncs of everything run inside `with Census():` (see the module docstring)."""

    launches: int = 0
    syncs: int = 0
    ops: Counter = field(default_factory=Counter)
    # Per launched aten op: bytes of its tensor inputs and outputs (an upper bound on the memory it
    # moves: an indexed op may touch less of its inputs) and matmul FLOPs (op_cost).
    traffic: Counter = field(default_factory=Counter)
    flops: Counter = field(default_factory=Counter)
    sync_where: list = field(default_factory=list)  # (what, "file:line in function") per sync
    _modes: tuple = ()
    _active: bool = False
    _wrapped: list = field(default_factory=list)  # how to undo each wrapping
    _suspended: bool = False
    _host_factory: bool = False  # inside a factory call made without device=

    def __enter__(self) -> "Census":
        # Dynamo runs compiled code eagerly under an active dispatch mode, so the modes are pushed only
        # inside our ops' implementations: each spt:: op's kernel is wrapped while the census lasts.
        self._modes = (_FunctionCount(self), _DispatchCount(self))
        self._active = False
        self._wrapped = []
        self._suspended = False
        for opdef in _our_opdefs():
            for key, fn in list(opdef._backend_fns.items()):
                opdef._backend_fns[key] = self._wrap(fn)
                self._wrapped.append(lambda d=opdef._backend_fns, k=key, f=fn: d.__setitem__(k, f))
        for cls in _triton_launchers():  # a Triton launch is one launch, whatever it does inside
            run = cls.__dict__["run"]
            cls.run = self._launch(run)
            self._wrapped.append(lambda c=cls, f=run: setattr(c, "run", f))
        return self

    def __exit__(self, *exc) -> None:
        for restore in reversed(self._wrapped):
            restore()
        self._wrapped = []

    def _launch(self, run):
        census = self

        def counted(self_, *args, **kwargs):
            if census._active and not census._suspended and not kwargs.get("warmup", False):
                census.launches += 1
                census.ops["triton:" + getattr(getattr(self_, "fn", self_), "__name__", "kernel")] += 1
            suspended, census._suspended = census._suspended, True  # the interpreter's own tensor work
            try:
                return run(self_, *args, **kwargs)
            finally:
                census._suspended = suspended

        return counted

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            with self.counting():  # an spt op inside another: already counted by the outer one's modes
                return fn(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def counting(self):
        """Count everything run inside this block (each spt:: op's kernel runs in one): also for an op's
        functions called directly (sparse_ops), outside any compiled graph. Nested, it adds nothing."""
        if self._active:
            yield self
            return
        self._active = True
        try:
            with self._modes[0], self._modes[1]:
                yield self
        finally:
            self._active = False

    def note_sync(self, what: str) -> None:
        if self._suspended:
            return
        where = _caller()
        if where is None:  # a host-side tensor read by design
            return
        self.syncs += 1
        self.sync_where.append((what, where))

    def sync_sites(self) -> Counter:
        """Syncs counted per (what, where)."""
        return Counter(self.sync_where)

    def summary(self, top: int = 10) -> str:
        lines = [f"{self.launches} launches, {self.syncs} syncs"]
        lines += [f"  sync x{n}: {what} at {where}" for (what, where), n in self.sync_sites().most_common(top)]
        return "\n".join(lines)


def _caller() -> Optional[str]:
    """'file:line in function' of the innermost frame of this project below the modes; None when
    that frame is a HOST_READERS function, or any frame above it is named `_host_*` (host work by
    contract: such a function checks that its tensors are on the CPU)."""
    f = sys._getframe(2)
    outer = f
    while outer is not None:
        if outer.f_code.co_name.startswith("_host_") and outer.f_code.co_filename.startswith(_OURS):
            return None
        outer = outer.f_back
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_OURS) and not path.startswith(_SELF):
            rel = path[len(str(_PKG.parent)) + 1:]
            if any(rel.endswith(suffix) and f.f_code.co_name == fn for suffix, fn in HOST_READERS):
                return None
            return f"{rel}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back
    return "<outside spt>"


class _DispatchCount(TorchDispatchMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        host = all(_is_host(t) for t in tensors) if tensors else self.census._host_factory
        counted = not (self.census._suspended or host)
        if counted and func in SYNC_OPS:
            self.census.note_sync(str(func.overloadpacket.__name__))
        out = func(*args, **kwargs)
        if counted and func not in SYNC_OPS and func not in NO_KERNEL and not func.is_view:
            name = str(func.overloadpacket.__name__)
            self.census.launches += 1
            self.census.ops[name] += 1
            moved, flops = op_cost(func, tensors, _tensors((out,), {}))
            self.census.traffic[name] += moved
            self.census.flops[name] += flops
        if host:
            _mark_host(out)
        return out


def op_cost(func, inputs: list, outputs: list) -> tuple[int, int]:
    """(bytes of the tensor inputs and outputs, matmul FLOPs) of one aten op."""
    moved = sum(t.numel() * t.element_size() for t in (*inputs, *outputs))
    name = func.overloadpacket.__name__
    flops = 0
    if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "matmul", "_grouped_mm") and outputs:
        a = inputs[1] if name.rstrip("_") in ("addmm", "baddbmm") else inputs[0]
        flops = 2 * outputs[0].numel() * a.shape[-1]
    return moved, flops


def _our_opdefs() -> list:
    """The CustomOpDefs of every spt:: op (torch.library.custom_op keeps their kernels in
    _backend_fns, looked up at each call)."""
    from torch._library.custom_ops import OPDEFS

    importlib.import_module("spt_compile.backend")  # registers every op

    found = [d for name, d in OPDEFS.items() if name.startswith("spt::")]
    if not found or not all(isinstance(getattr(d, "_backend_fns", None), dict) for d in found):
        raise RuntimeError("spt_compile.testing.Census: this torch keeps custom-op kernels differently "
                           "(CustomOpDef._backend_fns); the census needs updating for it")
    return found


class _FunctionCount(TorchFunctionMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            device_given = kwargs.get("device") is not None
            if device_given and func in _COPY_FACTORIES and not _to_cpu_name(kwargs.get("device")):
                self.census.note_sync(f"{func.__name__}(data, device=): a pageable host-to-device copy")
            host, self.census._host_factory = self.census._host_factory, not device_given
            try:
                out = func(*args, **kwargs)
            finally:
                self.census._host_factory = host
            if not device_given:
                _mark_host(out)
            return out
        source = args[0] if args else None
        if func in _HOST_READ_METHODS and not _is_host(source):
            self.census.note_sync(func.__name__)
        elif func is torch.Tensor.to and _to_host(args, kwargs) and not _is_host(source):
            self.census.note_sync("to(cpu)")
        if func is torch.Tensor.to and _is_host(source) and _to_device(args, kwargs):
            # A host-to-device copy: one launch (a copy engine transfer), and device data from here on;
            # from pageable memory also a sync (the stream drains first). On the CPU `.to(x.device)`
            # returns the tensor itself; a clone stands for the device copy.
            self.census.launches += 1
            self.census.ops["copy host to device"] += 1
            if not source.is_pinned():
                self.census.note_sync("to(device) from pageable host memory")
            out = func(*args, **kwargs)
            out = out.clone() if out is source else out
            out.__dict__.pop(_HOST_ATTR, None)  # the dispatch mode marked the clone of host data as host
            return out
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_host(args, kwargs)):
            _mark_host(out)
        return out


def _to_target(args, kwargs):
    """Where `Tensor.to(...)` copies to: its device argument (a name, a torch.device, or a tensor's
    device), else None (a dtype-only call)."""
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return target.device if isinstance(target, torch.Tensor) else target


def _to_host(args, kwargs) -> bool:
    """`.to("cpu")` spelled out: a copy to the host. (`.to(x.device)` is not counted: on the CPU it
    cannot tell a host-to-device copy, which needs no sync, from a no-op.)"""
    target = _to_target(args, kwargs)
    return isinstance(target, str) and target.startswith("cpu")


def _to_device(args, kwargs) -> bool:
    """`.to(device)` with a device object or a non-CPU name: a copy to the device (`x.device` is one)."""
    target = _to_target(args, kwargs)
    return isinstance(target, torch.device) or (isinstance(target, str) and not target.startswith("cpu"))


def _triton_launchers() -> list:
    """Triton's kernel-launching classes that are loaded (none when triton is not imported)."""
    out = []
    jit = sys.modules.get("triton.runtime.jit")
    interp = sys.modules.get("triton.runtime.interpreter")
    for cls in (getattr(jit, "JITFunction", None), getattr(interp, "InterpretedFunction", None)):
        if cls is not None and "run" in cls.__dict__:
            out.append(cls)
    return out
