"""CLIP score through torchmetrics, with a CLIP model from a local folder (no hub).

torchmetrics 1.9's ``CLIPScore`` calls ``model.get_image_features(...)`` / ``get_text_features(...)`` and takes
``.norm`` of the result. transformers 5.x made those methods return a ``BaseModelOutputWithPooling`` (the projected
embedding in ``.pooler_output``), which breaks it (``'BaseModelOutputWithPooling' object has no attribute
'norm'``). :class:`CLIPFeatureAdapter` wraps a ``CLIPModel`` so both methods return ``[B, projection_dim]``
tensors again; :func:`clip_scorer` hands torchmetrics a callable returning ``(adapter, processor)``.

Tested with the versions in :data:`CLIP_TESTED_VERSIONS`; with transformers 4.x the methods already return tensors
and the adapter passes them through.

No public CLIP weights install offline, so the default CLIP is ``mini-clip`` (:mod:`vqsuite.zoo.mini_clip`): a
small ``CLIPModel`` trained here on MNIST + Fashion-MNIST with templated captions, shipped in the package. Its scores
are real CLIP scores *of that model*: meaningful for digit and clothing images with captions in its language ("a
photo of the digit seven"), not comparable with numbers from OpenAI's CLIP.

API::

    model, processor = load_clip()                                       # mini-clip (sha256-checked)
    model, processor = load_clip("/path/to/clip-vit-large-patch14")     # any save_pretrained folder
    s = clip_score(images_uint8, prompts)                                # mean 100 * cos(img, text), float
    metric = clip_scorer("/path/to/clip-folder")                         # torchmetrics CLIPScore, for update()
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqsuite.errors import UserError
from vqsuite.evals.inception import to_uint8_nchw

logger = logging.getLogger(__name__)

#: versions the adapter was tested with (transformers 5.x output objects, torchmetrics' CLIPScore contract)
CLIP_TESTED_VERSIONS = {"transformers": "5.23.0", "torchmetrics": "1.9.0"}


def _as_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return val
    raise TypeError(f"cannot find the embedding in a {type(out).__name__}")


class CLIPFeatureAdapter(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features(pixel_values) -> [B, P]`` and
    ``get_text_features(input_ids, attention_mask) -> [B, P]`` return tensors under transformers 4.x and 5.x."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor, **kw: Any) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values, **kw))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any
    ) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw))

    def forward(self, *args: Any, **kw: Any) -> Any:
        return self.model(*args, **kw)


def default_clip_dir() -> Path:
    """The folder of the shipped ``mini-clip`` (the CLIP used when none is given)."""
    from vqsuite.zoo.mini_clip import WEIGHTS_DIR

    return WEIGHTS_DIR


def load_clip(
    folder: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[CLIPFeatureAdapter, Any]:
    """``(adapter, processor)`` from a local ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained``
    folder (never the hub); ``None``: the shipped ``mini-clip``, whose weights are checked against their sha256."""
    folder = Path(folder) if folder is not None else default_clip_dir()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a CLIP model folder (no config.json)")
    from transformers import CLIPModel, CLIPProcessor

    if folder.resolve() == default_clip_dir().resolve():
        from vqsuite.zoo.mini_clip import load_mini_clip

        model, processor = load_mini_clip(folder)
        return CLIPFeatureAdapter(model.to(device)), processor
    model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval().to(device)
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    return CLIPFeatureAdapter(model), processor


def clip_scorer(
    source: str | os.PathLike | tuple[nn.Module, Any] | None = None, device: str | torch.device = "cpu"
) -> Any:
    """torchmetrics ``CLIPScore`` over a local CLIP (folder, a ``(model, processor)`` pair, or ``None``: mini-clip)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if isinstance(source, tuple):
        model, processor = source
        pair = (model if isinstance(model, CLIPFeatureAdapter) else CLIPFeatureAdapter(model), processor)
    else:
        pair = load_clip(source, device)
    return CLIPScore(model_name_or_path=lambda: pair)


@torch.no_grad()
def clip_score(
    images: torch.Tensor,
    prompts: list[str],
    source: str | os.PathLike | tuple[nn.Module, Any] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> float:
    """CLIP score ``max(100 * mean cos(image, text), 0)`` over the pairs (torchmetrics' definition).

    Args:
        images: uint8 ``[N, 3, H, W]`` (or float in [0, 1]).
        prompts: ``N`` strings, ``prompts[i]`` belongs to ``images[i]``.
        source: a local CLIP folder, a ``(model, processor)`` pair, or ``None`` (the shipped ``mini-clip``).
    """
    from tqdm.auto import tqdm

    x = to_uint8_nchw(images)
    if len(prompts) != x.shape[0]:
        raise UserError(f"{len(prompts)} prompts for {x.shape[0]} images")
    metric = clip_scorer(source)
    for i in tqdm(range(0, x.shape[0], batch_size), desc="CLIP score", disable=not progress, leave=False):
        metric.update(list(x[i : i + batch_size]), prompts[i : i + batch_size])
    return float(metric.compute())
