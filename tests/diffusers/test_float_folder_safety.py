"""A user's *float* pipeline folder (``vqsuite quantize FOLDER``, ``generate --compare``, a sweep's
``pipeline:FOLDER``) is loaded without running anything from it: no pickled ``.bin`` weights, no library outside the
allow-list, no custom pipeline code; each refusal is one line (CLI exit 2). A clean folder still loads."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import tiny_pipelines as tp
from pickle_bait import Evil

from vqsuite.cli.main import main
from vqsuite.evals.sweep import ModelSpec, build_target
from vqsuite.pipelines.errors import CheckpointError
from vqsuite.pipelines.float_folder import load_float_pipeline_folder

MAX_MESSAGE = 300
MARKER_NAME = "PWNED"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("float-folder") / "sd"
    tp.sd15().save_pretrained(str(folder))
    return folder


@pytest.fixture
def fp(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "sd"
    shutil.copytree(saved, dst)
    return dst


def _pickle_instead_of_weights(folder: Path) -> None:
    (folder / "unet" / UNET_WEIGHTS).unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil(folder.parent / MARKER_NAME)))


def _library(name: str):
    def damage(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        index["unet"] = [name, "UNet2DConditionModel"]
        (folder / "model_index.json").write_text(json.dumps(index))

    return damage


def _custom_pipeline(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "EvilPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _code_file(folder: Path) -> None:
    (folder / "unet" / "diffusers.py").write_text(f"open({str(folder.parent / MARKER_NAME)!r}, 'w').close()\n")


def _bad_json(folder: Path) -> None:
    (folder / "model_index.json").write_text("{not json")


DAMAGE = {
    "pickle-bin": (_pickle_instead_of_weights, "cannot load"),
    "library-os": (_library("os"), "not an allowed library"),
    "library-evil": (_library("evil_float_module"), "not an allowed library"),
    "custom-pipeline": (_custom_pipeline, "custom pipeline"),
    "code-file": (_code_file, "code file"),
    "bad-json": (_bad_json, "not valid JSON"),
}


def test_clean_float_folder_loads(fp: Path) -> None:
    pipe = load_float_pipeline_folder(fp)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("case", list(DAMAGE), ids=list(DAMAGE))
def test_hostile_float_folder_refused_without_running_it(fp: Path, case: str) -> None:
    damage, words = DAMAGE[case]
    damage(fp)
    with pytest.raises(CheckpointError) as info:
        load_float_pipeline_folder(fp)
    msg = str(info.value)
    assert words in msg and "\n" not in msg and len(msg) <= MAX_MESSAGE + len(str(fp))
    assert not (fp.parent / MARKER_NAME).exists()
    assert "evil_float_module" not in sys.modules


@pytest.mark.parametrize("case", ["pickle-bin", "library-evil", "code-file"])
def test_cli_quantize_refuses_hostile_float_folder(fp: Path, tmp_path: Path, capsys, case: str) -> None:
    DAMAGE[case][0](fp)
    rc = main(["quantize", str(fp), "--preset", "w8a16", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not (fp.parent / MARKER_NAME).exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["pickle-bin", "library-evil"])
def test_sweep_pipeline_source_refuses_hostile_float_folder(fp: Path, case: str) -> None:
    DAMAGE[case][0](fp)
    with pytest.raises(CheckpointError):
        build_target(ModelSpec(name="sd", source=f"pipeline:{fp}"))
    assert not (fp.parent / MARKER_NAME).exists()
