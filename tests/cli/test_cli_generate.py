"""``vqsuite quantize`` on a pipeline folder and ``vqsuite generate`` (with ``--compare``), end to end on a tiny
Stable Diffusion pipeline saved to disk: files, sizes, the seed rule, and that the images are the ones the library
itself produces with the same seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY_SIZE
from PIL import Image

import vqsuite
from vqsuite.cli.main import main

STEPS = 2


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _library_image(pipe, prompt: str, seed: int) -> np.ndarray:  # noqa: ANN001 - a diffusers pipeline
    """What ``generate`` must produce for one (prompt, seed): the pipeline called directly."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        img = pipe(
            prompt=prompt,
            num_inference_steps=STEPS,
            height=TINY_SIZE,
            width=TINY_SIZE,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    return np.asarray(img.convert("RGB"))


def _gen_args(model: Path, out: Path, *extra: str) -> list[str]:
    size = str(TINY_SIZE)
    return ["--quiet", "generate", str(model), "--steps", str(STEPS), "--height", size, "--width", size,
            "--out", str(out), *extra]  # fmt: skip


def test_quantize_pipeline_folder_writes_folder_and_report(
    quantized_sd: Path, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    assert main(["--quiet", "quantize", str(tiny_sd), "--preset", "w4a16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weight layers quantized" in printed and "down_blocks.0.attentions.0.proj_in" in printed
    for name in ("vqsuite_pipeline.json", "model_index.json", "report.txt", "report.json", "unet/model.safetensors"):
        assert (out / name).is_file(), name
    info = json.loads((out / "report.json").read_text())
    assert info["source"] == str(tiny_sd.resolve()) and info["preset"] == "w4a16"
    layers = info["report"]["components"]["unet"]["layers"]
    quantized = [r for r in layers if r["status"] == "quantized"]
    assert quantized and all(r["weight"] == "int4/g64" for r in quantized)
    assert len(layers) > len(quantized)  # the rule keeps some layers 16-bit, and the report says which
    assert (out / "report.txt").read_text().strip() in printed
    # the folder is a real quantized pipeline: the library loads it
    pipe = vqsuite.load_quantized(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert main(["info", str(out)]) == 0
    assert "quantized StableDiffusionPipeline" in capsys.readouterr().out


def test_generate_compare_from_quantized_folder(
    quantized_sd: Path, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gen"
    assert main(_gen_args(quantized_sd, out, "--prompt", "a red cat", "--n", "2", "--seed", "7", "--compare")) == 0
    assert "wrote 2 quantized images" in capsys.readouterr().out
    manifest = json.loads((out / "generate.json").read_text())
    assert [(im["file"], im["seed"], im["prompt"]) for im in manifest["images"]] == [
        ("000.png", 7, "a red cat"),
        ("001.png", 8, "a red cat"),
    ]
    assert manifest["fp_model"] == str(tiny_sd.resolve())  # found through the report vqsuite quantize wrote
    for f in ("000.png", "001.png", "fp/000.png", "fp/001.png", "compare/000.png", "compare/001.png"):
        assert Image.open(out / f).size == ((2 if f.startswith("compare") else 1) * TINY_SIZE, TINY_SIZE), f
    assert Image.open(out / "grid.png").size == (2 * TINY_SIZE, TINY_SIZE)
    assert Image.open(out / "compare_grid.png").size == (2 * TINY_SIZE, 2 * TINY_SIZE)

    # the images are exactly the library's, seed by seed: quantized folder and float folder
    q_pipe = vqsuite.load_quantized(quantized_sd)
    fp_pipe = __import__("diffusers").DiffusionPipeline.from_pretrained(str(tiny_sd), local_files_only=True)
    for j, seed in enumerate((7, 8)):
        q_ref, fp_ref = _library_image(q_pipe, "a red cat", seed), _library_image(fp_pipe, "a red cat", seed)
        np.testing.assert_array_equal(_pixels(out / f"{j:03d}.png"), q_ref)
        np.testing.assert_array_equal(_pixels(out / f"fp/{j:03d}.png"), fp_ref)
        pair = _pixels(out / f"compare/{j:03d}.png")
        np.testing.assert_array_equal(pair[:, :TINY_SIZE], fp_ref)  # left: full precision
        np.testing.assert_array_equal(pair[:, TINY_SIZE:], q_ref)  # right: quantized
    # quantization changed the images (INT4 weights), and the two seeds gave two different images
    assert not np.array_equal(_pixels(out / "000.png"), _pixels(out / "fp/000.png"))
    assert not np.array_equal(_pixels(out / "000.png"), _pixels(out / "001.png"))


def test_generate_on_the_fly_preset_matches_saved_folder(
    quantized_sd: Path, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# test prompts\na red cat\n\na dog\n")
    fly, saved = tmp_path / "fly", tmp_path / "saved"
    assert main(_gen_args(tiny_sd, fly, "--prompts", str(prompts), "--preset", "w4a16", "--compare")) == 0
    assert main(_gen_args(quantized_sd, saved, "--prompts", str(prompts))) == 0
    capsys.readouterr()
    manifest = json.loads((fly / "generate.json").read_text())
    assert [im["prompt"] for im in manifest["images"]] == ["a red cat", "a dog"]
    # RTN is deterministic and a saved checkpoint reloads bit-identically: same pixels either way
    for f in ("000.png", "001.png"):
        np.testing.assert_array_equal(_pixels(fly / f), _pixels(saved / f))
    assert (fly / "fp" / "001.png").is_file() and not (saved / "fp").exists()


def test_generate_force_replaces_own_output(
    quantized_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gen"
    assert main(_gen_args(quantized_sd, out, "--prompt", "a cat", "--n", "2")) == 0
    assert main(_gen_args(quantized_sd, out, "--prompt", "a dog", "--force")) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "generate.json", "grid.png"]  # 001.png is gone
    assert json.loads((out / "generate.json").read_text())["images"][0]["prompt"] == "a dog"


@pytest.mark.slow
def test_quantize_svdquant_calibrates_on_prompt_file(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "calib.txt"
    prompts.write_text("a red cat\na dog on a photo\na photo of the cat\n")
    out = tmp_path / "svdq"
    argv = ["--quiet", "quantize", str(tiny_sd), "--preset", "svdquant-int4", "--calib-prompts", str(prompts),
            "--num-calib-prompts", "2", "--calib-steps", "1", "--height", "32", "--width", "32",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "calibrated on 2 prompts x 1 steps" in capsys.readouterr().out
    cal = json.loads((out / "report.json").read_text())["report"]["components"]["unet"]["calibration"]
    assert cal["ran"] and cal["samples"] == 2 and cal["steps"] == 1
    ranks = {r["rank"] for r in json.loads((out / "report.json").read_text())["report"]["components"]["unet"]["layers"]}
    assert max(ranks) > 0  # the SVDQuant low-rank branch is there


#: W8A8 on the real face DCGAN keeps the images within this PSNR of the FP ones (measured ~47-49 dB on 4 seeds)
MIN_W8A8_GAN_PSNR_DB = 35.0


def _zoo_available(name: str) -> bool:
    try:
        import vqsuite.zoo as zoo

        zoo.load(name)
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _zoo_available("face-dcgan"), reason="the face DCGAN weights package is not installed")
def test_generate_builtin_gan_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "faces"
    assert main(["--quiet", "generate", "face-dcgan", "--preset", "w8a8", "--n", "3", "--seed", "5", "--compare",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "wrote 3 quantized (w8a8) images" in capsys.readouterr().out
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["kind"] == "builtin-generator" and manifest["seed"] == 5 and len(manifest["images"]) == 3
    assert Image.open(out / "compare_grid.png").size == (3 * 64, 2 * 64)
    for j in range(3):
        q, fp = _pixels(out / f"{j:03d}.png").astype(np.float64), _pixels(out / f"fp/{j:03d}.png").astype(np.float64)
        psnr = 10 * np.log10(255**2 / np.mean((q - fp) ** 2))
        assert MIN_W8A8_GAN_PSNR_DB < psnr < float("inf"), psnr  # close to FP, and really quantized
    # the FP images are the zoo generator's own outputs for preprocess(n, seed)
    import vqsuite.zoo as zoo

    z = zoo.load("face-dcgan")
    with torch.no_grad():
        ref = ((z.model(*z.preprocess(3, 5)).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    np.testing.assert_array_equal(_pixels(out / "fp/002.png"), ref[2].permute(1, 2, 0).numpy())


#: batched UNet calls may round differently from one-image calls; the PNGs must still agree to this many levels
MAX_BATCH_PIXEL_DIFF = 2


def test_generate_batch_size_keeps_per_image_seeds(
    quantized_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, batched = tmp_path / "one", tmp_path / "batched"
    assert main(_gen_args(quantized_sd, one, "--prompt", "a cat", "--n", "3")) == 0
    assert main(_gen_args(quantized_sd, batched, "--prompt", "a cat", "--n", "3", "--batch-size", "2")) == 0
    capsys.readouterr()
    for f in ("000.png", "001.png", "002.png"):  # a batch of 2, then a batch of 1
        diff = np.abs(_pixels(one / f).astype(int) - _pixels(batched / f).astype(int)).max()
        assert diff <= MAX_BATCH_PIXEL_DIFF, (f, diff)
    assert not np.array_equal(_pixels(batched / "000.png"), _pixels(batched / "001.png"))
