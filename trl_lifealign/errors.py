"""``LifeAlignError``: the base of every error about a user's input, files or environment.

The command line prints such an error as one line naming the file, row or key (``lifealign train: error: ...``, exit
status 2) instead of a traceback; anything else is a bug and keeps its traceback. Set ``LIFEALIGN_DEBUG=1`` for
tracebacks of these too. Standard library only.
"""

from __future__ import annotations

__all__ = ["LifeAlignError"]


class LifeAlignError(Exception):
    """An invalid recipe, data file, run directory, adapter, memory or environment (the message says which)."""
