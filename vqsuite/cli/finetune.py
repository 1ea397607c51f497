"""``vqsuite finetune --method {ofq,lsq,qalora} SOURCE --out DIR``: quantization-aware fine-tuning from the shell.

``--method ofq`` trains a vision transformer (a built-in classifier such as ``fmnist-vit``, or ``timm:<name>`` with
``--weights``) with OFQ (:func:`vqsuite.finetune.ofq`: StatsQ, query-key reparameterization, KD from the float
model, optional CGA; ``--method lsq``: the LSQ baseline), freezes the result into packed quantized layers
(:func:`vqsuite.finetune.freeze_qat`) and measures top-1 of the float, the QAT and the frozen model on held-out
images. ``--method qalora``
fine-tunes a diffusion pipeline (a built-in pipeline, ``mini-sd`` or ``mini-pixart``, or a local diffusers folder) with
QALoRA/EfficientDM (:func:`vqsuite.finetune.qalora`) and saves it as a quantized pipeline folder that
``vqsuite generate DIR`` runs.

Output folder (written beside the target and renamed into place; ``--force`` replaces an earlier finetune output)::

    finetune.json            method, settings, steps, wall time, the method's record (top-1, oscillations / losses)
    ofq/lsq: a quantized checkpoint folder (model.safetensors + vqsuite_config.json, as ``vqsuite.save_quantized``
             writes) holding the frozen QAT model: ``vqsuite.load_quantized(DIR)`` (or :func:`load_finetuned`);
             report.json. Folders of earlier versions (the QAT state dict + qat_config.json) still load with
             :func:`load_finetuned`.
    qalora: a quantized pipeline folder (vqsuite_pipeline.json, model_index.json, components), as ``vqsuite quantize``
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vqsuite.cli.errors import CLIError, check_float, check_int, check_out_dir, check_preset, read_prompt_file
from vqsuite.cli.sources import REPORT_JSON, Source, is_builtin_pipeline, resolve

logger = logging.getLogger(__name__)

METHODS = ("ofq", "lsq", "qalora")
#: the QAT methods (vision transformers), run by the same command path
QAT_METHODS = ("ofq", "lsq")
#: the record of every finetune output folder (also what marks the folder as replaceable with --force)
MANIFEST = "finetune.json"
#: OFQ folders of earlier versions: the QAT model's state dict and how to rebuild the architecture (read only)
QAT_WEIGHTS = "model.safetensors"
QAT_CONFIG = "qat_config.json"
QAT_FORMAT = "vqsuite-ofq-qat"
QAT_FORMAT_VERSION = 1
#: OFQ checkpoint file inside --checkpoint-dir (safetensors + JSON metadata: :mod:`vqsuite.finetune.checkpoint`)
OFQ_CHECKPOINT = "ofq.safetensors"
#: the pickle checkpoint of earlier versions: never loaded (refused on --resume, ignored otherwise)
OFQ_LEGACY_CHECKPOINT = "ofq.pt"
#: QALoRA's pointer to its newest checkpoint inside --checkpoint-dir (vqsuite.finetune.qalora.CKPT_LATEST)
QALORA_CHECKPOINT_POINTER = "latest.json"
OFQ_BITS = (2, 4)
DEFAULT_STEPS = {"ofq": 1000, "lsq": 1000, "qalora": 200}
DEFAULT_BATCH = {"ofq": 64, "lsq": 64, "qalora": 2}
DEFAULT_EVAL_N = 1000
DEFAULT_QALORA_CONFIG = "w4a4"
MAX_STEPS = 1_000_000
#: the Fashion-MNIST classifier trains on the built-in dataset; every other classifier needs --data
BUILTIN_DATA = {"fmnist-vit": "Fashion-MNIST"}
#: flags of one method only (dest, flag): given with the other method they are an error
_OFQ_ONLY = (("bits", "--bits"), ("cga_steps", "--cga-steps"), ("lr", "--lr"), ("cga_lr", "--cga-lr"),
             ("weights", "--weights"), ("data", "--data"), ("eval_n", "--eval-n"))  # fmt: skip
_QALORA_ONLY = (("config", "--config"), ("rank", "--rank"), ("prompts_file", "--prompts-file"),
                ("num_inference_steps", "--num-inference-steps"), ("guidance_scale", "--guidance-scale"),
                ("lr_scale", "--lr-scale"))  # fmt: skip


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    f = sub.add_parser(
        "finetune",
        parents=parents,
        help="quantization-aware fine-tuning: OFQ for vision transformers, QALoRA for diffusion pipelines",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    f.add_argument("source", metavar="SOURCE", nargs="?", help="ofq: a built-in classifier (fmnist-vit) or "
                   "timm:<name>; qalora: a built-in pipeline (mini-sd, mini-pixart) or a diffusers pipeline "
                   "folder")  # fmt: skip
    f.add_argument(
        "--method", required=True, choices=METHODS, help="ofq or lsq (QAT of vision transformers) or qalora (pipelines)"
    )
    f.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    f.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an earlier vqsuite output folder at --out")  # fmt: skip
    f.add_argument("--steps", type=int, help=f"optimizer updates (ofq {DEFAULT_STEPS['ofq']}, qalora "
                   f"{DEFAULT_STEPS['qalora']})")  # fmt: skip
    f.add_argument("--batch-size", type=int, help=f"ofq: images per step ({DEFAULT_BATCH['ofq']}); qalora: prompts "
                   f"per trajectory ({DEFAULT_BATCH['qalora']})")  # fmt: skip
    f.add_argument("--seed", type=int, default=0, help="seed of the batches / noise (0)")
    f.add_argument("--checkpoint-dir", metavar="D", help="save a resumable checkpoint here (outside --out)")
    f.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="checkpoint every N steps (and "
                   "at the end; only at the end when not given); needs --checkpoint-dir")  # fmt: skip
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    f.add_argument("--device", default="auto", help="where to train: auto, cpu, cuda[:N]")
    f.add_argument("--no-progress", action="store_true", help="no progress bar (same as --quiet)")
    o = f.add_argument_group("ofq (vision transformers)")
    o.add_argument("--bits", type=int, help="weight and activation bits of the body: 2, 3 or 4 (4); patch "
                   "embedding and head stay 8-bit")  # fmt: skip
    o.add_argument("--cga-steps", type=int, help="confidence-guided annealing steps after the main stage (0)")
    o.add_argument("--lr", type=float, help="peak learning rate (5e-4, cosine to 0)")
    o.add_argument("--cga-lr", type=float, help="CGA learning rate (lr / 10)")
    o.add_argument("--weights", help="timm:<name>: local weights file (.safetensors, .pt/.pth)")
    o.add_argument("--data", help="labelled image folder root/<class>/<image> (ImageFolder) to train and evaluate "
                   "on; fmnist-vit uses Fashion-MNIST when not given")  # fmt: skip
    o.add_argument("--eval-n", type=int, help=f"held-out images for top-1 ({DEFAULT_EVAL_N})")
    q = f.add_argument_group("qalora (diffusion pipelines)")
    q.add_argument("--config", help=f"quantization preset trained against ({DEFAULT_QALORA_CONFIG})")
    q.add_argument("--rank", type=int, help="LoRA rank (32)")
    q.add_argument("--prompts-file", metavar="F", help="training prompts, one per line (default: "
                   "vqsuite's own; a built-in pipeline's ten digit prompts)")  # fmt: skip
    q.add_argument("--num-inference-steps", type=int, help="denoising steps of the teacher/student runs (20)")
    q.add_argument("--guidance-scale", type=float, help="classifier-free guidance (the pipeline's default)")
    q.add_argument("--lr-scale", type=float, help="LoRA learning-rate scale (official 1/2500)")
    f.set_defaults(fn=run)


# ------------------------------------------------------------------------------------------------ validation
def _given(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for dest, flag in flags if getattr(args, dest) not in (None, False)]


def _kind(src: Source) -> str:
    """``classifier``, ``pipeline`` or what the built-in entry is (``generator``, ``features``)."""
    if src.kind in ("float-pipeline", "quantized-pipeline"):
        return "pipeline"
    if src.kind == "quantized-module":
        return "quantized"
    if src.kind == "builtin":
        from vqsuite.cli.sources import builtin_kind

        return builtin_kind(src.arg)
    return "classifier"


def _checkpoint_file(args: argparse.Namespace) -> Path | None:
    return Path(args.checkpoint_dir).expanduser() / OFQ_CHECKPOINT if args.checkpoint_dir else None


def _check_out(args: argparse.Namespace, src: Source) -> Path:
    """The output folder, refused before any work when it would overwrite something (see ``check_out_dir``):
    ``--force`` replaces only an earlier finetune output holding nothing but the files finetune wrote."""
    out = Path(args.out).expanduser()
    if src.path is not None and out.resolve() == src.path.resolve():
        raise CLIError(f"--out {out} is the input folder; choose another")
    check_out_dir(out, force=args.force, kind="finetune")
    if args.checkpoint_dir:
        ck = Path(args.checkpoint_dir).expanduser().resolve()
        if ck == out.resolve() or out.resolve() in ck.parents:
            raise CLIError(f"--checkpoint-dir {args.checkpoint_dir} lies inside --out {out} (the output folder is "
                           "replaced as a whole); choose a folder outside it")  # fmt: skip
    return out


def _validate_common(args: argparse.Namespace) -> None:
    check_int(args.steps, "--steps", 1, MAX_STEPS)
    check_int(args.batch_size, "--batch-size", 1, 65_536)
    check_int(args.seed, "--seed", 0, 2**63 - 1)
    check_int(args.checkpoint_every, "--checkpoint-every", 0, MAX_STEPS)
    if args.checkpoint_every and not args.checkpoint_dir:
        raise CLIError("--checkpoint-every needs --checkpoint-dir (where to write the checkpoint)")
    if args.resume and not args.checkpoint_dir:
        raise CLIError("--resume needs --checkpoint-dir (the folder holding the checkpoint to continue from)")
    if args.checkpoint_dir:
        ck = Path(args.checkpoint_dir).expanduser()
        if ck.exists() and not ck.is_dir():
            raise CLIError(f"--checkpoint-dir {ck} is a file, not a folder")


def _source_arg(args: argparse.Namespace) -> str:
    if not args.source:
        what = "a built-in classifier (fmnist-vit) or timm:<name>" if args.method in QAT_METHODS else (
            "a built-in pipeline (mini-sd, mini-pixart) or a diffusers pipeline folder")  # fmt: skip
        raise CLIError(f"SOURCE is missing: {what}")
    return args.source


# ------------------------------------------------------------------------------------------------ ofq
def _ofq_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~vqsuite.finetune.OFQOptions` fields the command sets (validated by constructing them)."""
    from vqsuite.finetune import OFQOptions

    lr = 5e-4 if args.lr is None else args.lr
    opts = {
        "bits": 4 if args.bits is None else args.bits,
        "method": args.method,
        "steps": args.steps or DEFAULT_STEPS[args.method],
        "cga_steps": args.cga_steps or 0,
        "batch_size": args.batch_size or DEFAULT_BATCH[args.method],
        "lr": lr,
        "cga_lr": lr / 10 if args.cga_lr is None else args.cga_lr,
        "seed": args.seed,
        "log_every": 50,
    }
    OFQOptions(**opts)
    return opts


