"""The one exception type users see: a one-line message, no traceback."""

from __future__ import annotations


class EcqaeError(Exception):
    """A problem with the user's input or environment, reported as one line.

    The CLI prints it as ``ecqae: error: <message>`` and exits non-zero; the
    message names the file (and row/column or key) and the problem.
    """
