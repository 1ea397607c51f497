"""Nothing the user had is deleted: ``--force`` (and the demo's rerun) replaces only an earlier output of the same
command whose every file vqsuite wrote; anything else is refused with one line naming the file (or both kinds of
output), before any work, and every file stays byte-identical."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_SIZE, assert_one_line_usage_error, snapshot

from vqsuite.cli.main import main

Ctx = dict[str, Path]
SIZE = str(TINY_SIZE)


def _gen_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(model), "--prompt", "a cat", "--steps", "1", "--height", SIZE, "--width", SIZE,
            "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def outputs(tiny_sd: Path, quantized_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    """Real earlier outputs (copied per test): a quantized pipeline folder and a generate output."""
    root = tmp_path_factory.mktemp("no-deletion")
    gen = root / "gen"
    assert main(["--quiet", *_gen_argv(quantized_sd, gen)]) == 0
    return {"sd": tiny_sd, "q": quantized_sd, "gen": gen}


def _copy(src: Path, dest: Path, extra: dict[str, bytes] | None = None) -> Path:
    shutil.copytree(src, dest)
    for rel, data in (extra or {}).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    return dest


# (id, the --out folder made from the real outputs in `o` at `d`, argv writing to it, text the error must contain)
CASES: list[tuple[str, Callable[[Ctx, Path], Path], Callable[[Ctx, Path], list[str]], str]] = [
    (
        "generate-onto-quantized-pipeline",
        lambda o, d: _copy(o["q"], d),
        lambda o, out: _gen_argv(o["q"], out, "--force"),
        "is a quantized pipeline folder (vqsuite quantize), not a generate output folder (vqsuite generate)",
    ),
    (
        "generate-onto-own-output-with-user-file",
        lambda o, d: _copy(o["gen"], d, {"notes.txt": b"my notes"}),
        lambda o, out: _gen_argv(o["q"], out, "--force"),
        "holds notes.txt, which was not written by vqsuite (it is not in the folder's manifest); refusing to "
        "replace it even with --force",
    ),
    (
        "generate-onto-own-output-with-edited-image",
        lambda o, d: _copy(o["gen"], d, {"000.png": b"my own drawing"}),
        lambda o, out: _gen_argv(o["q"], out, "--force"),
        "holds 000.png, which was changed after vqsuite wrote it",
    ),
    (
        "generate-onto-older-output-with-user-file",
        lambda o, d: _copy(o["gen"], d, {"generate.json": b'{"images": []}', "holiday.jpg": b"jpg"}),
        lambda o, out: _gen_argv(o["q"], out, "--force"),
        "(written by an older vqsuite, without a manifest) holds holiday.jpg, which a generate output folder",
    ),
    (
        "quantize-onto-generate-output",
        lambda o, d: _copy(o["gen"], d),
        lambda o, out: ["quantize", str(o["sd"]), "--preset", "w4a16", "--out", str(out), "--force"],
        "is a generate output folder (vqsuite generate), not a quantized pipeline folder (vqsuite quantize)",
    ),
    (
        "quantize-onto-own-output-with-user-file-in-component",
        lambda o, d: _copy(o["q"], d, {"unet/my-notes.txt": b"notes"}),
        lambda o, out: ["quantize", str(o["sd"]), "--preset", "w4a16", "--out", str(out), "--force"],
        "holds unet/my-notes.txt, which was not written by vqsuite",
    ),
    (
        "quantize-onto-older-checkpoint-with-user-file",
        lambda o, d: _older_checkpoint(o["q"] / "unet", d, {"train.py": b"print()"}),
        lambda o, out: ["quantize", "timm:resnet18", "--out", str(out), "--force"],
        "holds train.py, which a quantized checkpoint folder (vqsuite quantize) does not contain",
    ),
    (
        "finetune-onto-quantize-output",
        lambda o, d: _copy(o["q"], d),
        lambda o, out: ["finetune", "--method", "ofq", "fmnist-vit", "--out", str(out), "--force"],
        "is a quantized pipeline folder (vqsuite quantize), not a finetune output folder (vqsuite finetune)",
    ),
    (
        "foreign-folder",
        lambda o, d: _foreign(d),
        lambda o, out: _gen_argv(o["q"], out, "--force"),
        "is not empty and was not written by vqsuite",
    ),
]


def _foreign(d: Path) -> Path:
    d.mkdir()
    (d / "holiday.png").write_bytes(os.urandom(64))
    return d


def _older_checkpoint(component: Path, d: Path, extra: dict[str, bytes]) -> Path:
    """A checkpoint folder as vqsuite wrote it before manifests (weights + config), plus ``extra``."""
    d.mkdir()
    for name in ("model.safetensors", "vqsuite_config.json"):
        shutil.copy2(component / name, d / name)
    for rel, data in extra.items():
        (d / rel).write_bytes(data)
    return d


@pytest.mark.parametrize("make, argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_force_refuses_and_deletes_nothing(
    outputs: Ctx,
    tmp_path: Path,
    make: Callable[[Ctx, Path], Path],
    argv: Callable[[Ctx, Path], list[str]],
    needle: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    make(outputs, out)
    before = snapshot(out)
    assert_one_line_usage_error(argv(outputs, out), needle, capsys)
    assert snapshot(out) == before  # every file still there, same bytes, same mtime
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing written beside it either


def test_quantize_force_replaces_its_own_output(outputs: Ctx, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _copy(outputs["q"], tmp_path / "q")
    argv = ["--quiet", "quantize", str(outputs["sd"]), "--preset", "w4a16", "--out", str(out), "--force"]
    (out / "report.txt").write_text("edited")  # a file it wrote, changed by hand: refused
    assert main(argv) == 2
    shutil.copy2(outputs["q"] / "report.txt", out / "report.txt")  # put back: replaced
    before = (out / "report.json").read_text()
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "report.json").read_text() != before  # a new run (its wall time)
    manifest = json.loads((out / ".vqsuite-manifest.json").read_text())
    assert manifest["kind"] == "pipeline" and {"report.txt", "report.json", "unet/model.safetensors"} <= set(
        manifest["files"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_info_says_an_interrupted_save_was_restored(
    outputs: Ctx, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """A quantized pipeline folder only present as ``.q.old-X`` (a save killed between its renames) is restored
    by ``vqsuite info`` and the warning says where it was."""
    hidden = _copy(outputs["q"], tmp_path / ".q.old-0123abcd")
    caplog.set_level(logging.WARNING, logger="vqsuite.fileio")
    assert main(["info", str(tmp_path / "q")]) == 0
    assert "quantized StableDiffusionPipeline" in capsys.readouterr().out
    assert f"an interrupted save left the previous version of {tmp_path / 'q'} at {hidden}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# ------------------------------------------------------------------------------------------------ demo
@pytest.fixture
def fast_demo(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``vqsuite demo`` (mini-sd) with the sampling, quantization and judge stubbed out: only the writing is real.
    Returns the presets the demo ran, in order."""
    import vqsuite
    import vqsuite.evals.fidelity
    from vqsuite import zoo
    from vqsuite.cli import demo_sd

    ran: list[str] = []

    class Pipe:
        unet = torch.nn.Linear(4, 4)

    def sample(pipe, seeds, prompts, **kw):  # noqa: ANN001, ANN003 - sample_pipeline's signature
        gen = torch.Generator().manual_seed(len(ran))
        return torch.randint(0, 255, (len(seeds), 3, 32, 32), generator=gen, dtype=torch.uint8)

    monkeypatch.setattr(demo_sd, "mini_sd_available", lambda: True)
    monkeypatch.setattr(zoo, "load", lambda name: type("Entry", (), {"model": Pipe()})())
    monkeypatch.setattr(vqsuite.evals.fidelity, "sample_pipeline", sample)
    monkeypatch.setattr(vqsuite, "quantize_pipeline", lambda pipe, preset, **kw: ran.append(preset))
    monkeypatch.setattr(demo_sd, "_alignment", lambda images, digits, judge: 1.0)
    return ran


