"""Loading a quantized pipeline folder is safe by construction: a hostile pickle under any name diffusers or
transformers could look at never runs (a component with only a ``.bin`` is refused, not unpickled), no library or
module the JSON names outside the allow-lists is imported, no ``.py`` in the folder is ever used, component names
and symlinks never lead outside the folder, every malformed field of ``vqsuite_pipeline.json`` / ``model_index.json``
is one readable CheckpointError line, and NaN/Inf in a quantized component is refused. The same through
``vqsuite info`` and ``vqsuite generate`` (exit 2, one line)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tiny_pipelines as tp
from pickle_bait import Evil, refuse_unpickling
from safetensors.torch import load_file, save_file

import vqsuite
from vqsuite.nn import QuantLayer
from vqsuite.pipelines.diffusers_io import MODEL_INDEX_NAME, PIPELINE_META_NAME, read_pipeline_meta
from vqsuite.pipelines.io import CONFIG_NAME, WEIGHTS_NAME

MAX_MESSAGE = 300
MARKER_NAME = "PWNED"
EVIL_MODULE = "evil_pipe_module"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline, its UNet quantized with RTN w4a16 (fast), saved once for the module."""
    folder = tmp_path_factory.mktemp("load-safety") / "q"
    vqsuite.save_quantized(tp.quantize("sd15", "w4a16"), folder)
    return folder


