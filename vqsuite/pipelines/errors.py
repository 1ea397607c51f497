"""The error every checkpoint loader raises for a folder it will not load (re-exported by ``vqsuite.pipelines.io``).

It lives in its own module so the validators (``schema.py``, ``folder.py``) and the loaders (``io.py``,
``diffusers_io.py``) can all raise it without importing one another.
"""

from __future__ import annotations

from vqsuite.errors import UserError

__all__ = ["CheckpointError", "short_repr"]

#: longest JSON value or name quoted back in a message (the rest of the line names the file and field)
MAX_QUOTED_CHARS = 48


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message is one readable line."""


def short_repr(value: object) -> str:
    """``repr`` of a scalar read from a file, clipped to :data:`MAX_QUOTED_CHARS` (always one line); a table or
    list is named by its type only, so a message never echoes a file's content."""
    if isinstance(value, (dict, list, tuple)):
        return f"a {'table' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."
