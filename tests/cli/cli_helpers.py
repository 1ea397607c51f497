"""Helpers of the CLI tests (a plain module with a unique name, so test files import it under any import mode)."""

from __future__ import annotations

from pathlib import Path

#: the tiny pipelines' VAE downsamples by 2 and the UNet by 2: 32x32 images are the smallest sensible size
TINY_SIZE = 32


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """``{relative path: (bytes, mtime_ns)}`` of every file under ``folder``."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
