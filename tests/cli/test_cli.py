"""The vqsuite command: working paths end to end, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqsuite.cli.main import EXIT_USAGE, main


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_presets_and_formats_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("w8a8", "w8a8-fp8", "w4a16", "w4a8", "w4a4", "nvfp4", "mxfp4"):
        assert f"\n{name} " in "\n" + out
    assert main(["formats"]) == 0
    assert "nvfp4" in capsys.readouterr().out


def test_quantize_save_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    rc = main(["quantize", "--model", "timm:resnet18", "--preset", "w4a16", "--out", str(out)])
    assert rc == 0
    assert "layers quantized" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "vqsuite_config.json").is_file()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized layers" in info and "int4/g64" in info
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_source"]["name"] == "resnet18"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["info", "/nonexistent/ck"], "no checkpoint"),
        (["quantize", "--model", "timm:not_a_model_xyz", "--out", "x"], "no model named"),
        (["quantize", "--model", "resnet18", "--out", "x"], "must look like"),
        (["quantize", "--model", "timm:resnet18", "--preset", "w3a3", "--out", "x"], "unknown preset"),
        (["quantize", "--model", "timm:resnet18", "--weights", "/nonexistent.pth", "--out", "x"], "does not exist"),
        (["demo", "--presets", "w8a8,nope"], "unknown preset"),
    ],
    ids=[
        "missing-checkpoint",
        "unknown-timm-model",
        "no-library-prefix",
        "unknown-preset",
        "missing-weights",
        "demo-unknown-preset",
    ],
)
def test_bad_input_is_one_line_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert needle in _one_line_error(capsys)


def test_corrupt_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "vqsuite_config.json").write_text("{not json")
    (ck / "model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["info", str(ck)]) == EXIT_USAGE
    assert "not valid JSON" in _one_line_error(capsys)


def test_corrupt_weights_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"garbage, not a torch file")
    assert main(["quantize", "--model", "timm:resnet18", "--weights", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read weights" in _one_line_error(capsys)


def test_demo_runs_one_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "mobilenet-v2", "--presets", "w8a8", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "reloaded outputs identical: True" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("w8a8 "))
    assert float(row.split()[3]) > 2.0  # "x smaller" column: INT8 storage must shrink the model


def _mini_sd_ships() -> bool:
    from vqsuite.cli.demo_sd import mini_sd_available

    return mini_sd_available()


@pytest.mark.slow
@pytest.mark.skipif(not _mini_sd_ships(), reason="mini-sd weights are not in this checkout")
def test_demo_mini_sd_main_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main job, at 4 steps: FP vs svdquant-int4 grid, memory, fidelity and alignment are written."""
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "UNet memory" in printed and "prompt alignment" in printed
    result = json.loads((out / "demo.json").read_text())
    assert result["preset"] == "svdquant-int4" and result["n_images"] == 10
    # 1.52x measured: at this tiny width many layers have K = 32, 288 or 864, which 64-groups do not divide (kept)
    assert result["unet_compression"] > 1.3, result
    assert result["psnr_db_vs_fp"] > 10.0, result  # same seeds: the quantized images follow the FP ones
    assert (out / "grid.png").is_file() and len(list((out / "quantized").glob("*.png"))) == 10
    # a second run replaces the demo's own earlier output, never a folder of other files
    assert main(["demo", "--steps", "4", "--out", str(out)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["demo", "--steps", "4", "--out", str(other)]) == 2
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_console_script_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vqsuite.cli.main", "info", "/nonexistent"], capture_output=True, text=True
    )
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().startswith("vqsuite info: error:")
