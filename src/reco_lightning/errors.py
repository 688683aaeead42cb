"""The package's error family: every error written for a user derives from :class:`RecoError`.

Why one base: the ``reco`` command prints a ``RecoError`` as one line (its message already says what is
wrong and how to fix it) instead of a traceback; anything else is a bug and keeps its traceback. The
concrete errors also derive from the builtin they replace (``RuntimeError``/``ValueError``), so code that
caught those keeps working.
"""

from __future__ import annotations

__all__ = ["ChunkedJobError", "MissingInputError", "RecoError", "RecoMemoryError"]


class RecoError(Exception):
    """An error caused by the user's input, files or settings; its message names the thing and the fix."""


class RecoMemoryError(RecoError, RuntimeError):
    """Raised for any memory that cannot be built, opened or searched; the message names the file and the fix."""


class ChunkedJobError(RecoError, RuntimeError):
    """A chunked prediction job (``jobs.chunked``) whose plan or rank shares do not add up; re-run or start over.

    Apart from :class:`RecoMemoryError` because the same job machinery builds feature caches too: a cache
    build that fails is not a memory error. A memory build reports these as a ``RecoMemoryError``.
    """


class MissingInputError(RecoError, FileNotFoundError):
    """A path the run needs (a backbone directory, say) does not exist; ``path`` is what was asked for.

    The ``reco`` script adds what creates it when an app knows (``reco prepare-tiny`` for the tiny setup's
    paths, ``reco demo`` for the demo's).
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path
