"""``vqsuite finetune``: OFQ on the shipped fmnist-vit and on a timm ViT with an image folder (top-1 recorded and
reproduced from the saved quantized checkpoint of the frozen QAT model, exact checkpoint/resume through the CLI),
QALoRA plumbing into a pipeline folder that ``vqsuite generate`` runs, and bad input (exit 2, one line, nothing
written)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_usage_error, snapshot

from vqsuite.cli import finetune as ft_cli
from vqsuite.cli.main import EXIT_USAGE, main
from vqsuite.zoo.datasets import FASHION_DIR

needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST (dataset-fashion-mnist) missing"
)
#: the smallest OFQ run that still exercises both stages (main + CGA)
OFQ_FAST = ["--steps", "2", "--cga-steps", "1", "--batch-size", "8", "--eval-n", "40", "--no-progress"]


def _ofq(out: Path, *extra: str, source: str = "fmnist-vit") -> list[str]:
    return ["finetune", "--method", "ofq", source, "--bits", "2", "--out", str(out), *OFQ_FAST, *extra]


def _qat_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / ft_cli.QAT_WEIGHTS))


# ------------------------------------------------------------------------------------------------ ofq
@needs_fashion
def test_ofq_fmnist_vit_writes_record_and_a_reloadable_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ofq"
    assert main(_ofq(out)) == 0
    stdout = capsys.readouterr().out
    assert "top-1 (n=40 held out)" in stdout and "load_quantized" in stdout
    rec = json.loads((out / ft_cli.MANIFEST).read_text())
    assert (rec["method"], rec["bits"], rec["steps"], rec["cga_steps"]) == ("ofq", 2, 2, 1)
    assert rec["top1"]["n"] == 40 and 0 <= rec["top1"]["qat"] <= 100 and 0 <= rec["top1"]["fp"] <= 100
    assert 0 <= rec["top1"]["frozen"] <= 100 and rec["bytes"]["frozen"] < rec["bytes"]["fp"] / 4
    assert rec["wall_s"] > 0 and rec["loss_first"] > 0
    assert 0 <= rec["oscillation"]["total"]["oscillating_fraction"] <= 1
    assert any(k.endswith("w_qk") for k in rec["oscillation"]["layers"])  # QKR applied to timm Attention
    assert not any(".tracker." in k for k in _qat_tensors(out))
    # the folder is a quantized checkpoint of the frozen model: it reproduces the recorded top-1 on the same images
    import vqsuite
    from vqsuite.zoo.datasets import fashion_mnist
    from vqsuite.zoo.vit import vit_preprocess

    x, y = fashion_mnist("test")
    for model in (ft_cli.load_finetuned(out), vqsuite.load_quantized(out)):
        assert model.vqsuite_config.method == "qat"
        with torch.no_grad():
            pred = model(vit_preprocess(x[:40])).argmax(-1)
        assert 100.0 * float((pred == y[:40]).float().mean()) == pytest.approx(rec["top1"]["frozen"], abs=1e-9)


@needs_fashion
def test_ofq_interrupted_then_resumed_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ref, out, ck = tmp_path / "ref", tmp_path / "resumed", tmp_path / "ck"
    assert main(_ofq(ref)) == 0

    class Interrupting:  # the progress bar of the first run: Ctrl-C after the second step
        n = 0

        def update(self, k: int = 1) -> None:
            self.n += k
            if self.n == 2:
                raise KeyboardInterrupt

        def set_postfix_str(self, s: str) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr("vqsuite.cli.progress.bar", lambda *a, **k: Interrupting())
    assert main(_ofq(out, "--checkpoint-dir", str(ck), "--checkpoint-every", "1")) == 130
    assert not out.exists() and (ck / ft_cli.OFQ_CHECKPOINT).is_file()
    from vqsuite.finetune.ofq import read_ofq_checkpoint_meta

    assert read_ofq_checkpoint_meta(ck / ft_cli.OFQ_CHECKPOINT)["step"] == 1
    monkeypatch.undo()
    assert main(_ofq(out, "--checkpoint-dir", str(ck), "--resume")) == 0
    a, b = _qat_tensors(ref), _qat_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / ft_cli.MANIFEST).read_text()) for d in (ref, out))
    assert rb["resumed"] and (ra["loss_first"], ra["loss_last"], ra["top1"]) == (rb["loss_first"], rb["loss_last"],
                                                                                  rb["top1"])  # fmt: skip
    # --force replaces an earlier finetune output (and only that)
    before = (out / ft_cli.QAT_WEIGHTS).stat().st_mtime_ns
    assert main(_ofq(out, "--force")) == 0
    assert (out / ft_cli.QAT_WEIGHTS).stat().st_mtime_ns != before
    capsys.readouterr()


def _image_folder(root: Path, per_class: int = 6) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            px = (torch.rand(24, 24, 3, generator=gen) * 120 + 100 * c).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


def test_ofq_timm_vit_with_weights_and_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=2)
    weights = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "ofq-timm"
    # timm's test_vit head has 1000 classes unless told otherwise: a 2-class state dict does not fit it
    argv = ["finetune", "--method", "ofq", "timm:test_vit", "--weights", str(weights), "--data", str(data), "--bits",
            "4", "--steps", "2", "--batch-size", "4", "--eval-n", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    assert "does not fit timm:test_vit" in capsys.readouterr().err and not out.exists()
    net = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    assert main(argv) == 0
    rec = json.loads((out / ft_cli.MANIFEST).read_text())
    assert rec["top1"]["n"] == 2  # min(--eval-n, 12 // 5) held-out images of the folder
    assert "2 classes, 10 train / 2 held out" in rec["data"]
    meta = json.loads((out / "vqsuite_config.json").read_text())
    assert meta["model_source"] == {"library": "timm", "name": "test_vit", "kwargs": {}}
    model = ft_cli.load_finetuned(out)
    ref = _qat_tensors(out)
    assert model.state_dict().keys() == ref.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


# ------------------------------------------------------------------------------------------------ qalora
class FakeQALoRA:
    """Stands in for ``vqsuite.finetune.qalora`` (argument plumbing only): RTN-quantizes the pipeline (fast) and
    leaves the record the real one leaves."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict[str, Any]]] = []

    def __call__(self, pipe: Any, config: str = "w4a4", steps: int = 200, rank: int = 32, lr_scale: float = 1 / 2500,
                 prompts: list[str] | None = None, **kw: Any) -> Any:  # fmt: skip
        import vqsuite

        self.calls.append(((config, steps, rank, lr_scale, prompts), kw))
        vqsuite.quantize_pipeline(pipe, "w4a16")
        pipe.vqsuite_qalora = {"updates": steps, "wall_s": 0.5, "loss_first": 2.0, "loss_last": 1.0,
                               "loss_curve": [2.0, 1.0], "config": config, "rank": rank}  # fmt: skip
        return pipe


