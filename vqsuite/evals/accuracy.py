"""Classifier quality: top-k accuracy over labelled images, and agreement of a quantized model with its FP self.

Inputs are tensors or folders. A labelled folder is ``root/<class name>/*.png`` (torchvision ``ImageFolder``
layout: classes sorted by name get indices 0..C-1) unless ``labels`` are given; an unlabelled folder is any folder
of images. Preprocessing: ``transform`` (a callable on one PIL image -> float ``[3, H, W]``); for timm models
:func:`timm_transform` builds it from the model's pretrained config (``resolve_data_config`` +
``create_transform``); tensors already preprocessed (float ``[N, 3, H, W]``) go straight in.

API::

    logits = collect_logits(model, inputs, batch_size=32)              # float32 [N, C]
    acc = evaluate_accuracy(model, inputs, labels, topk=(1, 5))        # {"top1": .., "top5": .., "n": ..}
    agr = agreement(fp_model, q_model, inputs)                         # {"top1_agreement", "kl", "logit_cosine", "n"}
    agreement_from_logits(fp_logits, q_logits)                         # same, from logits
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.errors import UserError
from vqsuite.evals.distributed import sharded_map

logger = logging.getLogger(__name__)

Inputs = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike]


def timm_transform(model: nn.Module) -> Callable:
    """timm's eval preprocessing for ``model`` (``resolve_data_config`` + ``create_transform``): PIL -> [3,H,W]."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return create_transform(**cfg, is_training=False)


def labelled_folder(root: str | os.PathLike) -> tuple[list[Path], torch.Tensor, list[str]]:
    """``(files, labels [N] int64, class names)`` of an ``ImageFolder``-style tree ``root/<class>/<image>``."""
    from vqsuite.evals.images import list_images

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in list_images(root / c):
            files.append(f)
            labels.append(i)
    if not files:
        raise UserError(f"{root} has class sub-folders but no images in them (root/<class>/<image>)")
    return files, torch.tensor(labels, dtype=torch.int64), classes


def _loader(
    inputs: Inputs, transform: Callable | None, batch_transform: Callable | None = None
) -> tuple[int, Callable[[list[int]], torch.Tensor]]:
    """``(N, fetch)`` where ``fetch(indices)`` returns the float ``[B, C, H, W]`` model inputs.

    Tensor batches go through ``batch_transform`` when given (raw batch -> model input), else uint8 is scaled to
    [0, 1] and float is used as is."""
    if isinstance(inputs, torch.Tensor):
        x = inputs
        if x.ndim == 0 or x.shape[0] == 0:
            raise UserError(f"inputs of shape {tuple(x.shape)} hold no examples; nothing to evaluate")

        def fetch_t(idx: list[int]) -> torch.Tensor:
            b = x[idx]
            if batch_transform is not None:
                return batch_transform(b)
            return b.float() / 255 if b.dtype == torch.uint8 else b.float()

        if transform is not None:
            logger.debug("tensor inputs are used as given; transform ignored")
        return x.shape[0], fetch_t
    from PIL import Image

    from vqsuite.evals.images import list_images

    files = list_images(inputs) if isinstance(inputs, (str, os.PathLike)) else [Path(f) for f in inputs]
    if not files:
        where = f"in {inputs}" if isinstance(inputs, (str, os.PathLike)) else "given"
        raise UserError(f"no image files {where}; nothing to evaluate")
    if transform is None:
        raise UserError("images from files need a transform (e.g. timm_transform(model))")

    def fetch_f(idx: list[int]) -> torch.Tensor:
        return torch.stack([transform(Image.open(files[i]).convert("RGB")) for i in idx])

    return len(files), fetch_f


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    inputs: Inputs,
    *,
    transform: Callable | None = None,
    batch_transform: Callable | None = None,
    batch_size: int = 32,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "logits",
) -> torch.Tensor:
    """float32 ``[N, C]`` logits of ``model`` (eval mode) over ``inputs`` (float ``[N,3,H,W]`` preprocessed
    tensors, uint8 tensors scaled to [0, 1] or mapped by ``batch_transform``, an image folder or a list of files
    with ``transform``)."""
    model.eval()
    n, fetch = _loader(inputs, transform, batch_transform)
    dev = next(model.parameters(), torch.empty(0)).device

    def run(idx: list[int]) -> torch.Tensor:
        out = model(fetch(idx).to(dev))
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
        return out.float().cpu()

    return sharded_map(run, n, batch_size=batch_size, accelerator=accelerator, desc=desc, progress=progress)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": fraction, "top5": ..., "n": N}`` (k larger than the class count counts as the class count)."""
    if logits.shape[0] != labels.shape[0]:
        raise UserError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    out: dict[str, float] = {}
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == labels.view(-1, 1)
    for k in topk:
        out[f"top{k}"] = float(hit[:, : min(k, maxk)].any(dim=1).float().mean())
    out["n"] = int(labels.shape[0])
    return out


def evaluate_accuracy(
    model: nn.Module,
    inputs: Inputs,
    labels: torch.Tensor | None = None,
    *,
    topk: Sequence[int] = (1, 5),
    transform: Callable | None = None,
    **kw: Any,
) -> dict[str, float]:
    """Top-k accuracy of ``model``. ``inputs``: tensors with ``labels``, or a labelled folder (labels from the
    sub-folder names unless given)."""
    if labels is None:
        if not isinstance(inputs, (str, os.PathLike)):
            raise UserError("labels are needed unless inputs is a labelled folder")
        files, labels, _ = labelled_folder(inputs)
        inputs = files
    logits = collect_logits(model, inputs, transform=transform, **kw)
    return topk_accuracy(logits, labels, topk)


def agreement_from_logits(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> dict[str, float]:
    """Agreement of ``q_logits`` with ``fp_logits`` (both ``[N, C]``):

    * ``top1_agreement``: fraction of inputs with the same arg-max;
    * ``kl``: mean ``KL(softmax(fp) || softmax(q))`` in nats;
    * ``logit_cosine``: mean per-input cosine similarity of the logit vectors.
    """
    if fp_logits.shape != q_logits.shape:
        raise UserError(f"logit shapes differ: {tuple(fp_logits.shape)} vs {tuple(q_logits.shape)}")
    p, q = fp_logits.double(), q_logits.double()
    kl = F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), reduction="none", log_target=True).sum(1)
    return {
        "top1_agreement": float((p.argmax(1) == q.argmax(1)).double().mean()),
        "kl": float(kl.mean()),
        "logit_cosine": float(F.cosine_similarity(p, q, dim=1).mean()),
        "n": int(p.shape[0]),
    }


def agreement(fp_model: nn.Module, q_model: nn.Module, inputs: Inputs, **kw: Any) -> dict[str, float]:
    """:func:`agreement_from_logits` of the two models over the same (unlabelled) inputs."""
    fp = collect_logits(fp_model, inputs, desc="logits fp", **kw)
    q = collect_logits(q_model, inputs, desc="logits quantized", **kw)
    return agreement_from_logits(fp, q)
