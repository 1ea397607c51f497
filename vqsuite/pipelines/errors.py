"""The error every checkpoint loader raises for a folder it will not load (re-exported by ``vqsuite.pipelines.io``).

It lives in its own module so the validators (``schema.py``, ``folder.py``) and the loaders (``io.py``,
``diffusers_io.py``) can all raise it without importing one another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqsuite.errors import UserError

__all__ = ["CheckpointError", "first_line", "name_repr", "read_json_file", "short_repr"]

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


def first_line(e: BaseException, n: int = 200) -> str:
    """``Type: first line`` of an exception, clipped (a library's message may quote long values from a file)."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= n else line[: n - 3] + "..."


def read_json_file(file: Path) -> Any:
    """Parsed JSON of ``file``; a ``CheckpointError`` names the position of a syntax error, never the file's bytes."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON (not UTF-8 text at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise CheckpointError(f"{file} is not readable ({e.strerror or type(e).__name__})") from None
