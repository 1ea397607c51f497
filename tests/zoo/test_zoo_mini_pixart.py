"""The trained ``mini-pixart`` (a genuine diffusers ``PixArtAlphaPipeline``): offline load, components, shipped
size, the shared VAE, the offline T5 tokenizer, prompt alignment judged by the shipped ``mnist-cnn3``, and W8A8
quantization through :func:`vqsuite.quantize_pipeline`."""

from __future__ import annotations

import os
import time

import pytest
import torch

import vqsuite.zoo as zoo
from vqsuite.zoo import mini_pixart, mini_sd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: the issue's bound on the shipped folder (the VAE is mini-sd's, not stored again)
MAX_FOLDER_BYTES = 5 * 2**20
#: one image per digit at 4 DDIM steps must be read as prompted for at least this many of the ten (measured on the
#: shipped weights: 10/10 at 4 steps, 9/10 at 2; 100 % of 500 at 20 steps)
GEN_DIGITS = tuple(range(10))
MIN_GEN_CORRECT = 8
GEN_STEPS = 4
GEN_GUIDANCE = 4.0
#: loading the pipeline offline must take seconds, not a hub timeout
MAX_LOAD_S = 30.0
#: W8A8 images vs FP images of the same seeds, 4 steps (measured 42.2 dB on the shipped weights)
MIN_W8A8_PSNR_DB = 30.0

pytestmark = pytest.mark.skipif(
    "mini-pixart" not in zoo.list(), reason="mini-pixart weights (vqsuite/zoo/weights/mini-pixart) not present"
)


@pytest.fixture(scope="module")
def loaded() -> zoo.ZooModel:
    t0 = time.perf_counter()
    m = zoo.load("mini-pixart")
    m.meta["load_s"] = time.perf_counter() - t0
    return m


def _generate(pipe, digits: tuple[int, ...], steps: int = GEN_STEPS) -> torch.Tensor:  # noqa: ANN001
    prompts = [mini_pixart.prompt(d) for d in digits]
    gen = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=steps, guidance_scale=GEN_GUIDANCE, output_type="pt", **mini_pixart.CALL_KWARGS)
    return pipe(prompts, generator=gen, **kw).images


def test_mini_pixart_record_size_and_shared_vae() -> None:
    rec = mini_pixart.train_record()
    assert rec["transformer"]["steps"] > 0 and rec["transformer"]["wall_s"] > 0 and rec["caption_dropout"] == 0.1
    assert rec["vae"]["from"] == "mini-sd/vae" and rec["vae"]["sha256"] == mini_pixart.vae_sha256()
    files = [f for f in mini_pixart.WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert 0 < sum(f.stat().st_size for f in files) <= MAX_FOLDER_BYTES
    assert not (mini_pixart.WEIGHTS_DIR / "vae").exists()  # shared with mini-sd, not duplicated


def test_caption_tokenizer_one_token_per_word_and_eos() -> None:
    tok = mini_pixart.caption_tokenizer()
    assert tok.convert_ids_to_tokens(tok(mini_pixart.prompt(7)).input_ids) == [
        "\u2581a", "\u2581photo", "\u2581of", "\u2581the", "\u2581digit", "\u2581seven", "</s>",
    ]  # fmt: skip
    assert tok.convert_ids_to_tokens(tok(mini_sd.caption(3, 2, True)).input_ids) == [
        "\u2581the", "\u2581number", "\u2581three", ",", "\u2581thick", "\u2581strokes", "</s>",
    ]  # fmt: skip
    assert tok("").input_ids == [tok.eos_token_id]
    assert tok.unk_token_id not in tok("zebra 42").input_ids  # unseen words still tokenize, letter by letter


def test_mini_pixart_is_a_genuine_pixart_pipeline_and_draws_the_prompted_digit(loaded: zoo.ZooModel) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

    assert loaded.meta["load_s"] < MAX_LOAD_S and loaded.kind == "pipeline"
    pipe = loaded.model
    assert type(pipe) is PixArtAlphaPipeline
    assert isinstance(pipe.transformer, PixArtTransformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, T5EncoderModel) and isinstance(pipe.tokenizer, T5Tokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.transformer.config
    assert cfg.caption_channels == pipe.text_encoder.config.d_model and cfg.norm_type == "ada_norm_single"
    assert cfg.sample_size * pipe.vae_scale_factor == 32 and pipe.transformer.dtype == torch.float32
    assert loaded.meta["call_kwargs"] == mini_pixart.CALL_KWARGS

    out = _generate(pipe, GEN_DIGITS)
    assert out.shape == (len(GEN_DIGITS), 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    judge = zoo.load("mnist-cnn3")
    with torch.no_grad():
        pred = judge.model(judge.preprocess(mini_pixart.images_to_digits(out))).argmax(-1)
    correct = int((pred == torch.tensor(GEN_DIGITS)).sum())
    assert correct >= MIN_GEN_CORRECT, f"classifier read {pred.tolist()} for prompted digits {list(GEN_DIGITS)}"


def test_quantize_pipeline_w8a8_runs_on_mini_pixart() -> None:
    import vqsuite
    from vqsuite.evals.fidelity import paired_metrics

    pipe = zoo.load("mini-pixart").model  # a fresh copy: quantize_pipeline works in place
    digits = (0, 7)
    ref = _generate(pipe, digits)
    vqsuite.quantize_pipeline(pipe, "w8a8", **mini_pixart.CALL_KWARGS)
    assert sum(r.status == "quantized" for r in pipe.vqsuite_report.rows) > 0
    out = _generate(pipe, digits)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert paired_metrics(ref, out)["psnr"] >= MIN_W8A8_PSNR_DB
