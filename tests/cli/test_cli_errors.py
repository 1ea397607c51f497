"""Bad input through the real ``vqsuite`` entry point: exit code 2, one line on stderr naming the problem, no
traceback (unless ``--debug``), nothing on stdout, and no existing file touched (bytes and mtime compared), even
with ``--force`` pointing at an earlier output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_usage_error, snapshot

from vqsuite.cli.main import EXIT_USAGE, main

Ctx = dict[str, Path]


@pytest.fixture(scope="module")
def ctx(tiny_sd: Path, quantized_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    """Inputs for the bad commands, and earlier outputs they must leave alone."""
    root = tmp_path_factory.mktemp("cli-bad")
    c: Ctx = {"sd": tiny_sd, "q": quantized_sd, "root": root}
    c["prev_gen"] = root / "prev-gen"  # an earlier `vqsuite generate` output
    c["prev_gen"].mkdir()
    (c["prev_gen"] / "generate.json").write_text('{"images": []}\n')
    (c["prev_gen"] / "000.png").write_bytes(os.urandom(256))
    c["prev_ck"] = root / "prev-ck"  # an earlier `vqsuite quantize` output
    c["prev_ck"].mkdir()
    (c["prev_ck"] / "vqsuite_config.json").write_text("{}\n")
    (c["prev_ck"] / "model.safetensors").write_bytes(os.urandom(512))
    c["foreign"] = root / "my-photos"  # someone's folder: never replaced, even with --force
    c["foreign"].mkdir()
    (c["foreign"] / "holiday.png").write_bytes(os.urandom(128))
    c["notpipe"] = root / "not-a-pipeline"
    c["notpipe"].mkdir()
    (c["notpipe"] / "readme.txt").write_text("hello\n")
    c["corrupt_q"] = root / "corrupt-q"
    shutil.copytree(quantized_sd, c["corrupt_q"])
    weights = c["corrupt_q"] / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated download
    c["broken_float"] = root / "broken-float"
    shutil.copytree(tiny_sd, c["broken_float"])
    (c["broken_float"] / "model_index.json").write_text("{oops")
    c["q_nosrc"] = root / "q-no-source"  # a quantized folder that does not record its float pipeline
    shutil.copytree(quantized_sd, c["q_nosrc"])
    (c["q_nosrc"] / "report.json").unlink()
    c["empty_prompts"] = root / "empty.txt"
    c["empty_prompts"].write_text("# only a comment\n\n   \n")
    c["garbage_pth"] = root / "garbage.pth"
    c["garbage_pth"].write_bytes(b"not a torch file at all")
    c["bad_toml"] = root / "bad.toml"
    c["bad_toml"].write_text('name = "x"\nconfigs = ["w8a8"\n[[models]]\n')
    c["bad_config_toml"] = root / "config.toml"
    c["bad_config_toml"].write_text(
        'name = "x"\nconfigs = ["w8a8", "w3a3"]\n'
        '[[models]]\nname = "m"\nsource = "timm:resnet18"\ndata = {random = 2, size = 32}\n'
    )
    c["bad_metric_toml"] = root / "metric.toml"
    c["bad_metric_toml"].write_text(
        'name = "x"\nmetrics = ["no-such-metric"]\nconfigs = ["w8a8"]\n'
        '[[models]]\nname = "m"\nsource = "timm:resnet18"\ndata = {random = 2, size = 32}\n'
    )
    return c


def _gen(c: Ctx, model: str, *extra: str, out: str = "prev_gen", force: bool = True) -> list[str]:
    argv = ["generate", str(c[model]) if model in c else model, "--steps", "2", "--out", str(c[out]), *extra]
    return argv + (["--force"] if force else [])


def _quant(c: Ctx, model: str, *extra: str, out: str = "prev_ck", force: bool = True) -> list[str]:
    argv = ["quantize", str(c[model]) if model in c else model, "--out", str(c[out]), *extra]
    return argv + (["--force"] if force else [])


# (id, argv from the context, text the one error line must contain)
CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("gen-missing-folder", lambda c: _gen(c, "/nonexistent/pipe", "--prompt", "a"), "no such folder"),
    ("gen-not-a-pipeline", lambda c: _gen(c, "notpipe", "--prompt", "a"), "not a diffusers pipeline folder"),
    ("gen-corrupt-checkpoint", lambda c: _gen(c, "corrupt_q", "--prompt", "a"), "corrupt"),
    ("gen-broken-model-index", lambda c: _gen(c, "broken_float", "--prompt", "a"), "is not valid JSON"),
    ("gen-steps-zero", lambda c: _gen(c, "q", "--prompt", "a", "--steps", "0"), "--steps=0 is out of range"),
    ("gen-steps-huge", lambda c: _gen(c, "q", "--prompt", "a", "--steps", "100000"), "--steps=100000 is out of range"),
    ("gen-empty-prompt-file", lambda c: _gen(c, "q", "--prompts", str(c["empty_prompts"])), "has no prompts"),
    ("gen-missing-prompt-file", lambda c: _gen(c, "q", "--prompts", "/nonexistent.txt"), "does not exist"),
    ("gen-blank-prompt", lambda c: _gen(c, "q", "--prompt", "   "), "--prompt is empty"),
    ("gen-negative-seed", lambda c: _gen(c, "q", "--prompt", "a", "--seed", "-3"), "--seed=-3 is out of range"),
    ("gen-seed-not-int", lambda c: _gen(c, "q", "--prompt", "a", "--seed", "abc"), "invalid int value: 'abc'"),
    ("gen-unknown-option", lambda c: _gen(c, "q", "--prompt", "a", "--bogus"), "unrecognized arguments: --bogus"),
    ("gen-n-zero", lambda c: _gen(c, "q", "--prompt", "a", "--n", "0"), "--n=0 is out of range"),
    ("gen-height-not-multiple", lambda c: _gen(c, "q", "--prompt", "a", "--height", "30"), "multiple of 8"),
    ("gen-negative-guidance", lambda c: _gen(c, "q", "--prompt", "a", "--guidance", "-1"), "--guidance=-1"),
    ("gen-output-exists", lambda c: _gen(c, "q", "--prompt", "a", force=False), "exists and is not empty"),
    ("gen-force-foreign-folder", lambda c: _gen(c, "q", "--prompt", "a", out="foreign"), "not written by vqsuite"),
    ("gen-preset-on-quantized", lambda c: _gen(c, "q", "--prompt", "a", "--preset", "w8a8"), "already quantized"),
    ("gen-unknown-preset", lambda c: _gen(c, "sd", "--prompt", "a", "--preset", "w3a3"), "unknown preset 'w3a3'"),
    ("gen-compare-no-source", lambda c: _gen(c, "q_nosrc", "--prompt", "a", "--compare"), "pass --fp-model"),
    ("gen-compare-float-no-preset", lambda c: _gen(c, "sd", "--prompt", "a", "--compare"), "needs --preset"),
    ("gen-pipeline-without-prompt", lambda c: _gen(c, "q"), "needs --prompt TEXT or --prompts FILE"),
    ("gen-prompt-for-generator", lambda c: _gen(c, "face-dcgan", "--prompt", "a"), "--steps do not apply"),
    ("gen-builtin-classifier", lambda c: _gen(c, "mnist-cnn3"), "is a classifier"),
    ("quant-unknown-preset", lambda c: _quant(c, "sd", "--preset", "w3a3"), "unknown preset 'w3a3'"),
    ("quant-already-quantized", lambda c: _quant(c, "q", "--preset", "w8a8"), "already a quantized pipeline"),
    ("quant-output-exists", lambda c: _quant(c, "sd", "--preset", "w8a8", force=False), "exists and is not empty"),
    ("quant-force-foreign-folder", lambda c: _quant(c, "sd", out="foreign"), "not written by vqsuite"),
    (
        "quant-unreadable-weights",
        lambda c: _quant(c, "timm:resnet18", "--weights", str(c["garbage_pth"])),
        "cannot read weights",
    ),  # fmt: skip
    ("quant-missing-weights", lambda c: _quant(c, "timm:resnet18", "--weights", "/nonexistent.pth"), "does not exist"),
    ("quant-unknown-model", lambda c: _quant(c, "no_such_model_xyz"), "must look like"),
    ("quant-missing-folder", lambda c: _quant(c, "./no/such/pipeline"), "no such folder"),
    (
        "quant-empty-calib-prompts",
        lambda c: _quant(c, "sd", "--calib-prompts", str(c["empty_prompts"])),
        "has no prompts",
    ),  # fmt: skip
    ("quant-calib-steps-zero", lambda c: _quant(c, "sd", "--calib-steps", "0"), "--calib-steps=0 is out of range"),
    ("quant-weights-on-pipeline", lambda c: _quant(c, "sd", "--weights", str(c["garbage_pth"])), "--weights applies"),
    ("sweep-malformed-toml", lambda c: ["sweep", str(c["bad_toml"]), "--out", str(c["prev_gen"])], "not valid TOML"),
    ("sweep-missing-file", lambda c: ["sweep", "/nonexistent/sweep.toml"], "does not exist"),
    (
        "sweep-unknown-metric",
        lambda c: ["sweep", str(c["bad_metric_toml"]), "--out", str(c["foreign"])],
        "unknown metric set 'no-such-metric'",
    ),  # fmt: skip
    (
        "eval-quantized-folder",
        lambda c: ["eval", str(c["q"]), "--preset", "w8a8", "--out", str(c["foreign"])],
        "already quantized",
    ),  # fmt: skip
    ("bench-unknown-benchmark", lambda c: ["bench", "conv"], "invalid choice: 'conv'"),
    ("info-not-a-checkpoint", lambda c: ["info", str(c["notpipe"])], "not a vqsuite checkpoint"),
]


def _protected(c: Ctx) -> dict[str, dict[str, tuple[bytes, int]]]:
    return {k: snapshot(c[k]) for k in ("prev_gen", "prev_ck", "foreign", "q", "sd")}


@pytest.mark.parametrize("argv_of, needle", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(
    ctx: Ctx, argv_of: Callable[[Ctx], list[str]], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _protected(ctx)
    assert_one_line_usage_error(argv_of(ctx), needle, capsys)
    assert _protected(ctx) == before
    assert not [p for p in ctx["root"].iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_bench_without_gpu_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vqsuite.cli import bench

    # a script that would fail loudly if it ran: the refusal must come first
    (tmp_path / "gemm.py").write_text("def parse_args(argv):\n    return argv\ndef run(args):\n    raise SystemError\n")
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "gemm", "--quick"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert (
        err == "vqsuite bench: error: vqsuite bench needs a CUDA GPU (the benchmarks time GPU kernels); none is visible"
    )


def test_bench_missing_script_says_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vqsuite.cli import bench

    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "block"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vqsuite bench block is not available in this build" in err


def test_debug_flag_shows_the_traceback(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    before = _protected(ctx)
    assert main(["generate", str(ctx["corrupt_q"]), "--prompt", "a", "--out", str(ctx["prev_gen"]), "--force",
                 "--debug"]) == EXIT_USAGE  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("vqsuite generate: error: ")
    assert _protected(ctx) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_cuda_device_without_gpu(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    before = _protected(ctx)
    assert main(_gen(ctx, "q", "--prompt", "a", "--device", "cuda")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == "vqsuite generate: error: --device cuda: no CUDA GPU on this machine"
    assert _protected(ctx) == before


def _console_script() -> Path:
    script = Path(sys.executable).parent / "vqsuite"
    if not script.is_file():
        pytest.skip(f"no console script at {script} (package not installed in this environment)")
    return script


def test_console_script_bad_inputs(ctx: Ctx) -> None:
    """The installed ``vqsuite`` executable: one line, exit code 2, nothing overwritten (also the same in a new
    process, where logging, tqdm and the libraries' own handlers are live)."""
    before = _protected(ctx)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for argv, needle in (
        (["quantize", str(ctx["sd"]), "--preset", "w3a3", "--out", str(ctx["prev_ck"]), "--force"], "unknown preset"),
    ):
        proc = subprocess.run([str(_console_script()), *argv], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vqsuite {argv[0]}: error: ") and needle in lines[0], lines
        assert proc.stdout == ""
    assert _protected(ctx) == before
