"""``vqsuite generate DIR_OR_MODEL --prompt "..." --out DIR``: PNGs and a grid from a (quantized) pipeline.

DIR_OR_MODEL is a folder written by ``vqsuite quantize`` (loaded without recalibration) or a float diffusers
pipeline folder (quantized on the fly with ``--preset``, or run as is). Image ``j`` (prompt ``j // n``, sample
``j % n``) uses ``torch.Generator("cpu").manual_seed(seed + j)``, so runs, devices and the ``--compare`` pair
share their starting noise. ``--compare`` also runs the float pipeline with the same seeds and writes each pair
side by side (left: full precision, right: quantized).

Output folder (written beside the target and renamed into place: an interrupted run leaves nothing half-done;
``--force`` replaces only an earlier generate output whose files are all listed in its ``generate.json``)::

    000.png 001.png ...       the images (quantized when a quantization is involved)
    grid.png                  all of them in one image
    fp/000.png ...            --compare: the full-precision images, same seeds
    compare/000.png ...       --compare: FP | quantized, side by side
    compare_grid.png          --compare: FP row(s) above the quantized row(s)
    generate.json             prompts, seeds, settings, files (``vqsuite_manifest``: every file written, sizes)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from vqsuite.cli.errors import (
    CLIError,
    check_float,
    check_int,
    check_out_dir,
    check_preset,
    check_size,
    read_prompt_file,
)
from vqsuite.cli.sources import Source, is_builtin_pipeline, recorded_builtin, recorded_source, resolve

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 20
MAX_STEPS = 1000
#: most images one command makes (prompts x --n)
MAX_IMAGES = 10_000
MAX_GUIDANCE = 100.0
MANIFEST = "generate.json"
#: what --force may replace: an earlier generate output (never a checkpoint or pipeline folder); generate.json
#: lists the files written (vqsuite.fileio), and only those are ever deleted
OUTPUT_KIND = "generate"
#: at most this many images per grid row
GRID_MAX_COLS = 8
#: built-in generators: images per forward, calibration latents (a seed no image uses by default)
GENERATOR_BATCH = 16
GENERATOR_CALIB = 16
GENERATOR_CALIB_SEED = 12345


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    g = sub.add_parser(
        "generate",
        parents=parents,
        help="generate images with a quantized (or float) pipeline folder; --compare adds the FP images",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    g.add_argument("model", metavar="DIR_OR_MODEL", help="quantized or float pipeline folder, a built-in "
                   "pipeline (vqsuite.zoo: mini-sd, mini-pixart) or a built-in generator (face-dcgan, "
                   "eye-cdcgan)")  # fmt: skip
    p = g.add_mutually_exclusive_group()
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line")
    g.add_argument("--negative-prompt", help="negative prompt (pipelines that take one)")
    g.add_argument("--preset", help="quantize a float pipeline folder on the fly with this preset")
    g.add_argument("--steps", type=int, help=f"denoising steps ({DEFAULT_STEPS})")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image j uses seed + j (0)")
    g.add_argument("--n", type=int, default=1, help="images per prompt (1)")
    g.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (1); seeds stay per image")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (the pipeline's default)")
    g.add_argument("--height", type=int, help="image height (the pipeline's default)")
    g.add_argument("--width", type=int, help="image width")
    g.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    g.add_argument("--force", action="store_true", help="replace an earlier generate output at --out "
                   "(only when it holds nothing but the files generate wrote)")  # fmt: skip
    g.add_argument("--compare", action="store_true", help="also generate the full-precision images, side by side")
    g.add_argument("--fp-model", metavar="FOLDER", help="float pipeline for --compare (default: the folder "
                   "`vqsuite quantize` recorded)")  # fmt: skip
    g.add_argument("--calib-prompts", metavar="FILE", help="with --preset: calibration prompts, one per line")
    g.add_argument("--num-calib-prompts", type=int, default=16, help="with --preset: at most this many (16)")
    g.add_argument("--calib-steps", type=int, help="with --preset: steps of each calibration run (20)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load float pipelines in this dtype")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda[:N]")
    g.set_defaults(fn=run)


# ----------------------------------------------------------------------------------------- planning
def _plan(args: argparse.Namespace) -> tuple[Source, Path | None, list[str]]:
    """Validate everything that needs no model: (source, float folder for --compare, prompts)."""
    src = resolve(args.model, folders_only=True)
    builtin_pipe = is_builtin_pipeline(src)
    if src.kind == "builtin" and not builtin_pipe:
        return _plan_generator(args, src)
    if src.kind not in ("float-pipeline", "quantized-pipeline") and not builtin_pipe:
        what = "a quantized model checkpoint" if src.kind == "quantized-module" else "not a pipeline"
        raise CLIError(f"{args.model} is {what}; generate needs a diffusers pipeline folder (float or quantized)")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CLIError("--prompt is empty")
        prompts = [args.prompt]
    elif args.prompts is not None:
        prompts = read_prompt_file(args.prompts, "--prompts")
    else:
        raise CLIError("a text-to-image pipeline needs --prompt TEXT or --prompts FILE")
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    check_int(args.steps, "--steps", 1, MAX_STEPS)
    check_int(args.n, "--n", 1, MAX_IMAGES)
    total = len(prompts) * args.n
    if total > MAX_IMAGES:
        raise CLIError(f"{len(prompts)} prompts x --n {args.n} = {total} images; at most {MAX_IMAGES} per command")
    check_int(args.seed, "--seed", 0, 2**63 - 1 - total)
    check_float(args.guidance, "--guidance", 0.0, MAX_GUIDANCE)
    check_int(args.batch_size, "--batch-size", 1, 1024)
    check_size(args.height, "--height")
    check_size(args.width, "--width")
    check_int(args.num_calib_prompts, "--num-calib-prompts", 1, 100_000)
    check_int(args.calib_steps, "--calib-steps", 1, MAX_STEPS)
    check_preset(args.preset)
    if src.kind == "quantized-pipeline" and args.preset:
        raise CLIError(f"{args.model} is already quantized; --preset applies to a float pipeline folder")
    if args.preset is None and (args.calib_prompts or args.calib_steps):
        raise CLIError("--calib-prompts/--calib-steps apply only with --preset (quantizing on the fly)")
    if args.calib_prompts:
        read_prompt_file(args.calib_prompts, "--calib-prompts")
    fp_folder = None
    if args.compare:
        if src.kind == "float-pipeline" or builtin_pipe:
            if not args.preset:
                raise CLIError("--compare on a float pipeline needs --preset (there is nothing to compare against)")
            if args.fp_model:
                raise CLIError("--fp-model applies to a quantized folder; here the float pipeline is the input")
            fp_folder = src.path  # None for a built-in pipeline: the FP images come from the same pipeline
        elif not args.fp_model and recorded_builtin(src.path) is not None:
            fp_folder = None  # made from a built-in pipeline: --compare loads it from vqsuite.zoo
        else:
            fp_folder = Path(args.fp_model).expanduser() if args.fp_model else recorded_source(src.path)
            if fp_folder is None:
                raise CLIError(f"--compare: {args.model} does not record its float pipeline; pass --fp-model FOLDER")
            fp_src = resolve(str(fp_folder), folders_only=True) if fp_folder.exists() else None
            if fp_src is None:
                raise CLIError(f"--compare: float pipeline folder {fp_folder} does not exist (pass --fp-model FOLDER)")
            if fp_src.kind != "float-pipeline":
                raise CLIError(f"--compare: {fp_folder} is not a float diffusers pipeline folder")
    elif args.fp_model:
        raise CLIError("--fp-model applies only with --compare")
    out = Path(args.out).expanduser()
    for folder in (src.path, fp_folder):
        if folder is not None and out.resolve() == folder.resolve():
            raise CLIError(f"--out {out} is an input folder; choose another")
    check_out_dir(out, force=args.force, kind=OUTPUT_KIND)
    return src, fp_folder, prompts


def _plan_generator(args: argparse.Namespace, src: Source) -> tuple[Source, Path | None, list[str]]:
    """A built-in generator (a GAN of :mod:`vqsuite.zoo`): no prompts, no denoising settings."""
    from vqsuite.cli.sources import builtin_kind

    kind = builtin_kind(src.arg)
    if kind != "generator":
        raise CLIError(f"built-in model {src.arg!r} is a {kind}; generate needs a pipeline folder or a generator")
    given = [
        flag
        for flag, value in (
            ("--prompt", args.prompt),
            ("--prompts", args.prompts),
            ("--negative-prompt", args.negative_prompt),
            ("--steps", args.steps),
            ("--guidance", args.guidance),
            ("--height", args.height),
            ("--width", args.width),
            ("--fp-model", args.fp_model),
            ("--calib-prompts", args.calib_prompts),
            ("--calib-steps", args.calib_steps),
            ("--dtype", args.dtype),
        )  # fmt: skip
        if value is not None
    ]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise CLIError(f"{', '.join(given)} {verb} not apply to the built-in generator {src.arg!r} (no prompts)")
    check_int(args.n, "--n", 1, MAX_IMAGES)
    check_int(args.seed, "--seed", 0, 2**63 - 1)
    check_preset(args.preset)
    if args.compare and not args.preset:
        raise CLIError("--compare needs --preset (there is nothing to compare against)")
    check_out_dir(Path(args.out).expanduser(), force=args.force, kind=OUTPUT_KIND)
    return src, None, []


# ----------------------------------------------------------------------------------------- generation
def _call_kwargs(pipe: Any, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of every generation call: the flags, ``extra`` (what the pipeline needs on every
    call: a zoo entry's ``call_kwargs`` or those recorded beside a quantized folder) and the PixArt fallbacks of
    :func:`vqsuite.cli.sources.pipeline_call_kwargs`."""
    import inspect

    from vqsuite.cli.sources import pipeline_call_kwargs

    params = inspect.signature(pipe.__call__).parameters
    if "prompt" not in params:
        raise CLIError(f"{type(pipe).__name__} does not take a prompt; generate runs text-to-image pipelines")
    kw: dict[str, Any] = {"num_inference_steps": args.steps}
    for name, value in (
        ("guidance_scale", args.guidance),
        ("height", args.height),
        ("width", args.width),
        ("negative_prompt", args.negative_prompt),
    ):
        if value is not None:
            if name not in params:
                raise CLIError(f"{type(pipe).__name__} takes no {name}")
            kw[name] = value
    kw.update(pipeline_call_kwargs(pipe, extra))  # clean_caption=False, use_resolution_binning=False, ...
    if "output_type" in params:
        kw["output_type"] = "pil"
    return kw


