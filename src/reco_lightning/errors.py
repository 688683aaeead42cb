"""The package's error family: every error written for a user derives from :class:`RecoError`.

Why one base: the ``reco`` command prints a ``RecoError`` as one line (its message already says what is
wrong and how to fix it) instead of a traceback; anything else is a bug and keeps its traceback. The
concrete errors also derive from the builtin they replace (``RuntimeError``/``ValueError``), so code that
caught those keeps working.
"""

from __future__ import annotations

__all__ = ["RecoError"]


class RecoError(Exception):
    """An error caused by the user's input, files or settings; its message names the thing and the fix."""
