"""Helpers of the CLI tests (a plain module with a unique name, so test files import it under any import mode)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: the tiny pipelines' VAE downsamples by 2 and the UNet by 2: 32x32 images are the smallest sensible size
TINY_SIZE = 32


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """``{relative path: (bytes, mtime_ns)}`` of every file under ``folder``."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def assert_one_line_usage_error(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``vqsuite ARGV`` exits 2 with exactly one line on stderr, ``vqsuite <command>: error: ...`` naming
    ``needle``, no traceback, nothing on stdout."""
    from vqsuite.cli.main import EXIT_USAGE, main

    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"vqsuite {argv[0]}: error: "), err
    assert needle in err, err
    assert captured.out == ""