def _generate(
    pipe: Any, jobs: list[tuple[str, int]], args: argparse.Namespace, desc: str, extra: dict[str, Any] | None = None
) -> list[Any]:
    """``[(prompt, seed)]`` -> PIL images, ``--batch-size`` per pipeline call, under a progress bar.

    Each image has its own ``torch.Generator`` (diffusers draws each latent from its own generator), so the
    starting noise of image ``j`` does not depend on the batching.
    """
    import torch

    from vqsuite.cli.progress import bar

    kw = _call_kwargs(pipe, args, extra)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # our bar counts images; the pipeline's would nest per step
    images: list[Any] = []
    progress = bar(len(jobs), desc, unit="img", disable=args.quiet)
    size = args.batch_size
    try:
        with torch.no_grad():
            for i in range(0, len(jobs), size):
                chunk = jobs[i : i + size]
                gens = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
                prompts = [p for p, _ in chunk]
                if len(chunk) == 1:
                    out = pipe(prompt=prompts[0], generator=gens[0], **kw).images
                else:
                    neg = kw.get("negative_prompt")
                    extra = {"negative_prompt": [neg] * len(chunk)} if neg is not None else {}
                    out = pipe(prompt=prompts, generator=gens, **{**kw, **extra}).images
                images += list(out)
                progress.update(len(chunk))
    finally:
        progress.close()
    return images


