"""vqsuite.save_quantized / load_quantized on quantized pipelines: bit-identical images after the round trip
(same seed, no recalibration), loading into a float pipeline, atomic saves, one-line CheckpointErrors for a
folder from another architecture, a truncated tensor file and a missing component."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_pipelines as tp
import torch

import vqsuite
from vqsuite.nn import QLinearLowRank, QuantLayer
from vqsuite.pipelines.diffusers_io import PIPELINE_META_NAME
from vqsuite.pipelines.io import WEIGHTS_NAME


def _saved(tmp_path_factory: pytest.TempPathFactory, arch: str, preset: str) -> tuple[Path, torch.Tensor]:
    pipe, images = tp.quantized(arch, preset)
    folder = tmp_path_factory.mktemp(f"{arch}-{preset}") / "pipe"
    vqsuite.save_quantized(pipe, folder)
    return folder, images


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    return _saved(tmp_path_factory, "flux", "svdquant-int4")


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    return _saved(tmp_path_factory, "pixart", "nvfp4")


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(vqsuite.CheckpointError, match=match) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "arch,preset",
    [
        ("sd15", "svdquant-int4"),
        ("sdxl", "nvfp4"),
        ("pixart", "svdquant-int4"),
        ("sd3", "nvfp4"),
        ("ddpm", "svdquant-int4"),
        ("dit", "nvfp4"),
    ],
)
def test_round_trip_bit_exact(tmp_path: Path, arch: str, preset: str) -> None:
    pipe, images = tp.quantized(arch, preset)
    vqsuite.save_quantized(pipe, tmp_path / "q")
    loaded = vqsuite.load_quantized(tmp_path / "q")
    assert type(loaded) is type(pipe)
    assert torch.equal(tp.generate(loaded, arch), images), f"{arch}/{preset}: images differ after save/load"


def test_flux_round_trip_keeps_lowrank_and_config(flux_folder: tuple[Path, torch.Tensor]) -> None:
    folder, images = flux_folder
    loaded = vqsuite.load_quantized(folder)
    assert torch.equal(tp.generate(loaded, "flux"), images)
    attn = loaded.transformer.transformer_blocks[0].attn
    assert isinstance(attn.to_q, QLinearLowRank) and attn.to_q.frozen and attn.to_q.rank == 32
    assert attn.to_q.proj_down is attn.to_k.proj_down  # the shared branch survives the round trip
    assert loaded.transformer.vqsuite_config.name == "svdquant-int4"
    assert not loaded.transformer.training
    # unquantized components came back as ordinary diffusers/transformers modules
    assert not any(isinstance(m, QuantLayer) for m in loaded.text_encoder_2.modules())


def test_quantized_text_encoder_round_trip(tmp_path: Path) -> None:
    pipe = tp.quantize("flux", "w4a4", components=["text_encoder_2"])
    images = tp.generate(pipe, "flux")
    vqsuite.save_quantized(pipe, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / PIPELINE_META_NAME).read_text())
    assert set(meta["quantized"]) == {"transformer", "text_encoder_2"}
    loaded = vqsuite.load_quantized(tmp_path / "q")
    assert any(isinstance(m, QuantLayer) for m in loaded.text_encoder_2.modules())
    assert torch.equal(tp.generate(loaded, "flux"), images)
    into = vqsuite.load_quantized(tmp_path / "q", model=tp.flux(tp.TEST_WIDTH["flux"]))  # a transformers component
    assert any(isinstance(m, QuantLayer) for m in into.text_encoder_2.modules())
    assert torch.equal(tp.generate(into, "flux"), images)


def test_load_into_float_pipeline(flux_folder: tuple[Path, torch.Tensor]) -> None:
    folder, images = flux_folder
    pipe = tp.flux(tp.TEST_WIDTH["flux"])  # same architecture and seed as the saved one
    out = vqsuite.load_quantized(folder, model=pipe)
    assert out is pipe and isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, QLinearLowRank)
    assert torch.equal(tp.generate(pipe, "flux"), images)


def test_overwrite_is_atomic(tmp_path: Path) -> None:
    pipe, images = tp.quantized("dit", "nvfp4")
    target = tmp_path / "q"
    vqsuite.save_quantized(pipe, target)
    vqsuite.save_quantized(pipe, target)  # replacing a quantized-pipeline folder is fine
    assert torch.equal(tp.generate(vqsuite.load_quantized(target), "dit"), images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp folders left


def test_failed_save_leaves_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, images = tp.quantized("dit", "nvfp4")
    target = tmp_path / "q"
    vqsuite.save_quantized(pipe, target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(pipe.vae), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        vqsuite.save_quantized(pipe, target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert torch.equal(tp.generate(vqsuite.load_quantized(target), "dit"), images)


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    pipe, _ = tp.quantized("dit", "nvfp4")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(lambda: vqsuite.save_quantized(pipe, tmp_path / "mine"), "refusing to overwrite")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_unquantized_pipeline_is_refused(tmp_path: Path) -> None:
    _one_line_error(lambda: vqsuite.save_quantized(tp.dit(), tmp_path / "q"), "no quantized component")


# ------------------------------------------------------------------------------ damaged folders
def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_other_architecture_pipeline(flux_folder: tuple[Path, torch.Tensor]) -> None:
    folder, _ = flux_folder
    pixart = tp.pixart(tp.TEST_WIDTH["pixart"])
    _one_line_error(lambda: vqsuite.load_quantized(folder, model=pixart), "holds a quantized FluxPipeline")
    assert not any(isinstance(m, QuantLayer) for m in pixart.transformer.modules())


def test_other_architecture_component(
    tmp_path: Path, flux_folder: tuple[Path, torch.Tensor], pixart_folder: tuple[Path, torch.Tensor]
) -> None:
    dst = _copy(flux_folder[0], tmp_path)
    shutil.rmtree(dst / "transformer")
    shutil.copytree(pixart_folder[0] / "transformer", dst / "transformer")
    _one_line_error(lambda: vqsuite.load_quantized(dst), "another architecture")


def test_same_class_other_shape(tmp_path: Path, flux_folder: tuple[Path, torch.Tensor]) -> None:
    wider = tp.flux(256)
    msg = _one_line_error(lambda: vqsuite.load_quantized(flux_folder[0], model=wider), "another architecture")
    assert "transformer" in msg
    assert not any(isinstance(m, QuantLayer) for m in wider.transformer.modules())  # left as it was


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_truncated_tensor_file(tmp_path: Path, flux_folder: tuple[Path, torch.Tensor], component: str) -> None:
    dst = _copy(flux_folder[0], tmp_path)
    files = sorted((dst / component).glob("*.safetensors"))
    assert files, f"no tensor file in {component}/"
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: vqsuite.load_quantized(dst), "corrupt|unreadable|cannot load|incomplete|invalid")


@pytest.mark.parametrize("component", ["vae", "tokenizer_2", "transformer"])
def test_missing_component(tmp_path: Path, flux_folder: tuple[Path, torch.Tensor], component: str) -> None:
    dst = _copy(flux_folder[0], tmp_path)
    shutil.rmtree(dst / component)
    _one_line_error(lambda: vqsuite.load_quantized(dst), f"{component}.*missing|missing.*{component}")


def test_missing_weights_of_quantized_component(tmp_path: Path, flux_folder: tuple[Path, torch.Tensor]) -> None:
    dst = _copy(flux_folder[0], tmp_path)
    (dst / "transformer" / WEIGHTS_NAME).unlink()
    _one_line_error(lambda: vqsuite.load_quantized(dst), f"transformer.*{WEIGHTS_NAME}")


def test_not_a_quantized_pipeline(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    tp.dit().save_pretrained(plain)
    _one_line_error(lambda: vqsuite.load_quantized(plain, model=tp.dit()), "not a vqsuite quantized pipeline")
    _one_line_error(lambda: vqsuite.load_quantized(tmp_path / "nothing", model=tp.dit()), "no checkpoint")


def test_bad_pipeline_meta(tmp_path: Path, flux_folder: tuple[Path, torch.Tensor]) -> None:
    dst = _copy(flux_folder[0], tmp_path)
    (dst / PIPELINE_META_NAME).write_text("{not json")
    _one_line_error(lambda: vqsuite.load_quantized(dst), "not valid JSON")
    meta = {"format": "vqsuite-quantized-pipeline", "version": 99, "quantized": {"transformer": {}}}
    (dst / PIPELINE_META_NAME).write_text(json.dumps(meta))
    _one_line_error(lambda: vqsuite.load_quantized(dst), "version 99")
