"""The models trained here (``fmnist-vit``, ``mini-sd``): offline loads, shapes, shipped sizes, and fast quality
checks against independent judges (Fashion-MNIST test labels; the shipped MNIST CNNs for generated digits)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import vqsuite.zoo as zoo
from vqsuite.zoo import mini_sd, vit
from vqsuite.zoo.datasets import FASHION_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: git-friendly bound on each shipped weights folder
MAX_FOLDER_BYTES = 15 * 2**20
#: the trained ViT's top-1 on the first 500 Fashion-MNIST test images must stay above this
MIN_VIT_TOP1_500 = 0.80
N_VIT = 500
#: one image per digit at 4 DDIM steps (checked: 10/10 read as prompted at 4 steps, 9/10 at 2; 999/1000 at 20)
GEN_DIGITS = tuple(range(10))
MIN_GEN_CORRECT = 8
GEN_STEPS = 4
GEN_GUIDANCE = 4.0
#: loading the pipeline offline must take seconds, not a hub timeout
MAX_LOAD_S = 30.0


def _folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_trained_entries_registered_with_their_records() -> None:
    assert {"fmnist-vit", "mini-sd"} <= set(zoo.list())
    rv, rs = vit.train_record(), mini_sd.train_record()
    assert rv["steps"] > 0 and rv["wall_s"] > 0 and rv["test_n"] == 10000 and 0 < rv["final_loss_ema"] < 2.3
    assert rs["vae"]["steps"] > 0 and rs["unet"]["steps"] > 0 and rs["caption_dropout"] == 0.1
    for folder in (vit.WEIGHTS_DIR, mini_sd.WEIGHTS_DIR):
        assert 0 < _folder_bytes(folder) <= MAX_FOLDER_BYTES, folder


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST needs the Debian package dataset-fashion-mnist")
def test_fmnist_vit_loads_and_classifies_fashion_mnist() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from vqsuite.zoo.datasets import fashion_mnist

    m = zoo.load("fmnist-vit")
    assert isinstance(m.model, VisionTransformer) and not m.model.training and m.kind == "classifier"
    x, y = fashion_mnist("test")
    with torch.no_grad():
        logits = m.model(m.preprocess(x[:N_VIT]))
    assert logits.shape == (N_VIT, 10) and logits.dtype == torch.float32
    top1 = (logits.argmax(-1) == y[:N_VIT]).float().mean().item()
    assert top1 >= MIN_VIT_TOP1_500, f"{top1=:.3f} on the first {N_VIT} test images"


def test_caption_tokenizer_has_one_token_per_caption_word(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    mini_sd.write_caption_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok(mini_sd.prompt(7)).input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "the</w>", "digit</w>", "seven</w>", "<|endoftext|>",
    ]  # fmt: skip
    assert tok.model_max_length == mini_sd.MAX_TOKENS
    assert len(tok.tokenize("zebra")) > 1  # unseen words still tokenize (byte fallback), as several pieces


def test_mini_sd_is_a_genuine_sd_pipeline_and_draws_the_prompted_digit() -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    t0 = time.perf_counter()
    m = zoo.load("mini-sd")
    assert time.perf_counter() - t0 < MAX_LOAD_S
    pipe = m.model
    assert isinstance(pipe, StableDiffusionPipeline) and m.kind == "pipeline"
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.dtype == torch.float32

    out = pipe([m.preprocess(d) for d in GEN_DIGITS], num_inference_steps=GEN_STEPS, guidance_scale=GEN_GUIDANCE,
               generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert out.shape == (len(GEN_DIGITS), 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    judge = zoo.load("mnist-cnn3")
    with torch.no_grad():
        pred = judge.model(judge.preprocess(mini_sd.images_to_digits(out))).argmax(-1)
    correct = int((pred == torch.tensor(GEN_DIGITS)).sum())
    assert correct >= MIN_GEN_CORRECT, f"classifier read {pred.tolist()} for prompted digits {list(GEN_DIGITS)}"
