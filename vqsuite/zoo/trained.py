"""Zoo entries for the models trained here (weights in ``vqsuite/zoo/weights/``): ``fmnist-vit``, ``mini-sd``,
``mini-pixart`` and ``mini-clip``.

* ``fmnist-vit`` (kind ``"classifier"``): timm ``VisionTransformer``; ``preprocess`` takes uint8 ``[N, 1, 28, 28]``.
* ``mini-sd`` (kind ``"pipeline"``): ``model`` is a ready ``StableDiffusionPipeline`` (not an ``nn.Module``);
  ``preprocess(k)`` is the evaluation prompt for digit ``k`` ("a photo of the digit seven").
* ``mini-pixart`` (kind ``"pipeline"``): a ready ``PixArtAlphaPipeline``, same prompts; call it with
  ``meta["call_kwargs"]`` (``use_resolution_binning=False, clean_caption=False``).
* ``mini-clip`` (kind ``"features"``): ``model`` is a ``transformers.CLIPModel`` (image and text towers), and
  ``preprocess`` its ``CLIPProcessor`` (any image size -> 32x32; the caption tokenizer); the CLIP behind
  :func:`vqsuite.evals.clip.clip_score` by default.
"""

from __future__ import annotations

from vqsuite.zoo import mini_clip, mini_pixart, mini_sd, vit

TRAINED_REQUIREMENT = "vqsuite (weights ship inside the package)"


def register_trained() -> None:
    """Register ``fmnist-vit``, ``mini-sd``, ``mini-pixart`` and ``mini-clip`` whose weights are present in this
    checkout."""
    from vqsuite.zoo import ZooEntry, register
    from vqsuite.zoo.datasets import FASHION_CLASSES

    if (vit.WEIGHTS_DIR / "model.safetensors").is_file():
        register(ZooEntry(
            "fmnist-vit", "classifier",
            "timm VisionTransformer (28x28, patch 4, grey) trained here on Fashion-MNIST train (60k); "
            "top-1 on the Fashion-MNIST test set in its meta['train']",
            TRAINED_REQUIREMENT, vit.load_fmnist_vit, lambda: vit.vit_preprocess,
            {"input": "uint8 or [0,1] float [N, 1, 28, 28]", "normalize": (vit.FMNIST_MEAN, vit.FMNIST_STD),
             "classes": FASHION_CLASSES, "train": vit.train_record()},
        ))  # fmt: skip
    if (mini_sd.WEIGHTS_DIR / "model_index.json").is_file():
        register(ZooEntry(
            "mini-sd", "pipeline",
            "diffusers StableDiffusionPipeline (AutoencoderKL, UNet2DConditionModel, tiny CLIPTextModel, offline "
            "CLIPTokenizer) trained here on MNIST digits, 32x32; prompts like 'a photo of the digit seven'",
            TRAINED_REQUIREMENT, mini_sd.load_mini_sd, lambda: mini_sd.prompt,
            {"size": 32, "prompt": "a photo of the digit {word}", "train": mini_sd.train_record()},
        ))  # fmt: skip
    if (mini_pixart.WEIGHTS_DIR / "model_index.json").is_file() and (mini_pixart.VAE_DIR / "config.json").is_file():
        register(ZooEntry(
            "mini-pixart", "pipeline",
            "diffusers PixArtAlphaPipeline (PixArtTransformer2DModel, tiny T5EncoderModel, offline T5Tokenizer, "
            "mini-sd's AutoencoderKL) trained here on MNIST digits, 32x32; prompts like 'a photo of the digit seven'",
            TRAINED_REQUIREMENT, mini_pixart.load_mini_pixart, lambda: mini_pixart.prompt,
            {"size": 32, "prompt": "a photo of the digit {word}", "call_kwargs": dict(mini_pixart.CALL_KWARGS),
             "train": mini_pixart.train_record()},
        ))  # fmt: skip
    if (mini_clip.WEIGHTS_DIR / "model.safetensors").is_file():
        loaded: dict = {}

        def build():  # noqa: ANN202 - one load gives both the model and its processor
            loaded["pair"] = mini_clip.load_mini_clip()
            return loaded["pair"][0]

        def processor():  # noqa: ANN202
            return loaded.pop("pair")[1] if "pair" in loaded else mini_clip.load_mini_clip()[1]

        rec = mini_clip.train_record()
        zs = rec.get("zero_shot", {})
        register(ZooEntry(
            "mini-clip", "features",
            "transformers CLIPModel (ViT 32x32 patch 8 + text tower, width 64) trained here on MNIST + "
            f"Fashion-MNIST with templated captions; zero-shot top-1 (prompt ensemble, n={zs.get('n')} each): MNIST "
            f"{zs.get('mnist', float('nan')):.2%}, Fashion-MNIST {zs.get('fashion-mnist', float('nan')):.2%}",
            TRAINED_REQUIREMENT, build, processor,
            {"input": "CLIPProcessor(images=..., text=...): any size, grey or RGB -> [N, 3, 32, 32]",
             "digit_templates": mini_clip.DIGIT_TEMPLATES, "fashion_templates": mini_clip.FASHION_TEMPLATES,
             "train": rec},
        ))  # fmt: skip
