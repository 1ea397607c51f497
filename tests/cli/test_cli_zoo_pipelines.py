"""The CLI on the zoo's trained pipelines (``mini-sd``, ``mini-pixart``): ``quantize NAME``, ``generate`` on the
saved folder and on ``NAME --preset`` directly, ``eval NAME``. mini-pixart needs its ``call_kwargs``
(``use_resolution_binning=False``) on every call, calibration runs included; the images must be the ones the library
produces with the same seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqsuite
from vqsuite import zoo
from vqsuite.cli.main import main
from vqsuite.cli.sources import builtin_call_kwargs, builtin_prompts, pipeline_call_kwargs

STEPS = 2
PROMPT = "a photo of the digit seven"
PIPELINES = [n for n in ("mini-sd", "mini-pixart") if n in zoo.list()]
pytestmark = pytest.mark.skipif(len(PIPELINES) < 2, reason="the zoo's trained pipelines are not in this checkout")


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _library_image(pipe, kwargs: dict, seed: int = 0) -> np.ndarray:  # noqa: ANN001 - a diffusers pipeline
    """What ``generate`` must write for (PROMPT, seed): the pipeline called directly."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        img = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                   output_type="pil", **kwargs).images[0]  # fmt: skip
    return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module", params=PIPELINES)
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``vqsuite quantize NAME --preset w8a8 --out DIR`` (dynamic activations: no calibration run)."""
    name = request.param
    out = tmp_path_factory.mktemp("zoo-quantized") / name
    assert main(["--quiet", "quantize", name, "--preset", "w8a8", "--out", str(out)]) == 0
    return name, out


def test_quantize_builtin_pipeline_writes_a_loadable_folder_and_records_call_kwargs(quantized: tuple[str, Path]):
    name, out = quantized
    assert (out / "vqsuite_pipeline.json").is_file() and (out / "model_index.json").is_file()
    assert (out / "vae" / "config.json").is_file()  # mini-pixart's VAE (mini-sd's folder) is saved with it
    info = json.loads((out / "report.json").read_text())
    assert info["builtin"] == name and info["preset"] == "w8a8"
    assert info["call_kwargs"] == builtin_call_kwargs(name) | ({"clean_caption": False} if "pixart" in name else {})
    pipe = vqsuite.load_quantized(out)
    assert type(pipe).__name__ == type(zoo.load(name).model).__name__


def test_generate_on_saved_folder_matches_library_and_compare_uses_the_zoo(quantized: tuple[str, Path], tmp_path: Path):
    name, folder = quantized
    out = tmp_path / "gen"
    argv = ["--quiet", "generate", str(folder), "--prompt", PROMPT, "--steps", str(STEPS), "--out", str(out)]
    assert main([*argv, "--compare"]) == 0
    kw = builtin_call_kwargs(name)
    q = _pixels(out / "000.png")
    assert np.array_equal(q, _library_image(vqsuite.load_quantized(folder), kw))
    fp = _pixels(out / "fp" / "000.png")
    assert np.array_equal(fp, _library_image(zoo.load(name).model, kw))
    assert json.loads((out / "generate.json").read_text())["fp_model"] == name


def test_generate_on_folder_without_record_detects_pixart_binning(quantized: tuple[str, Path], tmp_path: Path):
    """A folder with no report.json (saved through the Python API): PixArt's binning is switched off by detection."""
    name, folder = quantized
    pipe = vqsuite.load_quantized(folder)
    detected = pipeline_call_kwargs(pipe)
    if "pixart" in name:
        assert detected == {"use_resolution_binning": False, "clean_caption": False}
    else:
        assert detected == {}


@pytest.mark.parametrize("name", PIPELINES)
def test_generate_builtin_pipeline_with_preset_on_the_fly(name: str, tmp_path: Path):
    out = tmp_path / "gen"
    argv = ["--quiet", "generate", name, "--preset", "w4a4", "--prompt", PROMPT, "--steps", str(STEPS)]
    assert main([*argv, "--out", str(out)]) == 0
    pipe = vqsuite.quantize_pipeline(zoo.load(name).model, "w4a4", **builtin_call_kwargs(name))
    assert np.array_equal(_pixels(out / "000.png"), _library_image(pipe, builtin_call_kwargs(name)))
    assert json.loads((out / "generate.json").read_text())["model"] == name


def test_quantize_calibrates_on_digit_prompts_with_call_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A recipe that calibrates (static activation scales) runs mini-pixart with its call kwargs on the digit
    prompts; without use_resolution_binning=False the calibration calls would raise."""
    seen: dict = {}
    real = vqsuite.quantize_pipeline

    def spy(pipe, config, **kw):  # noqa: ANN001, ANN202 - wraps the real function
        seen.update(kw)
        return real(pipe, config, **kw)

    monkeypatch.setattr(vqsuite, "quantize_pipeline", spy)
    out = tmp_path / "q"
    argv = ["--quiet", "quantize", "mini-pixart", "--preset", "w4a8-static", "--calib-steps", "1", "--out", str(out)]
    assert main(argv) == 0
    assert seen["calib_prompts"] == builtin_prompts("mini-pixart") == [zoo.load("mini-sd").preprocess(k)
                                                                      for k in range(10)]  # fmt: skip
    assert seen["use_resolution_binning"] is False and seen["clean_caption"] is False
    assert json.loads((out / "report.json").read_text())["call_kwargs"]["use_resolution_binning"] is False


def test_eval_builtin_pipeline(tmp_path: Path):
    out = tmp_path / "eval"
    argv = ["--quiet", "eval", "mini-pixart", "--preset", "w8a8", "--num-samples", "1", "--steps", "1"]
    assert main([*argv, "--out", str(out), "--no-report"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2 and all(r.get("status", "ok") == "ok" for r in rows)
