"""`enable(**options)` and `disable()`: the context-manager ways in.

Inside `enable(...)`:
  * a `torch.compile(model)` that names no backend uses spt, with these options;
  * spt-compiled models that run inside it use its run-time options (they override the options
    given to torch.compile; nested `enable` blocks override outer ones).
Inside `disable()`: spt-compiled models run dense (exact attention, every MLP block), no recompile.

Both are context-local (contextvars): a thread or an asyncio task sees only the blocks it entered
itself, and a new thread starts with none. A call's options are fixed when its forward runs; a
forward re-run inside backward (activation checkpointing, which on CUDA may run on autograd's own
threads) replays them (registry.Site.begin), whatever context the backward runs in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import replace
from typing import Any, Iterator

import torch

from .options import RUNTIME_NAMES, Options, SptOptionError, check_names, is_int, make_options

# Innermost last. Each entry: the run-time overrides of one enable() block, or {"dense": True}.
_STACK: contextvars.ContextVar[tuple[dict[str, Any], ...]] = contextvars.ContextVar("spt_stack", default=())
# Structural options of the enclosing enable() blocks, for graphs compiled inside them.
_COMPILE_STACK: contextvars.ContextVar[tuple[dict[str, Any], ...]] = contextvars.ContextVar(
    "spt_compile_stack", default=())


@contextlib.contextmanager
def _pushed(var: contextvars.ContextVar, entry: dict[str, Any]) -> Iterator[None]:
    token = var.set(var.get() + (entry,))
    try:
        yield
    finally:
        var.reset(token)


def resolve(options: Options) -> tuple[Options, bool]:
    """The options a site uses right now, and whether it must run dense."""
    dense = False
    overrides: dict[str, Any] = {}
    for entry in _STACK.get():
        if entry.get("dense"):
            dense = True
        else:
            overrides.update(entry)
    if overrides:
        try:
            options = replace(options, **overrides)
        except SptOptionError as e:  # e.g. ffn_active above this site's ffn_blocks
            raise SptOptionError(f"{e} (set by spt_compile.enable())", option=e.option) from None
    return options, dense


def compile_overrides() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for entry in _COMPILE_STACK.get():
        merged.update(entry)
    return merged


def _validate_partial(options: dict[str, Any]) -> None:
    """Checks enable()'s options now. ffn_active without ffn_blocks is checked against each site's
    ffn_blocks when the site runs."""
    check_names(options, "spt_compile.enable()")
    given = dict(options)
    active = given.pop("ffn_active", None)
    base = make_options(given, where="spt_compile.enable()")
    if active is not None:
        blocks = given.get("ffn_blocks", active if is_int(active) and active >= 1 else base.ffn_blocks)
        make_options({"ffn_active": active, "ffn_blocks": blocks}, where="spt_compile.enable()")


class _DefaultSpt:
    """The default backend inside enable(): spt with that block's options."""

    __name__ = "spt"

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def __call__(self, gm, example_inputs, **kwargs):
        from .backend import spt_backend

        options = {**self.options, **(kwargs.pop("options", None) or {})}
        return spt_backend(gm, example_inputs, options=options, **kwargs)


@contextlib.contextmanager
def _default_backend(backend) -> Iterator[None]:
    compiler = torch.compiler
    if hasattr(compiler, "set_default_backend"):
        previous = compiler.get_default_backend()
        compiler.set_default_backend(backend)
        try:
            yield
        finally:
            compiler.set_default_backend(previous)
        return
    # Older torch: torch.compile's backend defaults to the string "inductor", so a call that names no
    # backend cannot be told from one that names inductor; wrap torch.compile to tell them apart.
    original = torch.compile
    unset = object()

    @functools.wraps(original)
    def compile_with_default(model=None, *args, backend=unset, **kwargs):
        return original(model, *args, backend=backend if backend is not unset else backend_obj, **kwargs)

    backend_obj = backend
    torch.compile = compile_with_default
    try:
        yield
    finally:
        torch.compile = original


@contextlib.contextmanager
def enable(**options: Any) -> Iterator[None]:
    """Use spt for torch.compile calls that name no backend, and these options for spt-compiled
    models run inside the block. Raises SptOptionError for an unknown name or a bad value."""
    _validate_partial(options)
    runtime = {k: v for k, v in options.items() if k in RUNTIME_NAMES}
    with _pushed(_STACK, runtime), _pushed(_COMPILE_STACK, dict(options)):
        with _default_backend(_DefaultSpt(compile_overrides())):
            yield


@contextlib.contextmanager
def disable() -> Iterator[None]:
    """Run spt-compiled models dense inside the block (exact attention, every MLP block), without
    recompiling. Sparse state is not updated by calls made inside it."""
    with _pushed(_STACK, {"dense": True}):
        yield
