"""``kept_layers_config``: the layers an architecture rule keeps 16-bit get INT8 weights (first/last in groups)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import sd15  # noqa: E402

import vqsuite  # noqa: E402
from vqsuite.nn import QuantLayer  # noqa: E402
from vqsuite.pipelines.rules import KEPT_IO_GROUP, denoiser_config, kept_layers_config  # noqa: E402

#: the tiny random UNet's output, every layer INT8 (first/last in groups of 4), vs float: measured 40.3 dB
#: (44.1 dB when the rule keeps its layers float)
MIN_SQNR_DB = 25.0


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def test_kept_layers_get_int8_and_first_last_groups() -> None:
    unet = sd15(width=32).unet
    plain = denoiser_config(unet, "w8a16")
    kept = [n for n, m in unet.named_modules() if hasattr(m, "weight") and n and plain.spec_for(n) is None]
    assert "conv_in" in kept and "conv_out" in kept and any("time_embedding" in n for n in kept)
    cfg = denoiser_config(unet, kept_layers_config(unet, "w8a16"))
    for n in kept:
        spec = cfg.spec_for(n)
        if unet.get_submodule(n).weight.ndim < 2:  # norms: never quantized
            continue
        assert spec is not None and spec.weight == "int8" and spec.act is None, n
        want = KEPT_IO_GROUP if n in ("conv_in", "conv_out") else None
        assert spec.weight_group_size == want, n
    # the layers the rule quantizes keep the preset's own recipe
    assert cfg.spec_for("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == plain.default


def test_kept_layers_quantized_smaller_and_close() -> None:
    unet = sd15(width=32).unet
    torch.manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 8, 64)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    base = vqsuite.quantize_model(copy.deepcopy(unet), denoiser_config(unet, "w8a16"))
    full = vqsuite.quantize_model(copy.deepcopy(unet), denoiser_config(unet, kept_layers_config(unet, "w8a16")))
    assert vqsuite.module_nbytes(full) < vqsuite.module_nbytes(base)
    n_q = [sum(isinstance(m, QuantLayer) for m in q.modules()) for q in (base, full)]
    assert n_q[1] > n_q[0]
    with torch.no_grad():
        out = full(x, t, encoder_hidden_states=ctx).sample
    assert _sqnr(ref, out) >= MIN_SQNR_DB
