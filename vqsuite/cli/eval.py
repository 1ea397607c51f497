"""``vqsuite eval MODEL --preset P [--metrics ...]``: measure presets on one model (a one-model sweep).

MODEL is a float diffusers pipeline folder, ``timm:<name>`` / ``torchvision:<name>`` (``--weights``), or a built-in
model; each preset is quantized from the float model and measured with the metric sets of
:mod:`vqsuite.evals.sweep` (classifiers: ``agreement``, ``accuracy``, ``sqnr``; pipelines: ``fidelity``,
``fid-vs-fp``, ``clip``). Results go to ``--out`` as a sweep folder, so an interrupted eval resumes like a sweep.

``--metrics clip`` scores the samples against their prompts with the CLIP in ``--clip`` (a local
``save_pretrained`` folder), by default the shipped ``mini-clip`` (trained here on digits and clothing); the hub is
never asked.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from vqsuite.cli.errors import (
    CLIError,
    check_int,
    check_preset,
    check_size,
    one_line,
    read_prompt_file,
    unavailable,
)
from vqsuite.cli.sources import builtin_kind, is_builtin_pipeline, resolve

logger = logging.getLogger(__name__)

#: pipelines and generators: PSNR/SSIM against the FP samples with the same seeds
DEFAULT_PIPELINE_METRICS = ("fidelity",)
DEFAULT_MODEL_METRICS = ("agreement",)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "eval",
        parents=parents,
        help="measure one or more presets on a model or pipeline (quality, fidelity to FP, memory)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    e.add_argument("model", help="pipeline folder, timm:<name>, torchvision:<name> or a built-in model")
    e.add_argument("--preset", action="append", required=True, help="preset (repeatable, or comma-separated)")
    e.add_argument("--metrics", help="comma-separated metric sets (default: fidelity for pipelines, agreement "
                   "for models)")  # fmt: skip
    e.add_argument("--weights", help="local weights file of a timm/torchvision model")
    e.add_argument("--data", help="classifier inputs: a labelled folder root/<class>/* or an image folder "
                   "(default: 16 random inputs, plumbing only)")  # fmt: skip
    e.add_argument("--random", type=int, default=16, help="classifiers without --data: this many random inputs (16)")
    e.add_argument("--input-size", type=int, help="random inputs' side (224; a built-in model's own size)")
    e.add_argument("--channels", type=int, help="random inputs' channels (3; a built-in model's own)")
    e.add_argument("--prompts", metavar="FILE", help="pipelines: prompts, one per line")
    e.add_argument("--num-samples", type=int, help="pipelines: images per config")
    e.add_argument("--steps", type=int, help="pipelines: denoising steps")
    e.add_argument("--height", type=int)
    e.add_argument("--width", type=int)
    e.add_argument("--clip", metavar="FOLDER", help="--metrics clip: local CLIP folder (default: the shipped "
                   "mini-clip)")  # fmt: skip
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--no-fp", action="store_true", help="leave out the full-precision row")
    e.add_argument("--out", required=True, help="results folder (resumed when it holds an earlier eval)")
    e.add_argument("--force", action="store_true", help="use a non-empty --out that holds no results")
    e.add_argument("--no-report", action="store_true", help="do not render the report (markdown, plots, HTML)")
    e.set_defaults(fn=run)


def _presets(values: list[str]) -> list[str]:
    names = [p.strip() for v in values for p in v.split(",") if p.strip()]
    if not names:
        raise CLIError("--preset is empty")
    for n in names:
        check_preset(n)
    return names


def _builtin_input(name: str) -> tuple[int, int] | None:
    """``(channels, size)`` a zoo classifier takes, read from its ``[N, C, H, W]`` input note (None: images)."""
    import re

    from vqsuite import zoo

    note = str(zoo._REGISTRY[name].meta.get("input", "")) if name in zoo._REGISTRY else ""
    m = re.search(r"\[N, (\d+), (\d+), \d+\]", note)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _register_builtin(name: str, sweep_mod: Any) -> None:
    """Let the sweep build a zoo classifier by name, unless the sweep knows the zoo itself (``builtin:NAME``
    resolving through :mod:`vqsuite.zoo`) or the name is registered already."""
    known = getattr(sweep_mod, "_zoo_names", None)
    if name in sweep_mod.MODEL_FACTORIES or (callable(known) and name in known()):
        return
    from vqsuite import zoo

    def factory() -> Any:
        z = zoo.load(name)
        if z.kind != "classifier":
            raise CLIError(f"built-in model {name!r} is a {z.kind}; this build's sweep measures only classifiers")
        transform = z.preprocess if "PIL" in str(z.meta.get("input", "")) else None
        return sweep_mod.BuiltModel("classifier", z.model, transform)

    sweep_mod.register_model(name, factory)


def _clip_folder(arg: str | None) -> str:
    """The CLIP folder of ``--metrics clip``: ``--clip`` or the shipped mini-clip, checked to be a CLIP folder."""
    if arg:
        folder = Path(arg).expanduser()
        if not (folder / "config.json").is_file():
            raise CLIError(f"--clip {arg} is not a CLIP model folder (no config.json)")
        return str(folder.resolve())
    from vqsuite.evals.clip import default_clip_dir

    folder = default_clip_dir()
    if not (folder / "model.safetensors").is_file():
        raise CLIError(f"mini-clip does not ship in this install ({folder} is missing); pass --clip FOLDER")
    return str(folder)


def run(args: argparse.Namespace) -> int:
    try:
        from vqsuite.evals import sweep as sweep_mod
    except ImportError as e:
        raise unavailable("vqsuite eval", f"vqsuite.evals.sweep: {one_line(e)}") from None
    from vqsuite.cli.sweep import _render, _table, check_configs, check_results_dir, is_main_process

    presets = _presets(args.preset)
    check_int(args.num_samples, "--num-samples", 1, 100_000)
    check_int(args.steps, "--steps", 1, 1000)
    check_int(args.batch_size, "--batch-size", 1, 4096)
    check_int(args.random, "--random", 1, 1_000_000)
    check_int(args.input_size, "--input-size", 1, 8192)
    check_int(args.channels, "--channels", 1, 64)
    check_size(args.height, "--height")
    check_size(args.width, "--width")
    src = resolve(args.model)
    model: dict[str, Any] = {"name": src.arg if src.path is None else src.path.name}
    if src.kind == "float-pipeline" or is_builtin_pipeline(src):
        if src.path is not None:
            model["source"] = f"pipeline:{src.path.resolve()}"
        else:  # a zoo pipeline: built by its loader, with its call kwargs and (by default) its digit prompts
            from vqsuite.cli.sources import builtin_call_kwargs, builtin_prompts
            from vqsuite.zoo import _REGISTRY

            build = _REGISTRY[src.arg].build
            model["source"] = f"python:{build.__module__}:{build.__qualname__}"
            model["call_kwargs"] = builtin_call_kwargs(src.arg)
            model["prompts"] = builtin_prompts(src.arg)
        for flag, value in (("--weights", args.weights), ("--data", args.data)):
            if value:
                raise CLIError(f"{flag} applies to classifiers, not to a pipeline")
        if args.prompts:
            model["prompts"] = read_prompt_file(args.prompts)
        for key, value in (("num_samples", args.num_samples), ("steps", args.steps)):
            if value is not None:
                model[key] = value
        for key, value in (("height", args.height), ("width", args.width)):
            if value is not None:
                model[key] = value
        default_metrics = DEFAULT_PIPELINE_METRICS
    elif src.kind == "builtin" and builtin_kind(src.arg) == "generator":
        for flag, value in (("--weights", args.weights), ("--data", args.data), ("--prompts", args.prompts)):
            if value:
                raise CLIError(f"{flag} does not apply to the built-in generator {src.arg!r}")
        _register_builtin(src.arg, sweep_mod)
        model["source"] = f"builtin:{src.arg}"
        if args.num_samples is not None:
            model["num_samples"] = args.num_samples
        default_metrics = DEFAULT_PIPELINE_METRICS
    elif src.kind in ("module", "builtin"):
        if args.prompts:
            raise CLIError("--prompts applies to pipelines, not to a classifier")
        if src.kind == "builtin":
            kind = builtin_kind(src.arg)
            if kind != "classifier":
                raise CLIError(f"built-in model {src.arg!r} is a {kind}; eval measures classifiers, "
                               "generators and pipelines")  # fmt: skip
            _register_builtin(src.arg, sweep_mod)
            model["source"] = f"builtin:{src.arg}"
        else:
            model["source"] = src.arg
        if args.weights:
            if not Path(args.weights).expanduser().is_file():
                raise CLIError(f"weights file {args.weights} does not exist")
            model["weights"] = str(Path(args.weights).expanduser().resolve())
        if args.data:
            data = Path(args.data).expanduser()
            if not data.is_dir():
                raise CLIError(f"--data {args.data} is not a folder")
            from vqsuite.evals.images import IMAGE_SUFFIXES, list_images

            if not list_images(data):
                raise CLIError(f"--data {args.data} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            model["data"] = str(data.resolve())
        else:
            channels, size = (_builtin_input(src.arg) if src.kind == "builtin" else None) or (3, 224)
            model["data"] = {
                "random": args.random,
                "size": args.input_size or size,
                "channels": args.channels or channels,
            }
        default_metrics = DEFAULT_MODEL_METRICS
    else:
        raise CLIError(f"{args.model} is already quantized; eval measures presets on the float model or pipeline")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else list(default_metrics)
    if not metrics:
        raise CLIError("--metrics is empty")
    decl: dict[str, Any] = {
        "name": f"eval-{model['name']}",
        "metrics": metrics,
        "batch_size": args.batch_size,
        "include_fp": not args.no_fp,
        "models": [model],
        "configs": presets,
    }
    if "clip" in metrics:
        decl["clip"] = _clip_folder(args.clip)
    elif args.clip:
        raise CLIError("--clip applies to --metrics clip")
    spec = sweep_mod.spec_from_dict(decl)
    check_configs(spec)
    out = Path(args.out).expanduser()
    check_results_dir(out, args.force)
    rows = sweep_mod.run_sweep(spec, out, progress=not args.quiet, stop_on_error=True)
    if not is_main_process():
        return 0
    print(_table(rows))
    print(f"results: {out / sweep_mod.RESULTS_FILE}")
    if not args.no_report and rows:
        for f in _render(rows, out, args.quiet):
            print(f"wrote {f}")
    return 0
