"""Sweeps: TOML declarations, one JSON line per cell, resuming after a kill or a truncated line, pipelines/GANs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evals_helpers import TinyExtractor, TinyGen, gen_sample, tiny_classifier

from vqsuite.evals import sweep as sw
from vqsuite.evals.sweep import (
    ConfigSpec,
    GeneratorTarget,
    ModelSpec,
    SweepError,
    SweepSpec,
    load_sweep,
    read_results,
    run_sweep,
)

HERE = Path(__file__).resolve().parent

TOML = """
name = "toy"
metrics = ["agreement", "sqnr"]
batch_size = 8
configs = [
    "w8a8",
    "w4a16",
    {name = "w4-g32", config = {default = {weight = "int4", weight_group_size = 32}, overrides = {head = "float"}}},
]

[[models]]
name = "tiny"
source = "python:evals_helpers:tiny_classifier"
data = {random = 8, size = 8}
"""


def _spec(**kw) -> SweepSpec:
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    return SweepSpec(
        models=[ModelSpec("tiny", tiny_classifier, data=(x, y), key="tiny")],
        configs=[ConfigSpec("w8a8"), ConfigSpec("w4a16"), ConfigSpec("w4a4")],
        metrics=["accuracy", "agreement"],
        name="toy",
        **kw,
    )


def test_toml_declaration_runs(tmp_path) -> None:
    (tmp_path / "s.toml").write_text(TOML)
    spec = load_sweep(tmp_path / "s.toml")
    assert [c.name for c in spec.configs] == ["w8a8", "w4a16", "w4-g32"]
    assert len(spec.cells()) == 4  # + the FP row
    rows = run_sweep(spec, tmp_path / "out", progress=False, stop_on_error=True)
    assert [r["config_name"] for r in rows] == ["fp", "w8a8", "w4a16", "w4-g32"]
    by = {r["config_name"]: r for r in rows}
    assert by["fp"]["metrics"]["top1_agreement"] == 1.0 and by["fp"]["memory"]["compression"] == 1.0
    assert by["w8a8"]["metrics"]["sqnr_min_db"] > by["w4a16"]["metrics"]["sqnr_min_db"]
    assert by["w4-g32"]["config"]["default"]["weight_group_size"] == 32
    assert by["w4-g32"]["config"]["overrides"] == [["head", None]]  # kept in float
    assert by["w8a8"]["memory"]["bits_per_weight"] < by["fp"]["memory"]["bits_per_weight"]
    for r in rows:
        assert set(r) >= {"hash", "metrics", "memory", "wall_s", "versions", "time"}
        assert r["versions"]["torch"] == torch.__version__.split("+")[0] or r["versions"]["torch"] == torch.__version__
    assert (tmp_path / "out" / "artifacts" / by["w8a8"]["hash"] / "sqnr.md").is_file()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("configs = ['w8a8']", "no \\[\\[models\\]\\]"),
        (TOML.replace('"agreement", "sqnr"', '"agreement", "nope"'), "unknown metric set 'nope'"),
        (TOML.replace("batch_size = 8", "batchsize = 8"), "unknown sweep keys \\['batchsize'\\]"),
        (TOML.replace("data = {random = 8, size = 8}", 'colour = "red"'), "unknown keys \\['colour'\\]"),
        ("name = [", "not valid TOML"),
    ],
    ids=["no-models", "bad-metric", "bad-key", "bad-model-key", "bad-toml"],
)
def test_toml_errors(tmp_path, text: str, match: str) -> None:
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(SweepError, match=match):
        load_sweep(tmp_path / "s.toml")


def test_source_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "missing.toml")
    for source, match in [
        ("builtin:nope", "unknown builtin model 'nope'"),
        ("pipeline:" + str(tmp_path), "not a diffusers pipeline folder"),
        ("python:nomodule_xyz:f", "cannot import"),
        ("weird", "must be timm:NAME"),
    ]:
        with pytest.raises(SweepError, match=match):
            sw.build_target(ModelSpec("m", source))
    with pytest.raises(ValueError, match="unknown preset"):
        run_sweep(
            SweepSpec([ModelSpec("t", tiny_classifier, data={"random": 2, "size": 8})], [ConfigSpec("zz")]),
            tmp_path / "o",
            progress=False,
            stop_on_error=True,
        )


def test_resume_never_recomputes_and_tolerates_truncated_line(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    spec = _spec()
    first = run_sweep(spec, out, progress=False, max_cells=2, stop_on_error=True)
    assert [r["config_name"] for r in first] == ["fp", "w8a8"]
    before = (out / "results.jsonl").read_bytes()
    calls = []
    real_run_cell = sw.run_cell
    monkeypatch.setattr(sw, "run_cell", lambda *a, **k: calls.append(a[2].name) or real_run_cell(*a, **k))
    rows = run_sweep(spec, out, progress=False, stop_on_error=True)
    assert calls == ["w4a16", "w4a4"]  # only the unfinished cells
    assert (out / "results.jsonl").read_bytes().startswith(before)  # finished lines untouched
    assert len(rows) == 4 and len({r["hash"] for r in rows}) == 4
    calls.clear()
    run_sweep(spec, out, progress=False)
    assert calls == []  # all done: nothing recomputed
    # a kill in the middle of writing the last line: it is ignored and its cell recomputed, the rest kept
    data = (out / "results.jsonl").read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    (out / "results.jsonl").write_bytes(data[: last_start + 40])
    rows = run_sweep(spec, out, progress=False, stop_on_error=True)
    assert calls == ["w4a4"]
    assert sorted(r["config_name"] for r in rows) == ["fp", "w4a16", "w4a4", "w8a8"]
    assert sum(1 for line in (out / "results.jsonl").read_bytes().split(b"\n") if line.strip()) == 5  # + the stub


def test_changed_setting_is_a_new_cell(tmp_path) -> None:
    a = sw.cell_hash(*_spec().cells()[1], _spec())
    spec_b = _spec(batch_size=4)
    assert sw.cell_hash(*spec_b.cells()[1], spec_b) != a
    assert sw.cell_hash(*_spec().cells()[1], _spec()) == a  # stable across processes: content only


KILL_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {here!r})
from evals_helpers import tiny_classifier
from vqsuite.evals import sweep as sw
calls = []
def m(ctx):
    calls.append(ctx.config.name)
    if ctx.config.name == "w4a4":
        os._exit(9)  # killed hard in the middle of the third quantized cell: no cleanup runs
    return {{"ok": 1.0}}
sw.register_metric_set("killer", ["classifier"], m)
spec = sw.SweepSpec([sw.ModelSpec("tiny", tiny_classifier, data={{"random": 4, "size": 8}}, key="tiny")],
                    [sw.ConfigSpec(c) for c in ("w8a8", "w4a16", "w4a4", "nvfp4")], metrics=["killer"], name="k")
sw.run_sweep(spec, {out!r}, progress=False, stop_on_error=True)
"""


