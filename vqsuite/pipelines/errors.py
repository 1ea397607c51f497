"""The error every checkpoint loader raises for a folder it will not load (re-exported by ``vqsuite.pipelines.io``).

It lives in its own module so the validators (``schema.py``, ``folder.py``) and the loaders (``io.py``,
``diffusers_io.py``) can all raise it without importing one another.
"""

from __future__ import annotations

from vqsuite.errors import UserError

__all__ = ["CheckpointError", "name_repr", "short_repr"]

#: longest JSON value quoted back in a message (the rest of the line names the file and field)
MAX_QUOTED_CHARS = 48
#: longest tensor or layer name quoted back (real ones run to ~100 characters: they must stay whole)
MAX_NAME_CHARS = 160


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message is one readable line."""


def short_repr(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr`` of a scalar read from a file, clipped to ``limit`` characters (always one line); a table or list
    is named by its type only, so a message never echoes a file's content."""
    if isinstance(value, (dict, list, tuple)):
        return f"a {'table' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def name_repr(name: object) -> str:
    """A tensor or layer name read from a file, quoted for a message (clipped at :data:`MAX_NAME_CHARS`)."""
    return short_repr(name, MAX_NAME_CHARS)
