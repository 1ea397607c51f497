"""SVDQuant against plain round-to-nearest on a denoiser with outliers: a tiny PixArt transformer whose linears
get a few input columns scaled x20 (weight outliers) and whose adaLN scales blow a few hidden-state channels up
x20 (activation outliers, the case smoothing exists for). The presets are used as shipped (full smoothing grid,
low-rank refinement), through the PixArt architecture rule, calibrated on two batches of denoiser inputs and
measured on a held-out batch against the float denoiser."""

from __future__ import annotations

import copy

import pytest
import tiny_pipelines as tp
import torch

import vqsuite
from vqsuite.pipelines.rules import denoiser_config

#: outlier columns / channels and their scale
N_OUTLIERS, OUTLIER_SCALE = 4, 20.0


def _inputs(seed: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 16, 64, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


@pytest.fixture(scope="module")
def outlier_pixart() -> torch.nn.Module:
    model = tp.pixart_transformer(128, num_layers=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, lin in model.named_modules():
            if isinstance(lin, torch.nn.Linear) and lin.in_features >= 64:
                cols = torch.randperm(lin.in_features, generator=g)[:N_OUTLIERS]
                lin.weight[:, cols] *= OUTLIER_SCALE
        for block in model.transformer_blocks:
            # rows 1 and 4 are scale_msa and scale_mlp: norm(x) * (1 + scale) feeds attn1 q/k/v and ff.net.0
            cols = torch.randperm(block.scale_shift_table.shape[1], generator=g)[:N_OUTLIERS]
            block.scale_shift_table[1, cols] += OUTLIER_SCALE - 1
            block.scale_shift_table[4, cols] += OUTLIER_SCALE - 1
    return model


def _sqnr_db(model: torch.nn.Module, preset: str, base: torch.nn.Module) -> float:
    calib = [_inputs(s) for s in range(2)]
    x = _inputs(100)
    with torch.no_grad():
        ref = base(**x)[0]
    cfg = denoiser_config(model, preset)
    vqsuite.quantize_model(model, cfg, calib_data=calib if cfg.method == "svdquant" else None)
    with torch.no_grad():
        out = model(**x)[0]
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


@pytest.mark.parametrize("svdquant,rtn", [("svdquant-int4", "w4a4"), ("svdquant-nvfp4", "nvfp4")])
def test_svdquant_beats_rtn_with_outliers(outlier_pixart: torch.nn.Module, svdquant: str, rtn: str) -> None:
    ours = _sqnr_db(copy.deepcopy(outlier_pixart), svdquant, outlier_pixart)
    base = _sqnr_db(copy.deepcopy(outlier_pixart), rtn, outlier_pixart)
    assert ours > base, f"denoiser output SQNR: {svdquant} {ours:.2f} dB vs {rtn} {base:.2f} dB"
    # not a coin flip: the smoothing + low-rank branch must recover a real margin on outliers this strong
    assert ours > base + 3.0, f"denoiser output SQNR: {svdquant} {ours:.2f} dB vs {rtn} {base:.2f} dB"