def test_killed_process_resumes(tmp_path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = KILL_SCRIPT.format(here=str(HERE), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    done = [r["config_name"] for r in read_results(out / "results.jsonl")]
    assert done == ["fp", "w8a8", "w4a16"]
    resumed = []
    sw.register_metric_set("killer", ["classifier"], lambda ctx: resumed.append(ctx.config.name) or {"ok": 1.0})
    spec = SweepSpec(
        [ModelSpec("tiny", tiny_classifier, data={"random": 4, "size": 8}, key="tiny")],
        [ConfigSpec(c) for c in ("w8a8", "w4a16", "w4a4", "nvfp4")],
        metrics=["killer"],
        name="k",
    )
    rows = run_sweep(spec, out, progress=False, stop_on_error=True)
    assert resumed == ["w4a4", "nvfp4"]
    assert [r["config_name"] for r in rows] == ["fp", "w8a8", "w4a16", "w4a4", "nvfp4"]
    sw.METRIC_SETS.pop("killer")


def test_error_cell_is_recorded_and_retried(tmp_path) -> None:
    spec = SweepSpec(
        [ModelSpec("tiny", tiny_classifier, data={"random": 4, "size": 8}, key="tiny")],
        [ConfigSpec("w8a8")],
        metrics=["accuracy"],  # random data has no labels: the cell fails with a one-line reason
        include_fp=False,
    )
    assert run_sweep(spec, tmp_path, progress=False) == []
    (err,) = read_results(tmp_path / "results.jsonl")
    assert err["status"] == "error" and "needs labelled data" in err["error"]
    with pytest.raises(SweepError, match="needs labelled data"):
        run_sweep(spec, tmp_path, progress=False, stop_on_error=True)


def test_generator_and_pipeline_sweep(tmp_path) -> None:
    """A GAN-like generator and a local diffusers pipeline folder: PSNR/SSIM and FID vs FP beside the floor."""
    tp = pytest.importorskip("tiny_pipelines")
    pipe = tp.ddpm(32)
    pipe.save_pretrained(tmp_path / "ddpm")
    spec = SweepSpec(
        models=[
            ModelSpec("gen", lambda: GeneratorTarget(TinyGen().eval(), gen_sample), key="gen", num_samples=6),
            ModelSpec("ddpm", f"pipeline:{tmp_path / 'ddpm'}", num_samples=3, steps=2),
        ],
        configs=[ConfigSpec("w8a8"), ConfigSpec("w4a4")],
        metrics=["fidelity", "fid-vs-fp"],
        extractor=TinyExtractor(),
        batch_size=3,
        name="gen",
    )
    rows = run_sweep(spec, tmp_path / "out", progress=False, stop_on_error=True)
    assert [(r["model"], r["config_name"]) for r in rows] == [
        (m, c) for m in ("gen", "ddpm") for c in ("fp", "w8a8", "w4a4")
    ]
    for r in rows:
        m = r["metrics"]
        assert set(m) >= {"psnr", "ssim", "fid_vs_fp", "fid_floor", "fid_n", "fid_resize"}
        assert (tmp_path / "out" / r["samples"]).is_file()
        if r["config_name"] == "fp":
            assert m["psnr"] == 200.0 and m["fid_vs_fp"] == 0.0
    gen = {r["config_name"]: r["metrics"] for r in rows if r["model"] == "gen"}
    assert gen["w8a8"]["psnr"] > gen["w4a4"]["psnr"] > 15.0
    assert gen["w8a8"]["fid_floor"] == gen["w4a4"]["fid_floor"] > 0  # one cached FP floor per model
    cached = sorted(p.name for p in (tmp_path / "out" / "cache" / "gen").iterdir())
    assert any(n.startswith("samples_fp_main") for n in cached) and any(n.startswith("gen-fp-floor") for n in cached)
    ddpm = [r for r in rows if r["model"] == "ddpm"]
    assert ddpm[1]["kind"] == "pipeline" and ddpm[1]["memory"]["compression"] > 1.5
    assert json.loads(json.dumps(rows)) == rows  # plain JSON


def test_timm_and_builtin_sources(tmp_path) -> None:
    """timm:NAME with a local weights file and a labelled image folder (timm preprocessing), and builtin:NAME."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from vqsuite.evals.images import save_images

    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        save_images(torch.randint(0, 256, (2, 3, 36, 36), generator=g, dtype=torch.uint8), tmp_path / "data" / cls)
    ref = timm.create_model("test_efficientnet", pretrained=False).eval()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    sw.register_model("tiny-test-cls", tiny_classifier, overwrite=True)
    (tmp_path / "s.toml").write_text(
        'name = "src"\nmetrics = ["accuracy", "agreement"]\nconfigs = ["w8a8"]\n'
        '[[models]]\nname = "effnet"\nsource = "timm:test_efficientnet"\nweights = "w.safetensors"\ndata = "data"\n'
        '[[models]]\nname = "builtin"\nsource = "builtin:tiny-test-cls"\nmetrics = ["agreement"]\n'
        "data = {random = 4, size = 8}\n"
    )
    rows = run_sweep(load_sweep(tmp_path / "s.toml"), tmp_path / "out", progress=False, stop_on_error=True)
    assert [(r["model"], r["config_name"]) for r in rows] == [
        ("effnet", "fp"), ("effnet", "w8a8"), ("builtin", "fp"), ("builtin", "w8a8")
    ]  # fmt: skip
    effnet = rows[1]["metrics"]
    assert effnet["n"] == 4 and effnet["top1"] in (0.0, 0.25, 0.5, 0.75, 1.0) and effnet["top5"] >= effnet["top1"]
    assert effnet["logit_cosine"] > 0.99
    fp_logits = ref(torch.zeros(1, 3, 160, 160))  # the weights file was really loaded: same float model
    built = sw.build_target(ModelSpec("effnet", "timm:test_efficientnet", weights=str(tmp_path / "w.safetensors")))
    assert torch.equal(built.obj(torch.zeros(1, 3, 160, 160)), fp_logits)
    sw.MODEL_FACTORIES.pop("tiny-test-cls")


def test_import_is_light() -> None:
    code = (
        "import sys, vqsuite.evals as e; e.__dir__(); "
        "heavy = [m for m in ('torchmetrics', 'matplotlib', 'transformers', 'diffusers', 'timm', 'cleanfid') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-500:]


@pytest.mark.slow
def test_fid_vs_data_and_clip_on_a_text_pipeline(tmp_path) -> None:
    """fid-vs-data (reference stats cached once per sweep) and clip (a tiny random CLIP: wiring only)."""
    tp = pytest.importorskip("tiny_pipelines")
    from evals_helpers import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "clip")
    ref = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    spec = SweepSpec(
        models=[
            ModelSpec(
                "sd", lambda: tp.sd15(64), key="tiny-sd15", num_samples=3, steps=2, height=32, width=32,
                prompts=["a red cat", "the dog"], reference=ref, calib={"num_calib_prompts": 2},
            )
        ],
        configs=[ConfigSpec("w8a8")],
        metrics=["fid-vs-data", "clip"],
        extractor=TinyExtractor(),
        clip=str(clip_dir),
        name="data",
    )  # fmt: skip
    rows = run_sweep(spec, tmp_path / "out", progress=False, stop_on_error=True)
    assert [r["config_name"] for r in rows] == ["fp", "w8a8"]
    for r in rows:
        m = r["metrics"]
        assert m["fid_vs_data"] > 0 and m["fid_data_n"] == 6 and m["fid_n"] == 3
        assert 0.0 <= m["clip_score"] <= 100.0
    assert len(list((tmp_path / "out" / "cache" / "reference").glob("*.safetensors"))) == 1


def _zoo_ready(*names: str) -> bool:
    try:
        from vqsuite import zoo
        from vqsuite.zoo import datasets

        for n in names:
            zoo.load(n)
        datasets.mnist_test()
    except Exception:  # noqa: BLE001 - any missing asset package means: skip
        return False
    return True


@pytest.mark.skipif(not _zoo_ready("mnist-cnn3", "face-dcgan"), reason="zoo asset packages not installed")
def test_builtin_zoo_models_with_real_weights(tmp_path) -> None:
    """builtin:NAME falls back to vqsuite.zoo: the real MNIST CNN (its own tensor preprocessing) on the first 200
    MNIST test digits, and the real face DCGAN (per-seed latents) with PSNR/SSIM against its FP samples."""
    spec = SweepSpec(
        models=[
            ModelSpec("cnn3", "builtin:mnist-cnn3", data="python:vqsuite.zoo.datasets:mnist_test", max_inputs=200,
                      metrics=["accuracy", "agreement"]),
            ModelSpec("face", "builtin:face-dcgan", num_samples=2, metrics=["fidelity"]),
        ],
        configs=[ConfigSpec("w8a8")],
        batch_size=100,
        name="zoo",
    )  # fmt: skip
    rows = run_sweep(spec, tmp_path, progress=False, stop_on_error=True)
    m = {(r["model"], r["config_name"]): r["metrics"] for r in rows}
    assert m["cnn3", "fp"]["n"] == 200 and m["cnn3", "fp"]["top1"] >= 0.97  # 99.06 % on all 10k
    assert m["cnn3", "w8a8"]["top1_agreement"] >= 0.99
    assert m["face", "w8a8"]["psnr"] > 35.0 and m["face", "w8a8"]["ssim"] > 0.95
    face_fp = sw.build_target(ModelSpec("face", "builtin:face-dcgan"))
    imgs = face_fp.obj.sample(face_fp.obj.model, [0, 9])  # seed 9 -> row 1 of preprocess(2, 9)
    assert imgs.shape == (2, 3, 64, 64) and imgs.dtype == torch.uint8
