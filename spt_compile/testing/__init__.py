"""Helpers for checking the backend's ops: `Census` counts the launches and host-device syncs of a call."""

from .census import Census

__all__ = ["Census"]