def test_qalora_plumbing_into_a_pipeline_folder_generate_runs(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    fake = FakeQALoRA()
    monkeypatch.setattr(ft_cli, "qalora_fn", lambda: fake)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# skipped\na dog\n")
    out, ck = tmp_path / "qalora", tmp_path / "ck"
    argv = ["finetune", "--method", "qalora", str(tiny_sd), "--config", "w4a8", "--steps", "2", "--rank", "4",
            "--out", str(out), "--prompts-file", str(prompts), "--num-inference-steps", "3", "--guidance-scale", "1.5",
            "--batch-size", "1", "--checkpoint-dir", str(ck), "--checkpoint-every", "1", "--seed", "7",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    (config, steps, rank, lr_scale, got_prompts), kw = fake.calls[0]
    # the CLI passes the library's default LoRA learning-rate scale when --lr-scale is not given
    assert (config, steps, rank, lr_scale, got_prompts) == ("w4a8", 2, 4, 1 / 2500, ["a cat", "a dog"])
    assert kw == {"num_inference_steps": 3, "guidance_scale": 1.5, "batch_size": 1, "seed": 7,
                  "checkpoint_dir": str(ck), "checkpoint_every": 1, "resume": False, "progress": False,
                  "call_kwargs": {}}  # fmt: skip
    rec = json.loads((out / ft_cli.MANIFEST).read_text())
    assert (rec["method"], rec["config"], rec["rank"], rec["steps"]) == ("qalora", "w4a8", 4, 2)
    assert rec["loss_curve"] == [2.0, 1.0] and rec["record"]["loss_last"] == 1.0
    assert json.loads((out / "report.json").read_text())["source"] == str(tiny_sd.resolve())
    assert "vqsuite generate" in capsys.readouterr().out
    gen = tmp_path / "gen"
    assert main(["generate", str(out), "--prompt", "a cat", "--steps", "2", "--out", str(gen), "--compare"]) == 0
    assert (gen / "000.png").is_file() and (gen / "fp" / "000.png").is_file()


def test_qalora_end_to_end_on_a_tiny_pipeline_then_resume_and_generate(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The real :func:`vqsuite.finetune.qalora` (2 updates, rank 4, W4A4) through the CLI; ``--resume`` from the
    finished checkpoint trains nothing more and reproduces the record; the folder runs in ``vqsuite generate``."""
    pytest.importorskip("vqsuite.finetune.qalora")
    out, again, ck = tmp_path / "qalora", tmp_path / "qalora-again", tmp_path / "ck"
    argv = ["finetune", "--method", "qalora", str(tiny_sd), "--config", "w4a4", "--steps", "2", "--rank", "4",
            "--num-inference-steps", "2", "--batch-size", "1", "--checkpoint-dir", str(ck), "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0
    rec = json.loads((out / ft_cli.MANIFEST).read_text())
    assert rec["record"]["updates"] == 2 and len(rec["loss_curve"]) == 2 and rec["record"]["rank"] == 4
    assert all(v > 0 for v in rec["loss_curve"])
    assert (out / "vqsuite_pipeline.json").is_file() and (ck / ft_cli.QALORA_CHECKPOINT_POINTER).is_file()
    assert main([*argv, "--out", str(again), "--resume"]) == 0
    rec2 = json.loads((again / ft_cli.MANIFEST).read_text())
    assert rec2["resume"] and rec2["record"]["resumed_from"] == 2 and rec2["loss_curve"] == rec["loss_curve"]
    gen = tmp_path / "gen"
    assert main(["generate", str(out), "--prompt", "a cat", "--steps", "2", "--out", str(gen)]) == 0
    assert (gen / "000.png").is_file()
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ bad input
Ctx = dict[str, Path]


def _ofq_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A (tensor-less) OFQ checkpoint file holding ``state``."""
    from vqsuite.finetune.checkpoint import write_checkpoint
    from vqsuite.finetune.ofq import OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION

    write_checkpoint(path, {}, state, OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION)


@pytest.fixture(scope="module")
def ctx(tiny_sd: Path, quantized_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    root = tmp_path_factory.mktemp("ft-bad")
    c: Ctx = {"sd": tiny_sd, "q": quantized_sd, "root": root}
    c["foreign"] = root / "my-photos"
    c["foreign"].mkdir()
    (c["foreign"] / "holiday.png").write_bytes(os.urandom(128))
    c["prev"] = root / "prev-ft"  # an earlier finetune output
    c["prev"].mkdir()
    (c["prev"] / ft_cli.MANIFEST).write_text("{}\n")
    c["new"] = root / "new-out"  # absent: a run that fails must not create it
    c["empty_ck"] = root / "empty-ck"
    c["empty_ck"].mkdir()
    c["other_ck"] = root / "other-ck"  # an OFQ checkpoint written with other settings
    c["other_ck"].mkdir()
    _ofq_checkpoint(c["other_ck"] / ft_cli.OFQ_CHECKPOINT, {"options": {"bits": 4, "steps": 99}})
    c["ofq_ck"] = root / "ofq-ck"  # an earlier run's checkpoints: kept unless --resume continues them
    c["ofq_ck"].mkdir()
    _ofq_checkpoint(c["ofq_ck"] / ft_cli.OFQ_CHECKPOINT, {"options": {}})
    c["qalora_ck"] = root / "qalora-ck"
    c["qalora_ck"].mkdir()
    (c["qalora_ck"] / ft_cli.QALORA_CHECKPOINT_POINTER).write_text('{"dir": "step-000002", "updates": 2}')
    c["data"] = root / "data"
    (c["data"] / "a").mkdir(parents=True)
    return c


def _ft(c: Ctx, method: str, source: str, *extra: str, out: str = "new") -> list[str]:
    src = str(c[source]) if source in c else source
    return ["finetune", "--method", method, src, "--out", str(c[out]), *extra]


CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("unknown-method", lambda c: _ft(c, "gptq", "fmnist-vit"), "invalid choice: 'gptq'"),
    ("missing-method", lambda c: ["finetune", "fmnist-vit", "--out", str(c["new"])], "--method"),
    ("bits-5", lambda c: _ft(c, "ofq", "fmnist-vit", "--bits", "5"), "--bits=5 is out of range (must be 2..4)"),
    ("bits-1", lambda c: _ft(c, "ofq", "fmnist-vit", "--bits", "1"), "--bits=1 is out of range"),
    ("missing-out", lambda c: ["finetune", "--method", "ofq", "fmnist-vit"], "arguments are required: --out"),
    ("missing-source", lambda c: ["finetune", "--method", "ofq", "--out", str(c["new"])], "SOURCE is missing"),
    ("out-exists", lambda c: _ft(c, "ofq", "fmnist-vit", out="prev"), "exists and is not empty; pass --force"),
    ("force-foreign", lambda c: _ft(c, "ofq", "fmnist-vit", "--force", out="foreign"), "not written by vqsuite"),
    ("unknown-source", lambda c: _ft(c, "ofq", "no_such_model_xyz"), "must look like"),
    ("missing-folder", lambda c: _ft(c, "qalora", "./no/such/pipeline"), "no such folder"),
    ("resume-without-dir", lambda c: _ft(c, "ofq", "fmnist-vit", "--resume"), "--resume needs --checkpoint-dir"),
    (
        "ofq-resume-no-checkpoint",
        lambda c: _ft(c, "ofq", "fmnist-vit", "--resume", "--checkpoint-dir", str(c["empty_ck"])),
        "--resume: no checkpoint at",
    ),
    (
        "ofq-resume-other-settings",
        lambda c: _ft(c, "ofq", "fmnist-vit", "--resume", "--checkpoint-dir", str(c["other_ck"])),
        "written with other settings",
    ),
    (
        "qalora-resume-no-checkpoint",
        lambda c: _ft(c, "qalora", "sd", "--resume", "--checkpoint-dir", str(c["empty_ck"])),
        "--resume: no checkpoint in",
    ),
    (
        "ofq-checkpoint-without-resume",
        lambda c: _ft(c, "ofq", "fmnist-vit", "--checkpoint-dir", str(c["ofq_ck"])),
        "holds a checkpoint (ofq.safetensors); pass --resume",
    ),
    (
        "qalora-checkpoint-without-resume",
        lambda c: _ft(c, "qalora", "sd", "--checkpoint-dir", str(c["qalora_ck"])),
        "holds a checkpoint (latest.json); pass --resume",
    ),
    ("every-without-dir", lambda c: _ft(c, "ofq", "fmnist-vit", "--checkpoint-every", "5"), "needs --checkpoint-dir"),
    (
        "checkpoint-inside-out",
        lambda c: _ft(c, "ofq", "fmnist-vit", "--force", "--checkpoint-dir", str(c["prev"] / "ck"), out="prev"),
        "lies inside --out",
    ),
    ("qalora-on-classifier", lambda c: _ft(c, "qalora", "fmnist-vit"), "is a classifier; qalora fine-tunes"),
    ("qalora-on-timm", lambda c: _ft(c, "qalora", "timm:test_vit"), "is a classifier; qalora fine-tunes"),
    ("qalora-on-quantized", lambda c: _ft(c, "qalora", "q"), "already a quantized pipeline"),
    ("ofq-on-pipeline-folder", lambda c: _ft(c, "ofq", "sd"), "is a diffusion pipeline; ofq fine-tunes"),
    ("ofq-on-generator", lambda c: _ft(c, "ofq", "face-dcgan"), "is a generator"),
    ("ofq-flag-on-qalora", lambda c: _ft(c, "qalora", "sd", "--bits", "4"), "--bits applies to --method ofq"),
    ("qalora-flag-on-ofq", lambda c: _ft(c, "ofq", "fmnist-vit", "--rank", "8"), "--rank applies to --method qalora"),
    ("ofq-timm-without-data", lambda c: _ft(c, "ofq", "timm:test_vit"), "needs --data"),
    ("ofq-data-not-folder", lambda c: _ft(c, "ofq", "timm:test_vit", "--data", "/nonexistent"), "is not a folder"),
    ("ofq-missing-weights", lambda c: _ft(c, "ofq", "timm:test_vit", "--weights", "/x.pth"), "does not exist"),
    ("ofq-torchvision", lambda c: _ft(c, "ofq", "torchvision:resnet18"), "not a timm:<name> model"),
    ("qalora-unknown-config", lambda c: _ft(c, "qalora", "sd", "--config", "w3a3"), "unknown preset 'w3a3'"),
    ("qalora-rank-zero", lambda c: _ft(c, "qalora", "sd", "--rank", "0"), "--rank=0 is out of range"),
    ("steps-zero", lambda c: _ft(c, "ofq", "fmnist-vit", "--steps", "0"), "--steps=0 is out of range"),
    ("lr-negative", lambda c: _ft(c, "ofq", "fmnist-vit", "--lr", "-1"), "--lr=-1.0 is out of range"),
    ("out-is-input", lambda c: _ft(c, "qalora", "sd", out="sd"), "is the input folder"),
]


def _protected(c: Ctx) -> dict[str, dict[str, tuple[bytes, int]]]:
    return {k: snapshot(c[k]) for k in ("foreign", "prev", "q", "sd", "empty_ck", "other_ck", "ofq_ck", "qalora_ck")}


@pytest.mark.parametrize("argv_of, needle", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    ctx: Ctx, argv_of: Callable[[Ctx], list[str]], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _protected(ctx)
    argv = argv_of(ctx)
    assert argv[0] == "finetune"  # so the message starts "vqsuite finetune: error: "
    assert_one_line_usage_error(argv, needle, capsys)
    assert _protected(ctx) == before
    assert not ctx["new"].exists()
    assert not [p for p in ctx["root"].iterdir() if p.name.startswith(".")]


def test_debug_shows_the_traceback(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_ft(ctx, "qalora", "fmnist-vit", "--debug")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CLIError" in err
    assert err.strip().splitlines()[-1].startswith("vqsuite finetune: error: ")


def test_qalora_missing_module_is_one_line(
    ctx: Ctx, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Until (or unless) ``vqsuite.finetune.qalora`` ships, the command says so in one line and writes nothing."""
    import sys

    monkeypatch.setitem(sys.modules, "vqsuite.finetune.qalora", None)  # import of it raises ModuleNotFoundError
    assert main(_ft(ctx, "qalora", "sd", "--steps", "1")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == (
        "vqsuite finetune: error: vqsuite finetune --method qalora is not available in this build "
        "(vqsuite.finetune.qalora is missing)"
    )
    assert not ctx["new"].exists()


# ------------------------------------------------------------------------------------------------ qalora on the zoo
ZOO_PIPELINES = [n for n in ("mini-sd", "mini-pixart") if n in __import__("vqsuite.zoo").zoo.list()]


def _zoo_qalora(name: str, out: Path, config: str = "w8a8", *extra: str) -> list[str]:
    return ["--quiet", "finetune", "--method", "qalora", name, "--config", config, "--steps", "2", "--rank", "4",
            "--num-inference-steps", "2", "--batch-size", "1", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("name", ZOO_PIPELINES)
def test_qalora_on_a_zoo_pipeline_records_the_builtin_and_generate_compare_uses_it(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zoo's own loader (mini-pixart's folder has no VAE), its digit prompts by default, report.json as
    ``vqsuite quantize`` writes it; ``generate DIR --compare`` then loads the FP pipeline from the zoo."""
    import numpy as np
    from PIL import Image

    from vqsuite import zoo
    from vqsuite.cli.sources import builtin_call_kwargs, builtin_prompts, pipeline_call_kwargs

    pytest.importorskip("vqsuite.finetune.qalora")
    real, seen = ft_cli.qalora_fn(), {}

    def spy(pipe: Any, **kw: Any) -> Any:  # the real qalora, recording what the CLI passed
        seen.update(kw)
        return real(pipe, **kw)

    monkeypatch.setattr(ft_cli, "qalora_fn", lambda: spy)
    out = tmp_path / "qalora"
    assert main(_zoo_qalora(name, out)) == 0
    info = json.loads((out / "report.json").read_text())
    fp = zoo.load(name).model
    assert (info["builtin"], info["source"], info["preset"]) == (name, None, "w8a8")
    assert info["call_kwargs"] == pipeline_call_kwargs(fp, builtin_call_kwargs(name))
    rec = json.loads((out / ft_cli.MANIFEST).read_text())
    digits = builtin_prompts(name)
    assert rec["prompts"] == len(digits) == 10 and rec["record"]["updates"] == 2
    assert seen["prompts"] == seen["calib_prompts"] == digits and "teacher" not in seen  # qalora quantizes itself
    assert seen["call_kwargs"] == info["call_kwargs"]  # ...with the pipeline's call kwargs on its calibration runs
    gen = tmp_path / "gen"
    prompt = "a photo of the digit seven"
    argv = ["--quiet", "generate", str(out), "--compare", "--steps", "2", "--prompt", prompt, "--out", str(gen)]
    assert main(argv) == 0
    assert json.loads((gen / "generate.json").read_text())["fp_model"] == name
    fp.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = fp(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=2,
                 output_type="pil", **builtin_call_kwargs(name)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(gen / "fp" / "000.png").convert("RGB")), np.asarray(ref.convert("RGB")))
    assert (gen / "000.png").is_file()


@pytest.mark.skipif("mini-pixart" not in ZOO_PIPELINES, reason="mini-pixart is not in this checkout")
def test_qalora_static_preset_on_mini_pixart_calibrates_with_its_call_kwargs(tmp_path: Path) -> None:
    """A preset that calibrates runs mini-pixart before training; without use_resolution_binning=False that call
    raises "Invalid sample size" inside diffusers (the CLI hands qalora the call kwargs for its calibration runs)."""
    pytest.importorskip("vqsuite.finetune.qalora")
    out = tmp_path / "qalora-static"
    assert main(_zoo_qalora("mini-pixart", out, "w4a8-static")) == 0
    rec = json.loads((out / ft_cli.MANIFEST).read_text())
    assert rec["record"]["config"] == "w4a8-static" and rec["record"]["updates"] == 2
    assert json.loads((out / "report.json").read_text())["call_kwargs"]["use_resolution_binning"] is False
