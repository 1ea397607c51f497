"""``mini-clip``: a genuine ``transformers.CLIPModel`` trained here on MNIST + Fashion-MNIST.

Training: ``scripts/train_mini_clip.py``.

A tiny ViT image tower (32x32 RGB, patch 8) and a tiny text tower, trained with a symmetric contrastive loss on
templated captions ("a photo of the digit seven", "a handwritten 7", "a photo of a sneaker", ...). It gives the
suite a real, offline CLIP score for its digit pipelines (``mini-sd``, ``mini-pixart``; :mod:`vqsuite.evals.clip`).

The folder ``vqsuite/zoo/weights/mini-clip`` is a plain ``save_pretrained`` folder of the model and its
``CLIPProcessor`` (``CLIPTokenizer`` whose BPE vocabulary is written offline for the caption language, every caption
word one token; ``CLIPImageProcessor`` resizing any image to 32x32, mean = std = 0.5), plus ``train.json`` holding the
training record and the sha256 of ``model.safetensors`` (checked by :func:`load_mini_clip`).

Images: the processor upsamples 28x28 dataset digits to 32x32 (bicubic) and leaves 32x32 pipeline outputs (digits
padded by 2, as ``mini-sd`` draws them) untouched; training saw both framings (:func:`pixel_values`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqsuite.errors import UserError

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights" / "mini-clip"
IMAGE_SIZE = 32
#: processor normalisation (pixel / 255 - MEAN) / STD, per channel
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
MAX_TOKENS = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the caption names of Fashion-MNIST's classes (vqsuite.zoo.datasets.FASHION_CLASSES order)
FASHION_WORDS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")  # fmt: skip
#: digit caption templates; ``{w}`` the digit's word, ``{d}`` its numeral (mini-sd's templates without stroke width)
DIGIT_TEMPLATES = (
    "a photo of the digit {w}",
    "a handwritten {d}",
    "the number {w}",
    "a handwritten digit {w}",
    "a drawing of a {d}",
    "the digit {d} written by hand",
    "an image of the number {d}",
    "a photo of the digit {d}",
)
#: Fashion-MNIST caption templates; ``{a}`` the article ("a"/"an"), ``{c}`` the class name
FASHION_TEMPLATES = (
    "a photo of {a} {c}",
    "{a} {c}",
    "a grey photo of {a} {c}",
    "a picture of {a} {c}",
    "a product photo of {a} {c}",
    "a small photo of {a} {c}",
    "an image of {a} {c}",
    "a low resolution photo of {a} {c}",
)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP's pre-tokenizer splits letters runs, single numerals and punctuation runs; only letter runs need merges
_WORD = re.compile(r"[a-z]+")


def digit_caption(digit: int, template: int) -> str:
    """Template ``template`` for ``digit`` ("a photo of the digit seven", "a handwritten 7", ...)."""
    return DIGIT_TEMPLATES[template % len(DIGIT_TEMPLATES)].format(w=DIGIT_WORDS[digit], d=str(digit))


def fashion_caption(label: int, template: int) -> str:
    """Template ``template`` for Fashion-MNIST class ``label`` ("a photo of a sneaker", "an ankle boot", ...)."""
    c = FASHION_WORDS[label]
    a = "an" if c[0] in "aeiou" else "a"
    return FASHION_TEMPLATES[template % len(FASHION_TEMPLATES)].format(a=a, c=c)


def class_captions(dataset: str) -> list[list[str]]:
    """``captions[k]``: every template's caption of class ``k`` of ``dataset`` ("mnist" or "fashion-mnist")."""
    if dataset == "mnist":
        return [[digit_caption(k, t) for t in range(len(DIGIT_TEMPLATES))] for k in range(10)]
    if dataset == "fashion-mnist":
        return [[fashion_caption(k, t) for t in range(len(FASHION_TEMPLATES))] for k in range(10)]
    raise UserError(f"{dataset=} must be 'mnist' or 'fashion-mnist'")


