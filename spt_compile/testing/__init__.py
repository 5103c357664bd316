"""Helpers for checking the backend's ops: `Census` counts the launches and host-device syncs of a call;
`compile_only` (spt_compile.testing.compile_only) compiles the Triton kernels for a GPU without one."""

from .census import Census

__all__ = ["Census"]
