"""Loading a user's *float* diffusers pipeline folder without running anything from it.

``DiffusionPipeline.from_pretrained`` imports the library each component of ``model_index.json`` names, loads
``<pipeline>.py`` code for a custom pipeline, and unpickles ``*.bin`` weights when no safetensors file is there.
:func:`load_float_pipeline_folder` checks ``model_index.json`` against the same allow-lists as a quantized folder
(:func:`vqsuite.pipelines.schema.validate_model_index`), refuses code files in the folder, and calls diffusers with
``local_files_only=True, use_safetensors=True, trust_remote_code=False``. Unlike a quantized checkpoint, a float
folder may hold symlinks that leave it: a Hugging Face cache snapshot links every file into ``../../blobs``.
diffusers is imported only inside the function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vqsuite.pipelines.errors import CheckpointError, first_line, read_json_file
from vqsuite.pipelines.folder import CODE_SUFFIXES
from vqsuite.pipelines.schema import validate_model_index

__all__ = ["load_float_pipeline_folder"]

MODEL_INDEX_NAME = "model_index.json"


def check_float_folder(folder: str | os.PathLike) -> dict[str, tuple[str | None, str | None]]:
    """Validate a float pipeline folder before diffusers reads it; returns ``{component: (library, class)}``.

    ``CheckpointError`` (one line) for: no ``model_index.json``, unreadable JSON, a component library outside the
    allow-list, a custom pipeline class, a code file in the folder or a component folder.
    """
    folder = Path(folder)
    index_file = folder / MODEL_INDEX_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (a diffusers pipeline folder holds {MODEL_INDEX_NAME})")
    if not index_file.is_file():
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX_NAME})")
    components = validate_model_index(read_json_file(index_file), index_file)
    for sub in [folder, *(folder / name for name in components)]:
        if not sub.is_dir():
            continue
        for entry in sub.iterdir():
            if entry.name.lower().endswith(CODE_SUFFIXES):
                raise CheckpointError(
                    f"{entry} is a code file; vqsuite never loads a pipeline folder that carries code (remove it)"
                )
    return components


def load_float_pipeline_folder(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """``DiffusionPipeline.from_pretrained(folder, **kwargs)`` after :func:`check_float_folder`, offline, with
    safetensors weights only and no remote code; any failure is one ``CheckpointError`` line."""
    from diffusers import DiffusionPipeline

    check_float_folder(folder)
    kw = dict(kwargs)
    kw.update(local_files_only=True, use_safetensors=True, trust_remote_code=False)
    try:
        return DiffusionPipeline.from_pretrained(str(folder), **kw)
    except CheckpointError:
        raise
    except Exception as e:  # a broken folder surfaces as any of a dozen exception types
        hint = ""
        if "safetensors" in str(e).lower():
            hint = " (vqsuite loads safetensors weights only, never pickled .bin files: convert them first)"
        raise CheckpointError(f"cannot load a diffusers pipeline from {folder}: {first_line(e)}{hint}") from None
