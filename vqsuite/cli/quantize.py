"""``vqsuite quantize MODEL --preset P --out DIR``: a quantized folder plus its layer report.

MODEL is a local diffusers pipeline folder (calibrated by running the pipeline over prompts when the recipe needs
data), ``timm:<name>`` / ``torchvision:<name>`` with an optional local ``--weights`` file, or a built-in model of
the suite. The layer report is printed and saved beside the weights as ``report.txt`` and ``report.json`` (which
also records the float source, so ``vqsuite generate --compare`` can find the float pipeline later).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from vqsuite.cli.errors import CLIError, check_int, check_out_dir, check_preset, check_size, read_prompt_file
from vqsuite.cli.sources import REPORT_JSON, REPORT_TXT, Source, is_builtin_pipeline, resolve

logger = logging.getLogger(__name__)

#: preset used when --preset is not given
DEFAULT_MODEL_PRESET = "w8a8"
DEFAULT_PIPELINE_PRESET = "svdquant-int4"
MAX_CALIB_PROMPTS = 100_000
MAX_STEPS = 1000


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "quantize",
        parents=parents,
        help="quantize a pipeline folder, a timm/torchvision model or a built-in model and save it",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    q.add_argument("model", nargs="?", help="pipeline folder, timm:<name>, torchvision:<name> or a built-in model")
    q.add_argument("--model", dest="model_opt", metavar="MODEL", help="same as the positional MODEL")
    q.add_argument("--preset", help=f"preset name, see `vqsuite presets` (default {DEFAULT_PIPELINE_PRESET} for "
                   f"pipelines, {DEFAULT_MODEL_PRESET} for models)")  # fmt: skip
    q.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    q.add_argument("--force", action="store_true", help="replace an earlier quantize output at --out "
                   "(only when it holds nothing but the files quantize wrote)")  # fmt: skip
    q.add_argument("--weights", help="local weights file of a timm/torchvision model (.safetensors, .pt/.pth)")
    q.add_argument("--exclude", action="append", help="fnmatch pattern of layers kept in float (repeatable)")
    g = q.add_argument_group("pipeline calibration (recipes that need data: svdquant-*, static activation scales)")
    g.add_argument("--calib-prompts", metavar="FILE", help="prompts, one per line (default: vqsuite's own)")
    g.add_argument("--num-calib-prompts", type=int, default=16, help="use at most this many prompts (16)")
    g.add_argument("--calib-steps", type=int, help="denoising steps of each calibration run (default 20)")
    g.add_argument("--calib-batch-size", type=int, default=4, help="prompts per calibration call (4)")
    g.add_argument("--height", type=int, help="calibration image height (the pipeline's default otherwise)")
    g.add_argument("--width", type=int, help="calibration image width")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration runs (0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load the pipeline in this dtype")
    g.add_argument("--device", default="auto", help="where the pipeline is calibrated: auto, cpu, cuda[:N]")
    m = q.add_argument_group("timm / torchvision models")
    m.add_argument("--calib-batches", type=int, default=0, help="random calibration batches (static presets)")
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--input-size", type=int, default=224)
    q.set_defaults(fn=run)


def _model_arg(args: argparse.Namespace) -> str:
    if args.model and args.model_opt and args.model != args.model_opt:
        raise CLIError(f"two models given ({args.model!r} and --model {args.model_opt!r}); give one")
    name = args.model or args.model_opt
    if not name:
        raise CLIError("MODEL is missing: a pipeline folder, timm:<name>, torchvision:<name> or a built-in model")
    return name


def _validate(args: argparse.Namespace, src: Source) -> None:
    """Every check that needs no model, so a bad flag fails in milliseconds and writes nothing."""
    check_preset(args.preset)
    check_int(args.num_calib_prompts, "--num-calib-prompts", 1, MAX_CALIB_PROMPTS)
    check_int(args.calib_steps, "--calib-steps", 1, MAX_STEPS)
    check_int(args.calib_batch_size, "--calib-batch-size", 1, 4096)
    check_int(args.calib_batches, "--calib-batches", 0, 100_000)
    check_int(args.batch_size, "--batch-size", 1, 4096)
    check_int(args.input_size, "--input-size", 1, 8192)
    check_int(args.seed, "--seed", 0, 2**63 - 1)
    check_size(args.height, "--height")
    check_size(args.width, "--width")
    if src.kind == "quantized-pipeline":
        raise CLIError(f"{src.arg} is already a quantized pipeline (vqsuite_pipeline.json); quantize its float source")
    if src.kind == "quantized-module":
        raise CLIError(f"{src.arg} is already a quantized checkpoint (vqsuite_config.json); quantize the float model")
    if src.kind == "float-pipeline" or is_builtin_pipeline(src):
        if args.weights:
            raise CLIError("--weights applies to timm/torchvision models; a pipeline carries its own weights")
        if args.calib_batches:
            raise CLIError("--calib-batches applies to timm/torchvision models; pipelines calibrate on prompts")
        if args.exclude:
            raise CLIError("--exclude applies to timm/torchvision models; pipelines follow their architecture rule")
    elif args.calib_prompts:
        raise CLIError("--calib-prompts applies to diffusers pipelines, not to a timm/torchvision model")
    if args.weights and not Path(args.weights).expanduser().is_file():
        what = "is a folder, not a file" if Path(args.weights).expanduser().is_dir() else "does not exist"
        raise CLIError(f"weights file {args.weights} {what}")
    if src.kind == "builtin" and args.weights:
        raise CLIError(f"--weights does not apply to the built-in model {src.arg!r} (it ships its own)")
    out = Path(args.out).expanduser()
    if src.path is not None and out.resolve() == src.path.resolve():
        raise CLIError(f"--out {out} is the input folder; choose another")
    check_out_dir(out, force=args.force, kind=_out_kinds(src))


def _out_kinds(src: Source) -> tuple[str, str]:
    """What the output folder is (first) and what else ``--force`` may replace: an earlier quantize output of
    either kind, never another command's (a generate, demo or finetune folder)."""
    pipeline = src.kind == "float-pipeline" or is_builtin_pipeline(src)
    return ("pipeline", "checkpoint") if pipeline else ("checkpoint", "pipeline")


