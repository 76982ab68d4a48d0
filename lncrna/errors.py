"""Errors shared by the ``lncrna`` library and its CLI."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line, exit status 2."""
