"""The repository's promises: README commands, CI running exactly the README's test command, a light import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("diffusers", "timm", "triton", "transformers", "torchvision")


def _code_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)]


def test_readme_first_screen_has_setup_and_test_commands() -> None:
    blocks = _code_blocks((ROOT / "README.md").read_text())
    setup, tests = blocks[0], blocks[1]
    assert setup.count("\n") == 0 and "scripts/setup.sh" in setup and "vqsuite demo" in setup
    assert tests.count("\n") == 0 and "pytest" in tests


def test_ci_runs_setup_then_exactly_the_readme_test_command() -> None:
    test_cmd = _code_blocks((ROOT / "README.md").read_text())[1]
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in ci_lines if ln and not ln.startswith("#") and not ln.startswith("set ")]
    assert "bash scripts/setup.sh" in commands
    assert commands[-1] == test_cmd


def test_import_is_light() -> None:
    code = (
        "import sys, vqsuite, vqsuite.formats, vqsuite.nn, vqsuite.kernels, vqsuite.pipelines; "
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import vqsuite pulled in heavy modules: {out}"


def test_constraints_pin_torch_and_torchvision_together() -> None:
    pins = dict(ln.split("==", 1) for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert pins["triton"].startswith("3.8")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, str(ROOT)], capture_output=True, text=True)


def test_ruff_check_is_clean() -> None:
    """The lint CI expects: ``ruff check`` passes on the whole repository."""
    res = _ruff("check", "--no-cache")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]


def test_ruff_format_is_clean() -> None:
    """``ruff format --check`` passes: no file needs reformatting."""
    res = _ruff("format", "--check", "--no-cache")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