def _validate_ofq(args: argparse.Namespace, src: Source) -> dict[str, Any]:
    """Every OFQ check that needs no model or data; returns the options."""
    wrong = _given(args, _QALORA_ONLY)
    if wrong:
        raise CLIError(f"{wrong[0]} applies to --method qalora, not to {args.method}")
    kind = _kind(src)
    if kind == "pipeline":
        raise CLIError(f"{src.arg} is a diffusion pipeline; ofq fine-tunes vision transformers (use --method qalora)")
    if kind == "quantized":
        raise CLIError(f"{src.arg} is already a quantized checkpoint (vqsuite_config.json); ofq starts from the float "
                       "model")  # fmt: skip
    if kind != "classifier":
        raise CLIError(f"built-in model {src.arg!r} is a {kind}; ofq fine-tunes classifiers (vision transformers)")
    if src.kind == "module" and not src.arg.startswith("timm:"):
        raise CLIError(f"ofq fine-tunes timm vision transformers; {src.arg!r} is not a timm:<name> model")
    check_int(args.bits, "--bits", *OFQ_BITS)
    check_int(args.cga_steps, "--cga-steps", 0, MAX_STEPS)
    if args.method == "lsq" and args.cga_steps:
        raise CLIError("--cga-steps applies to --method ofq (CGA anneals StatsQ weights), not to lsq")
    check_int(args.eval_n, "--eval-n", 1, 1_000_000)
    check_float(args.lr, "--lr", 1e-12, 10.0)
    check_float(args.cga_lr, "--cga-lr", 1e-12, 10.0)
    if args.weights:
        if src.kind == "builtin":
            raise CLIError(f"--weights does not apply to the built-in model {src.arg!r} (it ships its own)")
        w = Path(args.weights).expanduser()
        if not w.is_file():
            what = "is a folder, not a file" if w.is_dir() else "does not exist"
            raise CLIError(f"weights file {args.weights} {what}")
    if args.data:
        if not Path(args.data).expanduser().is_dir():
            raise CLIError(f"--data {args.data} is not a folder (a labelled image folder root/<class>/<image>)")
    elif src.arg not in BUILTIN_DATA:
        raise CLIError(f"{src.arg} needs --data, a labelled image folder root/<class>/<image> to train on (only "
                       f"{', '.join(BUILTIN_DATA)} has a built-in training set)")  # fmt: skip
    opts = _ofq_options(args)
    ck = _checkpoint_file(args)
    legacy = ck.with_name(OFQ_LEGACY_CHECKPOINT) if ck is not None else None
    if args.resume:
        if ck is None or not ck.is_file():
            if legacy is not None and legacy.is_file():
                raise CLIError(f"--resume: {legacy} is an OFQ checkpoint in the old pickle format, which vqsuite no "
                               "longer loads (loading it could run code); restart without --resume")  # fmt: skip
            raise CLIError(f"--resume: no checkpoint at {ck} (run once with --checkpoint-dir first)")
        _check_resumable(ck, opts)
    elif ck is not None and ck.is_file():
        raise CLIError(f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint ({ck.name}); pass --resume to "
                       "continue it, or choose another folder")  # fmt: skip
    elif legacy is not None and legacy.is_file():
        logger.warning("--checkpoint-dir %s holds an old pickle checkpoint (%s); it is not read, and the new "
                       "checkpoint is written beside it as %s", args.checkpoint_dir, legacy.name, ck.name)  # fmt: skip
    return opts


