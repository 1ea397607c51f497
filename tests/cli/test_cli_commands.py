"""``vqsuite sweep`` (run, interrupt, resume), ``vqsuite eval``, ``vqsuite bench`` (wiring, with stand-in benchmark
scripts: the real ones need a GPU), ``vqsuite presets`` descriptions, and ``quantize`` of timm and built-in models
with the report files."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

import vqsuite
from vqsuite.cli.main import main

TINY_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 10),
        ).eval()
    """
)

SWEEP_TOML = textwrap.dedent(
    """
    name = "tiny"
    metrics = ["agreement"]
    configs = ["w8a8", "w4a16"]

    [[models]]
    name = "tiny"
    source = "python:cli_sweep_tiny:tiny"
    data = {random = 8, size = 16}
    """
)


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _zoo_available(name: str) -> bool:
    try:
        import vqsuite.zoo as zoo

        zoo.load(name)
    except Exception:
        return False
    return True


def test_sweep_interrupted_then_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cli_sweep_tiny.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    toml = tmp_path / "sweep.toml"
    toml.write_text(SWEEP_TOML)
    out = tmp_path / "runs"
    # a sweep stopped after one cell (as if killed) ...
    assert main(["--quiet", "sweep", str(toml), "--out", str(out), "--max-cells", "1", "--no-report"]) == 0
    first = (out / "results.jsonl").read_bytes()
    assert [r["config_name"] for r in _results(out / "results.jsonl")] == ["fp"]
    assert "1/3 cells finished" in capsys.readouterr().out
    # ... resumes: the finished cell is kept byte for byte and not recomputed; the other two are added
    assert main(["--quiet", "sweep", str(toml), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _results(out / "results.jsonl")
    assert (out / "results.jsonl").read_bytes().startswith(first)
    assert [r["config_name"] for r in rows] == ["fp", "w8a8", "w4a16"] and all(r["status"] == "ok" for r in rows)
    assert "3/3 cells finished" in printed and "w4a16" in printed
    assert rows[0]["metrics"]["top1_agreement"] == 1.0  # the FP row agrees with itself
    # a third run has nothing to do
    assert main(["--quiet", "sweep", str(toml), "--out", str(out), "--no-report"]) == 0
    assert len(_results(out / "results.jsonl")) == 3
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "report" / "report.html").is_file() and "report.html" in printed


@pytest.mark.skipif(not _zoo_available("mnist-cnn3"), reason="the mnist-cnn3 weights package is not installed")
def test_eval_builtin_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    argv = ["--quiet", "eval", "mnist-cnn3", "--preset", "w8a8,w4a16", "--metrics", "agreement", "--random", "8",
            "--out", str(out), "--no-report"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["config_name"]: r for r in _results(out / "results.jsonl")}
    assert set(rows) == {"fp", "w8a8", "w4a16"}
    assert rows["fp"]["metrics"]["top1_agreement"] == 1.0
    # 8-bit is closer to the float model than 4-bit weights, on the same inputs
    assert rows["w8a8"]["metrics"]["logit_cosine"] >= rows["w4a16"]["metrics"]["logit_cosine"]
    assert rows["w4a16"]["memory"]["bytes_q"] < rows["w8a8"]["memory"]["bytes_q"] < rows["fp"]["memory"]["bytes_q"]
    assert "w4a16" in capsys.readouterr().out


FAKE_GEMM = textwrap.dedent(
    """
    import argparse

    def parse_args(argv=None):
        ap = argparse.ArgumentParser()
        ap.add_argument("--quick", action="store_true")
        ap.add_argument("--smoke-cpu", action="store_true")
        return ap.parse_args(argv)

    def run(args):
        return [{"kernel": "int4", "M": 16, "us": 1.5, "quick": args.quick, "smoke": args.smoke_cpu}]
    """
)

FAKE_BLOCK = FAKE_GEMM + textwrap.dedent(
    """
    def print_rows(rows):
        print("BLOCK TABLE", len(rows))
    """
)


def test_bench_runs_benchmark_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vqsuite.cli import bench

    (tmp_path / "gemm.py").write_text(FAKE_GEMM)
    (tmp_path / "block.py").write_text(FAKE_BLOCK)
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    out = tmp_path / "rows.json"
    assert main(["bench", "--quick", "--smoke-cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kernel" in printed and "int4" in printed  # gemm: no table of its own, the CLI prints one
    assert "BLOCK TABLE 1" in printed  # block: its own print_rows
    rows = json.loads(out.read_text())
    assert rows["gemm"] == [{"kernel": "int4", "M": 16, "us": 1.5, "quick": True, "smoke": True}]
    assert set(rows) == {"gemm", "block"}
    assert main(["bench", "gemm", "--smoke-cpu", "--json", str(out)]) == 2  # --json exists, no --force
    assert "exists" in capsys.readouterr().err


def test_presets_lists_each_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    descriptions = vqsuite.describe_presets()
    assert len(lines) == len(descriptions) == len(vqsuite.list_presets())
    for line, (name, desc) in zip(lines, descriptions.items()):
        assert line.split()[0] == name and line.endswith(desc) and desc.strip()


def test_quantize_timm_model_positional_with_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    assert main(["quantize", "timm:test_resnet", "--preset", "w8a8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "report.json").read_text())
    assert info["kind"] == "model" and info["model"] == "timm:test_resnet" and info["preset"] == "w8a8"
    n_quantized = sum(e["status"] == "quantized" for e in info["report"]["layers"])
    assert n_quantized > 0 and f"{n_quantized} layers quantized" in printed
    assert (out / "report.txt").read_text().strip() in printed
    model = vqsuite.load_quantized(out)  # rebuilt from the recorded timm source
    assert len([m for m in model.modules() if isinstance(m, vqsuite.nn.QuantLayer)]) == n_quantized


@pytest.mark.skipif(not _zoo_available("mnist-cnn3"), reason="the mnist-cnn3 weights package is not installed")
def test_quantize_builtin_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mnist"
    assert main(["quantize", "mnist-cnn3", "--preset", "w4a16", "--out", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    info = json.loads((out / "report.json").read_text())
    assert info["model"] == "mnist-cnn3" and any(e["status"] == "quantized" for e in info["report"]["layers"])
    assert (out / "model.safetensors").is_file()
    # the folder records its zoo source, so it loads without the float model and gives the quantized outputs
    import torch

    import vqsuite
    from vqsuite import zoo

    loaded = vqsuite.load_quantized(out)
    twin = zoo.load("mnist-cnn3").model
    vqsuite.quantize_model(twin, "w4a16")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), twin(x))


@pytest.mark.slow
def test_eval_pipeline_fidelity(tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "ev"
    argv = ["--quiet", "eval", str(tiny_sd), "--preset", "w4a16", "--prompts", str(prompts), "--num-samples", "1",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(out), "--no-report"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["config_name"]: r for r in _results(out / "results.jsonl")}
    assert set(rows) == {"fp", "w4a16"}
    # PSNR of the FP samples against themselves is the metric's cap; INT4 weights must land below it
    assert rows["w4a16"]["metrics"]["psnr"] < rows["fp"]["metrics"]["psnr"]
    assert 0 < rows["w4a16"]["metrics"]["ssim"] <= 1
    assert "w4a16" in capsys.readouterr().out


def test_bench_passes_unknown_options_to_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vqsuite.cli import bench

    (tmp_path / "gemm.py").write_text(FAKE_GEMM)
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "gemm", "--smoke-cpu", "--m", "16"]) == 2  # the stand-in script has no --m
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("unrecognized arguments: --m 16"), err


REAL_GEMM = Path(__file__).resolve().parents[2] / "benchmarks" / "gemm.py"


@pytest.mark.skipif(not REAL_GEMM.is_file(), reason="benchmarks/gemm.py is not in this checkout")
def test_bench_real_gemm_script_smoke_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The real script through the CLI on one tiny shape (its CPU smoke mode: timings meaningless)."""
    argv = ["bench", "gemm", "--smoke-cpu", "--m", "1", "--shapes", "64,128", "--iters", "1", "--trials", "1",
            "--kernels", "int4"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "torch bf16 F.linear" in out and "M=1 K=64 N=128" in out