def _write_reports(out: Path, report: Any, info: dict[str, Any]) -> None:
    (out / REPORT_TXT).write_text(str(report) + "\n", encoding="utf-8")
    info = dict(info, report=report.to_dict())
    (out / REPORT_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def _save(model: Any, report: Any, info: dict[str, Any], out: Path, kinds: tuple[str, str], **kw: Any) -> None:
    """The quantized folder and its reports, written together into one atomic folder (so the manifest lists
    the reports too, and an interrupted run leaves no checkpoint without its report)."""
    import vqsuite
    from vqsuite.fileio import atomic_folder

    with atomic_folder(out, kind=kinds) as tmp:
        vqsuite.save_quantized(model, tmp, **kw)
        _write_reports(tmp, report, info)


def _quantize_pipeline(args: argparse.Namespace, src: Source, out: Path) -> int:
    import vqsuite
    from vqsuite.cli.progress import StepProgress, accepts_step_callback
    from vqsuite.cli.sources import (
        builtin_call_kwargs,
        builtin_prompts,
        load_builtin_pipeline,
        load_float_pipeline,
        pick_device,
        pipeline_call_kwargs,
        quiet_hf_progress,
    )

    preset = args.preset or DEFAULT_PIPELINE_PRESET
    prompts = read_prompt_file(args.calib_prompts, "--calib-prompts") if args.calib_prompts else None
    device = pick_device(args.device)
    quiet_hf_progress(args.verbose)
    t0 = time.perf_counter()
    builtin = src.arg if src.kind == "builtin" else None
    if builtin is not None:  # a zoo pipeline: its own prompts calibrate by default, its call kwargs on every call
        pipe = load_builtin_pipeline(builtin, dtype=args.dtype, device=device)
        prompts = prompts if prompts is not None else builtin_prompts(builtin)
        call_kw = pipeline_call_kwargs(pipe, builtin_call_kwargs(builtin))
    else:
        pipe = load_float_pipeline(src.path, dtype=args.dtype, device=device)
        call_kw = pipeline_call_kwargs(pipe)
    n = min(len(prompts) if prompts is not None else args.num_calib_prompts, args.num_calib_prompts)
    steps = args.calib_steps or 20
    kw: dict[str, Any] = dict(call_kw)
    progress = StepProgress(math.ceil(n / args.calib_batch_size) * steps, "calibrating", disable=args.quiet)
    if accepts_step_callback(pipe):
        kw["callback_on_step_end"] = progress
    try:
        vqsuite.quantize_pipeline(
            pipe,
            preset,
            calib_prompts=prompts,
            num_calib_prompts=args.num_calib_prompts,
            num_inference_steps=args.calib_steps,
            seed=args.seed,
            height=args.height,
            width=args.width,
            calib_batch_size=args.calib_batch_size,
            **kw,
        )
    finally:
        progress.close()
    report = pipe.vqsuite_report
    info = {
        "kind": "pipeline",
        "source": str(src.path.resolve()) if src.path is not None else None,
        "builtin": builtin,
        "call_kwargs": call_kw,
        "preset": preset,
        "pipeline": type(pipe).__name__,
        "seconds": round(time.perf_counter() - t0, 3),
        "vqsuite_version": vqsuite.__version__,
    }
    _save(pipe, report, info, out, _out_kinds(src))
    print(report)
    print(f"saved quantized {type(pipe).__name__} ({preset}) to {out}")
    return 0


def _quantize_module(args: argparse.Namespace, src: Source, out: Path) -> int:
    import torch

    import vqsuite
    from vqsuite.cli.models import build_model
    from vqsuite.cli.sources import load_builtin

    preset = args.preset or DEFAULT_MODEL_PRESET
    t0 = time.perf_counter()
    model = load_builtin(src.arg) if src.kind == "builtin" else build_model(src.arg, args.weights)
    calib = None
    if args.calib_batches:
        size = args.input_size
        gen = torch.Generator().manual_seed(args.seed)
        calib = [torch.randn(args.batch_size, 3, size, size, generator=gen) for _ in range(args.calib_batches)]
    vqsuite.quantize_model(model, preset, calib_data=calib, exclude=args.exclude or None)
    report = model.vqsuite_report
    source = None
    lib, _, arch = src.arg.partition(":")
    if src.kind == "module" and lib == "timm":
        source = {"library": "timm", "name": arch, "kwargs": {}}
    elif src.kind == "builtin":
        source = {"library": "vqsuite.zoo", "name": src.arg}
    info = {
        "kind": "model",
        "model": src.arg,
        "weights": str(Path(args.weights).resolve()) if args.weights else None,
        "preset": preset,
        "seconds": round(time.perf_counter() - t0, 3),
        "vqsuite_version": vqsuite.__version__,
    }
    _save(model, report, info, out, _out_kinds(src), model_source=source)
    print(report)
    print(f"saved to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    src = resolve(_model_arg(args))
    _validate(args, src)
    out = Path(args.out).expanduser()
    if src.kind == "float-pipeline" or is_builtin_pipeline(src):
        return _quantize_pipeline(args, src, out)
    return _quantize_module(args, src, out)