def _check_resumable(ck: Path, opts: dict[str, Any]) -> int:
    """Before any work: the checkpoint must be an OFQ checkpoint (not an old pickle one, not corrupt or truncated:
    its tensors are read and checked against their checksum) written with the same settings; else one line.
    Returns the step it holds."""
    from vqsuite.finetune import OFQOptions
    from vqsuite.finetune.checkpoint import read_checkpoint
    from vqsuite.finetune.ofq import (
        OFQ_CHECKPOINT_FORMAT,
        OFQ_CHECKPOINT_VERSION,
        _options_diff,
        read_ofq_checkpoint_meta,
    )
    from vqsuite.pipelines.io import CheckpointError

    try:
        saved = read_ofq_checkpoint_meta(ck)
        want = asdict(OFQOptions(**opts))
        if saved.get("options") != want:
            raise CLIError(f"--resume: the checkpoint {ck} was written with other settings "
                           f"({_options_diff(saved.get('options'), want)})")  # fmt: skip
        read_checkpoint(ck, OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION, "OFQ checkpoint")
    except CheckpointError as e:
        raise CLIError(f"--resume: {e}") from None
    step = saved.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CLIError(f"--resume: the checkpoint {ck} holds no valid step count")
    return step


def _image_transform(src: Source, model: Any, zoo_model: Any) -> Any:
    """One PIL image -> the model's float input ``[C, H, W]``."""
    if zoo_model is None:
        from vqsuite.evals.accuracy import timm_transform

        return timm_transform(model)
    if "PIL" in str(zoo_model.meta.get("input", "")):
        return zoo_model.preprocess
    import re

    import numpy as np
    import torch

    m = re.search(r"\[N, (\d+), (\d+), (\d+)\]", str(zoo_model.meta.get("input", "")))
    if not m:
        raise CLIError(f"built-in model {src.arg!r} does not say what images it takes; --data cannot feed it")
    c, h, w = (int(g) for g in m.groups())

    def transform(img: Any) -> torch.Tensor:
        img = img.convert("L" if c == 1 else "RGB").resize((w, h))
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        arr = arr[None] if c == 1 else arr.permute(2, 0, 1)
        return zoo_model.preprocess(arr[None])[0]

    return transform


