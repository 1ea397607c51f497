"""Fixtures of the CLI tests: a tiny Stable Diffusion pipeline folder (random weights, built offline), its
quantized twin made through ``vqsuite quantize``, and a snapshot of a folder's files (bytes + mtime) to prove that a
failing command overwrote nothing."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import snapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_DIFFUSERS_TESTS = str(Path(__file__).resolve().parent.parent / "diffusers")
if _DIFFUSERS_TESTS not in sys.path:
    sys.path.insert(0, _DIFFUSERS_TESTS)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved float StableDiffusionPipeline folder (``save_pretrained``), loadable with local_files_only."""
    import tiny_pipelines

    folder = tmp_path_factory.mktemp("cli-models") / "tiny-sd"
    tiny_pipelines.sd15().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def quantized_sd(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vqsuite quantize tiny-sd --preset w4a16`` (RTN: no calibration, fast)."""
    from vqsuite.cli.main import main

    out = tmp_path_factory.mktemp("cli-quantized") / "tiny-sd-w4a16"
    assert main(["--quiet", "quantize", str(tiny_sd), "--preset", "w4a16", "--out", str(out)]) == 0
    return out


@pytest.fixture
def snap() -> Callable[[Path], dict[str, tuple[bytes, int]]]:
    return snapshot
