"""Image plumbing shared by the metrics: load a folder, write PNGs, make a grid.

Images travel as uint8 ``[N, 3, H, W]`` tensors (see :func:`vqsuite.evals.inception.to_uint8_nchw` for the
accepted inputs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vqsuite.errors import UserError
from vqsuite.evals.inception import to_uint8_nchw

#: file suffixes read as images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_images(
    source: str | os.PathLike | list[str | os.PathLike], size: int | None = None, limit: int | None = None
) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` from a folder or a list of files (RGB; resized to ``size`` x ``size`` with PIL bicubic
    when given, else all images must share one size)."""
    from PIL import Image

    files = list_images(source) if not isinstance(source, list) else [Path(f) for f in source]
    files = files[:limit] if limit else files
    if not files:
        raise FileNotFoundError(f"no images in {source}")
    arrs = []
    for f in files:
        img = Image.open(f).convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), resample=Image.BICUBIC)
        arrs.append(np.asarray(img))
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise UserError(f"images in {source} have different sizes {sorted(shapes)[:3]}...; pass size=")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def save_images(images: torch.Tensor, folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write ``images`` (any layout :func:`to_uint8_nchw` accepts) as ``{prefix}{i:05d}.png``; returns the paths."""
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    x = to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, a in enumerate(x):
        p = out / f"{prefix}{i:05d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """One uint8 ``[3, H', W']`` grid: row ``r`` holds the images of ``rows[r]`` (each uint8 ``[N_r, 3, H, W]``,
    all the same H, W), left to right, separated by ``pad`` white pixels."""
    rows = [to_uint8_nchw(r) for r in rows]
    h, w = rows[0].shape[-2:]
    ncol = max(r.shape[0] for r in rows)
    grid = torch.full((3, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, r in enumerate(rows):
        if r.shape[-2:] != (h, w):
            raise ValueError(f"row {i} has images of size {tuple(r.shape[-2:])}, expected {(h, w)}")
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y : y + h, x : x + w] = img
    return grid
