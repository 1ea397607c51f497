"""Train a small style LoRA for the shipped ``mini-sd`` (thicker strokes: MNIST digits dilated by a 3x3 max filter)
and save it as a diffusers LoRA file, for :mod:`benchmarks.lora` (LoRA on quantized pipelines).

peft/diffusers conventions (diffusers' ``train_text_to_image_lora.py``): the UNet's attention projections
(``to_q, to_k, to_v, to_out.0``) get a rank-``--rank`` LoRA (``lora_alpha = rank``, gaussian init) through
``unet.add_adapter``; the VAE, the text encoder and the UNet's own weights stay frozen; the loss is mini-sd's own
(DDPM epsilon MSE on VAE latents, the caption table of ``scripts/train_mini_sd.py`` with 10 % empty captions). The
result is written with ``StableDiffusionPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors``), so
``pipe.load_lora_weights(out_dir)`` reads it like any LoRA file. Nothing large is committed: ``--out`` is a temp dir.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_mini_sd_lora.py --steps 500 --n-train 5000 --out /tmp/mini_sd_lora

Measured (2026-12-03, shared 2-core x86 machine, one thread, ``--steps 500 --n-train 5000``): 33 s encoding, 362 s
training (``train_lora.json``), 46,592 trainable parameters; the final loss EMA 0.060.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_mini_sd_lora")

#: the style: a 3x3 max filter on the 28x28 digit thickens every stroke by about one pixel on each side
DILATE_KERNEL = 3
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def dilated_digits(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` MNIST training digits, dilated, as float ``[n, 3, 32, 32]`` in [-1, 1], labels, and the
    thick flag (ink above the class median, after dilation: the caption table's "thick"/"thin")."""
    from vqsuite.zoo.datasets import mnist_train

    x, y = mnist_train()
    x, y = x[:n].float(), y[:n]
    x = F.max_pool2d(x, DILATE_KERNEL, stride=1, padding=DILATE_KERNEL // 2)
    ink = x.sum((1, 2, 3))
    med = torch.stack([ink[y == d].median() for d in range(10)])
    thick = ink > med[y]
    x = F.pad(x / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0).expand(-1, 3, -1, -1).contiguous()
    return x, y, thick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--out", type=Path, default=Path("/tmp/mini_sd_lora"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from train_mini_sd import SCHED, noisy_batch  # scripts/ is on sys.path when this file runs

    import vqsuite.zoo as zoo
    from vqsuite.zoo.mini_sd import TEMPLATES, caption

    torch.manual_seed(a.seed)
    pipe = zoo.load("mini-sd").model
    vae, text, tok, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    for m in (vae, text, unet):
        m.requires_grad_(False)
    x, y, thick = dilated_digits(a.n_train)
    t0 = time.perf_counter()
    with torch.no_grad():
        enc = [vae.encode(x[i : i + 1000]).latent_dist for i in range(0, x.shape[0], 1000)]
        mean, std = torch.cat([d.mean for d in enc]), torch.cat([d.std for d in enc])
        table = [""] + [caption(d, t, s) for d in range(10) for t in range(len(TEMPLATES)) for s in (False, True)]
        ids = tok(table, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        cond_table = text(ids)[0]  # the text encoder is frozen: every caption's embedding once
    encode_s = time.perf_counter() - t0
    logger.info("encoded %d dilated digits and %d captions in %.0fs", x.shape[0], len(table), encode_s)

    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES))  # fmt: skip
    params = [q for q in unet.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHED.items() if k != "set_alpha_to_one"})
    acp = noise_sched.alphas_cumprod
    sf = vae.config.scaling_factor
    g = torch.Generator().manual_seed(a.seed)
    unet.train()
    t0, ema = time.perf_counter(), None
    for step in range(1, a.steps + 1):
        zt, t, eps, cap = noisy_batch(g, mean, std, y, thick, sf, acp, a.batch, len(TEMPLATES))
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond_table[cap]).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % a.log_every == 0 or step == a.steps:
            logger.info("step %d/%d loss %.4f ema %.4f %.0fs", step, a.steps, loss.item(), ema,
                        time.perf_counter() - t0)  # fmt: skip
    wall = time.perf_counter() - t0
    unet.eval()
    a.out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(a.out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)  # fmt: skip
    rec = {"style": f"MNIST digits dilated by a {DILATE_KERNEL}x{DILATE_KERNEL} max filter", "steps": a.steps,
           "batch": a.batch, "rank": a.rank, "lora_alpha": a.rank, "lr": a.lr, "target_modules": TARGET_MODULES,
           "n_train": int(x.shape[0]), "seed": a.seed, "encode_s": round(encode_s, 1), "train_s": round(wall, 1),
           "final_loss_ema": round(ema, 4), "threads": torch.get_num_threads(),
           "trainable_params": sum(q.numel() for q in params)}  # fmt: skip
    (a.out / "train_lora.json").write_text(json.dumps(rec, indent=1) + "\n")
    logger.info("saved %s: %s", a.out, rec)


if __name__ == "__main__":
    main()