@pytest.mark.parametrize("presets", [["w4a16"], ["w4a16", "w8a8"]], ids=["one-preset", "two-presets"])
def test_demo_rerun_replaces_own_output_and_refuses_user_files(
    fast_demo: list[str], tmp_path: Path, presets: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--model", "mini-sd", "--presets", ",".join(presets), "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    first = snapshot(out)
    records = [out / "demo.json"] if len(presets) == 1 else [out / p / "demo.json" for p in presets]
    assert all(r.is_file() for r in records)
    assert main(argv) == 0  # a rerun replaces the demo's own clean output
    assert snapshot(out).keys() == first.keys() and snapshot(out) != first
    assert fast_demo == presets * 2
    capsys.readouterr()
    (out / "fp").mkdir(exist_ok=True)
    (out / "fp" / "mine.txt").write_text("keep me")  # a file the demo did not write
    before = snapshot(out)
    assert_one_line_usage_error(argv, "holds fp/mine.txt, which was not written by vqsuite", capsys)
    assert snapshot(out) == before
    assert fast_demo == presets * 2  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_rerun_on_an_older_demo_output(fast_demo: list[str], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """An older demo's folder (no manifest) is replaced when it holds only demo files, refused otherwise."""
    out = tmp_path / "demo"
    (out / "fp").mkdir(parents=True)
    for name in ("demo.json", "grid.png", "fp/00000.png"):
        (out / name).write_bytes(b"old")
    argv = ["demo", "--model", "mini-sd", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0 and (out / ".vqsuite-manifest.json").is_file()
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / "demo.json").write_text("{}")
    (other / "keep.txt").write_text("mine")
    before = snapshot(other)
    argv[-1] = str(other)
    assert_one_line_usage_error(
        argv, "holds keep.txt, which a demo output folder (vqsuite demo) does not contain", capsys
    )
    assert snapshot(other) == before
