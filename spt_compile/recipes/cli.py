"""Command-line pieces the example scripts share."""

from __future__ import annotations

import json


def spt_option_pairs(pairs: list[str]) -> dict:
    """`--spt NAME=VALUE` arguments as an options dict: each value read as JSON (0.25, true, null),
    else kept as a string (compiler=eager)."""
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value  # a string option, e.g. compiler=eager
    return out
