"""Run by test_evals_distributed.py under ``accelerate launch --cpu --num_processes 2`` (and in-process): features of
fixed images and samples of a tiny DDPM, sharded over the processes and gathered; the main process saves them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "diffusers"))


def compute(accelerator) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from evals_helpers import TinyExtractor, tiny_classifier

    from vqsuite.evals.accuracy import collect_logits
    from vqsuite.evals.fid import extract_features
    from vqsuite.evals.fidelity import sample_pipeline

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 16, 16), generator=g, dtype=torch.uint8)
    feats = extract_features(images, TinyExtractor(), batch_size=2, accelerator=accelerator, progress=False)
    logits = collect_logits(tiny_classifier(), images, batch_size=2, accelerator=accelerator, progress=False)
    import tiny_pipelines

    pipe = tiny_pipelines.ddpm(32)
    pipe.set_progress_bar_config(disable=True)
    samples = sample_pipeline(
        pipe, range(3), num_inference_steps=2, batch_size=1, accelerator=accelerator, progress=False
    )
    return {"features": feats, "logits": logits, "samples": samples}


def sweep_spec():  # noqa: ANN201
    """A small sweep: a classifier (agreement) and a generator (PSNR/SSIM, FID vs FP with the tiny extractor)."""
    from evals_helpers import TinyExtractor, TinyGen, gen_sample, tiny_classifier

    from vqsuite.evals.sweep import ConfigSpec, GeneratorTarget, ModelSpec, SweepSpec

    return SweepSpec(
        models=[
            ModelSpec("cls", tiny_classifier, data={"random": 5, "size": 8}, key="cls", metrics=["agreement"]),
            ModelSpec(
                "gen",
                lambda: GeneratorTarget(TinyGen().eval(), gen_sample),
                key="gen",
                num_samples=5,
                metrics=["fidelity", "fid-vs-fp"],
            ),
        ],
        configs=[ConfigSpec("w4a4")],
        extractor=TinyExtractor(),
        batch_size=2,
        name="dist",
    )


def main(out: str) -> None:
    from vqsuite.evals.distributed import get_accelerator, is_main_process

    acc = get_accelerator(cpu=True)
    assert acc is not None and acc.num_processes == 2, f"expected 2 processes, got {acc}"
    res = compute(acc)
    from vqsuite.evals.sweep import run_sweep

    run_sweep(sweep_spec(), out + ".sweep", accelerator=acc, progress=False, stop_on_error=True)
    if is_main_process(acc):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in res.items()}, out)
        Path(out + ".ranks").write_text(str(acc.num_processes))
    acc.wait_for_everyone()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vqsuite.kernels

    # the in-process half of the comparison runs under tests/conftest.py's reference pin: the workers must too
    with vqsuite.kernels.prefer("reference"):
        main(sys.argv[1])