@pytest.fixture
def q(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of the saved folder to damage."""
    dst = tmp_path / "q"
    shutil.copytree(saved, dst, symlinks=True)
    return dst


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """pickle and torch.load record any use (and refuse); the test asserts nothing was recorded."""
    return refuse_unpickling(monkeypatch, "loading a pipeline folder")


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module (on sys.path, outside the folder) whose import would create the marker."""
    where = tmp_path / "site"
    where.mkdir()
    (where / f"{EVIL_MODULE}.py").write_text(
        f"open({str(tmp_path / MARKER_NAME)!r}, 'w').close()\nclass Evil:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)
    return tmp_path / MARKER_NAME


def _one_line(fn: Callable[[], object], needle: str, root: Path) -> str:
    with pytest.raises(vqsuite.CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert needle in msg, msg
    assert len(msg.replace(str(root), "")) <= MAX_MESSAGE, msg
    return msg


def _edit_json(file: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


# ---------------------------------------------------------------------------- pickle bait
#: (component, file name): everything diffusers / transformers / vqsuite could look for in a component folder
BAIT = [
    ("unet", "model.bin"),
    ("unet", "pytorch_model.bin"),
    ("unet", "diffusion_pytorch_model.bin"),
    ("unet", "model.pt"),
    ("unet", "model.pkl"),
    ("vae", "diffusion_pytorch_model.bin"),
    ("vae", "diffusion_pytorch_model.ckpt"),
    ("vae", "model.pt"),
    ("text_encoder", "pytorch_model.bin"),
    ("text_encoder", "tf_model.h5"),
    ("text_encoder", "model.pkl"),
    ("tokenizer", "pytorch_model.bin"),
    ("scheduler", "scheduler.bin"),
    (".", "pytorch_model.bin"),
    (".", "diffusion_pytorch_model.bin"),
    (".", "pipeline.pkl"),
]


@pytest.mark.parametrize("component,name", BAIT, ids=[f"{c}/{n}" for c, n in BAIT])
def test_pickle_beside_the_weights_is_ignored(component: str, name: str, q: Path, no_unpickling: list[str]) -> None:
    marker = q.parent / MARKER_NAME
    (q / component / name).write_bytes(pickle.dumps(Evil(marker)))
    pipe = vqsuite.load_quantized(q)
    assert any(isinstance(m, QuantLayer) for m in pipe.unet.modules())
    assert not marker.exists() and no_unpickling == []


INSTEAD = {  # component -> (its safetensors file, the pickle put in its place, the message)
    "unet": (WEIGHTS_NAME, "diffusion_pytorch_model.bin", f"quantized component 'unet' has no {WEIGHTS_NAME}"),
    "unet-same-name": (WEIGHTS_NAME, WEIGHTS_NAME, "is corrupt or unreadable"),
    "vae": (VAE_WEIGHTS, "diffusion_pytorch_model.bin", f"no file named {VAE_WEIGHTS}"),
    "vae-same-name": (VAE_WEIGHTS, VAE_WEIGHTS, "cannot load the other components"),
    "text_encoder": (TEXT_WEIGHTS, "pytorch_model.bin", f"no file named {TEXT_WEIGHTS}"),
    "text_encoder-same-name": (TEXT_WEIGHTS, TEXT_WEIGHTS, "cannot load the other components"),
}


@pytest.mark.parametrize("case", list(INSTEAD))
def test_pickle_instead_of_the_weights_is_refused(case: str, q: Path, no_unpickling: list[str]) -> None:
    component = case.split("-")[0]
    weights, name, needle = INSTEAD[case]
    marker = q.parent / MARKER_NAME
    (q / component / weights).unlink()
    (q / component / name).write_bytes(pickle.dumps(Evil(marker)))
    msg = _one_line(lambda: vqsuite.load_quantized(q), needle, q.parent)
    assert "PWNED" not in msg
    assert not marker.exists() and no_unpickling == []


# ---------------------------------------------------------------------------- nothing the folder names is imported
def _quantized_entry(**fields: object) -> Callable[[dict], object]:
    return lambda m: m["quantized"]["unet"].update(fields)


HOSTILE_META = {
    "library-os": (_quantized_entry(library="os"), "quantized.unet.library='os' is not an allowed library"),
    "library-subprocess": (_quantized_entry(library="subprocess"), "library='subprocess' is not an allowed"),
    "library-importable": (_quantized_entry(library=EVIL_MODULE), f"library='{EVIL_MODULE}' is not an allowed"),
    "class-dunder": (_quantized_entry(**{"class": "__class__"}), "describes a UNet2DConditionModel"),
    "class-path": (_quantized_entry(**{"class": "os.system"}), "quantized.unet.class='os.system' is not a class"),
}
HOSTILE_INDEX = {
    "unet-os": (lambda m: m.update(unet=["os", "system"]), "unet[0]='os' is not an allowed library"),
    "vae-importable": (lambda m: m.update(vae=[EVIL_MODULE, "Evil"]), f"vae[0]='{EVIL_MODULE}' is not an allowed"),
    "scheduler-subprocess": (lambda m: m.update(scheduler=["subprocess", "Popen"]), "scheduler[0]='subprocess'"),
    "tokenizer-dotted": (lambda m: m.update(tokenizer=["os.path", "join"]), "tokenizer[0]='os.path' is not"),
    "custom-pipeline": (lambda m: m.update(_class_name=[EVIL_MODULE, "Evil"]), "_class_name is a list"),
    "class-not-identifier": (lambda m: m.update(vae=["diffusers", "a.b"]), "vae[1]='a.b' is not a class name"),
}


@pytest.mark.parametrize("case", list(HOSTILE_META) + list(HOSTILE_INDEX))
def test_named_libraries_are_an_allow_list(case: str, q: Path, evil_module: Path, no_unpickling: list[str]) -> None:
    if case in HOSTILE_META:
        edit, needle = HOSTILE_META[case]
        _edit_json(q / PIPELINE_META_NAME, edit)
    else:
        edit, needle = HOSTILE_INDEX[case]
        _edit_json(q / MODEL_INDEX_NAME, edit)
    _one_line(lambda: vqsuite.load_quantized(q), needle, q.parent)
    _one_line(lambda: vqsuite.load_quantized(q, model=tp.sd15(tp.TEST_WIDTH["sd15"])), needle, q.parent)
    assert EVIL_MODULE not in sys.modules and not evil_module.exists()


CODE_FILES = ["None.py", f"{EVIL_MODULE}.py", "tokenizer/transformers.py", "unet/diffusers.py", "vae/evil.pyc",
              "scheduler/__pycache__/x.cpython-311.pyc", "text_encoder/modeling_evil.py"]  # fmt: skip


@pytest.mark.parametrize("rel", CODE_FILES)
def test_code_in_the_folder_is_refused(rel: str, q: Path, tmp_path: Path) -> None:
    """diffusers imports ``<folder>/<custom_pipeline>.py`` (even ``None.py``) and ``<component>/<library>.py``."""
    marker = tmp_path / MARKER_NAME
    file = q / rel
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(f"open({str(marker)!r}, 'w').close()\n")
    if rel == f"{EVIL_MODULE}.py":  # and the index names it as a custom pipeline
        _edit_json(q / MODEL_INDEX_NAME, lambda m: m.update(_class_name=[EVIL_MODULE, "Evil"]))
    _one_line(lambda: vqsuite.load_quantized(q), "is a code file", q.parent)
    assert not marker.exists() and EVIL_MODULE not in sys.modules


def test_generic_pipeline_class_is_refused(q: Path) -> None:
    _edit_json(q / PIPELINE_META_NAME, lambda m: m.update(pipeline_class="DiffusionPipeline"))
    _edit_json(q / MODEL_INDEX_NAME, lambda m: m.update(_class_name="DiffusionPipeline"))
    _one_line(lambda: vqsuite.load_quantized(q), "pipeline_class 'DiffusionPipeline' cannot be loaded", q.parent)


# ---------------------------------------------------------------------------- names never leave the folder
def _rename_quantized(new: str) -> Callable[[dict], object]:
    return lambda m: m.update(quantized={new: m["quantized"]["unet"]})


TRAVERSAL = {
    "quantized-dotdot": (PIPELINE_META_NAME, _rename_quantized("../unet"), "component name '../unet' is not a"),
    "quantized-absolute": (PIPELINE_META_NAME, _rename_quantized("/etc"), "component name '/etc' is not a plain"),
    "quantized-separator": (PIPELINE_META_NAME, _rename_quantized("unet/../unet"), "'unet/../unet' is not a plain"),
    "quantized-dot": (PIPELINE_META_NAME, _rename_quantized("."), "component name '.' is not a plain name"),
    "dtypes-dotdot": (PIPELINE_META_NAME, lambda m: m["dtypes"].update({"../x": "float32"}), "'../x' is not a"),
    "index-dotdot": (MODEL_INDEX_NAME, lambda m: m.update({"../vae": ["diffusers", "AutoencoderKL"]}), "'../vae'"),
    "index-absolute": (MODEL_INDEX_NAME, lambda m: m.update({"/tmp": ["diffusers", "AutoencoderKL"]}), "'/tmp'"),
    "quantized-not-in-index": (PIPELINE_META_NAME, _rename_quantized("vae2"), "'vae2' is not a component"),
}


@pytest.mark.parametrize("case", list(TRAVERSAL))
def test_component_names_never_leave_the_folder(case: str, q: Path) -> None:
    fname, edit, needle = TRAVERSAL[case]
    _edit_json(q / fname, edit)
    _one_line(lambda: vqsuite.load_quantized(q), needle, q.parent)


SYMLINKS = ["vae", "unet", f"unet/{WEIGHTS_NAME}", f"unet/{CONFIG_NAME}", "unet/config.json",
            f"vae/{VAE_WEIGHTS}", "tokenizer/tokenizer.json", "text_encoder", MODEL_INDEX_NAME]  # fmt: skip


@pytest.mark.parametrize("rel", SYMLINKS)
def test_symlink_out_of_the_folder_is_refused(rel: str, q: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / rel
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(q / rel, outside)  # valid content, but outside the folder
    os.symlink(outside, q / rel)
    _one_line(lambda: vqsuite.load_quantized(q), "is a link to outside the checkpoint folder", q.parent)
    _one_line(lambda: read_pipeline_meta(q), "is a link to outside the checkpoint folder", q.parent)


def test_symlink_inside_the_folder_is_fine(q: Path) -> None:
    shutil.move(q / "vae", q / "vae_real")
    os.symlink("vae_real", q / "vae")
    assert vqsuite.load_quantized(q).vae is not None


# ---------------------------------------------------------------------------- schema: one line per malformed field
MALFORMED_META = {
    "quantized-string": (lambda m: m.update(quantized="unet"), "quantized must be a table, not a string"),
    "quantized-list": (lambda m: m.update(quantized=["unet"]), "quantized must be a table, not a list"),
    "entry-string": (lambda m: m["quantized"].update(unet="diffusers"), "quantized.unet must be a table"),
    "entry-dtype-float128": (_quantized_entry(dtype="float128"), "quantized.unet.dtype='float128' is not a float"),
    "entry-dtype-Tensor": (_quantized_entry(dtype="Tensor"), "quantized.unet.dtype='Tensor' is not a float dtype"),
    "entry-class-number": (_quantized_entry(**{"class": 5}), "quantized.unet.class=5 is not a class name"),
    "entry-class-missing": (lambda m: m["quantized"]["unet"].pop("class"), "quantized.unet.class=None is not a"),
    "entry-unknown-key": (_quantized_entry(loader="x"), "quantized.unet.loader is not a known field"),
    "entry-library-table": (_quantized_entry(library={}), "quantized.unet.library is a table"),
    "dtypes-string": (lambda m: m.update(dtypes="float32"), "dtypes must be a table, not a string"),
    "dtypes-float128": (lambda m: m["dtypes"].update(vae="float128"), "dtypes.vae='float128' is not a float dtype"),
    "dtypes-Tensor": (lambda m: m["dtypes"].update(vae="Tensor"), "dtypes.vae='Tensor' is not a float dtype"),
    "dtypes-number": (lambda m: m["dtypes"].update(vae=32), "dtypes.vae=32 is not a float dtype"),
    "pipeline-class-number": (lambda m: m.update(pipeline_class=5), "pipeline_class=5 is not a pipeline class"),
    "pipeline-class-missing": (lambda m: m.pop("pipeline_class"), "pipeline_class=None is not a pipeline class"),
    "version-string": (lambda m: m.update(vqsuite_version=[1]), "vqsuite_version must be a string, not a list"),
    "no-format": (lambda m: m.pop("format"), "is not a vqsuite-quantized-pipeline file"),
}
MALFORMED_INDEX = {
    "index-class-number": (lambda m: m.update(_class_name=5), "_class_name=5 is not a pipeline class name"),
    "index-class-missing": (lambda m: m.pop("_class_name"), "_class_name=None is not a pipeline class name"),
    "index-entry-numbers": (lambda m: m.update(vae=[1, 2]), "vae must be a [library, class] pair"),
    "index-private-table": (lambda m: m.update(_diffusers_version={"a": 1}), "_diffusers_version must be a plain"),
    "index-other-pipeline": (lambda m: m.update(_class_name="FluxPipeline"), "mixed from two pipelines"),
}
MALFORMED_COMPONENT = {
    "weight-dtype-float128": (
        lambda m: next(iter(m["layers"].values())).update(weight_dtype="float128"),
        "].weight_dtype='float128' is not a float dtype",
    ),
    "layers-string": (lambda m: m.update(layers="all"), "layers must be a table, not a string"),
    "args-string": (lambda m: next(iter(m["layers"].values())).update(args="x"), "].args must be a table"),
}


@pytest.mark.parametrize("case", list(MALFORMED_META) + list(MALFORMED_INDEX) + list(MALFORMED_COMPONENT))
def test_malformed_field_is_one_line_naming_it(case: str, q: Path) -> None:
    if case in MALFORMED_META:
        file, (edit, needle) = q / PIPELINE_META_NAME, MALFORMED_META[case]
    elif case in MALFORMED_INDEX:
        file, (edit, needle) = q / MODEL_INDEX_NAME, MALFORMED_INDEX[case]
    else:
        file, (edit, needle) = q / "unet" / CONFIG_NAME, MALFORMED_COMPONENT[case]
    _edit_json(file, edit)
    msg = _one_line(lambda: vqsuite.load_quantized(q), needle, q.parent)
    assert str(file) in msg
    _one_line(lambda: read_pipeline_meta(q), needle, q.parent)  # what `vqsuite info` / `generate` read first
    pipe = tp.sd15(tp.TEST_WIDTH["sd15"])
    _one_line(lambda: vqsuite.load_quantized(q, model=pipe), needle, q.parent)
    assert not any(isinstance(m, QuantLayer) for m in pipe.unet.modules())  # left as it was


def test_whole_file_not_a_table(q: Path) -> None:
    (q / MODEL_INDEX_NAME).write_text("[1, 2]")
    _one_line(lambda: vqsuite.load_quantized(q), "must be a table, not a list", q.parent)
    (q / PIPELINE_META_NAME).write_text('"vqsuite"')
    _one_line(lambda: vqsuite.load_quantized(q), "is not a vqsuite-quantized-pipeline file", q.parent)


def test_invalid_json_does_not_echo_bytes(q: Path) -> None:
    (q / MODEL_INDEX_NAME).write_bytes(b'{"_class_name": SECRETSECRET}')
    msg = _one_line(lambda: vqsuite.load_quantized(q), "is not valid JSON (Expecting value", q.parent)
    assert "SECRET" not in msg


# ---------------------------------------------------------------------------- NaN / Inf in a quantized component
@pytest.mark.parametrize("kind", ["wscales-nan", "bias-inf", "float-weight-nan"])
def test_nan_or_inf_in_the_quantized_component_is_refused(kind: str, q: Path) -> None:
    file = q / "unet" / WEIGHTS_NAME
    tensors = load_file(str(file))
    suffix = {"wscales-nan": ".wscales", "bias-inf": ".bias", "float-weight-nan": "norm.weight"}[kind]
    name = next(k for k in sorted(tensors) if k.endswith(suffix) and tensors[k].is_floating_point())
    t = tensors[name].clone()
    t.view(-1)[0] = float("inf") if kind == "bias-inf" else float("nan")
    tensors[name] = t
    save_file(tensors, str(file), metadata={"format": "pt"})
    _one_line(lambda: vqsuite.load_quantized(q), f"tensor '{name}' holds NaN or Inf", q.parent)


# ---------------------------------------------------------------------------- through the CLI
CLI_CASES = {
    "library-os": (PIPELINE_META_NAME, HOSTILE_META["library-os"]),
    "dtype-float128": (PIPELINE_META_NAME, MALFORMED_META["entry-dtype-float128"]),
    "dtypes-Tensor": (PIPELINE_META_NAME, MALFORMED_META["dtypes-Tensor"]),
    "quantized-dotdot": (PIPELINE_META_NAME, TRAVERSAL["quantized-dotdot"][1:]),
    "index-os": (MODEL_INDEX_NAME, HOSTILE_INDEX["unet-os"]),
    "component-dtype": (f"unet/{CONFIG_NAME}", MALFORMED_COMPONENT["weight-dtype-float128"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
@pytest.mark.parametrize("command", ["info", "generate"])
def test_cli_is_exit_2_with_one_line(command: str, case: str, q: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqsuite.cli.main import EXIT_USAGE, main

    fname, (edit, needle) = CLI_CASES[case]
    _edit_json(q / fname, edit)
    out = q.parent / "gen"
    argv = [command, str(q)]
    if command == "generate":
        argv += ["--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"vqsuite {command}: error: ") and needle in err, err
    assert captured.out == "" and not out.exists()


def test_cli_generate_refuses_a_pickle_only_component(q: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqsuite.cli.main import EXIT_USAGE, main

    marker = q.parent / MARKER_NAME
    (q / "vae" / VAE_WEIGHTS).unlink()
    (q / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    out = q.parent / "gen"
    argv = ["generate", str(q), "--prompt", "a", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no file named {VAE_WEIGHTS}" in err, err
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------- model_index.json allow-list
def test_model_index_accepts_what_diffusers_writes(tmp_path: Path) -> None:
    """Libraries real pipelines record: diffusers, transformers, and a diffusers pipeline subpackage (the safety
    checker of Stable Diffusion is ``["stable_diffusion", "StableDiffusionSafetyChecker"]``); nulls for absent
    optional components; plain config values."""
    from vqsuite.pipelines.schema import validate_model_index

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "requires_safety_checker": True,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    components = validate_model_index(index, tmp_path / MODEL_INDEX_NAME)
    assert components["safety_checker"] == ("stable_diffusion", "StableDiffusionSafetyChecker")
    assert "requires_safety_checker" not in components
    for lib in ("os", "stable_diffusion.safety_checker", "pipelines", "__init__", "diffusers.pipelines"):
        with pytest.raises(vqsuite.CheckpointError, match="is not an allowed library"):
            validate_model_index({**index, "safety_checker": [lib, "X"]}, tmp_path / MODEL_INDEX_NAME)
