"""The error the recipes raise for a problem with the user's inputs (a missing package, a bad data
row, a flag out of range). Command-line scripts print its message and exit with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the inputs; a script's main() prints it and exits with status 2."""