def _folder_data(root: Path, transform: Any, eval_n: int, seed: int) -> tuple[Any, ...]:
    """Train/held-out split of a labelled folder: the held-out part is ``min(eval_n, N // 5)`` images of a seeded
    permutation. Training batches are loaded lazily: ``x`` holds file indices and ``preprocess`` reads them."""
    import torch
    from PIL import Image

    from vqsuite.evals.accuracy import labelled_folder

    files, labels, classes = labelled_folder(root)
    if len(files) < 2:
        raise CLIError(f"--data {root} holds {len(files)} image(s); need at least 2 (training and held-out)")
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, min(eval_n, len(files) // 5))
    held, train = perm[:n_eval], perm[n_eval:]

    def load(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([transform(Image.open(files[int(i)]).convert("RGB")) for i in idx.cpu()]).to(idx.device)

    eval_files = [files[int(i)] for i in held]
    desc = f"{root} ({len(classes)} classes, {len(train)} train / {n_eval} held out)"
    return train, labels[train], load, eval_files, labels[held], desc


def _top1(model: Any, x: Any, y: Any, *, transform: Any = None, batch_transform: Any = None, progress: bool) -> float:
    from vqsuite.evals.accuracy import collect_logits, topk_accuracy

    logits = collect_logits(model, x, transform=transform, batch_transform=batch_transform, batch_size=250,
                            progress=progress, desc="top-1")  # fmt: skip
    return 100.0 * topk_accuracy(logits, y, topk=(1,))["top1"]


def _strip_trackers(state: dict[str, Any]) -> dict[str, Any]:
    """The deployable state: the oscillation trackers are training statistics, not weights."""
    return {k: v.detach().contiguous() for k, v in state.items() if ".tracker." not in k}


def load_finetuned(path: str | Path, device: str = "cpu") -> Any:
    """The model saved by ``vqsuite finetune --method ofq|lsq`` (eval mode).

    A folder of this version is a quantized checkpoint (the frozen QAT model): :func:`vqsuite.load_quantized`
    rebuilds it from its recorded source. A folder of earlier versions (``qat_config.json`` + the QAT state dict) is
    rebuilt from its source, prepared for QAT with the recorded bits, and loaded (strict, except the oscillation
    trackers, which are not saved): the QAT model, which :func:`vqsuite.finetune.freeze_qat` can then freeze."""
    import re

    from vqsuite.pipelines.io import CONFIG_NAME

    if (Path(path) / CONFIG_NAME).is_file() and not (Path(path) / QAT_CONFIG).is_file():
        import vqsuite

        return vqsuite.load_quantized(path, device=device).eval()

    from safetensors.torch import load_file

    from vqsuite.finetune import prepare_qat
    from vqsuite.finetune.checkpoint import read_json
    from vqsuite.pipelines.io import CheckpointError

    path = Path(path)
    cfg_file = path / QAT_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path} holds neither {CONFIG_NAME} nor {QAT_CONFIG}; not a folder written by "
            "vqsuite finetune --method ofq"
        )
    cfg = read_json(cfg_file, "OFQ model config")
    if not isinstance(cfg, dict) or cfg.get("format") != QAT_FORMAT:
        raise CheckpointError(f"{cfg_file} is not a {QAT_FORMAT} config")
    src, bits, method, qkr = (cfg.get(k) for k in ("source", "bits", "method", "qkr"))
    name = src.get("name") if isinstance(src, dict) else None
    library = src.get("library") if isinstance(src, dict) else None
    if library not in ("vqsuite.zoo", "timm") or not isinstance(name, str) or not re.fullmatch(r"[\w.\-]+", name):
        raise CheckpointError(f"{cfg_file}: its source is not a vqsuite.zoo or timm model name")
    if bits not in (2, 3, 4, 5, 6, 7, 8) or method not in ("ofq", "lsq") or qkr not in (True, False, None):
        raise CheckpointError(f"{cfg_file}: its bits, method or qkr is not a valid value")
    if library == "vqsuite.zoo":
        from vqsuite import zoo

        if name not in zoo.list():
            raise CheckpointError(f"{cfg_file}: its source is not a built-in model of this vqsuite")
        model = zoo.load(name).model
    else:
        import timm

        if not timm.is_model(name):
            raise CheckpointError(f"{cfg_file}: its source is not a timm architecture of this timm")
        model = timm.create_model(name, pretrained=False)
    prepare_qat(model, bits, method, qkr=qkr)
    weights = path / QAT_WEIGHTS
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise CheckpointError(f"{weights} is missing") from None
    except Exception as e:  # safetensors' own error types for truncated or corrupt files
        raise CheckpointError(f"{weights} cannot be read ({type(e).__name__}); truncated or not safetensors") from None
    ours = {k: v for k, v in model.state_dict().items() if ".tracker." not in k}
    missing = sorted(set(ours) - set(state))
    unexpected = len(set(state) - set(model.state_dict()))
    bad = [k for k in ours if k in state and (state[k].shape != ours[k].shape or state[k].dtype != ours[k].dtype)]
    if missing or unexpected or bad:
        first = (missing or bad)[:1]
        raise CheckpointError(f"{weights} does not fit the rebuilt model: {len(missing)} missing, {unexpected} "
                              f"unexpected, {len(bad)} of another shape or dtype" + (f" (e.g. {first[0]})" if first
                              else ""))  # fmt: skip
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def _run_ofq(args: argparse.Namespace, src: Source, out: Path, opts: dict[str, Any]) -> int:
    import vqsuite
    from vqsuite.cli.progress import bar
    from vqsuite.cli.sources import pick_device
    from vqsuite.finetune import freeze_qat, ofq
    from vqsuite.pipelines.io import atomic_folder, write_json

    device = pick_device(args.device)
    progress = not (args.quiet or args.no_progress)
    eval_n = DEFAULT_EVAL_N if args.eval_n is None else args.eval_n
    zoo_model = None
    if src.kind == "builtin":
        from vqsuite import zoo

        zoo_model = zoo.load(src.arg)
        model = zoo_model.model
        source = {"library": "vqsuite.zoo", "name": src.arg}
    else:
        from vqsuite.cli.models import build_model

        model = build_model(src.arg, args.weights)
        source = {"library": "timm", "name": src.arg.partition(":")[2], "kwargs": {}}
    if not any(hasattr(m, "qkv") for m in model.modules()):
        logger.warning("%s has no attention with a fused qkv: OFQ's QKR does not apply, only its Linear layers "
                       "get %d bits", src.arg, opts["bits"])  # fmt: skip
    if args.data:
        transform = _image_transform(src, model, zoo_model)
        x, y, preprocess, eval_x, eval_y, data_desc = _folder_data(
            Path(args.data).expanduser(), transform, eval_n, args.seed
        )
        eval_kw: dict[str, Any] = {"transform": transform}
    else:  # fmnist-vit: Fashion-MNIST train to train on, the first eval_n test images to measure
        from vqsuite.zoo.datasets import fashion_mnist

        x, y = fashion_mnist("train")
        eval_x, eval_y = fashion_mnist("test")
        eval_x, eval_y = eval_x[:eval_n], eval_y[:eval_n]
        preprocess = zoo_model.preprocess
        eval_kw = {"batch_transform": preprocess}
        data_desc = f"Fashion-MNIST (train {len(x)}, test first {len(eval_x)})"
    model.to(device)
    teacher = copy.deepcopy(model).eval()
    top1_fp = _top1(teacher, eval_x, eval_y, progress=progress, **eval_kw)
    total = opts["steps"] + opts["cga_steps"]
    ck = _checkpoint_file(args)
    label = f"{opts['method']} W{opts['bits']}A{opts['bits']}"
    pbar = bar(total, label, unit="step", disable=not progress)
    if args.resume and ck is not None:  # the bar starts where the checkpoint left off (checked by _validate_ofq)
        from vqsuite.finetune.ofq import read_ofq_checkpoint_meta

        pbar.update(int(read_ofq_checkpoint_meta(ck)["step"]))

    def tick(h: dict[str, float]) -> None:
        pbar.update(1)
        pbar.set_postfix_str(f"loss {h['loss']:.3f}")

    t0 = time.perf_counter()
    try:
        ofq(model, train_data=(x, y), teacher=teacher, preprocess=preprocess, checkpoint_path=ck,
            checkpoint_every=args.checkpoint_every or None, resume=args.resume, device=device, callback=tick,
            **opts)  # fmt: skip
    finally:
        pbar.close()
    seconds = time.perf_counter() - t0
    top1_qat = _top1(model, eval_x, eval_y, progress=progress, **eval_kw)
    fp_bytes = vqsuite.module_nbytes(teacher)
    freeze_qat(model)
    top1_frozen = _top1(model, eval_x, eval_y, progress=progress, **eval_kw)
    frozen_bytes = vqsuite.module_nbytes(model)
    rec = model.vqsuite_ofq
    osc = rec["oscillation"]
    history = rec["history"]
    record = {
        "method": opts["method"],
        "source": src.arg,
        "weights": str(Path(args.weights).expanduser().resolve()) if args.weights else None,
        "data": data_desc,
        "bits": opts["bits"],
        "steps": opts["steps"],
        "cga_steps": opts["cga_steps"],
        "options": rec["options"],
        "resumed": bool(args.resume),
        "checkpoint": str(ck) if ck else None,
        "wall_s": round(rec["wall_s"], 3),
        "command_s": round(seconds, 3),
        "device": str(device),
        "top1": {"fp": top1_fp, "qat": top1_qat, "frozen": top1_frozen, "n": len(eval_y)},
        "bytes": {"fp": fp_bytes, "frozen": frozen_bytes, "formats": model.vqsuite_qat_frozen["formats"]},
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "oscillation": {"total": osc.get("total"), "layers": {k: v for k, v in osc.items() if k != "total"}},
        "saved": {"format": "vqsuite quantized checkpoint (frozen QAT model)", "loader": "vqsuite.load_quantized"},
    }  # fmt: skip
    info = {"kind": "model", "model": src.arg, "weights": record["weights"], "preset": None, "finetune": opts["method"],
            "seconds": round(seconds, 3), "vqsuite_version": vqsuite.__version__}  # fmt: skip
    with atomic_folder(out) as tmp:
        vqsuite.save_quantized(model, tmp, model_source=source)
        write_json(tmp / MANIFEST, record)
        (tmp / REPORT_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    total_osc = osc.get("total") or {}
    print(f"{label} on {src.arg}: {len(history)} steps ({opts['steps']} + "
          f"{opts['cga_steps']} CGA) in {rec['wall_s']:.1f} s on {device}; data {data_desc}")  # fmt: skip
    if history:
        print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    print(f"top-1 (n={len(eval_y)} held out): FP {top1_fp:.2f}%  QAT {top1_qat:.2f}%  frozen {top1_frozen:.2f}%")
    if total_osc:
        print(f"oscillating weights: {100 * total_osc['oscillating_fraction']:.3f}% "
              f"(flip EMA mean {total_osc['flip_ema_mean']:.2e})")  # fmt: skip
    print(f"saved the frozen model ({', '.join(model.vqsuite_qat_frozen['formats'])}; {frozen_bytes} bytes, FP32 "
          f"{fp_bytes}) to {out}: a quantized checkpoint, vqsuite.load_quantized({str(out)!r})")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ qalora
def qalora_fn() -> Any:
    """:func:`vqsuite.finetune.qalora`, imported when the command runs (its module is optional in a build)."""
    try:
        mod = importlib.import_module("vqsuite.finetune.qalora")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("vqsuite"):
            raise CLIError("vqsuite finetune --method qalora is not available in this build "
                           "(vqsuite.finetune.qalora is missing)") from None  # fmt: skip
        raise
    return mod.qalora


def _qalora_default_lr_scale() -> float:
    """``vqsuite.finetune.qalora``'s default LoRA learning-rate scale (one source of truth)."""
    import sys

    import vqsuite.finetune  # noqa: F401  (the package's ``qalora`` attribute is the function, not the module)

    return float(sys.modules["vqsuite.finetune.qalora"].DEFAULT_LR_SCALE)


def _qalora_checkpoint_pointer() -> str:
    """The file that marks a QALoRA checkpoint folder (``latest.json``: which ``step-XXXXXX`` is the newest)."""
    try:
        from vqsuite.finetune.qalora import CKPT_LATEST
    except Exception:  # a build without the module (the command then says so), or one that fails to import
        return QALORA_CHECKPOINT_POINTER
    return str(CKPT_LATEST)


def _check_qalora_resumable(ck: Path) -> None:
    """Before the pipeline is loaded: the checkpoint ``latest.json`` names is read and checked (pointer inside the
    folder, every file present and readable, the optimizer file tensors and numbers only); else one line."""
    try:
        from vqsuite.finetune.qalora import verify_checkpoint
    except ImportError:  # a build without the module: the command says so when it runs
        return
    from vqsuite.pipelines.io import CheckpointError

    try:
        verify_checkpoint(ck)
    except CheckpointError as e:
        raise CLIError(f"--resume: {e}; restart without --resume (and another --checkpoint-dir)") from None


def _validate_qalora(args: argparse.Namespace, src: Source) -> list[str] | None:
    """Every QALoRA check that needs no pipeline; returns the training prompts (``None``: vqsuite's own)."""
    wrong = _given(args, _OFQ_ONLY)
    if wrong:
        raise CLIError(f"{wrong[0]} applies to --method ofq, not to qalora")
    kind = _kind(src)
    if src.kind == "quantized-pipeline":
        raise CLIError(f"{src.arg} is already a quantized pipeline (vqsuite_pipeline.json); qalora starts from the "
                       "float pipeline")  # fmt: skip
    if kind != "pipeline":
        what = "a classifier" if kind in ("classifier", "quantized") else f"a {kind}"
        raise CLIError(f"{src.arg} is {what}; qalora fine-tunes diffusion pipelines (use --method ofq for vision "
                       "transformers)")  # fmt: skip
    check_preset(args.config)
    check_int(args.rank, "--rank", 1, 4096)
    check_int(args.num_inference_steps, "--num-inference-steps", 1, 1000)
    check_float(args.guidance_scale, "--guidance-scale", 0.0, 100.0)
    check_float(args.lr_scale, "--lr-scale", 1e-12, 1e6)
    if args.checkpoint_dir:
        ck = Path(args.checkpoint_dir).expanduser()
        latest = ck / _qalora_checkpoint_pointer()
        if args.resume and not latest.is_file():
            raise CLIError(f"--resume: no checkpoint in {ck} (run once with --checkpoint-dir first)")
        if args.resume:
            _check_qalora_resumable(ck)
        if not args.resume and latest.is_file():
            raise CLIError(f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint ({latest.name}); pass "
                           "--resume to continue it, or choose another folder")  # fmt: skip
    return read_prompt_file(args.prompts_file, "--prompts-file") if args.prompts_file else None


def _run_qalora(args: argparse.Namespace, src: Source, out: Path, prompts: list[str] | None) -> int:
    import vqsuite
    from vqsuite.cli.sources import (
        builtin_call_kwargs,
        builtin_prompts,
        load_builtin_pipeline,
        load_float_pipeline,
        pick_device,
        pipeline_call_kwargs,
        quiet_hf_progress,
    )
    from vqsuite.pipelines.io import atomic_folder, write_json

    fn = qalora_fn()
    device = pick_device(args.device)
    quiet_hf_progress(args.verbose)
    progress = not (args.quiet or args.no_progress)
    builtin = src.arg if is_builtin_pipeline(src) else None
    if builtin is not None:  # a zoo pipeline: its own loader (mini-pixart borrows mini-sd's VAE), its digit prompts
        pipe = load_builtin_pipeline(builtin, device=device)
        prompts = prompts if prompts is not None else builtin_prompts(builtin)
        call_kw = pipeline_call_kwargs(pipe, builtin_call_kwargs(builtin))
        fp_folder = None  # its weights folder is not a loadable pipeline on its own: generate --compare uses the zoo
    else:
        pipe = load_float_pipeline(src.path, device=device)
        call_kw = pipeline_call_kwargs(pipe)
        fp_folder = src.path.resolve() if src.path is not None else None  # recorded for generate --compare
    config = args.config or DEFAULT_QALORA_CONFIG
    steps = args.steps or DEFAULT_STEPS["qalora"]
    kw: dict[str, Any] = {
        "num_inference_steps": args.num_inference_steps or 20,
        "guidance_scale": args.guidance_scale,
        "batch_size": args.batch_size or DEFAULT_BATCH["qalora"],
        "seed": args.seed,
        "checkpoint_dir": str(Path(args.checkpoint_dir).expanduser()) if args.checkpoint_dir else None,
        "checkpoint_every": args.checkpoint_every or (steps if args.checkpoint_dir else 0),  # at least at the end
        "resume": args.resume,
        "progress": progress,
        "call_kwargs": call_kw,  # the pipeline's own call kwargs on qalora's calibration runs (mini-pixart)
    }
    if builtin is not None:  # a recipe that calibrates (static activation scales) sees the same digit prompts
        kw["calib_prompts"] = prompts
    rank = args.rank or 32
    lr_scale = _qalora_default_lr_scale() if args.lr_scale is None else args.lr_scale
    t0 = time.perf_counter()
    pipe = fn(pipe, config=config, steps=steps, rank=rank, lr_scale=lr_scale, prompts=prompts, **kw)
    seconds = time.perf_counter() - t0
    rec = dict(getattr(pipe, "vqsuite_qalora", None) or {})
    curve = rec.pop("loss_curve", None)
    record = {
        "method": "qalora",
        "source": src.arg,
        "config": config,
        "rank": rank,
        "steps": steps,
        "lr_scale": lr_scale,
        "prompts": len(prompts) if prompts is not None else "vqsuite's own",
        **{k: v for k, v in kw.items() if k not in ("progress", "calib_prompts", "call_kwargs")},
        "wall_s": rec.get("wall_s", round(seconds, 3)),
        "command_s": round(seconds, 3),
        "device": str(device),
        "record": rec,
        "loss_curve": curve,
    }
    with atomic_folder(out) as tmp:
        vqsuite.save_quantized(pipe, tmp)
        write_json(tmp / MANIFEST, record)
        report = getattr(pipe, "vqsuite_report", None)
        info = {"kind": "pipeline", "source": str(fp_folder) if fp_folder else None, "builtin": builtin,
                "call_kwargs": call_kw, "preset": config, "pipeline": type(pipe).__name__,
                "seconds": round(seconds, 3), "finetune": "qalora", "vqsuite_version": vqsuite.__version__}  # fmt: skip
        if report is not None and hasattr(report, "to_dict"):
            info["report"] = report.to_dict()
        (tmp / REPORT_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    loss = ""
    per_traj = rec.get("loss_per_trajectory")
    if per_traj:  # one update per denoising step: only whole trajectories compare like with like
        loss = f"; mean loss per trajectory {per_traj[0]:.4g} (first) -> {per_traj[-1]:.4g} (last of {len(per_traj)})"
    elif rec.get("loss_first") is not None and rec.get("loss_last") is not None:
        loss = f"; loss {rec['loss_first']:.4g} -> {rec['loss_last']:.4g}"
    print(f"qalora {config} rank {rank} on {src.arg}: {rec.get('updates', steps)} updates in "
          f"{float(record['wall_s']):.1f} s on {device}{loss}")  # fmt: skip
    print(f"saved the quantized {type(pipe).__name__} to {out}; run it with: vqsuite generate {out} --prompt ...")
    return 0


# ------------------------------------------------------------------------------------------------ entry
def run(args: argparse.Namespace) -> int:
    src = resolve(_source_arg(args))
    _validate_common(args)
    if args.method in QAT_METHODS:
        opts = _validate_ofq(args, src)
        out = _check_out(args, src)
        return _run_ofq(args, src, out, opts)
    prompts = _validate_qalora(args, src)
    out = _check_out(args, src)
    return _run_qalora(args, src, out, prompts)