def caption_words() -> list[str]:
    """Every letter run of every caption (the words the offline BPE vocabulary makes single tokens)."""
    words: set[str] = set()
    for ds in ("mnist", "fashion-mnist"):
        for caps in class_captions(ds):
            for c in caps:
                words.update(_WORD.findall(c.lower()))
    return sorted(words)


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned on ``words`` (each counted once) until every word is one symbol.

    Greedy as in BPE training: merge the most frequent adjacent pair (ties: the first in sorted order), repeat.
    Applying the merges by rank, as the tokenizer does, rebuilds each training word into a single token (a property
    of BPE on its own training words); symbols are characters with ``</w>`` on a word's last one.
    """
    segs = [[*w[:-1], w[-1] + "</w>"] for w in words if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in segs:
            for pair in zip(s[:-1], s[1:], strict=True):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, s in enumerate(segs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            segs[i] = out


def write_tokenizer(folder: Path) -> None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a CLIP BPE tokenizer for the captions.

    The vocabulary holds the 256 byte characters and their ``</w>`` forms (any text still tokenizes), then the
    symbols of :func:`bpe_merges` over the caption words, so each caption word is one token.
    """
    from vqsuite.zoo.mini_sd import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges = bpe_merges(caption_words())
    vocab += [a + b for a, b in merges] + [_BOS, _EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_TOKENS, "bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS,
        "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
    }))  # fmt: skip


def image_processor() -> Any:
    """The ``CLIPImageProcessor`` of mini-clip: shortest edge to 32 (bicubic), centre crop 32, mean = std = 0.5."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[PIXEL_MEAN] * 3, image_std=[PIXEL_STD] * 3, do_convert_rgb=True,
    )  # fmt: skip


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """The processor's transform in batched torch (training and zero-shot evaluation).

    Args:
        images: uint8 ``[N, 1|3, H, W]`` square.
    Returns:
        float32 ``[N, 3, 32, 32]``: PIL bicubic resize to 32 when ``H != 32`` (the processor's resize), then
        ``(x / 255 - 0.5) / 0.5``.
    """
    x = images
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        import numpy as np
        from PIL import Image

        grey = bool((x[:, 0] == x[:, 1]).all() and (x[:, 0] == x[:, 2]).all())
        src = x[:, :1] if grey else x
        out = []
        for im in src.permute(0, 2, 3, 1).numpy():
            pil = Image.fromarray(im[..., 0] if grey else im)
            out.append(np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)))
        x = torch.from_numpy(np.stack(out))
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if grey else x.permute(0, 3, 1, 2)
    return (x.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def weights_sha256(folder: Path | None = None) -> str:
    """sha256 of ``model.safetensors`` in ``folder`` (default: the shipped one)."""
    return hashlib.sha256(((folder or WEIGHTS_DIR) / "model.safetensors").read_bytes()).hexdigest()


def train_record(folder: Path | None = None) -> dict:
    """The training run's record (configs, steps, wall time, final loss, zero-shot accuracy, sha256)."""
    return json.loads(((folder or WEIGHTS_DIR) / "train.json").read_text())


def load_mini_clip(path: Path | None = None) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` of the shipped mini-clip (float32, eval, CPU), offline.

    Raises :class:`~vqsuite.errors.UserError` when ``model.safetensors`` does not match the sha256 in ``train.json``.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path or WEIGHTS_DIR)
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} holds no mini-clip weights (model.safetensors)")
    want = train_record(folder).get("sha256")
    got = weights_sha256(folder)
    if want != got:
        raise UserError(f"{folder / 'model.safetensors'} has sha256 {got[:12]}..., train.json records {want}")
    model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    return model, processor


def _tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def class_embeddings(model: Any, processor: Any, dataset: str) -> torch.Tensor:
    """Prompt-ensembled class embeddings ``[10, P]``: the mean of the unit text embeddings over every template of a
    class, renormalised."""
    caps = class_captions(dataset)
    flat = [c for cs in caps for c in cs]
    tok = processor.tokenizer(flat, padding=True, return_tensors="pt")
    t = F.normalize(
        _tensor(model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)), dim=-1
    )
    return F.normalize(t.reshape(10, len(caps[0]), -1).mean(1), dim=-1)


@torch.no_grad()
def zero_shot_predict(model: Any, processor: Any, images: torch.Tensor, dataset: str, batch: int = 500) -> torch.Tensor:
    """Zero-shot labels ``[N]`` of uint8 ``images [N, 1|3, H, W]`` among the 10 classes of ``dataset``."""
    cls = class_embeddings(model, processor, dataset)
    preds = []
    for i in range(0, images.shape[0], batch):
        f = F.normalize(_tensor(model.get_image_features(pixel_values=pixel_values(images[i : i + batch]))), dim=-1)
        preds.append((f @ cls.T).argmax(-1))
    return torch.cat(preds)