def grid(images: list[Any], cols: int | None = None, rows_of: list[list[Any]] | None = None) -> Any:
    """Images pasted on a grid, row-major (``cols`` per row, at most :data:`GRID_MAX_COLS` by default)."""
    from PIL import Image

    rows = rows_of
    if rows is None:
        cols = cols or min(len(images), GRID_MAX_COLS)
        rows = [images[i : i + cols] for i in range(0, len(images), cols)]
    w = max(im.width for r in rows for im in r)
    h = max(im.height for r in rows for im in r)
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (w * ncols, h * len(rows)), "white")
    for y, r in enumerate(rows):
        for x, im in enumerate(r):
            canvas.paste(im.convert("RGB"), (x * w, y * h))
    return canvas


def side_by_side(left: Any, right: Any) -> Any:
    return grid([], rows_of=[[left, right]])


def _run_generator(args: argparse.Namespace, src: Source, device: str) -> tuple[list[Any], list[Any] | None, str]:
    """A zoo GAN: inputs are the zoo's ``preprocess(n, seed)`` (image ``j`` is row ``j``), run in batches; with
    ``--preset`` the generator is quantized (calibrated on other latents when the recipe needs data)."""
    import copy

    import torch
    from PIL import Image

    import vqsuite
    from vqsuite import zoo
    from vqsuite.cli.progress import bar

    z = zoo.load(src.arg)
    inputs = z.preprocess(args.n, args.seed)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)

    def sample(model: Any, desc: str) -> list[Any]:
        model = model.to(device)
        images, progress = [], bar(args.n, desc, unit="img", disable=args.quiet)
        try:
            with torch.no_grad():
                for i in range(0, args.n, GENERATOR_BATCH):
                    out = model(*(t[i : i + GENERATOR_BATCH].to(device) for t in inputs))
                    u8 = ((out.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
                    images += [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]
                    progress.update(len(u8))
        finally:
            progress.close()
        return images

    if not args.preset:
        return sample(z.model, "float"), None, "float"
    fp_images = sample(z.model, "full precision") if args.compare else None
    calib = z.preprocess(GENERATOR_CALIB, GENERATOR_CALIB_SEED)
    q = vqsuite.quantize_model(copy.deepcopy(z.model), args.preset, calib_data=[calib])
    return sample(q, f"quantized ({args.preset})"), fp_images, f"quantized ({args.preset})"


def _saved_dtype(folder: Path) -> str | None:
    """The dtype the quantized pipeline's denoiser was saved in: the FP twin of ``--compare`` runs in it too."""
    from vqsuite.pipelines.diffusers_io import read_pipeline_meta

    dtypes = {e.get("dtype") for e in read_pipeline_meta(folder)["quantized"].values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def _free(pipe: Any) -> None:
    import torch

    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_pipeline(
    args: argparse.Namespace, src: Source, fp_folder: Path | None, jobs: list[tuple[str, int]], device: str
) -> tuple[list[Any], list[Any] | None, str, str]:
    """(images, FP images or None, label, pipeline class) of a pipeline folder, quantized or quantized here."""
    import vqsuite
    from vqsuite.cli.sources import (
        builtin_call_kwargs,
        builtin_prompts,
        load_builtin_pipeline,
        load_float_pipeline,
        load_quantized_pipeline,
        pipeline_call_kwargs,
        recorded_call_kwargs,
    )

    fp_images = None
    if src.kind == "quantized-pipeline":
        extra = recorded_call_kwargs(src.path)
        builtin = None if args.fp_model else recorded_builtin(src.path)
        if args.compare and builtin is not None:
            fp = load_builtin_pipeline(builtin, dtype=args.dtype or _saved_dtype(src.path), device=device)
            fp_images = _generate(fp, jobs, args, "full precision", {**builtin_call_kwargs(builtin), **extra})
            _free(fp)
        elif fp_folder is not None:
            fp = load_float_pipeline(fp_folder, dtype=args.dtype or _saved_dtype(src.path), device=device)
            fp_images = _generate(fp, jobs, args, "full precision", extra)
            _free(fp)
        pipe = load_quantized_pipeline(src.path, device=device)
        label = "quantized"
    else:
        calib = read_prompt_file(args.calib_prompts, "--calib-prompts") if args.calib_prompts else None
        if src.kind == "builtin":  # a zoo pipeline: its call kwargs on every call, its prompts calibrate
            pipe = load_builtin_pipeline(src.arg, dtype=args.dtype, device=device)
            extra = builtin_call_kwargs(src.arg)
            calib = calib if calib is not None else builtin_prompts(src.arg)
        else:
            pipe = load_float_pipeline(src.path, dtype=args.dtype, device=device)
            extra = {}
        label = "float"
        if args.preset:
            if args.compare:
                fp_images = _generate(pipe, jobs, args, "full precision", extra)
            vqsuite.quantize_pipeline(
                pipe,
                args.preset,
                calib_prompts=calib,
                num_calib_prompts=args.num_calib_prompts,
                num_inference_steps=args.calib_steps,
                height=args.height,
                width=args.width,
                **pipeline_call_kwargs(pipe, extra),
            )
            label = f"quantized ({args.preset})"
    return _generate(pipe, jobs, args, label, extra), fp_images, label, type(pipe).__name__


def _fp_label(src: Source) -> str:
    """What the FP images of ``--compare`` came from when no float folder was given: a zoo pipeline's name."""
    if src.path is not None:
        return recorded_builtin(src.path) or src.arg
    return src.arg


def run(args: argparse.Namespace) -> int:
    import vqsuite
    from vqsuite.cli.sources import pick_device, quiet_hf_progress
    from vqsuite.pipelines.io import atomic_folder

    src, fp_folder, prompts = _plan(args)
    device = pick_device(args.device)
    quiet_hf_progress(args.verbose)
    out = Path(args.out).expanduser()
    jobs = [(prompts[j // args.n], args.seed + j) for j in range(len(prompts) * args.n)]
    t0 = time.perf_counter()

    if src.kind == "builtin" and not is_builtin_pipeline(src):
        images, fp_images, label = _run_generator(args, src, device)
        files = [f"{j:03d}.png" for j in range(len(images))]
        manifest: dict[str, Any] = {
            "model": src.arg,
            "kind": "builtin-generator",
            "preset": args.preset,
            "seed": args.seed,
            "seed_rule": "inputs = vqsuite.zoo.load(model).preprocess(n, seed); image j comes from row j",
            "images": [{"file": f, "index": j} for j, f in enumerate(files)],
        }
    else:
        images, fp_images, label, pipe_name = _run_pipeline(args, src, fp_folder, jobs, device)
        files = [f"{j:03d}.png" for j in range(len(jobs))]
        manifest = {
            "model": str(src.path.resolve()) if src.path is not None else src.arg,
            "kind": src.kind,
            "preset": args.preset,
            "pipeline": pipe_name,
            "steps": args.steps,
            "guidance": args.guidance,
            "height": args.height,
            "width": args.width,
            "negative_prompt": args.negative_prompt,
            "seed_rule": "image j uses torch.Generator('cpu').manual_seed(seed + j)",
            "images": [{"file": f, "prompt": p, "seed": s} for f, (p, s) in zip(files, jobs)],
        }
    manifest.update(grid="grid.png", vqsuite_version=vqsuite.__version__)
    cols = min(len(images), GRID_MAX_COLS)
    with atomic_folder(out, kind=OUTPUT_KIND, record=MANIFEST) as tmp:
        for f, im in zip(files, images):
            im.save(tmp / f)
        grid(images, cols).save(tmp / "grid.png")
        if fp_images is not None:
            (tmp / "fp").mkdir()
            (tmp / "compare").mkdir()
            for j, (f, fp_im, q_im) in enumerate(zip(files, fp_images, images)):
                fp_im.save(tmp / "fp" / f)
                side_by_side(fp_im, q_im).save(tmp / "compare" / f)
                manifest["images"][j].update(fp_file=f"fp/{f}", compare_file=f"compare/{f}")
            rows = []
            for i in range(0, len(images), cols):
                rows += [fp_images[i : i + cols], images[i : i + cols]]
            grid([], rows_of=rows).save(tmp / "compare_grid.png")
            manifest.update(
                fp_model=str(fp_folder.resolve()) if fp_folder is not None else _fp_label(src),
                compare_grid="compare_grid.png",
                compare_layout="compare/*.png: left full precision, right quantized; compare_grid.png: "
                "each pair of rows is full precision above quantized",
            )
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    n_rows = math.ceil(len(images) / cols)
    print(f"wrote {len(images)} {label} images ({n_rows}x{cols} grid) to {out}")
    if fp_images is not None:
        print(f"full-precision images with the same seeds in {out / 'fp'}, pairs in {out / 'compare'}")
    return 0
