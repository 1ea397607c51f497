"""Names read from a checkpoint never leave its folder, and a pipeline folder holds no code.

A checkpoint folder is input from someone else: its JSON names component folders, and its files may be symlinks.
These helpers refuse (with one :class:`CheckpointError` line) a name that is not a plain identifier (``..``,
absolute paths, separators), any file or folder that resolves outside the checkpoint folder, and Python files
that diffusers would import as "custom code" (``<component>/<library>.py``, ``<pipeline>.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vqsuite.pipelines.errors import CheckpointError, short_repr

__all__ = ["CODE_SUFFIXES", "check_component_name", "check_tree", "contained_file"]

#: a component name: a Python identifier in ASCII (diffusers passes components as keyword arguments)
_COMPONENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: files a loader could import or execute; a checkpoint folder never needs one
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so")
#: a pipeline folder has a handful of components with a few files each; a scan that finds more stops here
MAX_TREE_ENTRIES = 100_000


def _inside(root_real: str, target: str) -> bool:
    target_real = os.path.realpath(target)
    return target_real == root_real or target_real.startswith(root_real.rstrip(os.sep) + os.sep)


def check_component_name(name: object, where: str) -> str:
    """``name`` if it is a plain component name (``unet``, ``text_encoder_2``); ``where`` names the field."""
    if not isinstance(name, str) or not _COMPONENT_NAME.fullmatch(name):
        raise CheckpointError(
            f"{where}: component name {short_repr(name)} is not a plain name (letters, digits, '_'; no path)"
        )
    return name


def contained_file(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, which must be a regular file that stays inside ``root`` once symlinks are resolved;
    ``what`` names it in the message (a missing file is the caller's message, so it is returned as is)."""
    file = root / relative
    if not _inside(os.path.realpath(root), str(file)):
        raise CheckpointError(f"{file} is a link to outside the checkpoint folder {root}; refusing {what}")
    return file


def check_tree(root: Path) -> None:
    """Walk ``root`` (not following links): every symlink must resolve inside it, and no file may be code.

    ``CheckpointError`` names the first offending path (relative to ``root``).
    """
    root_real = os.path.realpath(root)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            if seen > MAX_TREE_ENTRIES:
                raise CheckpointError(f"{root} holds more than {MAX_TREE_ENTRIES} files: not a checkpoint folder")
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full) and not _inside(root_real, full):
                raise CheckpointError(f"{root}: {short_repr(rel)} is a link to outside the checkpoint folder; refused")
            if name.lower().endswith(CODE_SUFFIXES):
                raise CheckpointError(
                    f"{root}: {short_repr(rel)} is a code file; a checkpoint folder holds none (nothing in it is run)"
                )
