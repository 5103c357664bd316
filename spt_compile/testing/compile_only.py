"""Compile the package's Triton kernels for a GPU without one: what a launch on an H100/H200 would
compile, and what that binary needs (registers, spilled bytes, shared memory).

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, but not that it compiles, nor
what it costs a GPU: a kernel whose accumulators do not fit the register file spills them to local
memory, and one that asks for more shared memory than an SM has does not launch. Triton's NVIDIA
backend compiles on any host (the pip wheel carries LLVM and ptxas); only its driver needs a device.
`compile_only` stands in for that driver: inside it, launching a kernel (`kernel[grid](...)`) compiles
it for the given architecture with the same specialisation a real launch makes from the same
arguments (dtypes, alignment, integer values of 1, divisibility by 16), records the binary, and
launches nothing, so the launchers can run on CPU tensors and return garbage.

    with compile_only(block_sparse_triton) as built:
        block_sparse_forward_triton(q, k, v, ...)     # CPU tensors; nothing runs
    for b in built: print(b.kernel, b.resources())

Sizes that depend on the toolchain: the device machine's Triton (3.6) and ptxas may allocate a few
registers differently from this one's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator

import triton

HOPPER = 90  # H100 / H200: compute capability 9.0


def available() -> bool:
    """Whether this Triton can compile for NVIDIA GPUs here (its backend and ptxas are installed)."""
    try:
        found = importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ImportError:
        return False
    return found and os.path.exists(_tool("cuobjdump"))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclass
class Built:
    """One compiled kernel: its name, the grid it would have launched on, and Triton's CompiledKernel."""

    kernel: str
    grid: tuple
    compiled: Any

    def resources(self) -> dict:
        """registers per thread, spill stack bytes per thread, shared memory bytes, warps (from the
        binary, as cuobjdump reports them), and the constexprs it was compiled with."""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(self.compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout

        def field(name: str) -> int:
            return int(re.search(name + r":(\d+)", usage).group(1))

        meta = self.compiled.metadata
        return dict(registers=field("REG"), spill_bytes=field("STACK"), shared_bytes=meta.shared,
                    warps=meta.num_warps, stages=meta.num_stages)


class _CompileOnlyDriver:
    """Answers the questions Triton's JIT asks its driver as a device of `arch` would; no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Stands in for a kernel in its module: `kernel[grid](*args, **kwargs)` compiles, records, returns."""

    def __init__(self, name: str, kernel, built: list):
        self.name, self.kernel, self.built = name, kernel, built

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)  # compiles; launches nothing
            self.built.append(Built(self.name, tuple(grid), compiled))
        return launch


@contextlib.contextmanager
def module_settings(module: ModuleType, **values) -> Iterator[None]:
    """module's globals set to values inside (a kernel module's switches: SPLIT_HEAD_TILES=True, ...),
    the previous ones restored after."""
    before = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(module, name, value)


@contextlib.contextmanager
def compile_only(*modules: ModuleType, arch: int = HOPPER) -> Iterator[list]:
    """Inside: every launched @triton.jit kernel defined in `modules` (by the package's convention the
    ones named *_kernel; the other jit functions are called from kernels and stay as they are)
    compiles for `arch` when launched, and is appended to the yielded list as a Built; nothing runs. Raises RuntimeError where the NVIDIA backend
    is missing (available() says beforehand)."""
    if not available():
        raise RuntimeError("compile_only: this Triton has no NVIDIA backend or ptxas (pip's triton wheel has both)")
    from triton.runtime.driver import driver

    built: list = []
    kernels = {(m, name): obj for m in modules for name, obj in vars(m).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    before = driver._active  # None here, where no GPU driver is active (reset_active would raise on a CPU host)
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        for (m, name), kernel in kernels.items():
            setattr(m, name, _Recorder(name, kernel, built))
        yield built
    finally:
        for (m, name), kernel in kernels.items():
            setattr(m, name, kernel)
            kernel.device_caches.clear()  # binders made for the stand-in target
        driver._active = before
